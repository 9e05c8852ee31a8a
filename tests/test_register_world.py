"""The whole pair registration in world coordinates, on re-headered real images.

* Storage invariance: the same anatomy stored with permuted/flipped voxel axes (header adjusted)
  gives the same world-space maps.
* Independent reader: the .h5 files ``ugi-register`` writes, applied by ANTs (antspyx) and by
  ITK, reproduce our own warp, both directions, in hard geometries (LPS storage, oblique
  1x1x3 mm voxels, origins 400 mm apart).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests import realdata
from tests.checkpoints import write_random_checkpoint
from ugi_bids.cli.register import main as register_main
from ugi_bids.engine.formats.itk import read_composite_h5
from ugi_bids.engine.registrar import Registrar
from ugi_bids.engine.spatial.volume import load_volume
from ugi_bids.engine.spatial.warp import apply_transform

NETWORK_SIZE = 68
OFFSET_400MM = np.array([[1, 0, 0, 330.0], [0, 1, 0, -220.0], [0, 0, 1, 75.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    # small last-layer weights: random but smooth, non-folding maps, like a trained model's
    path = tmp_path_factory.mktemp("weights") / "Step_2_final.trch"
    return write_random_checkpoint(path, seed=3, lastconv_scale=0.3)


@pytest.fixture(scope="module")
def registrar(small_checkpoint):
    return Registrar(weights=small_checkpoint, network_size=NETWORK_SIZE, device="cpu")


@pytest.fixture(scope="module")
def brains():
    """Fixed: the 2009c brain at 2.5 mm (RAS). Moving: FSL's MNI brain (another real brain) at
    2.5 mm, rotated by 8 degrees."""
    fixed = realdata.downsampled(load_volume(realdata.mni2009c_brain_path()), 2.5)
    moving = realdata.downsampled(load_volume(realdata.fsl_mni_brain_path()), 2.5)
    turn = np.eye(4)
    turn[:3, :3] = realdata.rotation_matrix((8.0, 0.0, -5.0))
    return fixed, realdata.reheader(moving, turn)


@pytest.mark.slow
@pytest.mark.parametrize("prealign, tolerance_mm", [("header", 1e-3), ("affine", 0.15)])
def test_storage_order_does_not_change_the_world_maps(registrar, brains, prealign, tolerance_mm):
    fixed, moving = brains
    reference = registrar.register(fixed, moving, prealign=prealign, io_iterations=0)
    permuted = registrar.register(realdata.store_as(fixed, "PIR"),
                                  realdata.store_as(moving, "LPS"),
                                  prealign=prealign, io_iterations=0)
    points = fixed.grid.world_coordinates()[::3, ::3, ::3].reshape(-1, 3)
    mask = realdata.brain_mask(fixed)[::3, ::3, ::3].reshape(-1)
    forward_a = reference.forward.map_points(points)
    forward_b = permuted.forward.map_points(points)
    assert np.linalg.norm(forward_a - points, axis=1).mean() > 1.0  # non-trivial maps
    assert np.abs(forward_a - forward_b)[mask].max() < tolerance_mm * (10 if prealign == "affine" else 1)
    assert np.linalg.norm(forward_a - forward_b, axis=1)[mask].mean() < tolerance_mm
    moving_points = moving.grid.world_coordinates()[::3, ::3, ::3].reshape(-1, 3)
    moving_mask = realdata.brain_mask(moving)[::3, ::3, ::3].reshape(-1)
    inverse_a = reference.inverse.map_points(moving_points)
    inverse_b = permuted.inverse.map_points(moving_points)
    assert np.linalg.norm(inverse_a - inverse_b, axis=1)[moving_mask].mean() < tolerance_mm


@pytest.fixture(scope="module")
def hard_pair(tmp_path_factory, brains):
    """Files for the hard geometry: fixed oblique 1x1x3 mm (at 2.5x2.5x3 for speed) RAS-ish;
    moving stored LPS, 400 mm away; moving labels (DK atlas carried with the moving anatomy)."""
    folder = tmp_path_factory.mktemp("hard")
    fixed_iso, moving = brains
    oblique = realdata.oblique_anisotropic_grid(fixed_iso, spacing=(2.5, 2.5, 3.0))
    fixed = realdata.resample_to(fixed_iso, oblique)
    moving = realdata.store_as(realdata.reheader(moving, OFFSET_400MM), "LPS")
    dk = load_volume(realdata.dk_atlas_path())
    turn = np.eye(4)
    turn[:3, :3] = realdata.rotation_matrix((8.0, 0.0, -5.0))
    dk_moving = realdata.reheader(realdata.downsampled(dk, 2.0, order=0), OFFSET_400MM @ turn)
    paths = {}
    for name, volume, dtype in (("fixed", fixed, np.float32), ("moving", moving, np.float32),
                                ("moving_labels", dk_moving, np.int16),
                                ("fixed_labels", realdata.downsampled(dk, 2.0, order=0), np.int16)):
        paths[name] = str(folder / f"{name}.nii.gz")
        nib.save(volume.to_nifti(dtype=dtype), paths[name])
    return paths


@pytest.fixture(scope="module")
def registered(hard_pair, small_checkpoint, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("out") / "sub-01")
    code = register_main(["--fixed", hard_pair["fixed"], "--moving", hard_pair["moving"],
                          "--fixed-modality", "mri", "--moving-modality", "mri",
                          "--out-prefix", prefix, "--weights", small_checkpoint,
                          "--network-size", str(NETWORK_SIZE), "--io-iterations", "0", "-q"])
    assert code == 0
    return prefix


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _max_error(ours: np.ndarray, theirs: np.ndarray, source: np.ndarray) -> tuple[float, float]:
    """The largest voxel difference, and the intensity range of the resampled image."""
    return float(np.abs(ours - theirs).max()), float(np.ptp(source))


def test_register_outputs_and_summary(registered, small_checkpoint):
    summary = json.loads(Path(f"{registered}_summary.json").read_text())
    sha256 = hashlib.sha256(Path(small_checkpoint).read_bytes()).hexdigest()
    assert summary["weights"]["sha256"] == sha256
    assert summary["settings"]["prealign"] == "affine"
    assert 0.0 <= summary["folded_voxel_fraction"] < 0.01
    # the 400 mm offset is in the pre-alignment (fixed -> moving world)
    shift = np.array(summary["prealign_affine_ras"])[:3, 3]
    assert np.linalg.norm(shift - OFFSET_400MM[:3, 3]) < 60
    warped = load_volume(f"{registered}_warped.nii.gz")
    fixed = load_volume(summary["fixed"])
    assert warped.grid.shape == fixed.grid.shape
    assert np.allclose(warped.grid.affine, fixed.grid.affine, atol=1e-4)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_ants_reads_our_transforms_like_we_do(registered, hard_pair, direction):
    ants = pytest.importorskip("ants")
    name = {"forward": "from-moving_to-fixed", "inverse": "from-fixed_to-moving"}[direction]
    xfm = f"{registered}_{name}_mode-image_xfm.h5"
    reference, source = ("fixed", "moving") if direction == "forward" else ("moving", "fixed")
    labels = f"{source}_labels"
    transform = read_composite_h5(xfm)
    reference_grid = load_volume(hard_pair[reference]).grid

    ours = apply_transform(load_volume(hard_pair[source]), transform, reference_grid, "linear")
    theirs = ants.apply_transforms(fixed=ants.image_read(hard_pair[reference]),
                                   moving=ants.image_read(hard_pair[source]),
                                   transformlist=[xfm], interpolator="linear")
    inside = ours.data > 0
    assert inside.mean() > 0.05
    assert _correlation(ours.data, theirs.numpy()) >= 0.999
    # the same sampling rules give the same numbers: measured 1.3e-6 (inverse) and 1.8e-6
    # (forward) of the source's intensity range (float32 rounding); a tenth-of-a-voxel slip
    # would move edge voxels by about a tenth of their contrast
    error, scale = _max_error(ours.data, theirs.numpy(), load_volume(hard_pair[source]).data)
    assert error <= 1e-4 * scale, (error, scale)

    source_labels = load_volume(hard_pair[labels])
    ours_labels = apply_transform(source_labels, transform, reference_grid, "nearest").data
    theirs_labels = ants.apply_transforms(fixed=ants.image_read(hard_pair[reference]),
                                          moving=ants.image_read(hard_pair[labels]),
                                          transformlist=[xfm],
                                          interpolator="nearestNeighbor").numpy()
    labelled = (ours_labels > 0) | (theirs_labels > 0)
    assert labelled.sum() > 1000
    assert np.mean(ours_labels[labelled] == np.round(theirs_labels[labelled])) >= 0.99

    ours_generic = apply_transform(source_labels, transform, reference_grid, "label").data
    theirs_generic = ants.apply_transforms(fixed=ants.image_read(hard_pair[reference]),
                                           moving=ants.image_read(hard_pair[labels]),
                                           transformlist=[xfm],
                                           interpolator="genericLabel").numpy()
    labelled = (ours_generic > 0) | (theirs_generic > 0)
    assert np.mean(ours_generic[labelled] == np.round(theirs_generic[labelled])) >= 0.99


@pytest.mark.slow
def test_itk_reads_our_transforms_like_we_do(registered, hard_pair):
    itk = pytest.importorskip("itk")
    xfm = f"{registered}_from-moving_to-fixed_mode-image_xfm.h5"
    transform = itk.transformread(xfm)[0]
    fixed = itk.imread(hard_pair["fixed"], itk.F)
    moving = itk.imread(hard_pair["moving"], itk.F)
    theirs = itk.resample_image_filter(moving, transform=transform, use_reference_image=True,
                                       reference_image=fixed)
    theirs = itk.array_from_image(theirs).transpose(2, 1, 0)  # ITK arrays are (k, j, i)
    ours = apply_transform(load_volume(hard_pair["moving"]), read_composite_h5(xfm),
                           load_volume(hard_pair["fixed"]).grid, "linear")
    assert _correlation(ours.data, theirs) >= 0.999
    # measured 1.8e-6 of the moving image's intensity range (float32 rounding)
    error, scale = _max_error(ours.data, theirs, load_volume(hard_pair["moving"]).data)
    assert error <= 1e-4 * scale, (error, scale)


@pytest.mark.slow
def test_register_prealign_dof_6_gives_a_rigid_prealignment(tmp_path):
    """``ugi-register --prealign-dof 6``: the summary holds the fit's report (6 dof) beside the
    pre-alignment affine, which is rigid although the moving brain is another, larger one."""
    fixed = realdata.downsampled(load_volume(realdata.mni2009c_brain_path()), 4.0)
    moving = realdata.downsampled(load_volume(realdata.fsl_mni_brain_path()), 4.0)
    change = np.eye(4)
    change[:3, :3] = 1.1 * realdata.rotation_matrix((10.0, 0.0, -6.0))
    change[:3, 3] = (12.0, -7.0, 5.0)
    paths = {name: str(tmp_path / f"{name}.nii.gz") for name in ("fixed", "moving")}
    nib.save(fixed.to_nifti(), paths["fixed"])
    nib.save(realdata.reheader(moving, change).to_nifti(), paths["moving"])
    weights = write_random_checkpoint(tmp_path / "Step_2_final.trch", seed=5,
                                      lastconv_scale=0.0)  # the deformable step is the identity
    prefix = str(tmp_path / "out" / "pair")
    code = register_main(["--fixed", paths["fixed"], "--moving", paths["moving"],
                          "--fixed-modality", "mri", "--moving-modality", "mri",
                          "--out-prefix", prefix, "--weights", weights, "--network-size", "65",
                          "--io-iterations", "0", "--prealign-dof", "6", "-q"])
    assert code == 0
    summary = json.loads(Path(f"{prefix}_summary.json").read_text())
    report = summary["prealign"]
    assert report["dof"] == 6 and report["metric"] == "mi" and report["fallback"] is None
    assert set(report) == {"metric", "final_cost", "dof", "start", "fallback", "scales",
                           "max_shear"}
    assert summary["settings"]["prealign"] == "affine"
    assert summary["settings"]["prealign_dof"] == 6
    assert "prealign_report" not in summary["settings"]  # once, beside the affine
    affine = np.array(summary["prealign_affine_ras"])
    assert np.abs(np.linalg.svd(affine[:3, :3], compute_uv=False) - 1.0).max() < 1e-3
    assert np.allclose(report["scales"], 1.0, atol=1e-3)
