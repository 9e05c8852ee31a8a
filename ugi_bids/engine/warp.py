"""Resampling images through a :class:`~ugi_bids.engine.transforms.WorldTransform`.

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

from .geometry import Grid
from .transforms import WorldTransform
from .volume import Volume

#: Default number of reference voxels processed at once (about 100-200 MB of temporaries).
DEFAULT_CHUNK = 1 << 20

INTERPOLATIONS = ("linear", "nearest", "label")


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


def displacement_on_grid(transform: WorldTransform, grid: Grid,
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


# --------------------------------------------------------------------------- sampling kernels

def _affine_points(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``affine`` (4x4) applied to points (n, 3), float64, by columns.

    Same result as :func:`ugi_bids.engine.geometry.apply_affine`, without a BLAS call: a
    ``(n, 3) @ (3, 3)`` matmul is several times slower through multi-threaded BLAS.
    """
    out = points[:, 0:1] * affine[:3, 0]
    out += points[:, 1:2] * affine[:3, 1]
    out += points[:, 2:3] * affine[:3, 2]
    out += affine[:3, 3]
    return out


def _inside(index: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """ITK's IsInsideBuffer for continuous indices: ``-0.5 <= index < n - 0.5`` on every axis."""
    return np.all((index >= -0.5) & (index < shape - 0.5), axis=1)


def _corners(index: np.ndarray, shape: tuple) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Flat indices (int64) and trilinear weights (float32) of the 8 neighbours of each point.

    Neighbour indices are clamped to the lattice (ITK's border behaviour).
    """
    ni, nj, nk = shape
    base = np.floor(index)
    frac = (index - base).astype(np.float32)
    base = base.astype(np.int64)
    strides = (nj * nk, nk, 1)
    lows, highs, w_low, w_high = [], [], [], []
    for axis, n in enumerate(shape):
        lows.append(np.clip(base[:, axis], 0, n - 1) * strides[axis])
        highs.append(np.clip(base[:, axis] + 1, 0, n - 1) * strides[axis])
        w_high.append(frac[:, axis])
        w_low.append(1.0 - frac[:, axis])
    flat, weights = [], []
    for corner in range(8):
        bits = [(corner >> (2 - axis)) & 1 for axis in range(3)]
        offset = sum(highs[a] if bits[a] else lows[a] for a in range(3))
        weight = np.ones(index.shape[0], dtype=np.float32)
        for a in range(3):
            weight = weight * (w_high[a] if bits[a] else w_low[a])
        flat.append(offset)
        weights.append(weight)
    return flat, weights


def _sample_linear(flat_data: np.ndarray, index: np.ndarray, shape: tuple) -> np.ndarray:
    flat, weights = _corners(index, shape)
    values = np.zeros(index.shape[0], dtype=np.float32)
    for offset, weight in zip(flat, weights):
        values += weight * flat_data[offset].astype(np.float32, copy=False)
    return values


def _sample_nearest(flat_data: np.ndarray, index: np.ndarray, shape: tuple) -> np.ndarray:
    nearest = np.floor(index + 0.5).astype(np.int64)
    ni, nj, nk = shape
    i = np.clip(nearest[:, 0], 0, ni - 1)
    j = np.clip(nearest[:, 1], 0, nj - 1)
    k = np.clip(nearest[:, 2], 0, nk - 1)
    return flat_data[(i * nj + j) * nk + k]


def _sample_label(flat_data: np.ndarray, index: np.ndarray, shape: tuple) -> np.ndarray:
    """Label with the largest interpolated indicator among each point's 8 neighbours."""
    flat, weights = _corners(index, shape)
    labels = [flat_data[offset] for offset in flat]
    best_label = labels[0].copy()
    best_score = np.full(index.shape[0], -1.0, dtype=np.float32)
    for c in range(8):
        score = np.zeros(index.shape[0], dtype=np.float32)
        for other in range(8):
            score += np.where(labels[other] == labels[c], weights[other], np.float32(0.0))
        better = (score > best_score) | ((score == best_score) & (labels[c] < best_label))
        best_score = np.where(better, score, best_score)
        best_label = np.where(better, labels[c], best_label)
    return best_label


_KERNELS = {"linear": _sample_linear, "nearest": _sample_nearest, "label": _sample_label}


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
    index = _affine_points(np.linalg.inv(moving.grid.affine), points)
    inside = _inside(index, np.asarray(shape, dtype=np.float64))
    values = np.full(index.shape[0], fill, dtype=dtype)
    if np.any(inside):
        values[inside] = _KERNELS[interpolation](data.reshape(-1), index[inside], shape)
    return values


def apply_transform(moving: Volume, transform: WorldTransform, reference: Grid,
                    interpolation: str = "linear", fill: float = 0.0,
                    max_points: int = DEFAULT_CHUNK) -> Volume:
    """Resample ``moving`` onto ``reference`` through the pull map ``transform``.

    Parameters
    ----------
    moving : Volume
        The source image (any storage orientation; world RAS mm).
    transform : WorldTransform
        Maps reference-space world points (RAS mm) to moving-space world points (RAS mm), the
        ``mode-image`` direction ``antsApplyTransforms`` expects.
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
