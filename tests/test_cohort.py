"""Cohort API: many moving images onto one fixed image with the network loaded once."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from tests.realdata import (
    downsampled,
    fsl_mni_brain_path,
    mni2009c_brain_path,
    reheader,
    rotation_matrix,
)
from ugi_bids.engine.registrar import Registrar
from ugi_bids.engine.spatial.volume import load_volume


@pytest.mark.slow
def test_register_many_equals_one_by_one(tmp_path, random_checkpoint):
    fixed = downsampled(load_volume(mni2009c_brain_path()), 2.0)
    base = downsampled(load_volume(fsl_mni_brain_path()), 2.0)
    change = np.eye(4)
    change[:3, :3] = rotation_matrix((0, 0, 6))
    change[:3, 3] = (4.0, -3.0, 2.0)
    moved = reheader(base, change)
    path = tmp_path / "moved.nii.gz"
    nib.save(moved.to_nifti(), str(path))

    registrar = Registrar(weights=random_checkpoint, network_size=65, device="cpu")
    results = list(registrar.register_many(fixed, [base, str(path)], io_iterations=0))
    assert len(results) == 2
    assert results[1].timings["read_s"] > 0
    for moving, many in zip((base, load_volume(str(path))), results):
        single = registrar.register(fixed, moving, io_iterations=0)
        np.testing.assert_allclose(many.prealign, single.prealign, atol=1e-9)
        np.testing.assert_allclose(many.forward.field.vectors, single.forward.field.vectors,
                                   atol=1e-5)
        np.testing.assert_allclose(many.inverse.field.vectors, single.inverse.field.vectors,
                                   atol=1e-5)
    # The re-headered copy is the same anatomy moved in world space: the pre-alignment found
    # the motion (the network maps then agree in world terms).
    assert not np.allclose(results[0].prealign, results[1].prealign, atol=1.0)
