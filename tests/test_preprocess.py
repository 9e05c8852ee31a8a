"""Intensity preprocessing and masks: the published windows, and masking in both modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import realdata
from ugi_bids.engine.preprocess import kth_quantile, normalise_intensities, preprocess
from ugi_bids.engine.registrar import Registrar
from ugi_bids.engine.spatial.geometry import Grid
from ugi_bids.engine.spatial.volume import Volume, load_volume
from ugi_bids.errors import InputDataError


def _volume(data):
    return Volume(Grid(data.shape, np.eye(4)), np.asarray(data, dtype=np.float32))


def test_mri_window_is_min_to_99th_percentile():
    data = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    out = normalise_intensities(_volume(data), "mri").data
    assert out.min() == 0.0 and out.max() == 1.0
    high = kth_quantile(data, 0.99)  # the 990th smallest value
    assert high == 989.0
    assert np.all(out[data >= high] == 1.0)
    assert np.isclose(out.ravel()[500], 500 / 989)


def test_ct_window_is_minus_1000_to_1000_hu():
    data = np.linspace(-2000, 2000, 1000, dtype=np.float32).reshape(10, 10, 10)
    out = normalise_intensities(_volume(data), "ct").data
    assert np.all(out[data <= -1000] == 0) and np.all(out[data >= 1000] == 1)
    inside = (data > -1000) & (data < 1000)
    assert np.allclose(out[inside], (data[inside] + 1000) / 2000, atol=1e-6)


def test_mri_normalisation_matches_the_reference():
    unigradicon = pytest.importorskip("unigradicon")
    itk = pytest.importorskip("itk")
    brain = realdata.downsampled(load_volume(realdata.mni2009c_brain_path()), 3.0)
    theirs = unigradicon.preprocess(itk.image_from_array(brain.data.transpose(2, 1, 0).copy()), "mri")
    theirs = itk.array_from_image(theirs).transpose(2, 1, 0)
    ours = normalise_intensities(brain, "mri").data
    assert np.max(np.abs(ours - theirs)) < 1e-6


@pytest.mark.parametrize("data", [np.zeros((8, 8, 8)), np.full((8, 8, 8), 3.0)])
def test_constant_image_is_refused(data):
    with pytest.raises(InputDataError, match="constant"):
        normalise_intensities(_volume(data), "mri")


def test_input_masking_multiplies_the_binarised_mask():
    rng = np.random.default_rng(0)
    image = _volume(rng.random((12, 12, 12)) * 100)
    mask_data = np.zeros((12, 12, 12), np.float32)
    mask_data[2:9, 3:10, 1:8] = 7.0  # any non-zero value means "inside"
    out = preprocess(image, "mri", _volume(mask_data), apply_mask=True).data
    assert np.all(out[mask_data == 0] == 0)
    assert np.allclose(out[mask_data > 0], normalise_intensities(image, "mri").data[mask_data > 0])


def test_mask_on_another_grid_or_empty_is_refused():
    image = _volume(np.random.default_rng(0).random((12, 12, 12)))
    with pytest.raises(InputDataError, match="grid"):
        preprocess(image, "mri", _volume(np.ones((10, 12, 12))), apply_mask=True)
    with pytest.raises(InputDataError, match="empty"):
        preprocess(image, "mri", _volume(np.zeros((12, 12, 12))), apply_mask=True)


@pytest.mark.slow
def test_loss_masks_restrict_the_io_objective(random_checkpoint):
    """Loss masks change the IO objective (and only it): a full mask equals no mask, a brain
    mask gives another similarity; without IO, loss masks leave the maps unchanged."""
    from ugi_bids.engine.optimise.instance import pair_objective
    from ugi_bids.engine.optimise.similarity import get_similarity

    brain = realdata.downsampled(load_volume(realdata.mni2009c_brain_path()), 3.0)
    shifted = Volume(brain.grid, np.roll(brain.data, 2, axis=0))
    mask = Volume(brain.grid, realdata.brain_mask(brain).astype(np.float32))
    shifted_mask = Volume(brain.grid, np.roll(mask.data, 2, axis=0))
    registrar = Registrar(weights=random_checkpoint, network_size=65, device="cpu")
    plain = registrar.register(brain, shifted, prealign="none", io_iterations=0)
    masked = registrar.register(brain, shifted, fixed_mask=mask, moving_mask=shifted_mask,
                                masking="loss", prealign="none", io_iterations=0)
    points = brain.grid.world_coordinates()[::5, ::5, ::5].reshape(-1, 3)
    assert np.allclose(plain.forward.map_points(points), masked.forward.map_points(points))

    from ugi_bids.engine.preprocess import binarise_mask
    from ugi_bids.engine.registrar import network_pair, prealignment
    fixed_n, moving_n = normalise_intensities(brain, "mri"), normalise_intensities(shifted, "mri")
    pair = network_pair(fixed_n, moving_n,
                        prealignment(fixed_n, moving_n, "none", network_size=65), size=65,
                        keep_storage=True, fixed_mask=binarise_mask(mask, brain),
                        moving_mask=binarise_mask(shifted_mask, shifted))
    assert 0.05 < float(pair.fixed_mask.mean()) < 0.95
    similarity = get_similarity("lncc")  # the masking of each similarity: test_reference_parity

    def objective(**masks):
        torch.manual_seed(0)
        with torch.no_grad():
            return pair_objective(registrar.network, pair.moving, pair.fixed, similarity,
                                  **masks)[1]

    unmasked = objective()
    full = objective(mask_a=torch.ones_like(pair.moving), mask_b=torch.ones_like(pair.fixed))
    restricted = objective(mask_a=pair.moving_mask, mask_b=pair.fixed_mask)
    assert abs(full.similarity - unmasked.similarity) < 1e-5
    assert abs(restricted.similarity - unmasked.similarity) > 1e-3
    assert abs(restricted.inverse_consistency - unmasked.inverse_consistency) < 1e-6
