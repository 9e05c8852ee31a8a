"""Resampling: our apply_transform against antspyx reading the files we write, in hard
geometries and both directions; plus exact small cases of the sampling rules.

(The same comparison against ITK's own reader and ResampleImageFilter is in ``test_itk_io.py``,
which already pays for loading ITK.)"""

from __future__ import annotations

import numpy as np
import pytest

from tests.realdata import downsampled, mni2009c_brain_path, resample_to, store_as
from tests.test_itk_io import (
    CASE_NAMES,
    DIRECTIONS,
    ants_image,
    build_case,
    correlation,
    label_agreement,
    load_real_images,
    translation,
)
from ugi_bids.engine.formats.itk import write_composite_h5, write_displacement_nifti
from ugi_bids.engine.spatial.geometry import Grid
from ugi_bids.engine.spatial.transforms import WorldTransform
from ugi_bids.engine.spatial.volume import Volume, load_volume
from ugi_bids.engine.spatial.warp import apply_transform, sample_at_points


@pytest.fixture(scope="module")
def cases() -> dict:
    images = load_real_images()
    return {name: build_case(name, images) for name in CASE_NAMES}


@pytest.fixture(scope="module")
def ants():
    return pytest.importorskip("ants")


@pytest.fixture(scope="module")
def written(cases, tmp_path_factory) -> dict:
    """One composite .h5 per (case, direction), written once."""
    folder = tmp_path_factory.mktemp("xfm")
    paths = {}
    for name, case in cases.items():
        for direction in DIRECTIONS:
            paths[name, direction] = str(folder / f"{name}_{direction}.h5")
            write_composite_h5(case.direction(direction)[3], paths[name, direction])
    return paths


# --------------------------------------------------------------------------- independent readers

@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_matches_ants(cases, written, ants, case_name, direction):
    source, labels, reference, transform = cases[case_name].direction(direction)
    path = written[case_name, direction]
    fixed = ants_image(Volume(reference, np.zeros(reference.shape, np.float32)))

    ours = apply_transform(source, transform, reference, "linear")
    theirs = ants.apply_transforms(fixed=fixed, moving=ants_image(source), transformlist=[path],
                                   interpolator="linear").numpy()
    assert ours.data.std() > 0.1 * source.data.std()  # the image landed in the FOV
    assert correlation(ours.data, theirs) >= 0.999
    # stricter: the same sampling rules give the same numbers (a 0.1-voxel slip would not)
    assert np.abs(ours.data - theirs).max() <= 1e-3 * source.data.max()

    for ours_mode, ants_mode in (("nearest", "nearestNeighbor"), ("label", "genericLabel")):
        ours = apply_transform(labels, transform, reference, ours_mode)
        theirs = ants.apply_transforms(fixed=fixed, moving=ants_image(labels),
                                       transformlist=[path], interpolator=ants_mode).numpy()
        assert np.count_nonzero(ours.data) > 0.05 * ours.data.size
        assert label_agreement(ours.data, theirs) >= 0.999, ours_mode


@pytest.mark.parametrize("on_reference", [False, True])
def test_displacement_nifti_applied_by_ants(cases, ants, tmp_path, on_reference):
    """The 5D vector NIfTI (affine folded in) resamples like the composite file."""
    case = cases["far_origins"]
    source, _, reference, transform = case.direction("forward")
    path = str(tmp_path / "warp.nii.gz")
    write_displacement_nifti(transform, path, reference=reference if on_reference else None)
    fixed = ants_image(Volume(reference, np.zeros(reference.shape, np.float32)))
    theirs = ants.apply_transforms(fixed=fixed, moving=ants_image(source),
                                   transformlist=[path]).numpy()
    ours = apply_transform(source, transform, reference, "linear")
    assert correlation(ours.data, theirs) >= 0.999
    # stricter: measured 3.2e-6 (field on its own grid) and 4.4e-6 (on the reference grid) of
    # the source's intensity range, float32 rounding of the stored vectors; bound 1e-4 of it
    assert np.abs(ours.data - theirs).max() <= 1e-4 * np.ptp(source.data)


# --------------------------------------------------------------------------- exact small cases

@pytest.fixture(scope="module")
def brain() -> Volume:
    return downsampled(load_volume(mni2009c_brain_path()), 4)


def test_identity_is_exact(brain):
    for mode in ("linear", "nearest", "label"):
        out = apply_transform(brain, WorldTransform(np.eye(4)), brain.grid, mode)
        assert np.allclose(out.data, brain.data, atol=1e-5), mode


def test_storage_orientation_is_invisible(brain):
    """An LPS-stored copy resampled onto the RAS grid gives the RAS voxels back exactly."""
    lps = store_as(brain, "LPS")
    out = apply_transform(lps, WorldTransform(np.eye(4)), brain.grid, "linear")
    assert np.allclose(out.data, brain.data, atol=1e-5)


def test_pull_direction_and_fill(brain):
    """T(x) = x + one voxel along i: output voxel i holds input voxel i + 1; the last slice
    maps outside and gets the fill value."""
    step = brain.grid.affine[:3, 0]
    out = apply_transform(brain, WorldTransform(translation(step)), brain.grid, "linear",
                          fill=-7.0)
    assert np.allclose(out.data[:-1], brain.data[1:], atol=1e-5)
    assert np.all(out.data[-1] == -7.0)


def test_itk_border_rules():
    """Inside means index in [-0.5, n - 0.5); within it the border value is repeated."""
    data = np.arange(4, dtype=np.float32).reshape(4, 1, 1) + 1.0
    volume = Volume(Grid(data.shape, np.eye(4)), data)
    points = np.array([[-0.6, 0, 0], [-0.5, 0, 0], [-0.2, 0, 0], [1.25, 0, 0], [3.4, 0, 0],
                       [3.5, 0, 0]])
    linear = sample_at_points(volume, points, "linear", fill=-1.0)
    assert np.allclose(linear, [-1.0, 1.0, 1.0, 2.25, 4.0, -1.0])
    nearest = sample_at_points(volume, points, "nearest", fill=-1.0)
    assert np.allclose(nearest, [-1.0, 1.0, 1.0, 2.0, 4.0, -1.0])


def test_label_mode_is_generic_label():
    """Largest interpolated indicator wins (not the nearest voxel, not the mean label)."""
    data = np.zeros((2, 2, 2), dtype=np.int16)
    data[0] = 5          # half of the 8 neighbours
    data[1, 0, 0] = 9    # 1/8
    data[1, 1, :] = 3    # 2/8
    volume = Volume(Grid(data.shape, np.eye(4)), data)
    centre = np.array([[0.5, 0.5, 0.5]])
    assert sample_at_points(volume, centre, "label")[0] == 5
    # near the corner (1, 0, 0) label 9 dominates
    assert sample_at_points(volume, np.array([[0.9, 0.1, 0.1]]), "label")[0] == 9
    out = sample_at_points(volume, np.array([[0.9, 0.9, 0.5]]), "label")
    assert out.dtype == np.int16 and out[0] == 3


def test_many_labels_in_bounded_memory():
    """~120 labels on a 96^3 grid: cost does not grow with the number of labels."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 120, size=(24, 24, 24)).astype(np.int32)
    coarse = Volume(Grid(labels.shape, np.diag([4.0, 4.0, 4.0, 1.0])), labels)
    fine = Grid((96, 96, 96), translation((-1.0, -1.0, -1.0)))
    out = apply_transform(coarse, WorldTransform(np.eye(4)), fine, "label", max_points=200_000)
    assert out.data.dtype == np.int32
    assert set(np.unique(out.data)) <= set(np.unique(labels))
    # points at coarse voxel centres keep their label
    assert np.array_equal(out.data[1::4, 1::4, 1::4], labels)


def test_chunking_does_not_change_results(cases):
    source, labels, reference, transform = cases["oblique_reference"].direction("backward")
    whole = apply_transform(source, transform, reference, "linear", max_points=10**9)
    pieces = apply_transform(source, transform, reference, "linear", max_points=20_000)
    assert np.array_equal(whole.data, pieces.data)
    whole = apply_transform(labels, transform, reference, "label", max_points=10**9)
    pieces = apply_transform(labels, transform, reference, "label", max_points=20_000)
    assert np.array_equal(whole.data, pieces.data)


def test_linear_matches_scipy_in_the_interior(brain):
    """Against scipy's map_coordinates (order 1) for a pure affine, away from the border."""
    shift = translation((1.3, -2.1, 0.7))
    out = apply_transform(brain, WorldTransform(shift), brain.grid, "linear")
    moved = Volume(Grid(brain.grid.shape, np.linalg.inv(shift) @ brain.grid.affine), brain.data)
    expected = resample_to(moved, brain.grid)
    assert np.allclose(out.data[2:-2, 2:-2, 2:-2], expected.data[2:-2, 2:-2, 2:-2], atol=1e-4)


def test_rejects_unknown_interpolation(brain):
    with pytest.raises(ValueError):
        apply_transform(brain, WorldTransform(np.eye(4)), brain.grid, "cubic")
