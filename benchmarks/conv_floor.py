#!/usr/bin/env python
"""The convolution floor of one instance-optimisation step, timed layer by layer.

The U-Nets' convolution passes alone, timed one by one with PyTorch's CPU (oneDNN) kernels.

Not a test: prints, for every convolution of a tallUNet2 at each cascade level, the seconds of
its forward pass, its input gradient and its weight gradient, with GFLOP/s, and sums them the
way one IO step runs them (both directions; per direction one U-Net at 44^3, one at 88^3 and
two at 175^3). Everything else an IO step does (trilinear sampling, joins, the loss, Adam)
comes on top, so these sums are a lower bound of the step on this machine with these kernels:

* activations kept (``--io-checkpointing off``): forward + input gradient + weight gradient;
* activations recomputed (the CPU default, for the 6 GB bound): one more forward.

The layers run exactly as the engine runs them in an IO step: channels-last float32, the
transposed convolutions with BatchNorm folded into them (same shapes), the last 18 -> 3 layer
through :mod:`ugi_bids.engine.kernels.narrow_conv` (oneDNN forward and input gradient, slab-GEMM weight
gradient). The coarsest U-Net's first layer needs no input gradient (its inputs are images).

Run from the repository root::

    python benchmarks/conv_floor.py               # 175^3, median of 3
    python benchmarks/conv_floor.py --grid 96 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

#: The instance-optimisation step bar of issue 4 on the 2-core machine, seconds.
STEP_TARGET_S = 30.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=175, help="network grid N^3 (default 175)")
    parser.add_argument("--repeats", type=int, default=3, help="median of R timings (default 3)")
    parser.add_argument("--threads", type=int, help="torch threads (default torch's)")
    return parser


def halved(edge: int) -> int:
    """A lattice edge after average pooling by 2 with ceil_mode (and after a stride-2
    convolution with padding 1): 175 -> 88 -> 44."""
    return -(-edge // 2)


def unet_input_edges(grid: int) -> list[int]:
    """The input lattice edge of each U-Net of the cascade, in the order of
    ``network.UNET_PREFIXES`` (coarse to fine): [44, 88, 175, 175] for the 175^3 grid."""
    middle = halved(grid)
    return [halved(middle), middle, grid, grid]


def unet_layers(size: int) -> list[dict]:
    """Every convolution of one tallUNet2 whose input lattice is ``size``^3: name, kind
    ("down", "up", "last"), channels in and out, input and output edge, multiply-adds."""
    from ugi_bids.engine.model.network import DOWN_CHANNELS, UP_CHANNELS

    depth = len(UP_CHANNELS)
    edges = [size]
    for _ in range(depth):
        edges.append(halved(edges[-1]))
    up_in = [DOWN_CHANNELS[d + 1] + (UP_CHANNELS[d + 1] if d + 1 < depth else 0)
             for d in range(depth)]
    layers = []
    for d in range(depth):
        cin, cout, out_edge = DOWN_CHANNELS[d], DOWN_CHANNELS[d + 1], edges[d + 1]
        layers.append(dict(name=f"down{d} {cin}->{cout}", kind="down", cin=cin, cout=cout,
                           in_edge=edges[d], out_edge=out_edge,
                           macs=out_edge ** 3 * 27 * cin * cout))
    for d in reversed(range(depth)):
        cin, cout, out_edge = up_in[d], UP_CHANNELS[d], 2 * edges[d + 1]
        layers.append(dict(name=f"up{d} {cin}->{cout}", kind="up", cin=cin, cout=cout,
                           in_edge=edges[d + 1], out_edge=out_edge,
                           macs=out_edge ** 3 * 8 * cin * cout))
    cin = DOWN_CHANNELS[0] + UP_CHANNELS[0]
    layers.append(dict(name=f"last {cin}->3", kind="last", cin=cin, cout=3, in_edge=size,
                       out_edge=size, macs=size ** 3 * 27 * cin * 3))
    return layers


def time_layer(layer: dict, repeats: int) -> dict[str, float]:
    """Median seconds of the layer's forward, input gradient and weight gradient (+ bias)."""
    import torch
    import torch.nn.functional as F

    from ugi_bids.engine.kernels import narrow_conv

    cl = torch.channels_last_3d
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, layer["cin"], *(layer["in_edge"],) * 3,
                    generator=generator).contiguous(memory_format=cl)
    kind = layer["kind"]
    if kind == "up":
        weight = torch.randn(layer["cin"], layer["cout"], 4, 4, 4, generator=generator) * 0.01
        stride, padding, transposed = [2] * 3, [1] * 3, True
    else:
        weight = torch.randn(layer["cout"], layer["cin"], 3, 3, 3, generator=generator) * 0.01
        stride = [2] * 3 if kind == "down" else [1] * 3
        padding, transposed = [1] * 3, False
    bias = torch.zeros(layer["cout"])

    def forward():
        if kind == "up":
            return F.conv_transpose3d(x, weight, bias, stride=2, padding=1)
        if kind == "down":
            return F.conv3d(x, weight, bias, stride=2, padding=1)
        return F.conv3d(x, weight, bias, padding=1)

    grad = torch.randn(forward().shape, generator=generator).contiguous(memory_format=cl)

    def backward(mask):
        return torch.ops.aten.convolution_backward(
            grad, x, weight, [layer["cout"]], stride, padding, [1] * 3, transposed, [0] * 3, 1,
            mask)

    def weight_gradient():
        if kind == "last":
            return narrow_conv.weight_gradient(x, grad), grad.sum((0, 2, 3, 4))
        return backward([False, True, True])

    passes = {"forward": forward, "input_grad": lambda: backward([True, False, False]),
              "weight_grad": weight_gradient}
    seconds = {}
    for name, run in passes.items():
        run()  # first call: oneDNN builds its primitive
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times)
    return seconds


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# Convolution floor of one IO step at {args.grid}^3 (CPU, float32, channels-last)")
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| level | layer | GMAC | forward s | input grad s | weight grad s | "
          "GFLOP/s fwd / in / wt |")
    print("|---|---|---:|---:|---:|---:|---|")
    totals = {"forward": 0.0, "input_grad": 0.0, "weight_grad": 0.0}
    flops = 0.0
    edges = unet_input_edges(args.grid)
    coarsest = edges[0]
    for size in sorted(set(edges)):  # each distinct U-Net once, counted as often as it runs
        nets = 2 * edges.count(size)  # both directions
        level = {coarsest: "coarse", args.grid: "full"}.get(size, "middle")
        for index, layer in enumerate(unet_layers(size)):
            seconds = time_layer(layer, args.repeats)
            gflop = 2 * layer["macs"] / 1e9
            rates = " / ".join(f"{gflop / seconds[k]:.0f}" for k in seconds)
            print(f"| {level} {size}^3 | {layer['name']} | {layer['macs'] / 1e9:.2f} | "
                  f"{seconds['forward']:.3f} | {seconds['input_grad']:.3f} | "
                  f"{seconds['weight_grad']:.3f} | {rates} |", flush=True)
            images_only = size == coarsest and index == 0
            totals["forward"] += nets * seconds["forward"]
            totals["input_grad"] += 0.0 if images_only else nets * seconds["input_grad"]
            totals["weight_grad"] += nets * seconds["weight_grad"]
            flops += nets * gflop * (2 if images_only else 3)
    kept = sum(totals.values())
    recomputed = kept + totals["forward"]
    print(f"\nOne IO step's convolutions (both directions, {2 * len(edges)}"
          f" U-Nets, {flops / 1e3:.2f} TFLOP without recomputation):")
    print(f"  forward {totals['forward']:.1f} s, input gradients {totals['input_grad']:.1f} s, "
          f"weight gradients {totals['weight_grad']:.1f} s")
    print(f"  activations kept:       {kept:.1f} s ({flops / kept:.0f} GFLOP/s)")
    print(f"  activations recomputed: {recomputed:.1f} s")
    scale = (args.grid / 175) ** 3
    print(f"  issue 4's bar for a whole step: {STEP_TARGET_S * scale:.1f} s"
          + (f" (30 s scaled by ({args.grid}/175)^3)" if args.grid != 175 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
