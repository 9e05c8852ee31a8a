"""Multi-start initialisation of the pre-alignment: which way round is the moving anatomy?

A gradient-based fit only finds the optimum nearest its start. From the centres of mass alone,
a head rotated by more than about 30 degrees, or lying prone instead of supine, is not found.
Before the rigid -> affine refinement, this module searches the starting pose the way FSL FLIRT
(``-searchrx``) and ANTs ``antsAI`` do:

1. candidate rotations: the 24 axis-aligned orientations (every proper rotation that maps the
   world axes onto the world axes) and the 4 proper alignments of the two images' principal
   axes (intensity moments), each about the centres of mass;
2. every candidate is scored on a coarse pyramid level with few samples; around the best
   distinct ones, a grid of rotations of up to +-``limit_deg`` (``step_deg`` apart) about each
   axis is scored too, then a grid of translations for the best rotation (a partial field of
   view moves the centre of mass away from the anatomy it should match);
3. the best poses (and always the plain centre-of-mass start, so that an image the headers
   already place well is never made worse) are each refined briefly; the caller keeps the one
   with the lowest cost.

Numpy only: the caller passes a ``score(matrix, translation) -> (cost, overlap)`` function, so
this module does not depend on how the similarity is computed or on which device.

Poses are ``(M, t)`` of ``A(x) = M (x - c) + c + t`` (world RAS mm, FIXED points -> MOVING
points, ``c`` the fixed centre of mass), as in :mod:`ugi_bids.engine.prealign.affine`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np

#: ``score(matrix (3, 3), translation (3,) mm) -> (cost, overlap)``: lower cost is better;
#: overlap is the fraction (0..1) of the fixed samples' weight that the moving image covers.
Score = Callable[[np.ndarray, np.ndarray], tuple[float, float]]


@dataclass(frozen=True)
class Start:
    """A scored starting pose: ``label`` says where it came from (logged and recorded)."""

    label: str
    matrix: np.ndarray
    translation: np.ndarray
    cost: float
    overlap: float


def axis_rotations() -> list[tuple[str, np.ndarray]]:
    """The 24 proper rotations that map the world axes onto the world axes (signed
    permutation matrices of determinant +1), each labelled by where it sends x, y and z
    (``"+x+y+z"`` is the identity, ``"-x-y+z"`` a half turn about z)."""
    rotations = []
    names = "xyz"
    for order in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            matrix = np.zeros((3, 3))
            for column, (row, sign) in enumerate(zip(order, signs)):
                matrix[row, column] = sign
            if np.linalg.det(matrix) > 0:
                label = "".join(("+" if s > 0 else "-") + names[r] for r, s in zip(order, signs))
                rotations.append((label, matrix))
    # the identity first, so that it wins ties
    rotations.sort(key=lambda item: item[0] != "+x+y+z")
    return rotations


def euler_rotation(angles_deg) -> np.ndarray:
    """The rotation ``Rz @ Ry @ Rx`` of Euler angles (degrees) about the world x, y, z axes."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rotation_grid(limit_deg: float, step_deg: float) -> list[tuple[tuple, np.ndarray]]:
    """Rotations with Euler angles on ``-limit .. limit`` every ``step`` degrees about each
    axis (the identity excluded): ``((ax, ay, az), R)``."""
    count = int(round(limit_deg / step_deg))
    angles = [step_deg * k for k in range(-count, count + 1)]
    return [(triple, euler_rotation(triple)) for triple in itertools.product(angles, repeat=3)
            if any(triple)]


def principal_axes(points: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The principal axes (columns, largest spread first) of weighted points (world mm)."""
    total = weights.sum()
    centre = (points * weights[:, None]).sum(axis=0) / total
    offsets = points - centre
    covariance = (offsets * weights[:, None]).T @ offsets / total
    values, vectors = np.linalg.eigh(covariance)
    return vectors[:, np.argsort(values)[::-1]]


def moment_rotations(fixed_axes: np.ndarray, moving_axes: np.ndarray
                     ) -> list[tuple[str, np.ndarray]]:
    """The 4 proper rotations taking the fixed image's principal axes onto the moving one's
    (an axis's sign is unknown, so each sign choice of determinant +1)."""
    rotations = []
    for signs in itertools.product((1, -1), repeat=3):
        matrix = moving_axes @ np.diag(signs) @ fixed_axes.T
        if np.linalg.det(matrix) > 0:
            label = "moments" + "".join("+" if s > 0 else "-" for s in signs)
            rotations.append((label, matrix))
    return rotations


def rotation_angle(a: np.ndarray, b: np.ndarray) -> float:
    """The angle (degrees) of the rotation taking ``a`` to ``b`` (both 3x3 rotations)."""
    cosine = (np.trace(a.T @ b) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def _usable(starts: list[Start], min_overlap: float) -> list[Start]:
    """The starts whose overlap is at least ``min_overlap`` times the best overlap: a pose that
    leaves most of the fixed object outside the moving image can score well on the little
    that is left."""
    best = max(start.overlap for start in starts)
    return [start for start in starts if start.overlap >= min_overlap * best]


def _distinct(starts: list[Start], count: int, min_angle_deg: float) -> list[Start]:
    """The ``count`` lowest-cost starts whose rotations differ by ``min_angle_deg`` or more."""
    chosen: list[Start] = []
    for start in sorted(starts, key=lambda s: s.cost):
        if all(rotation_angle(start.matrix, other.matrix) >= min_angle_deg for other in chosen):
            chosen.append(start)
        if len(chosen) == count:
            break
    return chosen


def search_starts(score: Score, translation: np.ndarray, *, radius: float,
                  moment_candidates: list[tuple[str, np.ndarray]] = (),
                  limit_deg: float = 60.0, step_deg: float = 30.0, top: int = 3,
                  shift_fraction: float = 0.25, min_overlap: float = 0.5,
                  keep: int = 3) -> list[Start]:
    """Score candidate starting poses; return the best ``keep`` (lowest cost, distinct
    rotations), the plain centre-of-mass start ("com") always among them.

    ``translation``: the centre-of-mass shift (mm, moving centre - fixed centre). Every
    rotation turns about the centres of mass. ``radius``: the fixed object's RMS radius (mm);
    the translation grid steps by ``shift_fraction`` of it along each axis.
    """
    translation = np.asarray(translation, dtype=np.float64)

    def scored(label: str, matrix: np.ndarray, shift: np.ndarray) -> Start:
        cost, overlap = score(matrix, shift)
        return Start(label, matrix, shift, float(cost), float(overlap))

    com = scored("com", np.eye(3), translation)
    coarse = [com] + [scored(label, matrix, translation)
                      for label, matrix in axis_rotations()[1:] + list(moment_candidates)]
    coarse = _usable(coarse, min_overlap)
    fine = list(coarse)
    for seed in _distinct(coarse, top, step_deg):
        fine += [scored(f"{seed.label}@({ax:g},{ay:g},{az:g})deg", seed.matrix @ turn,
                        translation)
                 for (ax, ay, az), turn in rotation_grid(limit_deg, step_deg)]
    fine = _usable(fine, min_overlap)
    best = min(fine, key=lambda s: s.cost)
    step = shift_fraction * radius
    shifted = [scored(f"{best.label}+shift({dx:g},{dy:g},{dz:g})", best.matrix,
                      translation + step * np.array([dx, dy, dz]))
               for dx, dy, dz in itertools.product((-1, 0, 1), repeat=3)
               if (dx, dy, dz) != (0, 0, 0)]
    candidates = _usable(fine + shifted, min_overlap)
    chosen = _distinct(candidates, keep, step_deg / 2)
    if com not in chosen:
        chosen = chosen[:keep - 1] + [com]
    return chosen
