"""Random-valued checkpoints in the official ``Step_2_final.trch`` format (same 188 keys and
shapes as the release files). The official weights cannot be downloaded here, and must never be
faked: these files exercise the exact loading path a real file takes, with random values."""

from __future__ import annotations

import torch

from ugi_bids.engine.model.network import build_cascade


def random_state_dict(seed: int = 0, lastconv_scale: float = 1.0) -> dict:
    """A state_dict with the official keys/shapes and random values.

    Convolutions keep PyTorch's default (Kaiming-uniform) initialisation drawn from ``seed``; the
    last convolutions, zero in a fresh network, get small random values scaled by
    ``lastconv_scale`` so that the maps are not the identity; BatchNorm statistics are random but
    valid (positive variances).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    state = build_cascade().state_dict()
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000, dtype=torch.long)
        elif "lastConv" in key:
            state[key] = lastconv_scale * 0.02 * torch.randn(value.shape, generator=generator)
        elif "batchNorms" in key and key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(value.shape, generator=generator)
        elif "batchNorms" in key and key.endswith("running_mean"):
            state[key] = 0.1 * torch.randn(value.shape, generator=generator)
        elif "batchNorms" in key and key.endswith("weight"):
            state[key] = 1.0 + 0.1 * torch.randn(value.shape, generator=generator)
        elif "batchNorms" in key and key.endswith("bias"):
            state[key] = 0.1 * torch.randn(value.shape, generator=generator)
    return state


def write_random_checkpoint(path, seed: int = 0, lastconv_scale: float = 1.0) -> str:
    """Save :func:`random_state_dict` with ``torch.save`` like the release files; returns path."""
    torch.save(random_state_dict(seed, lastconv_scale), str(path))
    return str(path)


def difference_state_dict(seed: int = 0, lastconv_scale: float = 1.0) -> dict:
    """A deformable random state_dict (official keys and shapes) that maps an image pair to the
    identity when the two images are equal, and to non-affine maps when they differ.

    Every U-Net sees only the difference of its two inputs: the first convolution's weights
    are antisymmetric in the two input channels; its last two output channels cancel the
    residual average-pooled inputs that the architecture adds after it (a 2x2x2 box of
    -1/8 inside the 3x3x3 stride-2 kernel reads exactly the pooled window); the last
    convolution's weights on the skipped input channels are antisymmetric; every bias is zero
    and BatchNorm is ``weight * x`` (mean 0, variance 1, shift 0). Equal inputs then give zero
    activations everywhere, so, like a trained network and unlike :func:`random_state_dict`,
    it has no systematic displacement for a pair of equal images (measured at 65^3: at most
    1.3e-5 mm). ``lastconv_scale`` scales the maps (1: about 3 mm at most between two
    different brains at 3 mm voxels).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    state = build_cascade().state_dict()
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000, dtype=torch.long)
        elif key.endswith(".bias"):
            state[key] = torch.zeros_like(value)
        elif "batchNorms" in key and key.endswith("running_var"):
            state[key] = torch.ones_like(value)
        elif "batchNorms" in key and key.endswith("running_mean"):
            state[key] = torch.zeros_like(value)
        elif "batchNorms" in key and key.endswith("weight"):
            state[key] = 1.0 + 0.1 * torch.randn(value.shape, generator=generator)
        elif key.endswith("lastConv.weight"):
            weight = lastconv_scale * 0.02 * torch.randn(value.shape, generator=generator)
            weight[:, -1] = -weight[:, -2]
            state[key] = weight
        elif key.endswith("downConvs.0.weight"):
            weight = value.clone()
            weight[:, 1] = -weight[:, 0]
            weight[-2:] = 0.0
            weight[-2, 0, 1:, 1:, 1:] = -1.0 / 8.0
            weight[-1, 1, 1:, 1:, 1:] = -1.0 / 8.0
            state[key] = weight
    return state


def write_difference_checkpoint(path, seed: int = 0, lastconv_scale: float = 1.0) -> str:
    """Save :func:`difference_state_dict` like the release files; returns the path."""
    torch.save(difference_state_dict(seed, lastconv_scale), str(path))
    return str(path)
