"""Chains of transform files: an image or an atlas carried through several mode-image transforms
in one resampling step (e.g. MNI -> subject template -> a session's raw grid).

Our order: ``[a, b]`` applies ``a`` to the reference (output) points first, then ``b``: the
source is sampled at ``b(a(x))``. That is ``antsApplyTransforms -t a -t b`` (antspyx
``transformlist=[a, b]``): ANTs' "applied in reverse order" describes how the image moves (push),
not how the points are mapped (pull); ``test_order_is_antsapplytransforms_order`` pins it with a
translation and a rotation. Checked against antspyx reading the files we write, with a real brain
and the real Desikan-Killiany atlas (stored LIA), through two transforms with rotations and
smooth displacement fields, an intermediate space ~260 mm away from both ends, and reference
grids stored oblique-anisotropic and LPS.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from tests.realdata import (
    dk_atlas_path,
    downsampled,
    mni2009c_brain_path,
    oblique_anisotropic_grid,
    reheader,
    rotation_matrix,
    store_as,
)
from tests.test_itk_io import (
    about,
    label_agreement,
    padded_field_grid,
    smooth_field,
    translation,
)
from ugi_bids.engine.formats.itk import write_composite_h5
from ugi_bids.engine.spatial.geometry import Grid
from ugi_bids.engine.spatial.jacobian import jacobian_determinant
from ugi_bids.engine.spatial.transforms import TransformChain, WorldTransform, compose
from ugi_bids.engine.spatial.volume import Volume, load_volume
from ugi_bids.engine.spatial.warp import apply_transform
from ugi_bids.interfaces.files import propagate_labels, read_transforms, resample_image

#: Where the intermediate space lies relative to the reference and source worlds (|t| ~ 260 mm).
SHIFT = (150.0, -200.0, 80.0)


def rigid_scaled(angles_deg, scales, shift, centre) -> np.ndarray:
    """A 4x4 rotation @ scale + shift acting about ``centre`` (world mm)."""
    matrix = np.eye(4)
    matrix[:3, :3] = rotation_matrix(angles_deg) @ np.diag(scales)
    matrix[:3, 3] = shift
    return about(matrix, centre)


def two_transforms(grid: Grid) -> tuple[WorldTransform, WorldTransform]:
    """``first`` maps points around ``grid`` (the reference world) into an intermediate space
    ``SHIFT`` away; ``second`` maps intermediate points back near ``grid`` (the source world).
    Each has a rotation, an anisotropic scale and a smooth field on its own lattice (stored like
    ``grid`` for ``first``, PIR in the intermediate space for ``second``)."""
    centre = grid.centre()
    first = WorldTransform(
        translation(SHIFT) @ rigid_scaled((6.0, -4.0, 8.0), (1.04, 0.97, 1.02), (2.0, -3.0, 1.0),
                                          centre),
        smooth_field(padded_field_grid(grid, nodes=20), amplitude=3.0, wavelength=70.0, seed=1))
    intermediate = reheader(Volume(grid, np.zeros(grid.shape, np.float32)), translation(SHIFT))
    field_grid = padded_field_grid(store_as(intermediate, "PIR").grid, nodes=20)
    second = WorldTransform(
        rigid_scaled((-5.0, 7.0, -3.0), (0.98, 1.03, 1.0), (-1.5, 2.0, 3.0), centre)
        @ translation(-np.asarray(SHIFT)),
        smooth_field(field_grid, amplitude=2.5, wavelength=60.0, seed=2))
    return first, second


# --------------------------------------------------------------------------- unit (fast)


def test_chain_applies_in_the_listed_order():
    grid = Grid((10, 12, 9), np.diag([4.0, 3.5, 5.0, 1.0]))
    first, second = two_transforms(grid)
    points = np.random.default_rng(0).uniform(-30, 60, size=(5, 7, 3))
    sequential = second.map_points(first.map_points(points))
    chain = TransformChain((first, second))
    assert chain.map_points(points).shape == points.shape
    assert np.array_equal(chain.map_points(points), sequential)
    assert not np.allclose(chain.map_points(points), first.map_points(second.map_points(points)),
                           atol=1.0)  # the order matters
    # nested chains flatten to the same map; compose() builds the chain
    third = WorldTransform(translation((1.0, 2.0, -3.0)))
    nested = TransformChain((chain, third))
    assert np.array_equal(nested.map_points(points), third.map_points(sequential))
    assert np.array_equal(compose(first, second).map_points(points), sequential)
    assert isinstance(compose(first, second), TransformChain)
    assert compose(first) is first and compose(chain) is chain
    with pytest.raises(ValueError):
        TransformChain(())
    with pytest.raises(TypeError):
        TransformChain((first, np.eye(4)))


def test_chain_of_affines_is_their_product():
    """Resampling and the Jacobian through ``[a, b]`` equal those of the one affine ``B A``;
    a chain is never taken for a plain affine by the Jacobian (it is differentiated)."""
    grid = Grid((20, 22, 18), np.diag([2.0, 2.0, 2.0, 1.0]))
    a = rigid_scaled((10.0, 0.0, -5.0), (1.1, 1.0, 0.9), (1.0, 0.0, 2.0), grid.centre())
    b = rigid_scaled((0.0, 8.0, 4.0), (1.0, 0.95, 1.05), (-2.0, 1.0, 0.0), grid.centre())
    data = np.random.default_rng(1).uniform(0, 1, grid.shape).astype(np.float32)
    moving = Volume(grid, data)
    chain = compose(WorldTransform(a), WorldTransform(b))
    product = WorldTransform(b @ a)
    ours = apply_transform(moving, chain, grid, "linear")
    expected = apply_transform(moving, product, grid, "linear")
    assert np.abs(ours.data - expected.data).max() <= 1e-5
    det = jacobian_determinant(chain, grid)
    assert np.allclose(det, np.linalg.det((b @ a)[:3, :3]), atol=1e-5)


def test_read_transforms_takes_one_path_or_a_list(tmp_path):
    grid = Grid((10, 12, 9), np.diag([4.0, 3.5, 5.0, 1.0]))
    first, second = two_transforms(grid)
    paths = [str(tmp_path / "first.h5"), str(tmp_path / "second.h5")]
    write_composite_h5(first, paths[0])
    write_composite_h5(second, paths[1])
    assert isinstance(read_transforms(paths[0]), WorldTransform)
    assert isinstance(read_transforms(tmp_path / "first.h5"), WorldTransform)
    assert isinstance(read_transforms(paths[:1]), WorldTransform)
    chain = read_transforms(paths)
    points = np.random.default_rng(2).uniform(-20, 50, size=(50, 3))
    # float32 field vectors in the files: agreement to ~1e-5 mm
    assert np.abs(chain.map_points(points)
                  - second.map_points(first.map_points(points))).max() < 1e-4
    with pytest.raises(ValueError):
        read_transforms([])


# --------------------------------------------------------------------------- against antspyx


@pytest.fixture(scope="module")
def ants():
    return pytest.importorskip("ants")


def test_order_is_antsapplytransforms_order(ants, tmp_path):
    """``a``: +10 mm along x; ``b``: 90 degrees about z. The moving image holds 1 at ``b(a(x))``
    and 2 at ``a(b(x))``; ours and ``transformlist=[a, b]`` read 1 at ``x``, ``[b, a]`` reads 2."""
    from tests.test_itk_io import ants_image

    a, b = translation((10.0, 0.0, 0.0)), np.eye(4)
    b[:3, :3] = [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    paths = [str(tmp_path / "a.h5"), str(tmp_path / "b.h5")]
    write_composite_h5(WorldTransform(a), paths[0])
    write_composite_h5(WorldTransform(b), paths[1])
    grid = Grid((41, 41, 41), translation((-20.0, -20.0, -20.0)))
    x = np.array([1.0, 2.0, 3.0])
    data = np.zeros(grid.shape, np.float32)
    data[tuple(np.rint(grid.world_to_index((b @ a)[:3, :3] @ x + (b @ a)[:3, 3])).astype(int))] = 1
    data[tuple(np.rint(grid.world_to_index((a @ b)[:3, :3] @ x + (a @ b)[:3, 3])).astype(int))] = 2
    moving = Volume(grid, data)
    at_x = tuple(np.rint(grid.world_to_index(x)).astype(int))
    ours = apply_transform(moving, read_transforms(paths), grid, "nearest").data
    fixed = ants_image(Volume(grid, np.zeros(grid.shape, np.float32)))
    theirs = {order: ants.apply_transforms(fixed, ants_image(moving), transformlist=list(order),
                                           interpolator="nearestNeighbor").numpy()
              for order in (tuple(paths), tuple(paths[::-1]))}
    assert ours[at_x] == 1
    assert theirs[tuple(paths)][at_x] == 1 and theirs[tuple(paths[::-1])][at_x] == 2
    assert np.array_equal(ours, theirs[tuple(paths)])


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict:
    """Files on disk: the brain at 3 mm (RAS), the DK atlas at 2.5 mm (LIA, int16), an oblique
    anisotropic reference (3 x 3 x 4 mm), LPS references (2.5 and 5 mm), the two transforms."""
    folder = tmp_path_factory.mktemp("chain")
    brain1 = load_volume(mni2009c_brain_path())
    brain3 = downsampled(brain1, 3.0)
    atlas = downsampled(load_volume(dk_atlas_path()), 2.5, order=0)
    assert nib.aff2axcodes(atlas.grid.affine) == ("L", "I", "A")
    oblique = oblique_anisotropic_grid(brain3, spacing=(3.0, 3.0, 4.0))
    lps = store_as(downsampled(brain1, 2.5), "LPS").grid
    small = store_as(downsampled(brain1, 5.0), "LPS").grid  # for the interfaces: a fast check
    files = {"brain": folder / "brain.nii.gz", "atlas": folder / "atlas.nii.gz",
             "oblique": folder / "oblique.nii.gz", "lps": folder / "lps.nii.gz",
             "small": folder / "small.nii.gz",
             "first": folder / "first_xfm.h5", "second": folder / "second_xfm.h5"}
    nib.save(brain3.to_nifti(dtype=np.float32), files["brain"])
    nib.save(Volume(atlas.grid, np.rint(atlas.data)).to_nifti(dtype=np.int16), files["atlas"])
    for name, grid in (("oblique", oblique), ("lps", lps), ("small", small)):
        nib.save(Volume(grid, np.zeros(grid.shape, np.float32)).to_nifti(dtype=np.uint8),
                 files[name])
    first, second = two_transforms(brain3.grid)
    write_composite_h5(first, files["first"])
    write_composite_h5(second, files["second"])
    return {"folder": folder, "source": brain3.data, **{k: str(v) for k, v in files.items()}}


def test_image_through_a_chain_matches_ants(scene, ants):
    out = str(scene["folder"] / "brain_chain.nii.gz")
    resample_image(scene["brain"], [scene["first"], scene["second"]], scene["oblique"], out,
                   "linear")
    ours = load_volume(out).data
    theirs = ants.apply_transforms(
        fixed=ants.image_read(scene["oblique"]), moving=ants.image_read(scene["brain"]),
        transformlist=[scene["first"], scene["second"]], interpolator="linear").numpy()
    source = scene["source"]
    assert ours.shape == theirs.shape
    assert ours.std() > 0.1 * source.std()  # the brain landed in the field of view
    # the same sampling rules give the same numbers: measured 1.6e-6 of the intensity range
    # (float32 rounding of the stored fields and of the NIfTI headers); bound 1e-5 of it
    assert np.abs(ours - theirs).max() <= 1e-5 * np.ptp(source)
    # the reverse order is a different map (so the comparison above does check the order)
    wrong = ants.apply_transforms(
        fixed=ants.image_read(scene["oblique"]), moving=ants.image_read(scene["brain"]),
        transformlist=[scene["second"], scene["first"]], interpolator="linear").numpy()
    assert np.abs(ours - wrong).max() > 0.5 * np.ptp(source)  # measured 0.99 of the range


def test_atlas_through_a_chain_matches_ants_generic_label(scene, ants):
    out = str(scene["folder"] / "atlas_chain.nii.gz")
    propagate_labels(scene["atlas"], [scene["first"], scene["second"]], scene["lps"], out)
    written = nib.load(out)
    assert np.issubdtype(written.get_data_dtype(), np.integer)
    assert np.allclose(written.affine, nib.load(scene["lps"]).affine)
    ours = np.asarray(written.dataobj).astype(int)
    theirs = ants.apply_transforms(
        fixed=ants.image_read(scene["lps"]), moving=ants.image_read(scene["atlas"]),
        transformlist=[scene["first"], scene["second"]], interpolator="genericLabel").numpy()
    theirs = np.rint(theirs).astype(int)
    atlas_values = set(np.unique(np.asarray(nib.load(scene["atlas"]).dataobj)).astype(int))
    assert set(np.unique(ours)) <= atlas_values
    assert np.count_nonzero(ours) > 0.1 * ours.size and len(np.unique(ours)) > 80
    # measured 100 % over the labelled voxels (113 label values on 16 % of the grid)
    assert label_agreement(ours, theirs) >= 0.999


def test_interfaces_take_one_file_or_a_list(scene, tmp_path):
    from ugi_bids.interfaces.labels import PropagateLabels
    from ugi_bids.interfaces.registration import ApplyTransform

    for folder in ("propagate", "apply"):
        (tmp_path / folder).mkdir()
    chain = [scene["first"], scene["second"]]
    expected = propagate_labels(scene["atlas"], chain, scene["small"],
                                str(tmp_path / "function.nii.gz"))
    node = PropagateLabels(in_file=scene["atlas"], transform=chain, reference=scene["small"])
    result = node.run(cwd=str(tmp_path / "propagate"))
    got, want = nib.load(result.outputs.out_file), nib.load(expected)
    assert got.get_data_dtype() == want.get_data_dtype()
    assert np.array_equal(got.affine, want.affine)
    assert np.array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))
    # one file, as the workflows connect it, is still accepted (a one-item list)
    single = PropagateLabels(in_file=scene["atlas"], transform=scene["first"],
                             reference=scene["small"])
    assert single.inputs.transform == [scene["first"]]
    apply = ApplyTransform(in_file=scene["brain"], transform=scene["first"],
                           reference=scene["small"], interpolation="linear")
    assert apply.inputs.transform == [scene["first"]]
    apply.inputs.transform = chain
    resampled = apply.run(cwd=str(tmp_path / "apply")).outputs.out_file
    direct = resample_image(scene["brain"], chain, scene["small"],
                            str(tmp_path / "direct.nii.gz"), "linear")
    assert np.array_equal(nib.load(resampled).get_fdata(), nib.load(direct).get_fdata())
