"""Differentiable trilinear sampling on the CPU: ``grid_sample`` (``align_corners=True``) with
compiled, multi-threaded forward and backward kernels.

Instance optimisation samples the cascade's displacement fields and images about 56 times per
step and backpropagates through every sample. PyTorch's 3-D ``grid_sample`` runs on the CPU in
one thread per batch entry, and its backward scatters into a zero-filled gradient per entry: at
175^3 the samples were 27 s of a 145 s step. These kernels compute the same numbers with all
threads.

They follow ATen's ``grid_sampler_3d`` formula for formula, in float32: the source index
``((2 c - 1 + 1) / 2) (n - 1)`` of a normalised coordinate ``c``, ``border`` clamping with a zero
coordinate gradient on and beyond the border, the eight corner weights multiplied in the same
order, and out-of-lattice corners skipped. Only the order of the per-thread sums in the image
gradient differs.

Layouts, as in :mod:`ugi_bids.engine.model.network`: ``image`` (1, C, *S) and ``coords`` (1, 3, *T),
channel ``a`` of ``coords`` being the normalised coordinate along tensor axis ``a`` of ``image``
(0 at the first voxel, 1 at the last). The result is (1, C, *T).
"""

from __future__ import annotations

import numpy as np
import torch

from . import njit, numba, prange
from .dispatch import kernels_apply
from .lattice import match_threads

#: Most thread-private image-gradient buffers (each the size of the sampled image).
MAX_GRADIENT_BUFFERS = 8

if numba is not None:
    _F32 = np.float32

    @njit(nogil=True, inline="always")
    def _source_index(coord, size, border):  # pragma: no cover - compiled
        """ATen's unnormalise (align_corners) of ``2 coord - 1``, clamped for ``border``;
        returns (index, d index / d coord) in float32."""
        g = coord * _F32(2.0) - _F32(1.0)
        index = ((g + _F32(1.0)) / _F32(2.0)) * _F32(size - 1)
        slope = _F32(size - 1)  # ATen's (n - 1) / 2, times 2 for c -> 2 c - 1
        if border:
            if index <= _F32(0.0):
                return _F32(0.0), _F32(0.0)
            if index >= _F32(size - 1):
                return _F32(size - 1), _F32(0.0)
        return index, slope

    @njit(nogil=True, inline="always")
    def _axis(coord, size, border):  # pragma: no cover - compiled
        """Lower corner, its weight, the upper corner's weight, d index / d coord, and whether
        the lower / upper corners lie on the lattice (ATen skips those that do not)."""
        index, slope = _source_index(coord, size, border)
        lower = np.floor(index)
        low = int(lower)
        return (low, lower + _F32(1.0) - index, index - lower, slope,
                0 <= low < size, 0 <= low + 1 < size)

    @njit(nogil=True, inline="always")
    def _at(image, c, k, j, i, inside):  # pragma: no cover - compiled
        return image[c, k, j, i] if inside else _F32(0.0)

    @njit(parallel=True, cache=True, nogil=True)
    def _forward_kernel(image, coords, out, border):  # pragma: no cover - compiled
        channels, n0, n1, n2 = image.shape
        for p in prange(coords.shape[1]):
            k, z0, z1, _, kin0, kin1 = _axis(coords[0, p], n0, border)
            j, y0, y1, _, jin0, jin1 = _axis(coords[1, p], n1, border)
            i, x0, x1, _, iin0, iin1 = _axis(coords[2, p], n2, border)
            # ATen's corner order tnw, tne, tsw, tse, bnw, bne, bsw, bse; weights x * y * z.
            # A corner off the lattice adds an exact 0 where ATen skips it: the same sum.
            for c in range(channels):
                total = _at(image, c, k, j, i, kin0 and jin0 and iin0) * (x0 * y0 * z0)
                total += _at(image, c, k, j, i + 1, kin0 and jin0 and iin1) * (x1 * y0 * z0)
                total += _at(image, c, k, j + 1, i, kin0 and jin1 and iin0) * (x0 * y1 * z0)
                total += _at(image, c, k, j + 1, i + 1, kin0 and jin1 and iin1) * (x1 * y1 * z0)
                total += _at(image, c, k + 1, j, i, kin1 and jin0 and iin0) * (x0 * y0 * z1)
                total += _at(image, c, k + 1, j, i + 1, kin1 and jin0 and iin1) * (x1 * y0 * z1)
                total += _at(image, c, k + 1, j + 1, i, kin1 and jin1 and iin0) * (x0 * y1 * z1)
                total += _at(image, c, k + 1, j + 1, i + 1, kin1 and jin1 and iin1) * (x1 * y1 * z1)
                out[c, p] = total

    @njit(nogil=True, inline="always")
    def _corner_grad(image, grad_image, c, k, j, i, inside, g, wx, wy, wz, sx, sy, sz,
                     want_image):  # pragma: no cover - compiled
        """Scatter one corner's share of ``g`` and return its (x, y, z) index gradients."""
        if not inside:
            return _F32(0.0), _F32(0.0), _F32(0.0)
        if want_image:
            grad_image[c, k, j, i] += wx * wy * wz * g
        v = image[c, k, j, i]
        return sx * v * wy * wz * g, sy * v * wx * wz * g, sz * v * wx * wy * g

    @njit(parallel=True, cache=True, nogil=True)
    def _backward_kernel(image, coords, grad_out, border, grad_coords, grad_parts,
                         want_image, want_coords):  # pragma: no cover - compiled
        channels, n0, n1, n2 = image.shape
        count = coords.shape[1]
        chunks = grad_parts.shape[0]
        minus, plus = _F32(-1.0), _F32(1.0)
        for chunk in prange(chunks):
            gi = grad_parts[chunk]
            for p in range(chunk * count // chunks, (chunk + 1) * count // chunks):
                k, z0, z1, sz, kin0, kin1 = _axis(coords[0, p], n0, border)
                j, y0, y1, sy, jin0, jin1 = _axis(coords[1, p], n1, border)
                i, x0, x1, sx, iin0, iin1 = _axis(coords[2, p], n2, border)
                gx = _F32(0.0)
                gy = _F32(0.0)
                gz = _F32(0.0)
                for c in range(channels):  # channels outer, corners inner: ATen's order
                    g = grad_out[c, p]
                    a, b, d = _corner_grad(image, gi, c, k, j, i, kin0 and jin0 and iin0, g,
                                           x0, y0, z0, minus, minus, minus, want_image)
                    gx += a
                    gy += b
                    gz += d
                    a, b, d = _corner_grad(image, gi, c, k, j, i + 1, kin0 and jin0 and iin1,
                                           g, x1, y0, z0, plus, minus, minus, want_image)
                    gx += a
                    gy += b
                    gz += d
                    a, b, d = _corner_grad(image, gi, c, k, j + 1, i, kin0 and jin1 and iin0,
                                           g, x0, y1, z0, minus, plus, minus, want_image)
                    gx += a
                    gy += b
                    gz += d
                    a, b, d = _corner_grad(image, gi, c, k, j + 1, i + 1,
                                           kin0 and jin1 and iin1, g, x1, y1, z0, plus, plus,
                                           minus, want_image)
                    gx += a
                    gy += b
                    gz += d
                    a, b, d = _corner_grad(image, gi, c, k + 1, j, i, kin1 and jin0 and iin0,
                                           g, x0, y0, z1, minus, minus, plus, want_image)
                    gx += a
                    gy += b
                    gz += d
                    a, b, d = _corner_grad(image, gi, c, k + 1, j, i + 1,
                                           kin1 and jin0 and iin1, g, x1, y0, z1, plus, minus,
                                           plus, want_image)
                    gx += a
                    gy += b
                    gz += d
                    a, b, d = _corner_grad(image, gi, c, k + 1, j + 1, i,
                                           kin1 and jin1 and iin0, g, x0, y1, z1, minus, plus,
                                           plus, want_image)
                    gx += a
                    gy += b
                    gz += d
                    a, b, d = _corner_grad(image, gi, c, k + 1, j + 1, i + 1,
                                           kin1 and jin1 and iin1, g, x1, y1, z1, plus, plus,
                                           plus, want_image)
                    gx += a
                    gy += b
                    gz += d
                if want_coords:
                    grad_coords[0, p] = sz * gz
                    grad_coords[1, p] = sy * gy
                    grad_coords[2, p] = sx * gx

    @njit(parallel=True, cache=True, nogil=True)
    def _sum_parts(parts, out):  # pragma: no cover - compiled
        flat_parts = parts.reshape(parts.shape[0], -1)
        flat_out = out.reshape(-1)
        for q in prange(flat_out.shape[0]):
            total = flat_parts[0, q]
            for chunk in range(1, flat_parts.shape[0]):
                total += flat_parts[chunk, q]
            flat_out[q] = total


def supported(image: torch.Tensor, coords: torch.Tensor) -> bool:
    """Whether :func:`sample` handles these tensors (CPU, float32, one image and one set of
    points); otherwise use ``grid_sample``."""
    return (kernels_apply(image, coords) and image.dim() == 5 and coords.dim() == 5
            and image.shape[0] == 1 and coords.shape[0] == 1 and coords.shape[1] == 3)


class _TrilinearSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, coords, border):  # noqa: D102 - see sample()
        image_c = image[0].contiguous()
        coords_c = coords[0].reshape(3, -1).contiguous()
        out = torch.empty(image.shape[1], coords_c.shape[1], dtype=torch.float32)
        match_threads()
        _forward_kernel(image_c.numpy(), coords_c.numpy(), out.numpy(), border)
        ctx.save_for_backward(image_c, coords_c)
        ctx.border = border
        ctx.shapes = (image.shape, coords.shape)
        return out.reshape(1, image.shape[1], *coords.shape[2:])

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102 - see sample()
        image_c, coords_c = ctx.saved_tensors
        image_shape, coords_shape = ctx.shapes
        want_image, want_coords = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_flat = grad_out[0].reshape(image_shape[1], -1).contiguous()
        chunks = min(match_threads(), MAX_GRADIENT_BUFFERS) if want_image else 1
        grad_parts = torch.zeros((chunks, *image_c.shape) if want_image else (1, 1, 1, 1, 1),
                                 dtype=torch.float32)
        grad_coords = torch.empty_like(coords_c) if want_coords else torch.empty(3, 1)
        _backward_kernel(image_c.numpy(), coords_c.numpy(), grad_flat.numpy(), ctx.border,
                         grad_coords.numpy(), grad_parts.numpy(), want_image, want_coords)
        grad_image = None
        if want_image:
            if chunks == 1:
                grad_image = grad_parts[0]
            else:
                grad_image = torch.empty(image_c.shape, dtype=torch.float32)
                _sum_parts(grad_parts.numpy(), grad_image.numpy())
            grad_image = grad_image[None]
        return (grad_image, grad_coords.reshape(coords_shape) if want_coords else None, None)


def sample(image: torch.Tensor, coords: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Trilinear samples of ``image`` (1, C, *S) at normalised ``coords`` (1, 3, *T): (1, C, *T).

    The same numbers as ``F.grid_sample(image, (2 coords - 1).flip(1).permute(0, 2, 3, 4, 1),
    "bilinear", padding, align_corners=True)`` and the same gradients for both inputs, with
    ``padding`` "border" (clamp to the lattice) or "zeros" (0 beyond it). CPU and float32 only
    (see :func:`supported`).
    """
    if padding not in ("border", "zeros"):
        raise ValueError(f"padding must be 'border' or 'zeros', not {padding!r}")
    return _TrilinearSample.apply(image, coords, padding == "border")
