"""A copy of a module's weights to restore after instance optimisation.

On the CPU the copy goes to an anonymous temporary file rather than into memory: during IO the
process holds the weights, their gradients and Adam's two moments (4 x 0.28 GB for the
released network) next to the activations, and a fifth in-memory copy would raise the peak by
0.28 GB for a restore that happens once, after the optimiser is gone. Writing and reading it
back takes well under a second, next to minutes of IO on a CPU. Where the file cannot be
written (full or read-only temporary folder), and on GPUs, the copy stays in memory.
"""

from __future__ import annotations

import copy
import logging
import tempfile

import torch
from torch import nn

LOGGER = logging.getLogger(__name__)


class WeightSnapshot:
    """``snapshot = WeightSnapshot(module)`` ... ``snapshot.restore()`` puts back exactly the
    parameters and buffers ``module`` had (bit for bit); :meth:`close` drops the copy."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._file = None
        self._state = None
        on_cpu = all(t.device.type == "cpu" for t in module.state_dict().values())
        if on_cpu:
            try:
                self._file = tempfile.TemporaryFile(prefix="ugi-bids-weights-")
                torch.save(module.state_dict(), self._file)
                self._file.flush()
            except OSError as exc:
                LOGGER.info("weights snapshot kept in memory (temporary file failed: %s)", exc)
                self.close()
        if self._file is None:
            self._state = copy.deepcopy(module.state_dict())

    def restore(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            state = torch.load(self._file, map_location="cpu", weights_only=True)
        else:
            state = self._state
        self.module.load_state_dict(state)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._state = None
