"""Trilinear (and nearest, and label-aware) reads of numpy volumes: the one sampler of the
engine's world-space code; no torch here.

Volumes are (i, j, k) or (i, j, k, C) arrays; points are continuous voxel indices (n, 3)
float64. Two rules for points off the lattice, both ITK's:

* transforms and fields (:func:`sample_trilinear`, :func:`sample_on_grid`): indices are clamped
  to the lattice, and points more than half a voxel outside it read 0 (``"zero"``, what ITK's
  DisplacementFieldTransform does) or the border value (``"border"``);
* image resampling (:mod:`ugi_bids.engine.spatial.warp`): ITK's ``IsInsideBuffer``
  (:func:`inside_itk`) decides which points get the fill value; the rest are read clamped
  (:func:`linear_at`, :func:`nearest_at`, :func:`label_at`).

The compiled kernels of :mod:`ugi_bids.engine.kernels.lattice` do the work where numba is
installed (threaded, float64 inside); :func:`corners` gives the same reads in numpy elsewhere.
"""

from __future__ import annotations

import numpy as np

from ..kernels import lattice, numba


def affine_points(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``affine`` (4x4) applied to points (n, 3), float64, by columns.

    Same result as :func:`ugi_bids.engine.spatial.geometry.apply_affine`, without a BLAS call: a
    ``(n, 3) @ (3, 3)`` matmul is several times slower through multi-threaded BLAS.
    """
    out = points[:, 0:1] * affine[:3, 0]
    out += points[:, 1:2] * affine[:3, 1]
    out += points[:, 2:3] * affine[:3, 2]
    out += affine[:3, 3]
    return out


def inside_itk(index: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """ITK's IsInsideBuffer for continuous indices: ``-0.5 <= index < n - 0.5`` on every axis."""
    return np.all((index >= -0.5) & (index < shape - 0.5), axis=1)


def corners(index: np.ndarray, shape: tuple) -> tuple[list[np.ndarray], list[np.ndarray]]:
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


def linear_at(flat_data: np.ndarray, index: np.ndarray, shape: tuple) -> np.ndarray:
    """Trilinear values (float32) of the flat data of a ``shape`` volume at voxel indices."""
    flat, weights = corners(index, shape)
    values = np.zeros(index.shape[0], dtype=np.float32)
    for offset, weight in zip(flat, weights):
        values += weight * flat_data[offset].astype(np.float32, copy=False)
    return values


def nearest_at(flat_data: np.ndarray, index: np.ndarray, shape: tuple) -> np.ndarray:
    """ITK's nearest neighbour: the voxel at ``floor(index + 0.5)``, clamped."""
    nearest = np.floor(index + 0.5).astype(np.int64)
    ni, nj, nk = shape
    i = np.clip(nearest[:, 0], 0, ni - 1)
    j = np.clip(nearest[:, 1], 0, nj - 1)
    k = np.clip(nearest[:, 2], 0, nk - 1)
    return flat_data[(i * nj + j) * nk + k]


def label_at(flat_data: np.ndarray, index: np.ndarray, shape: tuple) -> np.ndarray:
    """Label with the largest interpolated indicator among each point's 8 neighbours."""
    flat, weights = corners(index, shape)
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


def _trilinear_numpy(volume: np.ndarray, index: np.ndarray, zero_outside: bool) -> np.ndarray:
    """:func:`sample_trilinear` without the compiled kernels: (i, j, k, C) at (n, 3) -> (n, C)."""
    shape = volume.shape[:3]
    flat, weights = corners(index, shape)
    data = volume.reshape(-1, volume.shape[3])
    out = np.zeros((index.shape[0], volume.shape[3]), dtype=np.float32)
    for offset, weight in zip(flat, weights):
        out += weight[:, None] * data[offset]
    if zero_outside:
        outside = np.any((index < -0.5) | (index > np.asarray(shape) - 0.5), axis=1)
        out[outside] = 0.0
    return out


def sample_trilinear(volume: np.ndarray, index: np.ndarray, outside_half_voxel: str = "zero"
                     ) -> np.ndarray:
    """Trilinear samples of ``volume`` (i, j, k[, C]) at continuous voxel indices (n, 3).

    Indices are clamped to the lattice; points further than half a voxel outside it get 0 when
    ``outside_half_voxel == "zero"`` (ITK's behaviour) or the clamped border value when
    ``"border"``. Returns (n,) or (n, C) float32.
    """
    vol = np.asarray(volume, dtype=np.float32)
    squeeze = vol.ndim == 3
    if squeeze:
        vol = vol[..., None]
    index = np.ascontiguousarray(np.asarray(index, dtype=np.float64).reshape(-1, 3))
    zero_outside = outside_half_voxel == "zero"
    if numba is None:
        out = _trilinear_numpy(vol, index, zero_outside)
    else:
        out = np.empty((index.shape[0], vol.shape[3]), dtype=np.float32)
        lattice.match_threads()
        lattice._index_kernel(index, np.ascontiguousarray(vol), out, zero_outside)
    return out[:, 0] if squeeze else out


def sample_on_grid(volume: np.ndarray, shape, to_index: np.ndarray,
                   linear: np.ndarray | None = None, zero_outside: bool = True) -> np.ndarray:
    """Resample ``volume`` (i, j, k, C) float32 on a regular lattice of ``shape``: lattice
    index ``p`` reads ``volume`` trilinearly at voxel index ``to_index @ [p, 1]`` (4x4 or 3x4),
    clamped, and 0 beyond half a voxel outside with ``zero_outside``. ``linear`` (C', C), if
    given, multiplies every sampled vector (e.g. lattice -> world displacement).
    Returns (*shape, C') float32."""
    channels = volume.shape[3]
    linear = np.eye(channels) if linear is None else np.asarray(linear, dtype=np.float64)
    to_index = np.ascontiguousarray(np.asarray(to_index, dtype=np.float64)[:3])
    if numba is None:
        grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape],
                                    indexing="ij"), axis=-1).reshape(-1, 3)
        values = _trilinear_numpy(np.asarray(volume, dtype=np.float32),
                                  grid @ to_index[:, :3].T + to_index[:, 3], zero_outside)
        return (values.astype(np.float64) @ linear.T).astype(np.float32).reshape(
            *shape, linear.shape[0])
    out = np.empty((*shape, linear.shape[0]), dtype=np.float32)
    lattice.match_threads()
    lattice._grid_kernel(to_index, np.ascontiguousarray(volume, dtype=np.float32),
                         np.ascontiguousarray(linear), out, bool(zero_outside))
    return out
