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
