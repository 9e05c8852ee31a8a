"""A killed MultiProc worker ends the run (exit 1, a crash file, within seconds) instead of
hanging it forever (nipy/nipype#2700), and the workers die with a killed main process.

Both run ``ugi-bids`` for real and send SIGKILL, as the kernel's out-of-memory killer does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bidsdata import app_environment, make_bids_dataset, make_templateflow_home
from tests.checkpoints import write_random_checkpoint

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]

SPACE = "MNI152NLin2009cAsym"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("dead-worker")
    templateflow = make_templateflow_home(root / "templateflow")
    make_bids_dataset(root / "bids")
    weights = write_random_checkpoint(root / "Step_2_final.trch", seed=3, lastconv_scale=0.3)
    return {"root": root, "bids": root / "bids", "weights": weights,
            "env": app_environment(root, templateflow)}


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_registering(site, name: str) -> tuple[subprocess.Popen, Path, list[int]]:
    """Start ugi-bids (long IO, so the registrations run for minutes) and wait until a
    registration node runs; returns the process, its output folder and its worker pids."""
    out, work = site["root"] / name / "ugi-bids", site["root"] / f"work-{name}"
    command = [sys.executable, "-m", "ugi_bids.cli.run", str(site["bids"]), str(out),
               "participant", "-w", str(work), "--output-spaces", SPACE, "--sloppy",
               "--io-iterations", "500", "--weights", str(site["weights"]), "--device", "cpu",
               "--nprocs", "2", "--omp-nthreads", "1"]
    process = subprocess.Popen(command, env=site["env"], cwd=site["root"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        running = [d for d in work.rglob("unigradicon") if d.is_dir()
                   and not list(d.glob("result_*.pklz"))]
        workers = _children(process.pid)
        if running and workers:
            time.sleep(2)  # well inside the node's IO loop
            return process, out, _children(process.pid)
        time.sleep(0.5)
    process.kill()
    pytest.fail(f"no registration node started: {process.communicate()[1][-2000:]}")


def test_killed_worker_ends_the_run_with_a_crash_file(site):
    process, out, workers = _start_registering(site, "killed-worker")
    killed_at = time.monotonic()
    os.kill(workers[0], signal.SIGKILL)
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("ugi-bids still runs 60 s after a worker was killed (the nipype hang)")
    elapsed = time.monotonic() - killed_at
    assert process.returncode == 1, stderr[-3000:]
    assert elapsed < 30, elapsed
    errors = [line for line in stderr.splitlines() if line.startswith("ugi-bids: error:")]
    assert len(errors) == 1 and "worker process was killed while it ran" in errors[0], stderr
    assert "unigradicon" in errors[0] and "--mem" in errors[0]
    crash_files = sorted(out.glob("sub-*/log/*/crash-*"))
    assert crash_files, stderr[-3000:]
    text = "\n".join(path.read_text() for path in crash_files)
    assert "was killed by SIGKILL" in text and "out-of-memory" in text and "GB" in text
    time.sleep(1)
    assert not [pid for pid in workers if _alive(pid)], "workers left running"


def test_workers_die_with_a_killed_main_process(site):
    process, _out, workers = _start_registering(site, "killed-main")
    assert workers
    process.kill()  # SIGKILL: no handler runs in the main process
    process.wait(timeout=10)  # not communicate(): orphaned workers would hold its pipes open
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.2)
    orphans = [pid for pid in workers if _alive(pid)]
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)
    assert not orphans, "orphaned workers hold their memory"
