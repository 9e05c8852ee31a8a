"""The mean of world affines, and how far an affine is from the identity.

Affines here are 4x4 matrices in world RAS millimetres. The mean is log-Euclidean,
``expm(mean(logm(A_i)))``, iterated to a fixed point around the current mean (a Karcher-type
mean). Unlike averaging the matrix entries (ANTs' ``AverageAffineTransform``), it never shrinks:
the mean of two rotations by +/-theta is the identity, not ``cos(theta)`` times it, and the mean
determinant is the geometric mean of the determinants. It does not depend on where the world
origin is: ``logm(C A C^-1) = C logm(A) C^-1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import linalg

#: Stop the fixed-point iteration when the mean log of the recentred affines is below this
#: (dimensionless for the linear part, millimetres for the translation).
MEAN_TOLERANCE = 1e-9


def _logm(matrix: np.ndarray) -> np.ndarray:
    """Real principal logarithm of an affine whose linear part has a positive determinant."""
    log = linalg.logm(np.asarray(matrix, dtype=np.float64))
    return np.real(log)


def affine_mean(affines: Sequence[np.ndarray], max_iterations: int = 20) -> np.ndarray:
    """Log-Euclidean (Karcher-type) mean of 4x4 world affines, each with ``det > 0``.

    Returns ``M`` such that the mean of ``logm(A_i M^-1)`` is zero (to :data:`MEAN_TOLERANCE`):
    recentred on ``M``, the affines average to the identity.
    """
    affines = [np.asarray(a, dtype=np.float64) for a in affines]
    if not affines:
        raise ValueError("the mean of no affines is undefined")
    for a in affines:
        if np.linalg.det(a[:3, :3]) <= 0:
            raise ValueError("an affine with a reflection or a collapse has no mean with others")
    mean = linalg.expm(np.mean([_logm(a) for a in affines], axis=0))
    for _ in range(max_iterations):
        inverse = np.linalg.inv(mean)
        correction = np.mean([_logm(a @ inverse) for a in affines], axis=0)
        if np.abs(correction).max() < MEAN_TOLERANCE:
            break
        mean = linalg.expm(correction) @ mean
    mean[3] = (0.0, 0.0, 0.0, 1.0)
    return mean


def rotation_degrees(affine: np.ndarray) -> float:
    """The rotation angle (degrees) of the affine's linear part, from its polar decomposition
    ``L = R S`` (R a rotation, S symmetric positive definite)."""
    rotation, _ = linalg.polar(np.asarray(affine, dtype=np.float64)[:3, :3])
    cosine = np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.degrees(np.arccos(cosine)))


def scale_factors(affine: np.ndarray) -> np.ndarray:
    """The principal stretches of the affine's linear part: eigenvalues of ``S`` in ``L = R S``
    (1 = no scaling along that direction), ascending."""
    _, stretch = linalg.polar(np.asarray(affine, dtype=np.float64)[:3, :3])
    return np.linalg.eigvalsh(stretch)


def affine_summary(affine: np.ndarray, centre: np.ndarray | None = None) -> dict:
    """Rotation (degrees), the largest scale deviation (fraction, e.g. 0.004 = 0.4 %), and the
    translation (mm) at ``centre`` (world RAS mm; default the origin) of a world affine."""
    affine = np.asarray(affine, dtype=np.float64)
    centre = np.zeros(3) if centre is None else np.asarray(centre, dtype=np.float64)
    moved = affine[:3, :3] @ centre + affine[:3, 3]
    return {"rotation_deg": rotation_degrees(affine),
            "scale_deviation": float(np.abs(scale_factors(affine) - 1.0).max()),
            "translation_mm": float(np.linalg.norm(moved - centre))}
