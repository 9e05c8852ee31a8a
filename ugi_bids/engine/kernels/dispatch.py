"""Where the compiled kernels run: float32 tensors on the CPU, with torch's thread count."""

from __future__ import annotations

import torch

from . import numba
from .lattice import match_threads


def kernels_apply(*tensors: torch.Tensor) -> bool:
    """Whether the engine's compiled (numba) kernels can take these tensors: numba is
    installed and every tensor is float32 on the CPU. Elsewhere (CUDA, float64) the callers
    use PyTorch's own operations."""
    return numba is not None and all(t.device.type == "cpu" and t.dtype == torch.float32
                                     for t in tensors)


def match_torch_threads() -> int:
    """Give the compiled kernels as many threads as torch uses (``--omp-nthreads``), within
    numba's pool; returns that count."""
    return match_threads()
