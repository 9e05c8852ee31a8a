"""``benchmarks/conv_floor.py`` times the convolutions of the real network: its layer list must
be the U-Net's own (channels, lattices) and its arithmetic the issue's 330 GFLOP a direction."""

from __future__ import annotations

import torch

from benchmarks import conv_floor
from ugi_bids.engine.model.network import UNET_PREFIXES, TallUNet2, build_cascade


def test_layer_list_matches_the_unet_as_it_runs():
    size = 37  # odd edges on the way down, as 175 has
    unet = TallUNet2().train()  # the training branch calls the modules, so hooks see them
    seen = []

    def record(module, inputs, output):
        seen.append((inputs[0].shape[1], output.shape[1], inputs[0].shape[2],
                     output.shape[2]))

    for module in [*unet.downConvs, *unet.upConvs]:
        module.register_forward_hook(record)
    with torch.no_grad():
        out = unet(torch.rand(1, 1, size, size, size), torch.rand(1, 1, size, size, size))
    layers = conv_floor.unet_layers(size)
    assert [(la["cin"], la["cout"], la["in_edge"], la["out_edge"]) for la in layers[:-1]] == seen
    last = layers[-1]
    assert (last["cin"], last["cout"]) == (unet.lastConv.in_channels, unet.lastConv.out_channels)
    assert last["out_edge"] == out.shape[2] == size


def test_unet_input_edges_are_the_cascades_own():
    """Forward pre-hooks on the four U-Nets of the real cascade, in ``UNET_PREFIXES`` order."""
    cascade = build_cascade()
    unets = [cascade.get_submodule(prefix.rstrip(".")) for prefix in UNET_PREFIXES]
    seen = []
    for unet in unets:
        unet.register_forward_pre_hook(lambda module, inputs: seen.append(
            (unets.index(module), inputs[0].shape[2])))
    grid = 81
    with torch.no_grad():
        cascade(torch.rand(1, 1, grid, grid, grid), torch.rand(1, 1, grid, grid, grid))
    assert [edge for _, edge in sorted(seen)] == conv_floor.unet_input_edges(grid)


def test_arithmetic_is_the_issues_330_gflop_per_direction():
    assert conv_floor.unet_input_edges(175) == [44, 88, 175, 175]
    macs = sum(sum(la["macs"] for la in conv_floor.unet_layers(edge))
               for edge in conv_floor.unet_input_edges(175))
    assert abs(2 * macs / 1e9 - 330) < 10
