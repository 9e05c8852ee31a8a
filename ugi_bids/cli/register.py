"""``ugi-register`` and ``ugi-warp``: pairwise registration for users outside BIDS, with the
options of ``unigradicon-register`` / ``unigradicon-warp`` plus world-space pre-alignment.

``ugi-register --fixed F --moving M --fixed-modality mri --moving-modality mri --out-prefix P``
writes, all or nothing:

* ``P_from-moving_to-fixed_mode-image_xfm.h5``: resamples the moving image onto the fixed grid
  (maps fixed-space points to moving-space points); ANTs/ITK composite, LPS mm.
* ``P_from-fixed_to-moving_mode-image_xfm.h5``: the inverse direction.
* ``P_warped.nii.gz``: the moving image on the fixed grid (linear interpolation).
* ``P_summary.json``: model, weights SHA-256, settings, the pre-alignment affine and the report
  of its fit (``prealign``: metric, final cost, degrees of freedom, winning start, fallback,
  scales, largest shear; null unless ``--prealign affine``), timings, folded-voxel fraction.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time

import numpy as np

from .. import __version__
from ..engine.options import (
    DEFAULT_DEVICE,
    DEFAULT_INTERPOLATION,
    DEFAULT_IO_CHECKPOINTING,
    DEFAULT_MASKING,
    DEFAULT_MODEL,
    DEFAULT_NETWORK_SIZE,
    DEFAULT_PREALIGN,
    DEFAULT_PREALIGN_DOF,
    DEFAULT_PRECISION,
    DEFAULT_SIMILARITY,
    INTERPOLATIONS,
    IO_CHECKPOINTING,
    IO_LEARNING_RATE,
    IO_STEPS,
    MASKING_MODES,
    MODALITIES,
    MODELS,
    PREALIGN_DOFS,
    PREALIGN_MODES,
    PRECISIONS,
    SIMILARITIES,
)
from ..engine.spatial.volume import load_volume
from ..errors import guarded

LOGGER = logging.getLogger("ugi_bids")
PROG = "ugi-register"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Register a moving image to a fixed image with uniGradICON, in world "
                    "coordinates; writes ANTs/ITK transforms in both directions.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--fixed", required=True, help="fixed (reference) image, NIfTI")
    io.add_argument("--moving", required=True, help="moving image, NIfTI")
    io.add_argument("--fixed-modality", "--fixed_modality", required=True, choices=MODALITIES)
    io.add_argument("--moving-modality", "--moving_modality", required=True, choices=MODALITIES)
    io.add_argument("--out-prefix", required=True,
                    help="output prefix, e.g. out/sub-01 (folders are created)")
    io.add_argument("--fixed-mask", "--fixed_mask", help="mask of the fixed image (non-zero = in)")
    io.add_argument("--moving-mask", "--moving_mask", help="mask of the moving image")
    io.add_argument("--masking", choices=MASKING_MODES, default=DEFAULT_MASKING,
                    help="how masks are used: multiplied into the inputs (input, default) or "
                         "restricting the IO similarity (loss)")
    io.add_argument("--displacement-nifti", action="store_true",
                    help="also write each direction as an ANTs displacement-field NIfTI")
    io.add_argument("--jacobian", action="store_true",
                    help="also write the log-Jacobian determinant of the forward map on the "
                         "fixed grid (P_logjacobian.nii.gz)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, choices=MODELS)
    model.add_argument("--weights", help="weights file (overrides the cache)")
    model.add_argument("--download-weights", action="store_true",
                       help="download the weights into the cache when absent")
    model.add_argument("--device", default=DEFAULT_DEVICE, help="auto (default), cpu or cuda[:N]")
    model.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                       help="network arithmetic on CUDA: float32 (default, full precision) or "
                            "tf32 (opt-in, faster on tensor-core GPUs, slightly different "
                            "maps); the same on a CPU")
    model.add_argument("--network-size", type=int, default=DEFAULT_NETWORK_SIZE,
                       help="network input grid N^3 (175 is the released model's; smaller is "
                            "only for quick looks and tests)")
    reg = parser.add_argument_group("registration")
    reg.add_argument("--prealign", choices=PREALIGN_MODES, default=DEFAULT_PREALIGN,
                     help="world-space pre-alignment: none (voxel-grid correspondence, as the "
                          "published tool), header (trust the headers), affine (default)")
    reg.add_argument("--prealign-dof", type=int, choices=PREALIGN_DOFS,
                     default=DEFAULT_PREALIGN_DOF,
                     help="degrees of freedom of the affine pre-alignment: 6 (rigid), 7 "
                          "(similarity), 9 (rigid + per-axis scales) or 12 (full affine, "
                          f"default {DEFAULT_PREALIGN_DOF})")
    reg.add_argument("--io-iterations", "--io_iterations", type=_io_steps, default=IO_STEPS,
                     help=f"instance-optimisation steps (default {IO_STEPS}; 0 or None = off)")
    reg.add_argument("--io-checkpointing", choices=tuple(IO_CHECKPOINTING),
                     default=DEFAULT_IO_CHECKPOINTING,
                     help="recompute the U-Nets' activations during IO (on: about 5.8 GB at "
                          "175^3), keep them (off: about 9.5 GB, steps about 15 %% shorter on a "
                          "CPU) or let the engine choose (auto, default: on for the CPU, off on "
                          "a GPU with room); the maps are the same")
    reg.add_argument("--io-similarity", "--io_sim", choices=SIMILARITIES,
                     default=DEFAULT_SIMILARITY)
    reg.add_argument("--io-lr", "--io_lr", type=float, default=IO_LEARNING_RATE,
                     help=f"IO learning rate (default {IO_LEARNING_RATE})")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (repeatable)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    return parser


def _io_steps(text: str) -> int:
    if text.lower() == "none":
        return 0
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def output_paths(prefix: str, displacement_nifti: bool = False, jacobian: bool = False) -> dict:
    """Final paths of ``ugi-register``'s outputs for ``prefix``."""
    paths = {
        "forward": f"{prefix}_from-moving_to-fixed_mode-image_xfm.h5",
        "inverse": f"{prefix}_from-fixed_to-moving_mode-image_xfm.h5",
        "warped": f"{prefix}_warped.nii.gz",
        "summary": f"{prefix}_summary.json",
    }
    if displacement_nifti:
        paths["forward_nifti"] = f"{prefix}_from-moving_to-fixed_mode-image_xfm.nii.gz"
        paths["inverse_nifti"] = f"{prefix}_from-fixed_to-moving_mode-image_xfm.nii.gz"
    if jacobian:
        paths["logjacobian"] = f"{prefix}_logjacobian.nii.gz"
    return paths


def run_register(args: argparse.Namespace) -> dict:
    """Run one registration as the command line asked; returns the summary dictionary."""
    import nibabel as nib
    import torch

    from ..engine.checks import check_registrable
    from ..engine.formats.itk import write_composite_h5, write_displacement_nifti
    from ..engine.formats.staging import check_output_folder, staged_outputs
    from ..engine.registrar import Registrar
    from ..engine.spatial.jacobian import (
        folding_fraction,
        jacobian_determinant,
        log_jacobian,
    )
    from ..engine.spatial.volume import memory_available_bytes
    from ..engine.spatial.warp import apply_transform

    started = time.perf_counter()
    paths = output_paths(args.out_prefix, args.displacement_nifti, args.jacobian)
    out_folder = os.path.dirname(os.path.abspath(paths["summary"]))
    check_output_folder(out_folder)
    free = memory_available_bytes()  # an image this machine cannot read now fails here
    fixed = load_volume(args.fixed, "fixed image", free)
    moving = load_volume(args.moving, "moving image", free)
    fixed_mask = load_volume(args.fixed_mask, "fixed mask") if args.fixed_mask else None
    moving_mask = load_volume(args.moving_mask, "moving mask") if args.moving_mask else None
    # every image check before the weights load and anything is written
    for warning in (check_registrable(fixed, args.fixed_modality, "fixed image")
                    + check_registrable(moving, args.moving_modality, "moving image")):
        LOGGER.warning("%s", warning)
    registrar = Registrar(args.model, args.weights, device=args.device,
                          network_size=args.network_size, download=args.download_weights,
                          precision=args.precision, io_checkpointing=args.io_checkpointing)
    LOGGER.info("loaded %s weights %s (sha256 %s) on %s", registrar.weights.model,
                registrar.weights.path, registrar.weights.sha256[:12], registrar.device)
    result = registrar.register(
        fixed, moving, fixed_modality=args.fixed_modality, moving_modality=args.moving_modality,
        fixed_mask=fixed_mask, moving_mask=moving_mask, masking=args.masking,
        prealign=args.prealign, prealign_dof=args.prealign_dof,
        io_iterations=args.io_iterations, io_similarity=args.io_similarity,
        io_learning_rate=args.io_lr)
    timings = dict(result.timings)
    settings = dict(result.settings)
    # the affine fit's report goes beside its affine, not among the settings
    prealign_report = settings.pop("prealign_report", None)
    settings["prealign_dof"] = args.prealign_dof if args.prealign == "affine" else None

    with staged_outputs(out_folder) as staged:
        start = time.perf_counter()
        write_composite_h5(result.forward, staged.stage(paths["forward"]))
        write_composite_h5(result.inverse, staged.stage(paths["inverse"]))
        if args.displacement_nifti:
            write_displacement_nifti(result.forward, staged.stage(paths["forward_nifti"]),
                                     reference=fixed.grid)
            write_displacement_nifti(result.inverse, staged.stage(paths["inverse_nifti"]),
                                     reference=moving.grid)
        timings["write_transforms_s"] = time.perf_counter() - start

        start = time.perf_counter()
        warped = apply_transform(moving, result.forward, fixed.grid, "linear")
        nib.save(warped.to_nifti(), staged.stage(paths["warped"]))
        timings["warp_s"] = time.perf_counter() - start

        start = time.perf_counter()
        det = jacobian_determinant(result.forward, fixed.grid)
        folded = folding_fraction(det)
        if args.jacobian:
            nib.save(type(warped)(fixed.grid, log_jacobian(det)).to_nifti(),
                     staged.stage(paths["logjacobian"]))
        timings["jacobian_s"] = time.perf_counter() - start
        timings["weights_load_s"] = registrar.load_seconds
        timings["total_s"] = time.perf_counter() - started

        summary = {
            "ugi_bids_version": __version__,
            "command": " ".join([PROG] + sys.argv[1:]) if sys.argv else PROG,
            "fixed": os.path.abspath(args.fixed),
            "moving": os.path.abspath(args.moving),
            "weights": registrar.weights.as_dict(),
            "settings": settings,
            "prealign_affine_ras": np.round(result.prealign, 8).tolist(),
            "prealign": prealign_report,
            "outputs": {k: os.path.basename(v) for k, v in paths.items()},
            "directions": {
                "forward": "maps fixed-space points to moving-space points; resamples the "
                           "moving image onto the fixed grid",
                "inverse": "maps moving-space points to fixed-space points; resamples the "
                           "fixed image onto the moving grid",
            },
            "folded_voxel_fraction": folded,
            "io_losses": [vars(loss) for loss in result.maps.losses],
            "timings_s": {k.removesuffix("_s"): round(v, 3) for k, v in timings.items()},
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "host": platform.node()},
        }
        with open(staged.stage(paths["summary"]), "w") as handle:
            json.dump(summary, handle, indent=2)
    LOGGER.info("wrote %s (folded voxels: %.4f%%, %.1f s)", ", ".join(paths.values()),
                100 * folded, timings["total_s"])
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ugi-register``; returns the exit code."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    return guarded(PROG, lambda: run_register(args) and None)



def build_warp_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ugi-warp",
        description="Resample an image through a transform written by ugi-register (or any "
                    "ANTs/ITK composite .h5): moving onto the reference grid.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--fixed", "--reference", dest="fixed", required=True,
                        help="reference image: its grid is the output grid")
    parser.add_argument("--moving", required=True, help="image to resample")
    parser.add_argument("--transform", help="mode-image transform (.h5) from the moving image's "
                                            "space to the reference's; identity when omitted")
    parser.add_argument("--out", "--warped_moving_out", dest="out", required=True)
    interp = parser.add_mutually_exclusive_group()
    interp.add_argument("--interpolation", choices=INTERPOLATIONS,
                        default=DEFAULT_INTERPOLATION)
    interp.add_argument("--nearest_neighbor", "--nearest-neighbor", dest="interpolation",
                        action="store_const", const="nearest")
    interp.add_argument("--linear", dest="interpolation", action="store_const", const="linear")
    return parser


def run_warp(args: argparse.Namespace) -> None:
    import nibabel as nib

    from ..engine.formats.itk import read_composite_h5
    from ..engine.formats.staging import staged_outputs
    from ..engine.spatial.transforms import WorldTransform
    from ..engine.spatial.warp import apply_transform

    reference = load_volume(args.fixed, "reference image")
    moving = load_volume(args.moving, "moving image")
    transform = read_composite_h5(args.transform) if args.transform else WorldTransform(np.eye(4))
    warped = apply_transform(moving, transform, reference.grid, args.interpolation)
    source_dtype = nib.load(args.moving).get_data_dtype()
    dtype = np.float32 if args.interpolation == "linear" else source_dtype
    with staged_outputs(os.path.dirname(os.path.abspath(args.out))) as staged:
        nib.save(warped.to_nifti(dtype=dtype), staged.stage(args.out))


def warp_main(argv: list[str] | None = None) -> int:
    """Entry point of ``ugi-warp``; returns the exit code."""
    args = build_warp_parser().parse_args(argv)
    return guarded("ugi-warp", lambda: run_warp(args))


if __name__ == "__main__":
    sys.exit(main())
