"""A 3x3x3 convolution (stride 1, zero padding 1) with few output channels whose weight gradient
is computed as one matrix product per slab: the U-Net's last layer (18 -> 3 channels).

oneDNN computes that weight gradient at about 6 GFLOP/s on the CPU (2.4 s per 175^3 U-Net,
the largest single entry of an instance-optimisation step), because it vectorises over the
three output channels. The gradient is

    dW[o, c, t] = sum_p g[o, p] x[c, p + t]        (t one of the 27 taps)

so with the 27 shifted copies of ``g`` laid side by side for a few planes at a time (27 x 3
columns per voxel), it is ``x_slab^T @ columns`` (18 x 81), a well-shaped GEMM: 0.8 s. The
forward and the input gradient stay with oneDNN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import njit, numba, prange
from .dispatch import kernels_apply
from .lattice import match_threads

#: Lattice planes per GEMM (the columns of 4 planes at 175^2 are 40 MB).
SLAB_PLANES = 4

if numba is not None:
    @njit(parallel=True, cache=True, nogil=True)
    def _columns_kernel(padded, first, columns):  # pragma: no cover - compiled
        """``columns[a, b, d, t, o]`` = g[o] at voxel (first + a, b, d) minus tap t's offset,
        read from ``padded`` (g zero-padded by one voxel, channels-last)."""
        planes, n1, n2, _, outputs = columns.shape
        for a in prange(planes):
            for b in range(n1):
                for d in range(n2):
                    tap = 0
                    for da in range(3):
                        for db in range(3):
                            for dd in range(3):
                                for o in range(outputs):
                                    columns[a, b, d, tap, o] = padded[first + a + 2 - da,
                                                                      b + 2 - db,
                                                                      d + 2 - dd, o]
                                tap += 1


def weight_gradient(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d loss / d W of ``conv3d(x, W, padding=1)`` (3x3x3) given ``grad`` = d loss / d output:
    x (1, C, *S), grad (1, O, *S) -> (O, C, 3, 3, 3), float32, CPU."""
    channels, outputs = x.shape[1], grad.shape[1]
    n0, n1, n2 = x.shape[2:]
    rows = x.permute(0, 2, 3, 4, 1)[0]  # (n0, n1, n2, C), a view for channels-last x
    padded = F.pad(grad, (1,) * 6).permute(0, 2, 3, 4, 1)[0].contiguous()
    total = torch.zeros(channels, 27 * outputs, dtype=torch.float32)
    columns = torch.empty(min(SLAB_PLANES, n0), n1, n2, 27, outputs, dtype=torch.float32)
    match_threads()
    for first in range(0, n0, SLAB_PLANES):
        planes = min(SLAB_PLANES, n0 - first)
        slab = columns[:planes]
        _columns_kernel(padded.numpy(), first, slab.numpy())
        total.addmm_(rows[first:first + planes].reshape(-1, channels).T,
                     slab.reshape(-1, 27 * outputs))
    return total.reshape(channels, 27, outputs).permute(2, 0, 1).reshape(outputs, channels,
                                                                           3, 3, 3)


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """CPU float32, one volume, a 3x3x3 kernel."""
    return (kernels_apply(x, weight) and x.dim() == 5 and x.shape[0] == 1
            and tuple(weight.shape[2:]) == (3, 3, 3))


class _NarrowConv3d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):  # noqa: D102 - see conv3d()
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv3d(x, weight, bias, padding=1)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 - see conv3d()
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_weight = weight_gradient(x, grad)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3, 4))
        return grad_x, grad_weight, grad_bias


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, padding=1)`` for a 3x3x3 kernel; on the CPU in float32 its
    weight gradient is the slab GEMM of the module notes (same gradient up to float32
    summation order)."""
    if not supported(x, weight):
        return F.conv3d(x, weight, bias, padding=1)
    return _NarrowConv3d.apply(x, weight, bias)
