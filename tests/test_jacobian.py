"""Jacobian determinant of world transforms against analytic deformations."""

from __future__ import annotations

import numpy as np
import pytest

from tests.realdata import rotation_matrix, store_as
from ugi_bids.engine.spatial.geometry import Grid
from ugi_bids.engine.spatial.jacobian import (
    folding_fraction,
    jacobian_determinant,
    log_jacobian,
)
from ugi_bids.engine.spatial.transforms import DisplacementField, WorldTransform
from ugi_bids.engine.spatial.volume import Volume

CENTRE = np.array([10.0, -20.0, 15.0])


def oblique_grid(shape=(56, 60, 48), spacing=(1.0, 0.9, 1.1), angles=(8.0, -12.0, 20.0)) -> Grid:
    """An oblique, slightly anisotropic lattice centred on CENTRE (world RAS mm)."""
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix(angles) @ np.diag(spacing)
    affine[:3, 3] = CENTRE - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return Grid(shape, affine)


def sinusoid(points: np.ndarray, a: float, b: float, k: float):
    """Displacement d(x) (RAS mm) and its analytic gradient dd/dx at points (..., 3)."""
    y = points - CENTRE
    s, c = np.sin(k * y), np.cos(k * y)
    d = np.stack([a * s[..., 1] + b * s[..., 0],
                  a * s[..., 2] + b * s[..., 1],
                  a * s[..., 0] + b * s[..., 2]], axis=-1)
    grad = np.zeros(points.shape + (3,))
    for r in range(3):
        grad[..., r, r] = b * k * c[..., r]
        grad[..., r, (r + 1) % 3] = a * k * c[..., (r + 1) % 3]
    return d, grad


def general_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix((10.0, 5.0, -7.0)) @ np.diag([1.1, 0.95, 1.05])
    affine[:3, :3] += np.array([[0, 0.05, 0], [0, 0, 0], [0.03, 0, 0]])  # a little shear
    affine[:3, 3] = (5.0, -400.0, 12.0)
    return affine


def analytic_case(grid: Grid, a=1.5, b=1.0, wavelength=60.0):
    k = 2 * np.pi / wavelength
    points = grid.world_coordinates()
    d, grad = sinusoid(points, a, b, k)
    affine = general_affine()
    transform = WorldTransform(affine, DisplacementField(grid, d.astype(np.float32)))
    expected = np.linalg.det(affine[:3, :3]) * np.linalg.det(np.eye(3) + grad)
    return transform, expected


def test_matches_analytic_determinant_in_the_interior():
    grid = oblique_grid()
    transform, expected = analytic_case(grid)
    det = jacobian_determinant(transform, grid)
    assert det.dtype == np.float32 and det.shape == grid.shape
    interior = (slice(1, -1),) * 3
    assert np.ptp(expected) > 0.5  # a non-trivial deformation
    assert np.abs(det[interior] - expected[interior]).max() < 1e-3
    # one-sided differences at the border are first-order accurate: close, not exact
    assert np.abs(det - expected).max() < 0.05


def test_orientation_of_the_reference_grid_does_not_matter():
    """The same lattice stored LPS (negative voxel->world determinant) gives the same values."""
    grid = oblique_grid(shape=(30, 32, 28))
    transform, _ = analytic_case(grid)
    det = jacobian_determinant(transform, grid)
    flipped = store_as(Volume(grid, det), "LPS")
    det_flipped = jacobian_determinant(transform, flipped.grid)
    assert np.allclose(det_flipped, flipped.data, atol=1e-5)


def test_slabs_do_not_change_results():
    grid = oblique_grid(shape=(30, 32, 28))
    transform, _ = analytic_case(grid)
    whole = jacobian_determinant(transform, grid, max_points=10**9)
    slabs = jacobian_determinant(transform, grid, max_points=1000)  # one slice per slab
    assert np.array_equal(whole, slabs)


def test_pure_affine_gives_its_determinant():
    affine = general_affine()
    grid = oblique_grid(shape=(20, 22, 18))
    expected = np.linalg.det(affine[:3, :3])
    det = jacobian_determinant(WorldTransform(affine), grid)
    assert np.all(det == np.float32(expected))
    zero_field = DisplacementField(grid, np.zeros(grid.shape + (3,), np.float32))
    det = jacobian_determinant(WorldTransform(affine, zero_field), grid)
    assert np.allclose(det, expected, rtol=1e-6)


def test_field_smaller_than_reference():
    """Outside the field (beyond half a voxel) the map is the affine alone."""
    grid = oblique_grid(shape=(20, 22, 18))
    transform, _ = analytic_case(grid)
    bigger = Grid((40, 44, 36), grid.affine @ np.array(
        [[1, 0, 0, -10], [0, 1, 0, -11], [0, 0, 1, -9], [0, 0, 0, 1.0]]))
    det = jacobian_determinant(transform, bigger)
    assert np.allclose(det[:5], np.linalg.det(transform.affine[:3, :3]), rtol=1e-5)


def test_folding_is_detected():
    grid = oblique_grid(shape=(80, 16, 16), spacing=(0.5, 1.0, 1.0), angles=(0.0, 0.0, 0.0))
    k = 2 * np.pi / 20.0
    points = grid.world_coordinates()
    vectors = np.zeros(points.shape, np.float32)
    vectors[..., 0] = (1.5 / k) * np.sin(k * (points[..., 0] - CENTRE[0]))  # 1 + 1.5 cos < 0
    det = jacobian_determinant(WorldTransform(np.eye(4), DisplacementField(grid, vectors)), grid)
    expected = (np.pi - np.arccos(-2.0 / 3.0)) / np.pi  # fraction of the period with det < 0
    assert folding_fraction(det) == pytest.approx(expected, abs=0.04)
    assert folding_fraction(det, mask=det > 0) == 0.0
    smooth, _ = analytic_case(grid)
    assert folding_fraction(jacobian_determinant(smooth, grid)) == 0.0
    assert folding_fraction(np.array([1.0, np.nan, -1.0, 0.0])) == 0.75


def test_log_jacobian_clips():
    det = np.array([1.0, np.e, 0.0, -3.0, 1e-9], dtype=np.float32)
    out = log_jacobian(det)
    assert out.dtype == np.float32
    assert np.allclose(out, [0.0, 1.0, np.log(1e-3), np.log(1e-3), np.log(1e-3)], atol=1e-6)
    assert np.allclose(log_jacobian(det, floor=1e-6)[2], np.log(1e-6))
    with pytest.raises(ValueError):
        log_jacobian(det, floor=0.0)
