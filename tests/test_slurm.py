"""A real Slurm cluster (one node: slurmctld + slurmd, started by ``.ci/start-slurm.sh``): the
README's array script, submitted verbatim, runs one participant per array task, all writing
into one OUTPUT_DIR at the same time.

Skipped where no Slurm controller answers (``sinfo``); CI starts one before the tests. The
weights are random in the official format (``--weights`` passed after the script's name, as
the README says extra options are), so the maps say nothing about registration quality: this
tests the scheduling, the shared output folder and the files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bidsdata import app_environment, make_cohort_dataset, make_templateflow_home
from tests.checkpoints import write_random_checkpoint
from ugi_bids.interfaces.bids import STAGING_PREFIX

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"
SPACE = "MNI152NLin2009cAsym"


def _slurm_is_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return probe.returncode == 0 and bool(re.search(r"idle|mix|alloc", probe.stdout))


def readme_array_script() -> str:
    """The README's Slurm array script for an installed ugi-bids: the bash block that holds
    ``#SBATCH --array`` and no ``apptainer run`` (the container variant needs Apptainer, which
    does not install here)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    scripts = [block for block in blocks
               if "#SBATCH --array" in block and "apptainer run" not in block]
    assert len(scripts) == 1, "the README must hold exactly one installed-ugi-bids array script"
    return scripts[0]


@pytest.mark.skipif(not _slurm_is_up(), reason="no Slurm controller answers here "
                    "(CI starts one with .ci/start-slurm.sh)")
def test_readme_array_script_runs_a_cohort_into_one_output_folder(tmp_path):
    bids = make_cohort_dataset(tmp_path / "bids", participants=3)["bids_dir"]
    templateflow = make_templateflow_home(tmp_path / "templateflow")
    weights = write_random_checkpoint(tmp_path / "Step_2_final.trch", seed=3,
                                      lastconv_scale=0.3)
    script = tmp_path / "ugi-bids-array.sh"
    script.write_text(readme_array_script())
    out = tmp_path / "derivatives" / "ugi-bids"
    env = dict(app_environment(tmp_path, templateflow), BIDS_DIR=str(bids),
               OUTPUT_DIR=str(out), SCRATCH=str(tmp_path / "scratch"),
               UGI_BIDS_HOME=str(tmp_path / "empty-cache"),
               TEMPLATEFLOW_HOME=str(templateflow))
    # ugi-bids on PATH, as for a user who installed it (this interpreter's scripts folder)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    logs = tmp_path / "slurm-logs"
    logs.mkdir()
    # the command line overrides the script's #SBATCH sizes for this small node
    submit = subprocess.run(
        ["sbatch", "--wait", "--array=1-3", "--cpus-per-task=1", "--mem=1500M",
         "--time=20:00", f"--output={logs}/%A_%a.out", str(script),
         "--weights", str(weights), "--output-spaces", SPACE, "--sloppy",
         "--io-iterations", "0", "--device", "cpu"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1500)
    task_logs = {p.name: p.read_text() for p in sorted(logs.iterdir())}
    assert submit.returncode == 0, (submit.stdout, submit.stderr, task_logs)
    assert len(task_logs) == 3

    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "ugi-bids"
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "uniGradICON" in citation and citation.endswith("\n")
    assert (out / "logs" / "CITATION.bib").read_text().count("@") >= 2
    for label in ("01", "02", "03"):
        anat = out / f"sub-{label}" / "anat"
        for name in (f"sub-{label}_from-T1w_to-{SPACE}_mode-image_xfm.h5",
                     f"sub-{label}_from-{SPACE}_to-T1w_mode-image_xfm.h5",
                     f"sub-{label}_space-{SPACE}_desc-preproc_T1w.nii.gz",
                     f"sub-{label}_space-{SPACE}_desc-log_jacobian.nii.gz"):
            assert (anat / name).is_file(), name
            sidecar = anat / re.sub(r"\.(h5|nii\.gz)$", ".json", name)
            assert json.loads(sidecar.read_text())["Sources"]
    leftovers = [p for p in out.rglob("*") if ".partial" in p.name
                 or p.name.startswith(STAGING_PREFIX) or p.name.startswith(".tmp")]
    assert leftovers == []


@pytest.mark.skipif(not _slurm_is_up(), reason="no Slurm controller answers here "
                    "(CI starts one with .ci/start-slurm.sh)")
def test_slurmgraph_plugin_submits_every_node_with_its_own_requests(tmp_path):
    """``ugi-bids --use-plugin slurm.yml`` with nipype's SLURMGraph: one Slurm job per node, each
    asking for the node's annotated CPUs and memory; ugi-bids returns once the graph is
    submitted, and the outputs are complete when the jobs are done."""
    bids = make_cohort_dataset(tmp_path / "bids", participants=1)["bids_dir"]
    templateflow = make_templateflow_home(tmp_path / "templateflow")
    weights = write_random_checkpoint(tmp_path / "Step_2_final.trch", seed=3,
                                      lastconv_scale=0.3)
    plugin = tmp_path / "slurm.yml"
    plugin.write_text("plugin: SLURMGraph\nplugin_args:\n  dont_resubmit_completed_jobs: true\n"
                      "  sbatch_args: --time=20:00\n")
    out, work = tmp_path / "derivatives" / "ugi-bids", tmp_path / "work"
    env = app_environment(tmp_path, templateflow)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    run = subprocess.run(
        [sys.executable, "-m", "ugi_bids.cli.run", str(bids), str(out), "participant",
         "-w", str(work), "--use-plugin", str(plugin), "--weights", str(weights),
         "--output-spaces", SPACE, "--sloppy", "--io-iterations", "0", "--device", "cpu"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "submitted its jobs to Slurm (SLURMGraph)" in run.stderr

    submitted = next(work.rglob("batch/submit_jobs.sh")).read_text()
    jobs = [line for line in submitted.splitlines() if "=$(sbatch" in line]
    registration = [line for line in jobs if "_unigradicon=" in line]
    assert len(registration) == 1 and len(jobs) > 5
    assert all(re.search(r"--cpus-per-task=\d+ --mem=\d+M", line) for line in jobs)
    assert all("--time=20:00" in line for line in jobs)
    # wait for every job of this graph (named after its node) to leave the queue
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h", "-o", "%o"], capture_output=True,
                               text=True).stdout
        if str(work) not in queue:
            break
        time.sleep(3)
    else:
        pytest.fail("the SLURMGraph jobs did not finish in 15 minutes")
    anat = out / "sub-01" / "anat"
    for name in (f"sub-01_from-T1w_to-{SPACE}_mode-image_xfm.h5",
                 f"sub-01_from-{SPACE}_to-T1w_mode-image_xfm.h5",
                 f"sub-01_space-{SPACE}_desc-preproc_T1w.nii.gz"):
        assert (anat / name).is_file(), (name, sorted(p.name for p in work.rglob("*.e")))
