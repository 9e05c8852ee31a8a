"""The one slow test: the whole ``ugi-register`` command at the released network grid (175^3)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from tests import realdata
from ugi_bids.cli.register import main as register_main
from ugi_bids.engine.formats.itk import read_composite_h5
from ugi_bids.engine.spatial.volume import load_volume
from ugi_bids.engine.spatial.warp import apply_transform


@pytest.mark.slow
def test_register_at_the_true_grid(tmp_path, random_checkpoint):
    fixed = realdata.downsampled(load_volume(realdata.mni2009c_brain_path()), 2.0)
    moving = realdata.store_as(realdata.downsampled(load_volume(realdata.fsl_mni_brain_path()), 2.0), "LPS")
    nib.save(fixed.to_nifti(), tmp_path / "fixed.nii.gz")
    nib.save(moving.to_nifti(), tmp_path / "moving.nii.gz")
    prefix = str(tmp_path / "out" / "pair")
    code = register_main(["--fixed", str(tmp_path / "fixed.nii.gz"),
                          "--moving", str(tmp_path / "moving.nii.gz"),
                          "--fixed-modality", "mri", "--moving-modality", "mri",
                          "--out-prefix", prefix, "--weights", random_checkpoint,
                          "--io-iterations", "0", "--device", "cpu", "-q"])
    assert code == 0
    summary = json.load(open(f"{prefix}_summary.json"))
    assert summary["settings"]["network_size"] == 175
    forward = read_composite_h5(f"{prefix}_from-moving_to-fixed_mode-image_xfm.h5")
    assert forward.field.grid.shape == (177, 177, 177)  # the lattice plus a one-voxel rim
    assert forward.field.vectors.dtype == np.float32
    warped = load_volume(f"{prefix}_warped.nii.gz")
    ours = apply_transform(moving, forward, fixed.grid)
    assert np.allclose(warped.data, ours.data, atol=1e-3 * float(moving.data.max()))
    # the maps are not the identity (random weights), yet the result is still a brain near the fixed one
    moved = np.linalg.norm(forward.map_points(fixed.grid.world_coordinates()[::4, ::4, ::4])
                           - fixed.grid.world_coordinates()[::4, ::4, ::4], axis=-1)
    assert moved.mean() > 0.5
