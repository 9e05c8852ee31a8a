"""Which torch device a registration runs on; importing this loads torch and nothing else of
the engine, so a command line can check ``--device`` before building anything."""

from __future__ import annotations

import torch

from ...errors import DeviceUnavailableError
from ..options import DEFAULT_DEVICE


def resolve_device(device: str | torch.device = DEFAULT_DEVICE) -> torch.device:
    """"auto" -> CUDA when available, else CPU; "cuda" without a GPU is refused clearly."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {device} was requested but no CUDA GPU is available here; use --device cpu or auto")
    return device
