"""The uniGradICON / multiGradICON network: four tallUNet2 U-Nets in a 44^3 -> 88^3 -> 175^3 ->
175^3 cascade, with the module nesting of the official checkpoint so that ``Step_2_final.trch``
loads with ``strict=True``.

Maps live in normalised network coordinates: a (B, 3, *S) tensor whose channel ``a`` is the
coordinate along tensor axis ``a`` in [0, 1] (grid spacing 1 / (n - 1)). A registration module
called with ``(image_A, image_B)`` returns ``phi_AB``, a function of such coordinate tensors with
``image_A o phi_AB ~ image_B``: phi_AB maps points of B's (fixed) grid to points of A's (moving)
grid, the resampling ("pull") direction.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..kernels import narrow_conv, trilinear
from ..kernels.upsample_join import upsample_add_join

#: tallUNet2 channel plan: (down channels, up channels).
DOWN_CHANNELS = (2, 16, 32, 64, 256, 512)
UP_CHANNELS = (16, 32, 64, 128, 256)

#: Where each U-Net's parameters live in the official state_dict, coarse to fine.
UNET_PREFIXES = (
    "netPhi.netPhi.net.netPhi.net.net.",  # 44^3
    "netPhi.netPhi.net.netPsi.net.",      # 88^3
    "netPhi.netPsi.net.",                 # 175^3
    "netPsi.net.",                        # 175^3, last step
)


class CoordinateMap(Protocol):
    """A map of normalised coordinates; ``is_identity`` says the input is the exact identity
    lattice of the map's own level, which lets a displacement be added without interpolation
    (as the reference does)."""

    def __call__(self, coords: torch.Tensor, is_identity: bool = False) -> torch.Tensor: ...


def identity_grid(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Identity map on a lattice of ``shape`` (3 ints): (1, 3, *shape), values i / (n - 1)."""
    axes = [torch.arange(n, device=device, dtype=dtype) / (n - 1) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def warp(image: torch.Tensor, coords: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Sample ``image`` (B, C, *S) at normalised coordinates ``coords`` (B, 3, *T).

    Trilinear, ``align_corners=True``; ``padding`` is "border" for maps and images inside the
    cascade and "zeros" for the images the similarity loss sees (as in the reference). One image
    and one set of points in float32 on the CPU go through the compiled kernels of
    :mod:`ugi_bids.engine.kernels.trilinear` (the same numbers and gradients, all threads);
    everything else through ``grid_sample``.
    """
    if trilinear.supported(image, coords):
        return trilinear.sample(image, coords, padding)
    grid = (coords * 2.0 - 1.0).flip(1).permute(0, 2, 3, 4, 1)
    if grid.shape[0] == 1 and image.shape[0] != 1:
        grid = grid.expand(image.shape[0], -1, -1, -1, -1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode=padding, align_corners=True)


def _pad_or_crop_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Keep the first ``channels`` channels, zero-padding at the front when there are fewer."""
    y = x[:, :channels]
    if x.shape[1] < channels:
        y = F.pad(y, (0, 0, 0, 0, 0, 0, channels - x.shape[1], 0))
    return y


def batch_norm_affine(bn: nn.BatchNorm3d, dtype: torch.dtype | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm in eval mode as ``scale * x + shift`` per channel, computed in ``dtype``
    (default: the parameters' own; differentiable in its weight and bias)."""
    weight, bias, mean, var = (t if dtype is None else t.to(dtype) for t in
                               (bn.weight, bn.bias, bn.running_mean, bn.running_var))
    scale = weight / torch.sqrt(var + bn.eps)
    return scale, bias - mean * scale


class TallUNet2(nn.Module):
    """One tallUNet2 (17,670,229 parameters): two 1-channel images in, a displacement
    (B, 3, *S) in normalised coordinates out. A fresh network outputs exactly zero."""

    def __init__(self, num_layers: int = 5):
        super().__init__()
        down = list(DOWN_CHANNELS)
        up = list(UP_CHANNELS)
        up_in = [down[d + 1] + (up[d + 1] if d + 1 < num_layers else 0) for d in range(num_layers)]
        self.num_layers = num_layers
        self.downConvs = nn.ModuleList(
            nn.Conv3d(down[d], down[d + 1], kernel_size=3, padding=1, stride=2)
            for d in range(num_layers))
        self.upConvs = nn.ModuleList(
            nn.ConvTranspose3d(up_in[d], up[d], kernel_size=4, padding=1, stride=2)
            for d in range(num_layers))
        self.batchNorms = nn.ModuleList(nn.BatchNorm3d(up[d]) for d in range(num_layers))
        self.lastConv = nn.Conv3d(down[0] + up[0], 3, kernel_size=3, padding=1)
        nn.init.zeros_(self.lastConv.weight)
        nn.init.zeros_(self.lastConv.bias)

    def forward(self, image_a: torch.Tensor, image_b: torch.Tensor) -> torch.Tensor:
        # Channels-last: oneDNN/cuDNN run 3-D convolutions and their backward fastest in it
        # (about 1.8x for the full-resolution layers); every op below keeps the layout.
        x = torch.cat([image_a, image_b], 1).contiguous(memory_format=torch.channels_last_3d)
        skips = []
        for depth in range(self.num_layers):
            skips.append(x)
            y = self.downConvs[depth](F.leaky_relu(x))
            x = y + _pad_or_crop_channels(F.avg_pool3d(x, 2, ceil_mode=True), y.shape[1])
        for depth in reversed(range(self.num_layers)):
            conv, bn, skip = self.upConvs[depth], self.batchNorms[depth], skips[depth]
            if bn.training:
                y = conv(F.leaky_relu(x))
                x = bn(y + F.interpolate(_pad_or_crop_channels(x, y.shape[1]), scale_factor=2,
                                         mode="trilinear", align_corners=False))
                x = torch.cat([x[:, :, :skip.shape[2], :skip.shape[3], :skip.shape[4]], skip], 1)
            else:
                # BN(convT(l) + up(r)) with BN = scale * v + shift per channel: folded into the
                # transposed convolution and into r at the coarse resolution (exact algebra,
                # autograd included), saving two full-resolution passes and their storage.
                # The upsampling, sum, crop and concatenation then run as one pass.
                scale, shift = batch_norm_affine(bn)
                per_channel = scale[None, :, None, None, None]
                y = F.conv_transpose3d(F.leaky_relu(x), conv.weight * per_channel,
                                       conv.bias * scale + shift, stride=2, padding=1)
                x = upsample_add_join(y, _pad_or_crop_channels(x, y.shape[1]) * per_channel,
                                      skip)
        # The last layer's weight gradient is a slab GEMM on the CPU (narrow_conv notes).
        last = narrow_conv.conv3d(x, self.lastConv.weight, self.lastConv.bias)
        return (last / 10).contiguous()


class FunctionFromVectorField(nn.Module):
    """Wraps a U-Net: returns phi(x) = x + u(x), u read off the U-Net output by trilinear
    interpolation with border padding."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        #: Recompute the U-Net's activations in the backward pass instead of keeping them
        #: (instance optimisation sets it: peak memory of one U-Net instead of eight).
        self.checkpoint = False

    def forward(self, image_a: torch.Tensor, image_b: torch.Tensor) -> CoordinateMap:
        if self.checkpoint and torch.is_grad_enabled():
            displacement = torch.utils.checkpoint.checkpoint(self.net, image_a, image_b,
                                                             use_reentrant=False)
        else:
            displacement = self.net(image_a, image_b)

        def transform(coords: torch.Tensor, is_identity: bool = False) -> torch.Tensor:
            if is_identity and coords.shape[2:] == displacement.shape[2:]:
                return coords + displacement
            return coords + warp(displacement, coords)

        return transform


class DownsampleRegistration(nn.Module):
    """Runs the wrapped module on both images average-pooled by 2 (ceil_mode)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image_a: torch.Tensor, image_b: torch.Tensor) -> CoordinateMap:
        return self.net(F.avg_pool3d(image_a, 2, ceil_mode=True),
                        F.avg_pool3d(image_b, 2, ceil_mode=True))


class TwoStepRegistration(nn.Module):
    """netPhi on the inputs, then netPsi on (A warped by phi, B); returns phi(psi(x))."""

    def __init__(self, netPhi: nn.Module, netPsi: nn.Module):  # noqa: N803 (checkpoint names)
        super().__init__()
        self.netPhi = netPhi
        self.netPsi = netPsi

    def forward(self, image_a: torch.Tensor, image_b: torch.Tensor) -> CoordinateMap:
        identity = identity_grid(image_a.shape[2:], image_a.device, image_a.dtype)
        phi = self.netPhi(image_a, image_b)
        warped_a = warp(image_a, phi(identity, is_identity=True))
        psi = self.netPsi(warped_a, image_b)

        def transform(coords: torch.Tensor, is_identity: bool = False) -> torch.Tensor:
            return phi(psi(coords, is_identity))

        return transform


def build_cascade() -> TwoStepRegistration:
    """The uniGradICON/multiGradICON registration network (both releases share it), with the
    module nesting of the official state_dict. Fresh weights give the exact identity map."""
    level = FunctionFromVectorField(TallUNet2())
    for _ in range(2):
        level = TwoStepRegistration(DownsampleRegistration(level),
                                    FunctionFromVectorField(TallUNet2()))
    cascade = TwoStepRegistration(level, FunctionFromVectorField(TallUNet2()))
    return cascade.eval()


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters())


def map_on_identity(phi: Callable, shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Evaluate a coordinate map on the identity lattice of ``shape``: (1, 3, *shape)."""
    return phi(identity_grid(shape, device, dtype), is_identity=True)
