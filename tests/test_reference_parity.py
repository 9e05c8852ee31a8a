"""Parity with the published implementation (unigradicon 1.0.6 / icon-registration 1.1.9).

Same random official-format checkpoint, same real image pair on one grid, pre-alignment off:
our world maps must equal the reference ``register_pair`` maps within 1e-3 voxel, and one IO
step must give the same loss within 1e-4 with the same random draws. The reference packages are
an optional test dependency (installed by .ci/run); these tests skip only where they are absent.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from tests import realdata
from ugi_bids.engine.optimise.instance import instance_optimise
from ugi_bids.engine.optimise.similarity import lncc2_loss, lncc_loss, mind_loss
from ugi_bids.engine.preprocess import normalise_intensities
from ugi_bids.engine.registrar import Registrar, resize_to_lattice
from ugi_bids.engine.spatial.geometry import RAS_TO_LPS, apply_affine
from ugi_bids.engine.spatial.volume import Volume, load_volume

unigradicon = pytest.importorskip("unigradicon")
itk = pytest.importorskip("itk")
itk_wrapper = pytest.importorskip("icon_registration.itk_wrapper")
icon_losses = pytest.importorskip("icon_registration.losses")

NETWORK_SIZE = 68


@pytest.fixture(scope="module")
def brain_pair(tmp_path_factory):
    """A real brain (2.5 mm) and a shifted, noisier copy of it, on the same grid, as files."""
    folder = tmp_path_factory.mktemp("pair")
    fixed = realdata.downsampled(load_volume(realdata.mni2009c_brain_path()), 2.5)
    rng = np.random.default_rng(0)
    moving_data = ndimage.shift(fixed.data, (2.0, -3.0, 1.5), order=1)
    moving_data = moving_data + 5 * rng.random(fixed.data.shape).astype(np.float32)
    moving = Volume(fixed.grid, moving_data.astype(np.float32))
    paths = folder / "fixed.nii.gz", folder / "moving.nii.gz"
    nib.save(fixed.to_nifti(), paths[0])
    nib.save(moving.to_nifti(), paths[1])
    return tuple(str(p) for p in paths)


@pytest.fixture(scope="module")
def reference_network(random_checkpoint):
    net = unigradicon.make_network([1, 1] + [NETWORK_SIZE] * 3, include_last_step=True)
    net.regis_net.load_state_dict(torch.load(random_checkpoint, weights_only=True), strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def registrar(random_checkpoint):
    return Registrar(weights=random_checkpoint, network_size=NETWORK_SIZE, device="cpu")


def _reference_points(transform, points_ras):
    """Apply an ITK (LPS) transform to RAS points."""
    lps = apply_affine(RAS_TO_LPS, points_ras)
    out = np.array([transform.TransformPoint([float(v) for v in p]) for p in lps])
    return apply_affine(RAS_TO_LPS, out)


def test_world_maps_equal_reference_register_pair(brain_pair, reference_network, registrar):
    fixed_path, moving_path = brain_pair
    fixed, moving = load_volume(fixed_path), load_volume(moving_path)
    ours = registrar.register(fixed, moving, prealign="none", io_iterations=0)

    fixed_itk = unigradicon.preprocess(itk.imread(fixed_path), "mri")
    moving_itk = unigradicon.preprocess(itk.imread(moving_path), "mri")
    ref_ab, ref_ba = itk_wrapper.register_pair(reference_network, moving_itk, fixed_itk,
                                               finetune_steps=None)

    rng = np.random.default_rng(1)
    index = rng.uniform(-0.5, np.array(fixed.grid.shape) - 0.5, size=(400, 3))
    points = fixed.grid.index_to_world(index)
    ours_ab = ours.forward.map_points(points)
    theirs_ab = _reference_points(ref_ab, points)
    assert np.linalg.norm(theirs_ab - points, axis=1).mean() > 1.0  # the maps are not trivial
    assert np.max(np.abs(ours_ab - theirs_ab) / moving.grid.spacing) < 1e-3

    ours_ba = ours.inverse.map_points(points)
    theirs_ba = _reference_points(ref_ba, points)
    assert np.max(np.abs(ours_ba - theirs_ba) / fixed.grid.spacing) < 1e-3


@pytest.mark.slow
def test_one_io_step_gives_the_reference_loss(brain_pair, reference_network, registrar):
    fixed_path, moving_path = brain_pair
    fixed = normalise_intensities(load_volume(fixed_path), "mri")
    moving = normalise_intensities(load_volume(moving_path), "mri")
    image_a = resize_to_lattice(moving.data, NETWORK_SIZE)
    image_b = resize_to_lattice(fixed.data, NETWORK_SIZE)
    original = {k: v.clone() for k, v in registrar.network.state_dict().items()}

    torch.manual_seed(1234)
    ours = instance_optimise(registrar.network, image_a, image_b, steps=1, similarity="lncc")
    torch.manual_seed(1234)
    theirs = itk_wrapper.finetune_execute(reference_network, image_a, image_b, 1, 2e-5)

    final = ours.losses[-1]
    assert abs(final.total - float(theirs.all_loss)) < 1e-4
    assert abs(final.similarity - float(theirs.similarity_loss)) < 1e-4
    assert abs(final.inverse_consistency - float(theirs.inverse_consistency_loss)) < 1e-4
    # the step changed the maps, and the weights were restored afterwards
    assert ours.losses[0].total != final.total
    for key, value in registrar.network.state_dict().items():
        assert torch.equal(value, original[key]), key


@pytest.mark.parametrize("ours, theirs", [
    (lncc_loss, lambda: icon_losses.LNCC(sigma=5)),
    (lncc2_loss, lambda: icon_losses.SquaredLNCC(sigma=5)),
    (mind_loss, lambda: icon_losses.MINDSSC(radius=2, dilation=2)),
])
def test_similarities_equal_reference(ours, theirs):
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 30, 32, 34, generator=generator)
    b = torch.rand(1, 1, 30, 32, 34, generator=generator)
    mask = (torch.rand(1, 1, 30, 32, 34, generator=generator) > 0.3).float()
    reference = theirs()
    assert abs(float(ours(a, b)) - float(reference(a, b))) < 1e-5
    assert abs(float(ours(a, b, mask)) - float(reference(a, b, mask))) < 1e-5
