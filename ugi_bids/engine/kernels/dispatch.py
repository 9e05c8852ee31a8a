"""Where the compiled kernels run: float32 tensors on the CPU (their thread count:
:func:`ugi_bids.engine.kernels.lattice.match_threads`)."""

from __future__ import annotations

import torch

from . import numba


def kernels_apply(*tensors: torch.Tensor) -> bool:
    """Whether the engine's compiled (numba) kernels can take these tensors: numba is
    installed and every tensor is float32 on the CPU. Elsewhere (CUDA, float64) the callers
    use PyTorch's own operations."""
    return numba is not None and all(t.device.type == "cpu" and t.dtype == torch.float32
                                     for t in tensors)
