"""World-space transforms: an affine plus a dense displacement field, in RAS millimetres.

A :class:`WorldTransform` is always a *pull* map (``mode-image`` in NiPreps terms): it maps points
of the reference (target) space to points of the source space, so that resampling the source at
``T(x)`` for every reference voxel ``x`` puts the source onto the reference grid. This is the
direction ITK's ResampleImageFilter and ``antsApplyTransforms`` expect.

``T(x) = A (x + d(x))``: the displacement field ``d`` lives in the reference space and is applied
first, then the affine ``A`` (reference world -> source world). On disk (ITK/ANTs composite HDF5)
this is the transform queue ``[A, d]`` in LPS coordinates; ITK applies the back of the queue first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import Grid, apply_affine
from .sampling import sample_at_indices


@dataclass
class DisplacementField:
    """Displacement vectors sampled on a lattice.

    Attributes
    ----------
    grid : Grid
        Where the vectors are sampled (world RAS).
    vectors : ndarray, shape (i, j, k, 3), float32
        Displacement in RAS millimetres at each lattice point.

    Between lattice points the field is trilinear; within half a voxel outside the lattice it is
    clamped to the border value, and beyond that it is zero. This is exactly how ITK's
    DisplacementFieldTransform evaluates a field, so our maps and ITK's agree everywhere.
    """

    grid: Grid
    vectors: np.ndarray

    def __post_init__(self):
        self.vectors = np.asarray(self.vectors, dtype=np.float32)
        if self.vectors.shape != tuple(self.grid.shape) + (3,):
            raise ValueError(f"field vectors {self.vectors.shape} do not match grid {self.grid.shape}")

    def displacement_at(self, points: np.ndarray) -> np.ndarray:
        """Displacement (RAS mm) at world points (..., 3) RAS mm."""
        points = np.asarray(points, dtype=np.float64)
        flat = points.reshape(-1, 3)
        index = self.grid.world_to_index(flat)
        out = sample_trilinear(self.vectors, index, outside_half_voxel="zero")
        return out.reshape(points.shape)


@dataclass
class WorldTransform:
    """A pull map from reference-space points to source-space points, world RAS mm.

    ``map_points(x) = affine @ (x + field(x))``; ``field`` may be ``None`` (affine only).
    """

    affine: np.ndarray
    field: DisplacementField | None = None

    def __post_init__(self):
        self.affine = np.asarray(self.affine, dtype=np.float64)

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """Reference-space world points (..., 3) -> source-space world points (..., 3), RAS mm."""
        points = np.asarray(points, dtype=np.float64)
        if self.field is not None:
            points = points + self.field.displacement_at(points)
        return apply_affine(self.affine, points)


def sample_trilinear(volume: np.ndarray, index: np.ndarray, outside_half_voxel: str = "zero",
                     chunk: int = 4_000_000) -> np.ndarray:
    """Trilinear samples of ``volume`` (i, j, k[, C]) at continuous voxel indices (n, 3).

    Indices are clamped to the lattice; points further than half a voxel outside it get 0 when
    ``outside_half_voxel == "zero"`` (ITK's behaviour) or the clamped border value when
    ``"border"``. Returns (n,) or (n, C) float32.
    """
    vol = np.asarray(volume, dtype=np.float32)
    squeeze = vol.ndim == 3
    if squeeze:
        vol = vol[..., None]
    fast = sample_at_indices(vol, np.asarray(index, dtype=np.float64).reshape(-1, 3),
                             zero_outside=outside_half_voxel == "zero")
    if fast is not None:
        return fast[:, 0] if squeeze else fast
    shape = np.asarray(vol.shape[:3], dtype=np.float64)
    # grid_sample wants (N, C, D, H, W) with the last grid coordinate indexing W.
    vol_t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol, -1, 0)))[None]
    index = np.asarray(index, dtype=np.float64).reshape(-1, 3)
    out = np.empty((index.shape[0], vol.shape[-1]), dtype=np.float32)
    denom = np.where(shape > 1, shape - 1, 1.0)
    for start in range(0, index.shape[0], chunk):
        idx = index[start:start + chunk]
        norm = 2.0 * idx / denom - 1.0
        norm = np.where(shape > 1, norm, 0.0)
        grid = torch.from_numpy(norm[:, ::-1].astype(np.float32).copy()).view(1, 1, 1, -1, 3)
        sampled = F.grid_sample(vol_t, grid, mode="bilinear", padding_mode="border",
                                align_corners=True)
        values = sampled.view(vol.shape[-1], -1).T.numpy()
        if outside_half_voxel == "zero":
            inside = np.all((idx >= -0.5) & (idx <= shape - 0.5), axis=1)
            values = values * inside[:, None]
        out[start:start + chunk] = values
    return out[:, 0] if squeeze else out
