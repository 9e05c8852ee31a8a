"""Arithmetic precision of the network on CUDA: full float32 by default, TF32 only on request.

PyTorch lets cuDNN run float32 convolutions in TF32 (10-bit mantissa on the tensor cores) by
default. That changes the maps by far more than float32 rounding, so the engine switches it
off while the network runs on a GPU (``"float32"``) and restores the caller's settings
afterwards. ``"tf32"`` is the opt-in fast mode: convolutions and matrix products may use TF32;
its error against float32 is measured in ``benchmarks/README.md``. On the CPU there is no TF32
and both settings compute the same thing.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch

from ..options import DEFAULT_PRECISION, PRECISIONS

LOGGER = logging.getLogger(__name__)

#: Network precisions a caller may ask for; the first is the default.


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def effective_precision(precision: str, device: torch.device | str) -> str:
    """What the network will run in on ``device``: TF32 exists on CUDA only, so anywhere else
    a ``"tf32"`` request runs (and is recorded) as ``"float32"``, with a warning."""
    check_precision(precision)
    device = torch.device(device)
    if precision != "float32" and device.type != "cuda":
        LOGGER.warning("precision %s has no effect on %s: the network runs in float32",
                       precision, device)
        return "float32"
    return precision


def _new_api() -> bool:
    """torch >= 2.9 has per-backend ``fp32_precision`` settings; mixing them with the legacy
    ``allow_tf32`` flags is refused by some versions, so one API is used throughout."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    return hasattr(conv, "fp32_precision") and hasattr(torch.backends.cuda.matmul,
                                                       "fp32_precision")


@contextmanager
def network_precision(device: torch.device | str, precision: str = DEFAULT_PRECISION
                      ) -> Iterator[None]:
    """Run the enclosed network work on ``device`` in ``precision`` (see the module docstring);
    the global PyTorch settings are restored on exit."""
    check_precision(precision)
    if torch.device(device).type != "cuda":
        yield
        return
    allow = precision == "tf32"
    if _new_api():
        conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
        saved = (conv.fp32_precision, matmul.fp32_precision)
        conv.fp32_precision = matmul.fp32_precision = "tf32" if allow else "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
    else:  # pragma: no cover - torch < 2.9
        saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allow
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
