"""Trilinear sampling on the CPU for inference: map composition and image warping.

PyTorch's 3-D ``grid_sample`` runs on one thread on the CPU and costs about 0.5 s per 175^3
lattice, and a cascade pass needs nine of them per direction. These kernels compute the same
quantities (``align_corners=True``, border clamping) with all threads and float64 arithmetic
inside, so they are closer to the exact value than ``grid_sample`` itself (about 1e-5 voxel vs
1e-4 on white-noise fields).

Coordinates are normalised lattice coordinates as in :mod:`ugi_bids.engine.model.network`: a
point is an (a0, a1, a2) triple, ``a_k`` in [0, 1] along tensor axis k (grid spacing 1 / (n_k - 1)), held
channels-last: (..., 3) float32. Tables are channels-last too: (n0, n1, n2, C).

On other devices (CUDA) the same functions fall back to ``grid_sample``, which is fast there.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .dispatch import kernels_apply
from .lattice import _chain_kernel, match_threads


def _grid_sample(table: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Reference path: (n0, n1, n2, C) table at (..., 3) points -> (..., C)."""
    grid = (points * 2.0 - 1.0).flip(-1).reshape(1, -1, 1, 1, 3)
    image = table.permute(3, 0, 1, 2)[None]
    sampled = F.grid_sample(image, grid.to(table.dtype), mode="bilinear", padding_mode="border",
                            align_corners=True)
    return sampled.reshape(table.shape[3], -1).T.reshape(*points.shape[:-1], table.shape[3])


def _compose(points: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """``points + u(points)`` through ``grid_sample`` (the fallback of :func:`chain`)."""
    return points + _grid_sample(displacement, points)


def identity_points(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """The identity lattice of ``shape`` channels-last: (n0, n1, n2, 3), values i / (n - 1)
    (the same numbers as :func:`ugi_bids.engine.model.network.identity_grid`)."""
    axes = [torch.arange(n, device=device, dtype=dtype) / (n - 1) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def chain(shape, start: torch.Tensor | None, displacements: list[torch.Tensor],
          image: torch.Tensor | None = None) -> torch.Tensor:
    """Maps applied in turn to the identity lattice of ``shape``, optionally ending in an image
    read.

    Starting from the lattice point ``x`` (normalised), ``x += start[x]`` when ``start`` is given
    (a displacement on this very lattice, added without interpolation), then
    ``x += u(x)`` for each ``u`` in ``displacements`` (channels-last (n0, n1, n2, 3), read
    trilinearly, border-clamped), in order. Returns the points (*shape, 3), or ``image``
    ((m0, m1, m2), border-clamped) read at them, (*shape): one pass without intermediate
    arrays on the CPU, successive ``grid_sample`` calls elsewhere.
    """
    tensors = [t for t in (start, image, *displacements) if t is not None]
    if len(displacements) > 3 or not kernels_apply(*tensors):
        points = identity_points(shape, tensors[0].device, tensors[0].dtype)
        if start is not None:
            points = points + start
        for displacement in displacements:
            points = _compose(points, displacement)
        return points if image is None else _grid_sample(image[..., None], points)[..., 0]
    dummy = np.zeros((1, 1, 1, 3), dtype=np.float32)
    tables = [d.contiguous().numpy() for d in displacements] + [dummy] * (3 - len(displacements))
    out = torch.empty((*shape, 1 if image is not None else 3), dtype=torch.float32)
    match_threads()
    _chain_kernel(dummy if start is None else start.contiguous().numpy(), start is not None,
                  *tables, len(displacements),
                  dummy[..., :1] if image is None else image.contiguous()[..., None].numpy(),
                  image is not None, out.numpy())
    return out if image is None else out[..., 0]
