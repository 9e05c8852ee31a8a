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

from .geometry import Grid, apply_affine
from .sampling import sample_trilinear


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
