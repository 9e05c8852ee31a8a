"""The weights snapshot of instance optimisation restores parameters and buffers bit for bit,
from a temporary file on the CPU or from memory when no file can be written."""

from __future__ import annotations

import tempfile

import pytest
import torch
from torch import nn

from ugi_bids.engine.optimise.snapshot import WeightSnapshot


def _module() -> nn.Module:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.Conv3d(4, 3, 1))
    module[1].running_mean.normal_()
    return module.to(memory_format=torch.channels_last_3d)


def _scramble(module: nn.Module) -> None:
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(1.0)


@pytest.mark.parametrize("file_fails", [False, True])
def test_restore_is_exact(monkeypatch, file_fails):
    if file_fails:
        def no_file(*args, **kwargs):
            raise OSError("No space left on device")
        monkeypatch.setattr(tempfile, "TemporaryFile", no_file)
    module = _module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    snap = WeightSnapshot(module)
    assert (snap._file is None) == file_fails  # on the CPU the copy lives on disk when it can
    assert (snap._state is None) != file_fails
    _scramble(module)
    snap.restore()
    snap.close()
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert module[0].weight.is_contiguous(memory_format=torch.channels_last_3d)


def test_snapshot_file_does_not_stay_in_memory():
    """The point of the file: the process does not hold a second copy of the weights."""
    module = nn.Linear(1024, 1024)
    snap = WeightSnapshot(module)
    assert snap._state is None and snap._file.tell() > 4 * 1024 * 1024
    snap.close()
    assert snap._file is None

