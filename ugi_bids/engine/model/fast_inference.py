"""The cascade's forward map without autograd, evaluated stage by stage with the folded U-Nets
(:mod:`ugi_bids.engine.model.fused_unet`) and threaded trilinear sampling
(:mod:`ugi_bids.engine.kernels.chain`).

It computes exactly what calling the module tree of
:func:`ugi_bids.engine.model.network.build_cascade` computes (the same interpolations at the same points, in the same order); only float32 rounding
differs. Used for inference; instance optimisation needs gradients and runs the module tree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.chain import chain
from .fused_unet import drop_inference_unet, inference_unet
from .network import CoordinateMap, TallUNet2, warp


def cascade_unets(cascade: nn.Module) -> tuple[TallUNet2, TallUNet2, TallUNet2, TallUNet2]:
    """The four U-Nets of a :func:`build_cascade` module, coarse (44^3) to fine (175^3, last)."""
    level = cascade.netPhi
    coarse = level.netPhi.net
    return (coarse.netPhi.net.net, coarse.netPsi.net, level.netPsi.net, cascade.netPsi.net)


def fold_unets(cascade: nn.Module) -> None:
    """Build (or refresh) the folded inference form of all four U-Nets now, e.g. when the
    weights are loaded, rather than inside the first registration."""
    for unet in cascade_unets(cascade):
        inference_unet(unet)


def drop_folded_unets(cascade: nn.Module) -> None:
    """Forget the folded forms (they go stale when the weights change, and instance
    optimisation needs their ~0.3 GB more than a snapshot it would rebuild anyway)."""
    for unet in cascade_unets(cascade):
        drop_inference_unet(unet)


def _warped(image: torch.Tensor, start, displacements) -> torch.Tensor:
    """``image`` (1, 1, *S) read (border-clamped) through the maps, as (1, 1, *S)."""
    return chain(image.shape[2:], start, displacements, image[0, 0])[None, None]


@torch.no_grad()
def cascade_displacements(cascade: nn.Module, image_a: torch.Tensor, image_b: torch.Tensor
                          ) -> list[torch.Tensor]:
    """The four U-Net displacements of the pass (A, B), coarse to fine, each channels-last
    (n0, n1, n2, 3) on its own lattice (44^3, 88^3, 175^3, 175^3)."""
    unets = [inference_unet(u) for u in cascade_unets(cascade)]
    a0, b0 = image_a, image_b
    a1, b1 = F.avg_pool3d(a0, 2, ceil_mode=True), F.avg_pool3d(b0, 2, ceil_mode=True)
    a2, b2 = F.avg_pool3d(a1, 2, ceil_mode=True), F.avg_pool3d(b1, 2, ceil_mode=True)
    # 88^3 step: U1 on the 44^3 images, A warped by it, then U2.
    u1 = unets[0](a2, b2)
    u2 = unets[1](_warped(a1, None, [u1]), b1)
    # 175^3 steps: U3 after the 88^3 map (U2 then U1), U4 after U3's.
    u3 = unets[2](_warped(a0, None, [u2, u1]), b0)
    u4 = unets[3](_warped(a0, u3, [u2, u1]), b0)
    return [u1, u2, u3, u4]


@torch.no_grad()
def cascade_map(cascade: nn.Module, image_a: torch.Tensor, image_b: torch.Tensor
                ) -> torch.Tensor:
    """phi_AB on the identity lattice of the inputs, (1, 3, *S), normalised coordinates
    (B-lattice points -> A-lattice points); equals ``cascade(a, b)(identity, True)``."""
    u1, u2, u3, u4 = cascade_displacements(cascade, image_a, image_b)
    phi = chain(image_a.shape[2:], u4, [u3, u2, u1])
    return phi.permute(3, 0, 1, 2)[None]


@torch.no_grad()
def cascade_transform(cascade: nn.Module, image_a: torch.Tensor, image_b: torch.Tensor
                      ) -> CoordinateMap:
    """phi_AB as a function of coordinates, like ``cascade(a, b)`` (no autograd): the final
    evaluation of instance optimisation uses it for the loss terms."""
    fields = [u.permute(3, 0, 1, 2)[None] for u in cascade_displacements(cascade, image_a,
                                                                            image_b)]

    def transform(coords: torch.Tensor, is_identity: bool = False) -> torch.Tensor:
        finest = fields[3]
        if is_identity and coords.shape[2:] == finest.shape[2:]:
            coords = coords + finest
        else:
            coords = coords + warp(finest, coords)
        for displacement in reversed(fields[:3]):
            coords = coords + warp(displacement, coords)
        return coords

    return transform
