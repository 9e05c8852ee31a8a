"""Activation checkpointing in instance optimisation: the same gradients either way, and the
automatic choice (:func:`ugi_bids.engine.optimise.instance.io_checkpointing`): always on the CPU (the
6 GB bound), off on a GPU with room for the kept activations."""

from __future__ import annotations

import json

import nibabel as nib
import pytest
import torch

from tests import realdata
from tests.checkpoints import random_state_dict
from tests.test_cuda import needs_cuda
from tests.test_fast_inference import brain_pair
from ugi_bids.cli.register import main as register_main
from ugi_bids.engine.model.network import build_cascade
from ugi_bids.engine.optimise import instance as inference
from ugi_bids.engine.optimise.instance import (
    infer_maps,
    instance_optimise,
    pair_objective,
    set_checkpointing,
)
from ugi_bids.engine.optimise.similarity import get_similarity
from ugi_bids.engine.registrar import Registrar
from ugi_bids.engine.spatial.volume import load_volume


def _network(device: str = "cpu") -> torch.nn.Module:
    net = build_cascade()
    net.load_state_dict(random_state_dict(seed=3))
    return net.to(device).eval().to(memory_format=torch.channels_last_3d)


def _objective_and_gradients(network, moving, fixed, recompute: bool):
    """One IO objective (GradICON points seeded) and all weight gradients, flattened."""
    set_checkpointing(network, recompute)
    network.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    total, _, _, _ = pair_objective(network, moving, fixed, get_similarity("lncc"))
    total.backward()
    gradients = torch.cat([p.grad.flatten() for p in network.parameters()])
    network.zero_grad(set_to_none=True)
    set_checkpointing(network, False)
    return total.detach(), gradients


@pytest.mark.slow
def test_checkpointing_gives_the_same_gradients():
    """Recomputing the U-Nets' activations in the backward pass changes nothing: the same
    objective and bit-identical weight gradients (CPU, 65^3)."""
    network = _network()
    moving, fixed = brain_pair(65)
    kept = _objective_and_gradients(network, moving, fixed, recompute=False)
    recomputed = _objective_and_gradients(network, moving, fixed, recompute=True)
    assert torch.equal(kept[0], recomputed[0])
    assert torch.equal(kept[1], recomputed[1])


@pytest.mark.parametrize("free_gb, cached_gb, size, recompute", [
    (80.0, 0.0, 175, False),   # a large GPU keeps the activations
    (10.0, 0.0, 175, True),    # 10 GB do not hold the 9 GB step with 25 % to spare
    (2.0, 10.0, 175, False),   # this process's own cached blocks count as room
    (1.0, 0.0, 65, False),     # the need scales with the lattice's voxels
    (0.4, 0.0, 65, True),
])
def test_io_checkpointing_follows_free_gpu_memory(monkeypatch, free_gb, cached_gb, size,
                                                  recompute):
    gb = 1e9
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_gb * gb, 80 * gb))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: cached_gb * gb + 1e8)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1e8)
    assert inference.io_checkpointing(torch.device("cuda:0"), (size,) * 3) is recompute


@pytest.mark.slow
def test_io_checkpointing_is_always_on_for_the_cpu():
    """The CPU keeps the 6 GB bound; and a step records what it did."""
    assert inference.io_checkpointing(torch.device("cpu"), (175,) * 3) is True
    cpu_network = _network()
    moving, fixed = brain_pair(65)
    maps = instance_optimise(cpu_network, moving, fixed, steps=1)
    assert maps.checkpointing is True
    assert infer_maps(cpu_network, moving, fixed).checkpointing is None


def _failing_once(monkeypatch):
    """Make the first differentiable objective fail as a full GPU would; count calls."""
    calls = {"n": 0}
    original = inference.pair_objective

    def objective(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1 and torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(*args, **kwargs)

    monkeypatch.setattr(inference, "pair_objective", objective)
    return calls


@pytest.mark.slow
def test_io_falls_back_to_recomputing_when_memory_runs_out(monkeypatch, caplog):
    """The automatic choice kept the activations but the memory went (another process on the
    GPU): the step is redone recomputing them, and the run finishes."""
    network = _network()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    monkeypatch.setattr(inference, "io_checkpointing", lambda device, shape: False)
    calls = _failing_once(monkeypatch)
    moving, fixed = brain_pair(65)
    maps = instance_optimise(network, moving, fixed, steps=1)
    assert maps.checkpointing is True
    assert calls["n"] == 3  # the failed step, its retry, the final evaluation
    assert len(maps.losses) == 2
    assert "ran out of GPU memory" in caplog.text
    for key, value in network.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_io_does_not_override_an_explicit_choice(monkeypatch):
    network = _network()
    _failing_once(monkeypatch)
    moving, fixed = brain_pair(65)
    with pytest.raises(torch.OutOfMemoryError):
        instance_optimise(network, moving, fixed, steps=1, checkpointing=False)


def test_registrar_checks_the_setting(random_checkpoint):
    with pytest.raises(ValueError, match="IO checkpointing"):
        Registrar(weights=random_checkpoint, device="cpu", network_size=65,
                  io_checkpointing="sometimes")


@pytest.mark.slow
def test_ugi_register_keeps_activations_when_asked(random_checkpoint, tmp_path):
    """``ugi-register --io-checkpointing off`` reaches the run; its summary says what ran."""
    paths = {}
    for name, path in (("fixed", realdata.mni2009c_brain_path()),
                       ("moving", realdata.fsl_mni_brain_path())):
        paths[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(realdata.downsampled(load_volume(path), 3.0).to_nifti(), paths[name])
    prefix = str(tmp_path / "out" / "pair")
    code = register_main(["--fixed", paths["fixed"], "--moving", paths["moving"],
                          "--fixed-modality", "mri", "--moving-modality", "mri",
                          "--out-prefix", prefix, "--weights", random_checkpoint,
                          "--network-size", "65", "--io-iterations", "1",
                          "--io-checkpointing", "off", "--device", "cpu", "-q"])
    assert code == 0
    summary = json.load(open(f"{prefix}_summary.json"))
    assert summary["settings"]["io_checkpointing"] == "off"


@needs_cuda
def test_io_memory_on_cuda_at_true_grid(capsys):
    """On the GPU, checkpointing on and off give the same gradients (up to the GPU's own
    run-to-run differences: its convolution and sampling gradients add in no fixed order), and
    each way's peak stays within the figures the automatic choice relies on."""
    cuda_network = _network("cuda")
    moving, fixed = brain_pair(175)
    moving, fixed = moving.cuda(), fixed.cuda()
    peaks, gradients = {}, {}
    for recompute in (True, False):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        instance_optimise(cuda_network, moving, fixed, steps=2, checkpointing=recompute)
        peaks[recompute] = torch.cuda.max_memory_allocated()
    for recompute in (True, False):
        gradients[recompute] = _objective_and_gradients(cuda_network, moving, fixed,
                                                        recompute)[1]
    difference = float((gradients[True] - gradients[False]).norm() / gradients[False].norm())
    with capsys.disabled():
        print(f"\nIO at 175^3 on {torch.cuda.get_device_name()}: peak "
              f"{peaks[True] / 1e9:.2f} GB recomputing, {peaks[False] / 1e9:.2f} GB keeping; "
              f"gradients {difference:.1e} apart (relative norm)")
    assert peaks[True] <= inference.IO_CHECKPOINTED_PEAK_BYTES_175
    assert peaks[False] <= (inference.IO_CHECKPOINTED_PEAK_BYTES_175
                            + inference.IO_ACTIVATIONS_BYTES_175)
    assert difference < 1e-3
