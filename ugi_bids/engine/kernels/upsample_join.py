"""One step of the tallUNet2 up path after its transposed convolution, as one compiled pass:

    cat([(y + upsample2(r))[:, :, :s0, :s1, :s2], skip], 1)

``y`` is the transposed convolution's output (1, C, 2 m0, 2 m1, 2 m2), ``r`` the coarse tensor
(1, C, m0, m1, m2) that the U-Net upsamples (``F.interpolate(scale_factor=2, mode="trilinear",
align_corners=False)``) and adds, and ``skip`` the down path's tensor (1, K, s0, s1, s2) that
crops the sum and is concatenated after it. In PyTorch these are five passes over
full-resolution memory (upsample, add, crop copy, cat, and zero-filled gradients for the crop in
the backward); at 175^3 they cost about 2 s of a U-Net's 4.5 s forward. Here the forward is one
pass that writes the concatenation, and the backward two (the padded gradient of ``y``, and the
upsampling's adjoint gathered per coarse voxel).

The upsampling weights are PyTorch's (half-pixel source index clamped at 0, upper neighbour
clamped at the last voxel), so results equal the PyTorch composition up to float32 rounding.
All tensors are channels-last (``torch.channels_last_3d``), CPU, float32 (see
:func:`supported`); elsewhere :func:`upsample_add_join` composes the PyTorch operations.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import njit, numba, prange
from .dispatch import kernels_apply
from .lattice import match_threads

if numba is not None:
    @njit(parallel=True, cache=True, nogil=True)
    def _forward_kernel(y, r, skip, out, lo, hi, w_lo, w_hi):  # pragma: no cover - compiled
        s0, s1, s2, channels = skip.shape[0], skip.shape[1], skip.shape[2], y.shape[3]
        extra = skip.shape[3]
        for a in prange(s0):
            a0, a1, wa0, wa1 = lo[0, a], hi[0, a], w_lo[0, a], w_hi[0, a]
            for b in range(s1):
                b0, b1, wb0, wb1 = lo[1, b], hi[1, b], w_lo[1, b], w_hi[1, b]
                for d in range(s2):
                    d0, d1, wd0, wd1 = lo[2, d], hi[2, d], w_lo[2, d], w_hi[2, d]
                    for c in range(channels):
                        up = (wa0 * (wb0 * (wd0 * r[a0, b0, d0, c] + wd1 * r[a0, b0, d1, c])
                                     + wb1 * (wd0 * r[a0, b1, d0, c] + wd1 * r[a0, b1, d1, c]))
                              + wa1 * (wb0 * (wd0 * r[a1, b0, d0, c] + wd1 * r[a1, b0, d1, c])
                                       + wb1 * (wd0 * r[a1, b1, d0, c]
                                                + wd1 * r[a1, b1, d1, c])))
                        out[a, b, d, c] = y[a, b, d, c] + up
                    for c in range(extra):
                        out[a, b, d, channels + c] = skip[a, b, d, c]

    @njit(parallel=True, cache=True, nogil=True)
    def _grad_y_kernel(grad, grad_y):  # pragma: no cover - compiled
        """``grad_y`` (2 m0, 2 m1, 2 m2, C) = the first C channels of ``grad`` (s0, s1, s2, .),
        zero beyond the crop."""
        n0, n1, n2, channels = grad_y.shape
        s0, s1, s2 = grad.shape[0], grad.shape[1], grad.shape[2]
        for a in prange(n0):
            for b in range(n1):
                for d in range(n2):
                    inside = a < s0 and b < s1 and d < s2
                    for c in range(channels):
                        grad_y[a, b, d, c] = grad[a, b, d, c] if inside else np.float32(0.0)

    @njit(parallel=True, cache=True, nogil=True)
    def _grad_r_kernel(grad, grad_r, fine, weight):  # pragma: no cover - compiled
        """The upsampling's adjoint: each coarse voxel gathers the (cropped) fine gradients
        that read it, ``fine``/``weight`` (3, m, 4) listing per axis which fine indices read a
        coarse index and with what weight (weight 0 pads the list)."""
        m0, m1, m2, channels = grad_r.shape
        acc = np.zeros((m0, channels), dtype=np.float32)
        for a in prange(m0):
            for b in range(m1):
                for d in range(m2):
                    for c in range(channels):
                        acc[a, c] = np.float32(0.0)
                    for ia in range(4):
                        wa = weight[0, a, ia]
                        if wa == 0.0:
                            continue
                        fa = fine[0, a, ia]
                        for ib in range(4):
                            wb = weight[1, b, ib]
                            if wb == 0.0:
                                continue
                            fb = fine[1, b, ib]
                            for id_ in range(4):
                                wd = weight[2, d, id_]
                                if wd == 0.0:
                                    continue
                                w = wa * wb * wd
                                fd = fine[2, d, id_]
                                for c in range(channels):
                                    acc[a, c] += w * grad[fa, fb, fd, c]
                    for c in range(channels):
                        grad_r[a, b, d, c] = acc[a, c]


def _axis_weights(coarse: int, fine: int) -> tuple[np.ndarray, ...]:
    """Per fine index < ``fine``: PyTorch's lower/upper source index and weights for a x2
    linear upsampling (align_corners=False) of ``coarse`` samples."""
    out = np.arange(fine, dtype=np.float32)
    source = np.maximum(np.float32(0.5) * (out + np.float32(0.5)) - np.float32(0.5), 0)
    lower = np.floor(source).astype(np.int64)
    w_hi = np.clip(source - lower, 0, 1).astype(np.float32)
    upper = lower + (lower < coarse - 1)
    return lower, upper, np.float32(1) - w_hi, w_hi


def _tables(coarse_shape, fine_shape):
    """Forward tables (3, s) and adjoint tables (3, m, 4) of the three axes (padded to the
    longest axis)."""
    longest_fine, longest_coarse = max(fine_shape), max(coarse_shape)
    lo = np.zeros((3, longest_fine), np.int64)
    hi = np.zeros((3, longest_fine), np.int64)
    w_lo = np.zeros((3, longest_fine), np.float32)
    w_hi = np.zeros((3, longest_fine), np.float32)
    fine_of = np.zeros((3, longest_coarse, 4), np.int64)
    weight_of = np.zeros((3, longest_coarse, 4), np.float32)
    for axis, (m, s) in enumerate(zip(coarse_shape, fine_shape)):
        lower, upper, wl, wh = _axis_weights(m, s)
        lo[axis, :s], hi[axis, :s], w_lo[axis, :s], w_hi[axis, :s] = lower, upper, wl, wh
        filled = np.zeros(m, np.int64)
        for f in range(s):
            for index, w in ((lower[f], wl[f]), (upper[f], wh[f])):
                if w != 0:
                    slot = filled[index]
                    fine_of[axis, index, slot], weight_of[axis, index, slot] = f, w
                    filled[index] += 1
    return (lo, hi, w_lo, w_hi), (fine_of, weight_of)


def _cl(t: torch.Tensor) -> np.ndarray:
    """(1, C, *S) channels-last tensor -> (*S, C) numpy view."""
    return t.permute(0, 2, 3, 4, 1)[0].numpy()


def supported(y: torch.Tensor, r: torch.Tensor, skip: torch.Tensor) -> bool:
    """Whether the compiled pass applies: CPU float32 single tensors, ``y`` twice ``r``."""
    tensors = (y, r, skip)
    return (kernels_apply(*tensors) and all(t.dim() == 5 and t.shape[0] == 1 for t in tensors)
            and y.shape[1] == r.shape[1]
            and all(y.shape[2 + a] == 2 * r.shape[2 + a] >= skip.shape[2 + a] for a in range(3)))


class _UpsampleAddJoin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, r, skip):  # noqa: D102 - see upsample_add_join()
        cl = torch.channels_last_3d
        y, r, skip = (t.contiguous(memory_format=cl) for t in (y, r, skip))
        channels, extra = y.shape[1], skip.shape[1]
        forward_tables, adjoint_tables = _tables(r.shape[2:], skip.shape[2:])
        out = torch.empty((1, channels + extra, *skip.shape[2:]), dtype=torch.float32,
                          memory_format=cl)
        _forward_kernel(_cl(y), _cl(r), _cl(skip), _cl(out), *forward_tables)
        ctx.adjoint_tables = adjoint_tables
        ctx.shapes = (y.shape, r.shape)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 - see upsample_add_join()
        cl = torch.channels_last_3d
        y_shape, r_shape = ctx.shapes
        channels = y_shape[1]
        grad = grad.contiguous(memory_format=cl)
        grad_y = grad_r = grad_skip = None
        if ctx.needs_input_grad[0]:
            grad_y = torch.empty(y_shape, dtype=torch.float32, memory_format=cl)
            _grad_y_kernel(_cl(grad), _cl(grad_y))
        if ctx.needs_input_grad[1]:
            grad_r = torch.empty(r_shape, dtype=torch.float32, memory_format=cl)
            _grad_r_kernel(_cl(grad), _cl(grad_r), *ctx.adjoint_tables)
        if ctx.needs_input_grad[2]:
            grad_skip = grad[:, channels:]
        return grad_y, grad_r, grad_skip


def upsample_add_join(y: torch.Tensor, r: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``cat([(y + interpolate(r, scale_factor=2, trilinear))[..., :s0, :s1, :s2], skip], 1)``
    (module notes), differentiable in all three inputs; channels-last output."""
    if not supported(y, r, skip):
        up = F.interpolate(r, scale_factor=2, mode="trilinear", align_corners=False)
        x = (y + up)[:, :, :skip.shape[2], :skip.shape[3], :skip.shape[4]]
        return torch.cat([x, skip], 1)
    match_threads()
    return _UpsampleAddJoin.apply(y, r, skip)
