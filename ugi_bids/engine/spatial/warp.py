"""Resampling images through a :class:`~ugi_bids.engine.spatial.transforms.WorldTransform`
(or a :class:`~ugi_bids.engine.spatial.transforms.TransformChain` of them, in one step).

The transform is a pull map: for every voxel centre ``x`` of the *reference* grid (world RAS mm)
the *moving* image is sampled at ``T(x)`` (world RAS mm in the moving image's space). Sampling
follows ITK's ``ResampleImageFilter`` (what ``antsApplyTransforms`` uses), so our output and ANTs'
agree voxel for voxel:

* a point is inside the moving image when its continuous voxel index lies in
  ``[-0.5, n - 0.5)`` on every axis; outside points get ``fill``;
* ``"linear"``: trilinear, neighbours clamped to the lattice (so the half voxel around the border
  repeats the border value), like ``LinearInterpolateImageFunction``;
* ``"nearest"``: the voxel at ``floor(index + 0.5)``, like ITK's
  ``NearestNeighborInterpolateImageFunction``;
* ``"label"``: label-aware linear interpolation, like ANTs' ``genericLabel``: for each label the
  trilinear interpolation of its indicator, and the label with the largest value wins (ties go to
  the smaller label value). Only labels among a point's 8 neighbours can win, so this costs the
  same for 2 or 200 labels.

Work is done in slabs of at most ``max_points`` reference voxels, so memory stays bounded for
256^3 grids. World coordinates and voxel indices are float64; weights and outputs float32.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..options import INTERPOLATIONS
from .geometry import Grid
from .sampling import affine_points, inside_itk, label_at, linear_at, nearest_at
from .transforms import TransformChain, WorldTransform
from .volume import Volume

#: Default number of reference voxels processed at once (about 100-200 MB of temporaries).
DEFAULT_CHUNK = 1 << 20



def slab_points(grid: Grid, start: int, stop: int) -> np.ndarray:
    """World RAS mm (float64) of the voxel centres with first index in ``[start, stop)``.

    Shape ``(stop - start, nj, nk, 3)``.
    """
    _, nj, nk = grid.shape
    m = grid.affine[:3, :3]
    i = np.arange(start, stop, dtype=np.float64)[:, None, None, None] * m[:, 0]
    j = np.arange(nj, dtype=np.float64)[None, :, None, None] * m[:, 1]
    k = np.arange(nk, dtype=np.float64)[None, None, :, None] * m[:, 2]
    return i + j + k + grid.affine[:3, 3]


def iter_slabs(grid: Grid, max_points: int = DEFAULT_CHUNK) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges of the first axis, each covering at most ``max_points`` voxels
    (at least one slice)."""
    ni, nj, nk = grid.shape
    step = max(1, int(max_points) // max(1, nj * nk))
    for start in range(0, ni, step):
        yield start, min(ni, start + step)


def displacement_on_grid(transform: WorldTransform | TransformChain, grid: Grid,
                         max_points: int = DEFAULT_CHUNK) -> np.ndarray:
    """``T(x) - x`` (world RAS mm, float32) at every voxel centre ``x`` of ``grid``.

    ``T`` maps reference-space points to source-space points, so this is the full displacement
    (affine included) that carries a reference point to its source point. Shape ``(i, j, k, 3)``.
    """
    out = np.empty(tuple(grid.shape) + (3,), dtype=np.float32)
    for start, stop in iter_slabs(grid, max_points):
        points = slab_points(grid, start, stop)
        out[start:stop] = transform.map_points(points) - points
    return out


_KERNELS = {"linear": linear_at, "nearest": nearest_at, "label": label_at}


def sample_at_points(moving: Volume, points: np.ndarray, interpolation: str = "linear",
                     fill: float = 0.0) -> np.ndarray:
    """Values of ``moving`` at world RAS mm ``points`` (n, 3), with ITK's rules (module notes).

    Returns (n,): float32 for ``"linear"``; the moving data's dtype for ``"nearest"``/``"label"``.
    """
    if interpolation not in _KERNELS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, not {interpolation!r}")
    shape = tuple(moving.grid.shape)
    data = np.asarray(moving.data)
    dtype = np.float32 if interpolation == "linear" else data.dtype
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    index = affine_points(np.linalg.inv(moving.grid.affine), points)
    inside = inside_itk(index, np.asarray(shape, dtype=np.float64))
    values = np.full(index.shape[0], fill, dtype=dtype)
    if np.any(inside):
        values[inside] = _KERNELS[interpolation](data.reshape(-1), index[inside], shape)
    return values


def apply_transform(moving: Volume, transform: WorldTransform | TransformChain, reference: Grid,
                    interpolation: str = "linear", fill: float = 0.0,
                    max_points: int = DEFAULT_CHUNK) -> Volume:
    """Resample ``moving`` onto ``reference`` through the pull map ``transform``.

    Parameters
    ----------
    moving : Volume
        The source image (any storage orientation; world RAS mm).
    transform : WorldTransform or TransformChain
        Maps reference-space world points (RAS mm) to moving-space world points (RAS mm), the
        ``mode-image`` direction ``antsApplyTransforms`` expects. A chain is applied in its
        listed order (first to the reference points) and the moving image is sampled once.
    reference : Grid
        Output lattice.
    interpolation : {"linear", "nearest", "label"}
        See the module notes; ``"label"`` is ANTs' ``genericLabel``.
    fill : float
        Value for reference voxels that map outside the moving image.
    max_points : int
        Reference voxels processed per slab (memory bound).

    Returns
    -------
    Volume
        On ``reference``; float32 for ``"linear"``, the moving data's dtype otherwise.
    """
    if interpolation not in _KERNELS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, not {interpolation!r}")
    moving = Volume(moving.grid, np.ascontiguousarray(moving.data))  # flat views, no copies
    dtype = np.float32 if interpolation == "linear" else moving.data.dtype
    out = np.empty(tuple(reference.shape), dtype=dtype)
    for start, stop in iter_slabs(reference, max_points):
        points = slab_points(reference, start, stop)
        source_points = transform.map_points(points.reshape(-1, 3))
        values = sample_at_points(moving, source_points, interpolation, fill)
        out[start:stop] = values.reshape(points.shape[:3])
    return Volume(reference, out)
