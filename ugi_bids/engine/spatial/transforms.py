"""World-space transforms: an affine plus a dense displacement field, in RAS millimetres.

A :class:`WorldTransform` is always a *pull* map (``mode-image`` in NiPreps terms): it maps points
of the reference (target) space to points of the source space, so that resampling the source at
``T(x)`` for every reference voxel ``x`` puts the source onto the reference grid. This is the
direction ITK's ResampleImageFilter and ``antsApplyTransforms`` expect.

``T(x) = A (x + d(x))``: the displacement field ``d`` lives in the reference space and is applied
first, then the affine ``A`` (reference world -> source world). On disk (ITK/ANTs composite HDF5)
this is the transform queue ``[A, d]`` in LPS coordinates; ITK applies the back of the queue first.

A :class:`TransformChain` (built by :func:`compose`) applies several pull maps in the listed
order, the first one to the reference points: ``[a, b]`` is ``antsApplyTransforms -t a -t b``
(see the class notes on ANTs' "reverse order").
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


@dataclass(frozen=True)
class TransformChain:
    """Pull maps applied one after another, in the listed order (world RAS mm).

    ``map_points(x) = transforms[-1].map_points(... transforms[0].map_points(x))``: the *first*
    transform maps the points of the reference (output) grid, each next one maps the previous
    one's output, and the *last* gives points of the source image's space. For an atlas in MNI
    space carried onto a session's raw grid: ``[from-T1w_to-orig, from-MNI_to-T1w]`` (the first
    maps raw-session points to subject-template points, the second template points to MNI
    points).

    This is ``antsApplyTransforms``' order for points: our ``[a, b]`` is
    ``antsApplyTransforms -t a -t b`` (antspyx: ``transformlist=[a, b]``), which samples the
    source at ``b(a(x))``. ANTs' documentation says the ``-t`` list is "applied in reverse
    order, the last first": that describes how the *image* moves (push), the mirror of how the
    points are mapped (pull); ``tests/test_transform_chain.py`` pins the order with antspyx.

    Attributes
    ----------
    transforms : tuple of WorldTransform or TransformChain
        At least one; nested chains are allowed.
    """

    transforms: tuple[WorldTransform | TransformChain, ...]

    def __post_init__(self):
        transforms = tuple(self.transforms)
        if not transforms:
            raise ValueError("a transform chain needs at least one transform")
        for transform in transforms:
            if not isinstance(transform, (WorldTransform, TransformChain)):
                raise TypeError(f"not a WorldTransform or TransformChain: {type(transform)!r}")
        object.__setattr__(self, "transforms", transforms)

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """Reference-space world points (..., 3) -> source-space world points (..., 3), RAS mm,
        through every transform in the listed order."""
        points = np.asarray(points, dtype=np.float64)
        for transform in self.transforms:
            points = transform.map_points(points)
        return points


def compose(*transforms: WorldTransform | TransformChain) -> WorldTransform | TransformChain:
    """The pull maps ``transforms`` applied in the listed order (:class:`TransformChain`); one
    transform is returned as it is. ``compose(a, b)`` maps ``x`` to ``b(a(x))``, like
    ``antsApplyTransforms -t a -t b``."""
    if len(transforms) == 1:
        return transforms[0]
    return TransformChain(transforms)
