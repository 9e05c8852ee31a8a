"""File-level steps: each reads its inputs from files and writes its outputs atomically.

The Nipype interfaces of :mod:`ugi_bids.interfaces.registration` call one of these per node
(preprocess, pre-align, network, apply, Jacobian); each calls the engine and keeps the file
handling (names, dtypes, atomic writes) out of both the engine and the interfaces' traits.
Directions follow :mod:`ugi_bids.engine.registrar`: the *forward* transform maps fixed
(template) points to moving (subject) points and resamples the moving image onto the fixed
grid.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from ..engine.formats.staging import staged_outputs
from ..engine.options import (DEFAULT_DEVICE, DEFAULT_IO_CHECKPOINTING, DEFAULT_MODEL,
                              DEFAULT_NETWORK_SIZE, DEFAULT_PRECISION, DEFAULT_SIMILARITY, IO_LEARNING_RATE, IO_STEPS)
from ..engine.preprocess import binarise_mask, preprocess
from ..engine.spatial.transforms import WorldTransform
from ..engine.spatial.volume import Volume, load_volume

LOGGER = logging.getLogger(__name__)


def _save(volume: Volume, path: str | os.PathLike, dtype=np.float32) -> str:
    with staged_outputs(os.path.dirname(os.path.abspath(path))) as staged:
        nib.save(volume.to_nifti(dtype=dtype), staged.stage(path))
    return os.fspath(path)


def normalise_image(in_file: str, modality: str, out_file: str, mask_file: str | None = None,
                    apply_mask: bool = False) -> str:
    """Write ``in_file`` normalised for the network (see :mod:`.preprocess`) to ``out_file``
    (float32 NIfTI, same grid). With ``apply_mask`` the binarised mask is multiplied in."""
    volume = load_volume(in_file)
    mask = load_volume(mask_file, "mask") if mask_file else None
    return _save(preprocess(volume, modality, mask, apply_mask, f"image {in_file}"), out_file)


def prealign_images(fixed_file: str, moving_file: str, mode: str, out_file: str, *,
                    network_size: int, fixed_mask_file: str | None = None,
                    moving_mask_file: str | None = None) -> str:
    """Estimate the pre-alignment of two normalised images and write it as an affine-only ITK
    transform (``out_file``, .h5): it maps FIXED-space points to MOVING-space points."""
    from ..engine.formats.itk import write_composite_h5
    from ..engine.registrar import prealignment

    fixed, moving = load_volume(fixed_file), load_volume(moving_file)
    masks = {}
    if fixed_mask_file:
        masks["fixed_mask"] = binarise_mask(load_volume(fixed_mask_file, "mask"), fixed, "fixed mask")
    if moving_mask_file:
        masks["moving_mask"] = binarise_mask(load_volume(moving_mask_file, "mask"), moving,
                                             "moving mask")
    affine = prealignment(fixed, moving, mode, network_size=network_size, **masks)
    with staged_outputs(os.path.dirname(os.path.abspath(out_file))) as staged:
        write_composite_h5(WorldTransform(affine), staged.stage(out_file))
    return out_file


@functools.lru_cache(maxsize=2)
def cached_registrar(model: str, weights: str | None, device: str, network_size: int,
                     precision: str = DEFAULT_PRECISION,
                     io_checkpointing: str = DEFAULT_IO_CHECKPOINTING):
    """One :class:`~ugi_bids.engine.registrar.Registrar` per process and settings: a worker
    process that runs several registration nodes reads and checks the weights once."""
    from ..engine.registrar import Registrar

    return Registrar(model, weights, device=device, network_size=network_size,
                     precision=precision, io_checkpointing=io_checkpointing)


def register_images(fixed_file: str, moving_file: str, prealign_file: str, *,
                    forward_file: str, inverse_file: str, keep_storage: bool = False,
                    model: str = DEFAULT_MODEL, weights: str | None = None,
                    device: str = DEFAULT_DEVICE, precision: str = DEFAULT_PRECISION,
                    io_checkpointing: str = DEFAULT_IO_CHECKPOINTING,
                    network_size: int = DEFAULT_NETWORK_SIZE, io_iterations: int = IO_STEPS,
                    io_similarity: str = DEFAULT_SIMILARITY,
                    io_learning_rate: float = IO_LEARNING_RATE,
                    num_threads: int | None = None) -> dict:
    """Run uniGradICON (with instance optimisation) on two normalised, pre-aligned images.

    ``num_threads`` caps torch's CPU threads for this call (the scheduler's ``n_procs``), so
    that parallel registrations do not oversubscribe the cores.

    Writes ``forward_file`` (maps fixed points to moving points: resamples the moving image onto
    the fixed grid) and ``inverse_file`` (the opposite direction), both ITK composite .h5, all
    or nothing. Returns the provenance (model, weights SHA-256 and URL, settings, timings).
    """
    import torch

    from ..engine.formats.itk import read_composite_h5, write_composite_h5

    started = time.perf_counter()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    registrar = cached_registrar(model, weights, device, int(network_size), precision,
                                 io_checkpointing)
    fixed, moving = load_volume(fixed_file), load_volume(moving_file)
    prealign_affine = read_composite_h5(prealign_file).affine
    result = registrar.register_prealigned(
        fixed, moving, prealign_affine, keep_storage=keep_storage,
        io_iterations=io_iterations, io_similarity=io_similarity,
        io_learning_rate=io_learning_rate)
    common = os.path.commonpath([os.path.abspath(forward_file), os.path.abspath(inverse_file)])
    with staged_outputs(common) as staged:
        write_composite_h5(result.forward, staged.stage(forward_file))
        write_composite_h5(result.inverse, staged.stage(inverse_file))
    provenance = {
        "Model": registrar.weights.model,
        "WeightsSHA256": registrar.weights.sha256,
        "WeightsURL": registrar.weights.url,
        "NetworkGrid": int(network_size),
        "IOIterations": int(io_iterations),
        "IOSimilarity": io_similarity,
        "IOLearningRate": float(io_learning_rate),
        "Device": str(registrar.device),
        "Precision": registrar.precision,
        "IOFinalLoss": (result.maps.losses[-1].total if result.maps.losses else None),
        "RegistrationSeconds": round(time.perf_counter() - started, 3),
    }
    if result.settings.get("io_checkpointing"):  # what ran: IO's memory path ("on"/"off")
        provenance["IOCheckpointing"] = result.settings["io_checkpointing"]
    return provenance


def resample_image(moving_file: str, transform_file: str, reference_file: str, out_file: str,
                   interpolation: str = "linear") -> str:
    """Resample ``moving_file`` onto ``reference_file``'s grid through a mode-image transform
    (maps reference points to moving points). Linear output is float32; nearest/label keep the
    input's data type."""
    from ..engine.formats.itk import read_composite_h5
    from ..engine.spatial.warp import apply_transform

    moving = load_volume(moving_file, "image to resample")
    reference = load_volume(reference_file, "reference image")
    warped = apply_transform(moving, read_composite_h5(transform_file), reference.grid,
                             interpolation)
    dtype = np.float32 if interpolation == "linear" else nib.load(moving_file).get_data_dtype()
    return _save(warped, out_file, dtype)


def log_jacobian_image(transform_file: str, reference_file: str, out_file: str) -> float:
    """Write the log Jacobian determinant of a transform on ``reference_file``'s grid (float32,
    det clipped at 1e-3 before the log) and return the fraction of folded voxels (det <= 0)."""
    from ..engine.formats.itk import read_composite_h5
    from ..engine.spatial.jacobian import (
        folding_fraction,
        jacobian_determinant,
        log_jacobian,
    )

    reference = load_volume(reference_file, "reference image")
    det = jacobian_determinant(read_composite_h5(transform_file), reference.grid)
    _save(Volume(reference.grid, log_jacobian(det)), out_file)
    return folding_fraction(det)


def stem(path: str) -> str:
    """File name without folder and without .nii/.nii.gz/.h5 extensions."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".h5"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
