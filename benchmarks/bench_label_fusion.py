#!/usr/bin/env python
"""Joint label fusion: ours (``ugi_bids.engine.labels.fusion.fuse_labels``) against antspyx's
``ants.joint_label_fusion`` (ANTs' antsJointFusion) on the same inputs, in the same run.

Not a test: prints figures (see ``benchmarks/README.md``, "Label fusion").

Inputs: ``--atlases`` + 1 labelled subjects built from real brains exactly as the tests build
them (``tests/test_label_fusion.py``, ``labelled_subjects``): the ICBM 2009c and FSL MNI152 brains
(alternating) with the real Desikan-Killiany labels carried onto them through MNI coordinates,
each moved by its own smooth random deformation (synthetic, at most ``--amplitude`` mm),
resampled onto the 2009c brain's field of view at ``--voxel-size`` mm (``--crop N``: a central
N^3 box of it). Subject 0 is the target, the others the atlases, already on its grid (identity
alignment). The mask is what the app uses: voxels any atlas labels, dilated by 2 voxels. Both
sides get the same intensities: each image normalised by ``normalise_intensities`` over the mask.

Both run with the same parameters (alpha 0.1, beta 2, patch radius 2, search radius 3 by
default; ``--metric msq`` is antspyx's default ``usecor=False``) and the same number of threads
(``--threads``: ``torch.set_num_threads`` and ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``).

Printed: wall seconds of each, the ratio, ours' peak memory (CPU: peak RSS above the RSS before
the call, sampled every 5 ms; CUDA: ``torch.cuda.max_memory_allocated``), the agreement on the
mask voxels with antsJointFusion's own decision (rebuilt from antspyx's probability images, since
antspyx itself takes the arg-max over the labels other than 0) and with antspyx's returned
segmentation, Dice against the target's labels, and a look at the voxels where the answers
differ (how close ANTs' two best labels were there).

Run from the repository root::

    python benchmarks/bench_label_fusion.py                          # 2 mm whole brain, 10 atlases
    python benchmarks/bench_label_fusion.py --voxel-size 1 --atlases 3
    python benchmarks/bench_label_fusion.py --crop 48 --atlases 4    # a quick look
    python benchmarks/bench_label_fusion.py --skip-ants --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--atlases", type=int, default=10, help="atlases (default 10)")
    parser.add_argument("--voxel-size", type=float, default=2.0, help="mm (default 2)")
    parser.add_argument("--crop", type=int, default=None,
                        help="a central N^3 box of the field of view (default: all of it)")
    parser.add_argument("--amplitude", type=float, default=4.0,
                        help="largest synthetic displacement, mm (default 4)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both (default: torch's default)")
    parser.add_argument("--device", default="cpu", help="ours: cpu, cuda, cuda:N")
    parser.add_argument("--metric", choices=("msq", "pc"), default="msq",
                        help="patch metric of the search (antspyx: usecor=False is msq)")
    parser.add_argument("--skip-ants", action="store_true", help="ours only")
    parser.add_argument("--json", default=None, help="also write the figures here")
    return parser.parse_args(argv)


class PeakRSS:
    """Peak resident set size (bytes) of this process while the block runs, sampled."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.before = self.peak = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.rss())


def ants_decision(result: dict):
    """antsJointFusion's decision (label 0 competes, ties to the smaller label) and the margin
    between its two best posteriors, from antspyx's probability images."""
    import numpy as np

    probabilities = np.stack([p.numpy() for p in result["probabilityimages"]])
    numbers = np.asarray(result["segmentation_numbers"])
    everything = np.concatenate([(1.0 - probabilities.sum(axis=0))[None], probabilities])
    labels = np.concatenate([[0], numbers])
    order = np.argsort(labels)
    everything, labels = everything[order], labels[order]
    top2 = np.sort(everything, axis=0)[-2:]
    return labels[np.argmax(everything, axis=0)], top2[1] - top2[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    sys.path.insert(0, REPO)
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from tests.test_label_fusion import dice, fusion_mask, labelled_subjects
    from ugi_bids.engine.labels.fusion import (
        JLF_DEFAULTS,
        fuse_labels,
        normalise_intensities,
    )

    start = time.perf_counter()
    crop = None if args.crop is None else ((args.crop,) * 3, (0, 0, 0))
    per_brain = (args.atlases + 2) // 2
    subjects = labelled_subjects(args.voxel_size, per_brain, args.amplitude, crop=crop)
    subjects = subjects[:args.atlases + 1]
    build_s = time.perf_counter() - start
    target, truth = subjects[0]
    labels = [s[1] for s in subjects[1:]]
    mask = fusion_mask(labels)
    target_n = normalise_intensities(target, mask)
    images_n = [normalise_intensities(s[0], mask) for s in subjects[1:]]
    params = dict(JLF_DEFAULTS)
    figures = {
        "grid": list(target.shape), "voxel_mm": args.voxel_size, "atlases": args.atlases,
        "mask_voxels": int(mask.sum()), "labels": len(np.unique(np.stack(labels))),
        "threads": torch.get_num_threads(), "device": args.device, "metric": args.metric,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "params": params, "build_s": round(build_s, 1),
    }
    print(f"grid {target.shape} at {args.voxel_size} mm, {args.atlases} atlases, "
          f"{figures['mask_voxels']} mask voxels, {figures['labels']} labels, "
          f"{figures['threads']} threads, metric {args.metric}, {params}")

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as memory:
        start = time.perf_counter()
        ours = fuse_labels(target_n, images_n, labels, mask=mask, normalise=False,
                           device=device, metric=args.metric, **params)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        figures["ours_s"] = round(time.perf_counter() - start, 2)
    figures["ours_peak_rss_above_baseline_gb"] = round((memory.peak - memory.before) / 1e9, 3)
    figures["ours_peak_rss_gb"] = round(memory.peak / 1e9, 3)
    if device.type == "cuda":
        figures["ours_cuda_peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
    majority = fuse_labels(target_n, images_n, labels, mask=mask, normalise=False,
                           method="majority", device=device)
    figures["dice_ours"] = round(dice(np.where(mask, ours, 0), np.where(mask, truth, 0)), 4)
    figures["dice_majority"] = round(dice(np.where(mask, majority, 0),
                                          np.where(mask, truth, 0)), 4)
    figures["dice_single_atlas_mean"] = round(float(np.mean(
        [dice(np.where(mask, lab, 0), np.where(mask, truth, 0)) for lab in labels])), 4)

    if not args.skip_ants:
        import ants

        start = time.perf_counter()
        result = ants.joint_label_fusion(
            ants.from_numpy(target_n), ants.from_numpy(mask.astype(np.float32)),
            [ants.from_numpy(im) for im in images_n], beta=params["beta"],
            rad=params["patch_radius"],
            label_list=[ants.from_numpy(lab.astype(np.float32)) for lab in labels],
            rho=params["alpha"], r_search=params["search_radius"], usecor=args.metric == "pc")
        figures["ants_s"] = round(time.perf_counter() - start, 2)
        figures["speed_ratio"] = round(figures["ants_s"] / figures["ours_s"], 1)
        decision, margin = ants_decision(result)
        segmentation = result["segmentation"].numpy().astype(np.int64)
        differ = mask & (ours != decision)
        figures["agreement_with_antsjointfusion_pct"] = round(
            100 * float(np.mean(ours[mask] == decision[mask])), 4)
        figures["agreement_with_antspyx_segmentation_pct"] = round(
            100 * float(np.mean(ours[mask] == segmentation[mask])), 4)
        figures["agreement_majority_with_antsjointfusion_pct"] = round(
            100 * float(np.mean(majority[mask] == decision[mask])), 4)
        figures["dice_ants"] = round(dice(np.where(mask, decision, 0),
                                          np.where(mask, truth, 0)), 4)
        figures["differing_voxels"] = int(differ.sum())
        if differ.any():
            figures["differing_ants_margin_median"] = float(np.median(margin[differ]))
            figures["differing_ants_margin_max"] = float(margin[differ].max())
            figures["mask_ants_margin_median"] = float(np.median(margin[mask]))
        zero = mask & (decision == 0)
        figures["antspyx_segmentation_vs_decision_pct"] = round(
            100 * float(np.mean(segmentation[mask] == decision[mask])), 4)
        figures["mask_voxels_where_ants_decides_0"] = int(zero.sum())

    print()
    print("| figure | value |")
    print("|---|---:|")
    for key, value in figures.items():
        print(f"| {key} | {value} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
