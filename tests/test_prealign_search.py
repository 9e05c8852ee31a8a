"""The pre-alignment's multi-start search, degrees of freedom and fallback
(:mod:`ugi_bids.engine.prealign.search`, :mod:`ugi_bids.engine.prealign.affine`).

Hard starts are real data RESAMPLED (the header does not help): FSL's MNI152 brain at 2 mm is
rotated, flipped, shifted, scaled or cut in world space and resampled onto a fixed 260 mm cube
around the fixed brain; the fixed image is the ICBM 2009c brain (another brain) at 2 mm. The
error of a hard start is the mean distance, over the fixed brain mask, between its estimate and
the easy start's estimate moved by the known change: it lands where an easy start lands.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from tests import realdata
from ugi_bids.engine.prealign import affine as prealign_affine
from ugi_bids.engine.prealign import search
from ugi_bids.engine.prealign.affine import affine_shape, estimate_prealignment, implausible
from ugi_bids.engine.spatial.geometry import Grid, apply_affine
from ugi_bids.engine.spatial.volume import Volume, load_volume

CUBE_MM = 260.0
SPACING = 2.0


@pytest.fixture(scope="module")
def fixed() -> Volume:
    return realdata.downsampled(load_volume(realdata.mni2009c_brain_path()), SPACING)


@pytest.fixture(scope="module")
def moving_brain() -> Volume:
    return realdata.downsampled(load_volume(realdata.fsl_mni_brain_path()), SPACING)


@pytest.fixture(scope="module")
def brain_points(fixed) -> np.ndarray:
    return fixed.grid.world_coordinates()[realdata.brain_mask(fixed)]


def _cube(centre: np.ndarray) -> Grid:
    count = int(CUBE_MM / SPACING)
    affine = np.diag([SPACING] * 3 + [1.0])
    affine[:3, 3] = centre - SPACING * (count - 1) / 2
    return Grid((count,) * 3, affine)


def _moved(volume: Volume, centre: np.ndarray, rotation=np.eye(3), shift=np.zeros(3),
           scale: float = 1.0) -> tuple[Volume, np.ndarray]:
    """``volume``'s anatomy changed in world space by ``W`` (rotation and scale about
    ``centre``, then ``shift`` mm), resampled onto a cube around its new place; returns the
    image and ``W`` (world RAS -> world RAS)."""
    change = np.eye(4)
    change[:3, :3] = scale * np.asarray(rotation)
    change[:3, 3] = centre + shift - change[:3, :3] @ centre
    moved = realdata.resample_to(realdata.reheader(volume, change), _cube(centre + shift))
    return moved, change


def _top_slab(volume: Volume, keep_above_mm: float) -> Volume:
    """The axial slab of ``volume`` (an axis-aligned RAS grid) above ``keep_above_mm`` (world
    z): a partial field of view, not zeroed voxels."""
    first = int(np.ceil((keep_above_mm - volume.grid.affine[2, 3]) / volume.grid.affine[2, 2]))
    affine = volume.grid.affine.copy()
    affine[2, 3] += first * affine[2, 2]
    shape = volume.grid.shape[:2] + (volume.grid.shape[2] - first,)
    return Volume(Grid(shape, affine), np.ascontiguousarray(volume.data[:, :, first:]))


def _mean_error(estimate: np.ndarray, truth: np.ndarray, points: np.ndarray) -> float:
    return float(np.linalg.norm(apply_affine(estimate, points) - apply_affine(truth, points),
                                axis=-1).mean())


@pytest.fixture(scope="module")
def easy(fixed, moving_brain, brain_points) -> dict:
    """The unchanged moving brain on its cube, and the pre-alignment found from it."""
    centre = brain_points.mean(axis=0)
    moved, change = _moved(moving_brain, centre)
    return {"centre": centre, "affine": estimate_prealignment(fixed, moved).affine}


HARD_STARTS = {
    **{f"{deg}deg-about-{'xyz'[axis]}": {"rotation": realdata.rotation_matrix(
        [deg if a == axis else 0 for a in range(3)])}
       for axis in range(3) for deg in (45, 90, 180)},
    "prone": {"rotation": realdata.rotation_matrix([0, 180, 0])},
    "60mm-offset": {"shift": np.array([60.0, 0.0, 0.0]) @ realdata.rotation_matrix([0, 30, 45]).T},
    "scale-0.85": {"scale": 0.85},
    "scale-1.15": {"scale": 1.15},
}
QUICK = {"90deg-about-x", "prone", "scale-0.85"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=() if name in QUICK
                                               else pytest.mark.slow) for name in HARD_STARTS])
def test_hard_starts_land_within_2mm(name, fixed, moving_brain, brain_points, easy):
    moved, change = _moved(moving_brain, easy["centre"], **HARD_STARTS[name])
    result = estimate_prealignment(fixed, moved)
    error = _mean_error(result.affine, change @ easy["affine"], brain_points)
    print(f"\n{name}: mean error {error:.2f} mm over the brain; start {result.start}")
    assert error < 2.0, (error, result.start)


def test_top_half_slab_lands_within_2mm(fixed, moving_brain, brain_points, easy):
    """The top 50 % of the moving brain (by brain-mask voxels, a cropped field of view)
    registered to the whole fixed brain."""
    moved, change = _moved(moving_brain, easy["centre"])
    heights = moved.grid.world_coordinates()[realdata.brain_mask(moved)][:, 2]
    slab = _top_slab(moved, float(np.median(heights)))
    result = estimate_prealignment(fixed, slab)
    error = _mean_error(result.affine, change @ easy["affine"], brain_points)
    print(f"\nslab: mean error {error:.2f} mm over the whole brain; start {result.start}")
    assert error < 2.0, (error, result.start)


def test_without_the_search_a_half_turn_is_not_found(fixed, moving_brain, brain_points, easy):
    """The control: the same 180-degree start fails with the search off (so the search is what
    finds it)."""
    moved, change = _moved(moving_brain, easy["centre"],
                           rotation=realdata.rotation_matrix([0, 0, 180]))
    settings = prealign_affine.PrealignSettings(search=False)
    result = estimate_prealignment(fixed, moved, settings=settings)
    assert _mean_error(result.affine, change @ easy["affine"], brain_points) > 20.0


@pytest.mark.parametrize("dof", [6, 7, 9])
def test_degrees_of_freedom_shape_the_fit(dof, fixed, moving_brain, easy):
    moved, _ = _moved(moving_brain, easy["centre"], rotation=realdata.rotation_matrix(
        [8, -5, 10]), scale=1.1)
    result = estimate_prealignment(fixed, moved, dof=dof)
    matrix = result.affine[:3, :3]
    singular = np.linalg.svd(matrix, compute_uv=False)
    assert result.dof == dof and result.report()["dof"] == dof
    if dof == 6:
        np.testing.assert_allclose(singular, 1.0, atol=1e-4)
    elif dof == 7:
        np.testing.assert_allclose(singular, singular.mean(), rtol=1e-4)
        assert singular.mean() == pytest.approx(1.1, abs=0.05)
    else:  # M = R diag(s): M^T M is diagonal (scales along the fixed axes)
        gram = matrix.T @ matrix
        assert np.abs(gram - np.diag(np.diag(gram))).max() < 1e-4
        assert np.sqrt(np.diag(gram)).mean() == pytest.approx(1.1, abs=0.05)


@pytest.mark.slow
def test_implausible_fit_falls_back_with_a_warning(fixed, moving_brain, easy, monkeypatch,
                                                   caplog):
    """With the shear bound set to 0.001 (the 12-dof fit of two different brains has about
    0.004), the 12-dof fit is 'implausible': the similarity fit is
    used, the log warns and the report says so; with the scale range also shrunk to nothing,
    the rigid fit is used."""
    moved, _ = _moved(moving_brain, easy["centre"], scale=1.1)
    monkeypatch.setattr(prealign_affine, "MAX_SHEAR", 1e-3)
    with caplog.at_level(logging.WARNING, logger="ugi_bids.engine.prealign.affine"):
        result = estimate_prealignment(fixed, moved)
    assert "12-dof fit was implausible (shear" in result.fallback
    assert "similarity (7-dof) fit is used" in result.fallback
    assert any("implausible" in r.getMessage() for r in caplog.records)
    singular = np.linalg.svd(result.affine[:3, :3], compute_uv=False)
    np.testing.assert_allclose(singular, singular.mean(), rtol=1e-4)
    assert result.report()["fallback"] == result.fallback

    monkeypatch.setattr(prealign_affine, "PLAUSIBLE_SCALE", (0.999, 1.001))
    result = estimate_prealignment(fixed, moved)
    assert "rigid (6-dof) fit is used" in result.fallback
    np.testing.assert_allclose(np.linalg.svd(result.affine[:3, :3], compute_uv=False), 1.0,
                               atol=1e-4)


def test_affine_shape_and_plausibility():
    rotation = realdata.rotation_matrix([20, -10, 35])
    upper = np.array([[1.2, 0.3 * 1.2, 0.0], [0.0, 0.9, 0.1 * 0.9], [0.0, 0.0, 1.05]])
    scales, shear = affine_shape(rotation @ upper)
    np.testing.assert_allclose(scales, [1.2, 0.9, 1.05], atol=1e-12)
    assert shear == pytest.approx(0.3)
    assert "shear 0.300 above 0.2" in implausible(rotation @ upper)
    assert "outside 0.67-1.5" in implausible(np.diag([1.6, 1.0, 1.0]))
    assert implausible(rotation @ np.diag([1.1, 0.9, 1.2])) is None


def test_axis_rotations_are_the_24_proper_ones():
    rotations = search.axis_rotations()
    assert len(rotations) == 24 and rotations[0][0] == "+x+y+z"
    np.testing.assert_array_equal(rotations[0][1], np.eye(3))
    for _, matrix in rotations:
        np.testing.assert_allclose(matrix @ matrix.T, np.eye(3))
        assert np.linalg.det(matrix) == pytest.approx(1.0)
    assert len({matrix.tobytes() for _, matrix in rotations}) == 24
    assert len(search.rotation_grid(60, 30)) == 5 ** 3 - 1


def test_moment_rotations_map_principal_axes():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(5000, 3)) * [30.0, 15.0, 5.0]
    turn = realdata.rotation_matrix([30, 60, -20])
    weights = np.ones(len(points))
    fixed_axes = search.principal_axes(points, weights)
    moving_axes = search.principal_axes(points @ turn.T, weights)
    candidates = search.moment_rotations(fixed_axes, moving_axes)
    assert len(candidates) == 4
    assert min(search.rotation_angle(matrix, turn) for _, matrix in candidates) < 2.0


def test_search_keeps_the_centre_of_mass_start_and_finds_the_best_rotation():
    target = search.euler_rotation([0, 0, 150])

    def score(matrix, translation):
        return search.rotation_angle(matrix, target), 1.0

    starts = search.search_starts(score, np.zeros(3), radius=60.0)
    assert starts[0].label != "com" and search.rotation_angle(starts[0].matrix, target) <= 15.0
    assert "com" in [start.label for start in starts]


def _pose_difference(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> float:
    return float(np.linalg.norm(apply_affine(a, points) - apply_affine(b, points), axis=-1).max())


@pytest.fixture(scope="module")
def rotated_pair(fixed, moving_brain, easy):
    moved, _ = _moved(moving_brain, easy["centre"], rotation=realdata.rotation_matrix([0, 0, 90]),
                      scale=1.05)
    return fixed, moved


@pytest.mark.slow
def test_torch_path_equals_the_compiled_kernel(rotated_pair, brain_points, monkeypatch):
    """What a GPU runs (the torch similarity; the compiled kernel is CPU-only) gives the CPU's
    answer: at most 0.1 mm apart over the brain, search included."""
    compiled = estimate_prealignment(*rotated_pair)
    monkeypatch.setattr(prealign_affine.mattes_mi, "available", lambda: False)
    plain = estimate_prealignment(*rotated_pair)
    assert plain.start == compiled.start
    assert _pose_difference(plain.affine, compiled.affine, brain_points) < 0.1


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA GPU here")
def test_cuda_equals_cpu(rotated_pair, brain_points):
    cpu = estimate_prealignment(*rotated_pair)
    cuda = estimate_prealignment(*rotated_pair,
                                 settings=prealign_affine.PrealignSettings(device="cuda"))
    assert cuda.start == cpu.start
    assert _pose_difference(cuda.affine, cpu.affine, brain_points) < 0.1
