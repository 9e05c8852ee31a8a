"""Registrations take nipype MultiProc GPU slots only where they will run on a GPU, and
``--gpu-procs N`` lets N of them share it, whatever their thread count.

MultiProc charges a GPU node ``min(n_procs, n_gpu_procs)`` GPU slots. ``device="auto"`` on a
machine without a GPU used to flag every registration as a GPU node, which let one run at a
time however many cores ``--nprocs`` gave; and on a GPU, ``--gpu-procs 2`` with two or more
threads per registration still ran one at a time. The scheduling test below runs nipype's own
MultiProc on nodes that only sleep, so it needs no GPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    SimpleInterface,
    TraitedSpec,
    traits,
)
from nipype.pipeline import engine as pe

from ugi_bids.cli.run import plugin_settings
from ugi_bids.config import Config
from ugi_bids.workflows.registration import init_register_to_template_wf

SLEEP_S = 1.5


class _SleepInputSpec(BaseInterfaceInputSpec):
    log_dir = traits.Str(mandatory=True)
    tag = traits.Int(mandatory=True)
    use_gpu = traits.Bool(False, usedefault=True)


class _SleepOutputSpec(TraitedSpec):
    tag = traits.Int()


class Sleep(SimpleInterface):
    """Records when it ran (start and end, seconds since the epoch) in ``log_dir``."""

    input_spec = _SleepInputSpec
    output_spec = _SleepOutputSpec

    def _run_interface(self, runtime):
        start = time.time()
        time.sleep(SLEEP_S)
        Path(self.inputs.log_dir, f"{self.inputs.tag}.txt").write_text(f"{start} {time.time()}")
        self._results["tag"] = self.inputs.tag
        return runtime


def most_at_once(log_dir: Path) -> int:
    spans = [tuple(map(float, path.read_text().split())) for path in log_dir.glob("*.txt")]
    return max(sum(start <= moment < end for start, end in spans) for moment, _ in spans)


def run_sleepers(tmp_path: Path, settings: dict, *, use_gpu: bool, threads: int) -> int:
    log_dir = tmp_path / "log"
    log_dir.mkdir(parents=True)
    workflow = pe.Workflow(name="sleepers", base_dir=str(tmp_path / "work"))
    workflow.add_nodes([pe.Node(Sleep(log_dir=str(log_dir), tag=tag, use_gpu=use_gpu),
                                name=f"sleep{tag}", n_procs=threads) for tag in range(3)])
    workflow.run(**settings)
    return most_at_once(log_dir)


def config(**settings) -> Config:
    return Config(bids_dir=Path("/data"), output_dir=Path("/out"), **settings)


def test_plugin_gives_gpu_slots_for_gpu_procs_registrations_of_any_thread_count():
    settings = plugin_settings(config(nprocs=16, omp_nthreads=4, gpu_procs=2), use_gpu=True)
    assert settings["plugin"] == "MultiProc"
    assert settings["plugin_args"]["n_gpu_procs"] == 8
    cpu = plugin_settings(config(nprocs=16, omp_nthreads=4, gpu_procs=2))
    assert "n_gpu_procs" not in cpu["plugin_args"]  # no GPU nodes: nipype's default stands
    own = plugin_settings(config(nprocs=4, plugin={"plugin": "MultiProc",
                                                   "plugin_args": {"n_gpu_procs": 3}}),
                          use_gpu=True)
    assert own["plugin_args"]["n_gpu_procs"] == 3  # --use-plugin's own value wins


def test_gpu_registrations_share_the_cores_unless_omp_nthreads_says():
    """Without ``--omp-nthreads`` a CPU registration takes every core; on a GPU the cores are
    shared among the ``--gpu-procs`` registrations, so that they can run at once."""
    from ugi_bids.workflows.base import threads_per_registration

    assert threads_per_registration(config(nprocs=8, gpu_procs=2)) == 8
    assert threads_per_registration(config(nprocs=8, gpu_procs=2), use_gpu=True) == 4
    assert threads_per_registration(config(nprocs=3, gpu_procs=4), use_gpu=True) == 1
    assert threads_per_registration(config(nprocs=8, omp_nthreads=3, gpu_procs=2), True) == 3
    settings = plugin_settings(config(nprocs=8, gpu_procs=2), use_gpu=True)
    assert settings["plugin_args"]["n_gpu_procs"] == 8  # two registrations of four threads


@pytest.mark.parametrize("use_gpu", [False, True])
def test_registration_node_takes_a_gpu_slot_only_on_a_gpu(use_gpu):
    wf = init_register_to_template_wf(template_label="MNI152NLin2009cAsym", device="auto",
                                      omp_nthreads=2, use_gpu=use_gpu, io_iterations=0)
    node = wf.get_node("unigradicon")
    assert node.is_gpu_node() == use_gpu
    assert node.inputs.device == "auto"  # resolved where the node runs


@pytest.mark.slow
def test_multiproc_runs_gpu_procs_registrations_at_once(tmp_path):
    """Three two-thread registrations, four cores, ``--gpu-procs 2``: two share the GPU."""
    settings = plugin_settings(config(nprocs=4, omp_nthreads=2, gpu_procs=2), use_gpu=True)
    assert run_sleepers(tmp_path / "fixed", settings, use_gpu=True, threads=2) == 2
    # what the slots used to be (n_gpu_procs = --gpu-procs): one at a time
    settings["plugin_args"]["n_gpu_procs"] = 2
    assert run_sleepers(tmp_path / "before", settings, use_gpu=True, threads=2) == 1


@pytest.mark.slow
def test_multiproc_runs_cpu_registrations_by_cores_alone(tmp_path):
    """Without a GPU the registrations are ordinary nodes: four cores, two threads each."""
    settings = plugin_settings(config(nprocs=4, omp_nthreads=2, gpu_procs=1))
    assert run_sleepers(tmp_path, settings, use_gpu=False, threads=2) == 2
