"""Jacobian determinant of a world transform, for QC (folding, log-Jacobian maps).

For a pull map ``T`` (reference world RAS mm -> source world RAS mm) the determinant of
``dT/dx`` at a reference point is the local volume ratio source/reference: > 1 where the reference
region samples a larger source region, <= 0 where the map folds. The affine is included, so a pure
affine ``A`` gives ``det(A[:3, :3])`` everywhere. (A map written in LPS has the same
determinant: the RAS <-> LPS flip cancels.)
"""

from __future__ import annotations

import numpy as np

from .geometry import Grid
from .transforms import TransformChain, WorldTransform
from .warp import DEFAULT_CHUNK, iter_slabs, slab_points

#: Default lower clip of the determinant in :func:`log_jacobian`.
LOG_JACOBIAN_FLOOR = 1e-3


def _det3(m: np.ndarray) -> np.ndarray:
    """Determinants of (..., 3, 3) matrices (explicit cofactor formula, float64)."""
    return (m[..., 0, 0] * (m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1])
            - m[..., 0, 1] * (m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0])
            + m[..., 0, 2] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0]))


def jacobian_determinant(transform: WorldTransform | TransformChain, reference: Grid,
                         max_points: int = DEFAULT_CHUNK) -> np.ndarray:
    """``det(dT(x)/dx)`` at every voxel centre of ``reference``: float32, ``reference.shape``.

    ``T`` is evaluated at the voxel centres (world RAS mm, float64) and differentiated along the
    grid's index axes with central differences in the interior and one-sided differences at the
    borders (:func:`numpy.gradient`); the chain rule with the grid's voxel->world matrix ``M``
    gives the derivative in world mm, ``dT/dx = dT/di @ M^-1``, whose determinant is
    ``det(dT/di) / det(M)``. Oblique and anisotropic grids are handled exactly. Work is done in
    slabs along the first axis (with one slice of overlap), so memory stays bounded.
    A :class:`TransformChain` is differentiated numerically as a whole (never as an affine).
    """
    shape = tuple(reference.shape)
    if isinstance(transform, WorldTransform) and transform.field is None:
        return np.full(shape, np.linalg.det(transform.affine[:3, :3]), dtype=np.float32)
    if min(shape) < 2:
        raise ValueError(f"the reference grid needs 2 or more voxels along every axis: {shape}")
    det_voxel = np.linalg.det(reference.affine[:3, :3])
    out = np.empty(shape, dtype=np.float32)
    for start, stop in iter_slabs(reference, max_points):
        lo, hi = max(start - 1, 0), min(stop + 1, shape[0])
        mapped = transform.map_points(slab_points(reference, lo, hi))  # (n, nj, nk, 3)
        # derivs[..., r, c] = d T_r / d index_c
        derivs = np.stack(np.gradient(mapped, axis=(0, 1, 2)), axis=-1)
        derivs = derivs[start - lo:stop - lo]
        out[start:stop] = _det3(derivs) / det_voxel
    return out


def folding_fraction(det: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fraction of voxels (within ``mask`` when given) whose determinant is not positive.

    Non-finite determinants count as folded.
    """
    det = np.asarray(det)
    if mask is not None:
        det = det[np.asarray(mask, dtype=bool)]
    if det.size == 0:
        return 0.0
    return float(np.count_nonzero(~(det > 0)) / det.size)


def log_jacobian(det: np.ndarray, floor: float = LOG_JACOBIAN_FLOOR) -> np.ndarray:
    """Natural log of the determinant, float32.

    The determinant is clipped below at ``floor`` (default 1e-3) before the log, so folded
    voxels (det <= 0) read ``log(floor)`` (about -6.9) instead of NaN/-inf.
    """
    if floor <= 0:
        raise ValueError("floor must be positive")
    return np.log(np.maximum(np.asarray(det, dtype=np.float32), np.float32(floor)))
