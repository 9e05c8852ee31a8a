"""The network: official architecture, exact identity when fresh, strict loading."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from ugi_bids.engine.model.network import (
    UNET_PREFIXES,
    TallUNet2,
    build_cascade,
    count_parameters,
    identity_grid,
    map_on_identity,
)
from ugi_bids.engine.registrar import Registrar


def test_state_dict_layout_matches_the_release():
    state = build_cascade().state_dict()
    assert len(state) == 188
    for prefix in UNET_PREFIXES:
        keys = [k for k in state if k.startswith(prefix)]
        assert len(keys) == 47, prefix
    assert state["netPhi.netPhi.net.netPhi.net.net.downConvs.0.weight"].shape == (16, 2, 3, 3, 3)
    assert state["netPsi.net.lastConv.weight"].shape == (3, 18, 3, 3, 3)
    assert state["netPsi.net.upConvs.4.weight"].shape == (512, 256, 4, 4, 4)
    assert count_parameters(TallUNet2()) == 17_670_229
    assert count_parameters(build_cascade()) == 70_680_916


def test_fresh_network_is_exactly_the_identity():
    torch.manual_seed(0)
    cascade = build_cascade()
    size = (68, 68, 68)
    a, b = torch.rand(1, 1, *size), torch.rand(1, 1, *size)
    with torch.no_grad():
        phi = map_on_identity(cascade(a, b), size)
    assert torch.equal(phi, identity_grid(size))


def test_random_official_checkpoint_loads_strictly_and_moves_points(random_checkpoint):
    registrar = Registrar(weights=random_checkpoint, network_size=68, device="cpu")
    size = (68, 68, 68)
    torch.manual_seed(0)
    a, b = torch.rand(1, 1, *size), torch.rand(1, 1, *size)
    with torch.no_grad():
        phi = map_on_identity(registrar.network(a, b), size)
    assert (phi - identity_grid(size)).abs().max() > 1e-3  # the loaded weights are in use
    sha256 = hashlib.sha256(Path(random_checkpoint).read_bytes()).hexdigest()
    assert registrar.weights.sha256 == sha256


def test_network_grid_below_minimum_is_refused(random_checkpoint):
    with pytest.raises(ValueError, match="at least 65"):
        Registrar(weights=random_checkpoint, network_size=32)
