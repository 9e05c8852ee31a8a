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
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from ..engine.checks import check_registrable
from ..engine.formats.staging import staged_outputs
from ..engine.options import (DEFAULT_DEVICE, DEFAULT_IO_CHECKPOINTING, DEFAULT_MODALITY,
                              DEFAULT_MODEL, DEFAULT_NETWORK_SIZE, DEFAULT_PREALIGN_DOF,
                              DEFAULT_PRECISION, DEFAULT_SIMILARITY, IO_LEARNING_RATE, IO_STEPS)
from ..engine.preprocess import binarise_mask, preprocess
from ..engine.spatial.transforms import TransformChain, WorldTransform, compose
from ..engine.spatial.volume import Volume, load_volume

LOGGER = logging.getLogger(__name__)


def _save(volume: Volume, path: str | os.PathLike, dtype=np.float32,
          codes: tuple[int, int] = (1, 1)) -> str:
    with staged_outputs(os.path.dirname(os.path.abspath(path))) as staged:
        nib.save(volume.to_nifti(dtype=dtype, codes=codes), staged.stage(path))
    return os.fspath(path)


def xform_codes(reference_file: str) -> tuple[int, int]:
    """The (qform, sform) codes of ``reference_file``'s header, for an image written on its
    grid: it lies in the same space (a template's 4 = MNI stays 4, so the derivatives sink
    copies the file instead of re-encoding it to fix its header). 0 becomes 1."""
    header = nib.load(reference_file).header
    try:
        return tuple(int(header[name]) or 1 for name in ("qform_code", "sform_code"))
    except (KeyError, ValueError):  # not NIfTI
        return (1, 1)


def normalise_image(in_file: str, modality: str, out_file: str, mask_file: str | None = None,
                    apply_mask: bool = False) -> tuple[str, list[str]]:
    """Write ``in_file`` normalised for the network (see :mod:`.preprocess`) to ``out_file``
    (float32 NIfTI, same grid). With ``apply_mask`` the binarised mask is multiplied in.

    The image must be registrable (:func:`~ugi_bids.engine.checks.check_registrable`); returns
    ``(out_file, warnings)``, the warnings being that check's (for the provenance)."""
    volume = load_volume(in_file)
    warnings = check_registrable(volume, modality, f"image {in_file}")
    mask = load_volume(mask_file, "mask") if mask_file else None
    return _save(preprocess(volume, modality, mask, apply_mask, f"image {in_file}"),
                 out_file), warnings


def prealign_images(fixed_file: str, moving_file: str, mode: str, out_file: str, *,
                    network_size: int, fixed_mask_file: str | None = None,
                    moving_mask_file: str | None = None, dof: int = DEFAULT_PREALIGN_DOF,
                    fixed_modality: str = DEFAULT_MODALITY,
                    moving_modality: str = DEFAULT_MODALITY,
                    report_file: str | None = None) -> tuple[str, dict | None]:
    """Estimate the pre-alignment of two normalised images and write it as an affine-only ITK
    transform (``out_file``, .h5): it maps FIXED-space points to MOVING-space points.

    ``dof`` (6, 7, 9, 12) is that of the ``affine`` fit; the modalities choose where it looks
    in an image without a mask (a CT's body). Returns ``(out_file, report)``: the fit's report
    (:func:`~ugi_bids.engine.registrar.prealignment_report`; None for ``header`` and
    ``none``), also written as JSON to ``report_file`` when given (``null`` when None), with
    the .h5, all or nothing."""
    import json

    from ..engine.formats.itk import write_composite_h5
    from ..engine.registrar import prealignment_report

    fixed, moving = load_volume(fixed_file), load_volume(moving_file)
    masks = {}
    if fixed_mask_file:
        masks["fixed_mask"] = binarise_mask(load_volume(fixed_mask_file, "mask"), fixed, "fixed mask")
    if moving_mask_file:
        masks["moving_mask"] = binarise_mask(load_volume(moving_mask_file, "mask"), moving,
                                             "moving mask")
    affine, report = prealignment_report(fixed, moving, mode, network_size=network_size,
                                         dof=dof, fixed_modality=fixed_modality,
                                         moving_modality=moving_modality, **masks)
    common = os.path.dirname(os.path.abspath(out_file))
    if report_file:
        common = os.path.commonpath([common, os.path.dirname(os.path.abspath(report_file))])
    with staged_outputs(common) as staged:
        write_composite_h5(WorldTransform(affine), staged.stage(out_file))
        if report_file:
            with open(staged.stage(report_file), "w") as handle:
                json.dump(report, handle, indent=2)
    return out_file, report


#: BIDS-style sidecar keys of the pre-alignment report's fields.
PREALIGNMENT_KEYS = {"metric": "Metric", "final_cost": "FinalCost", "dof": "DOF",
                     "start": "Start", "fallback": "Fallback", "scales": "Scales",
                     "max_shear": "MaxShear"}


def prealignment_metadata(report: dict | None) -> dict | None:
    """The pre-alignment report (:func:`prealign_images`) with BIDS-style keys, for a sidecar's
    ``Prealignment``: ``{"Metric": "mi", "FinalCost": ..., "DOF": 12, "Start": "com",
    "Fallback": null, "Scales": [...], "MaxShear": ...}``; None for no report (or an empty
    one: ``header``, ``none``)."""
    if not report:
        return None
    return {PREALIGNMENT_KEYS.get(key, "".join(part.capitalize() for part in key.split("_"))):
            value for key, value in report.items()}


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


def read_transforms(transform_files: str | os.PathLike | Sequence[str | os.PathLike]
                    ) -> WorldTransform | TransformChain:
    """Read one transform file, or a list of them, as one pull map.

    A list is applied in the listed order (:func:`~ugi_bids.engine.spatial.transforms.compose`):
    the first file maps the reference (output) grid's points, the last gives points of the image
    to resample, like ``antsApplyTransforms -t a -t b`` for ``[a, b]``. Each file is read with
    :func:`~ugi_bids.engine.formats.itk.read_composite_h5`.
    """
    from ..engine.formats.itk import read_composite_h5

    if isinstance(transform_files, (str, os.PathLike)):
        transform_files = [transform_files]
    transform_files = list(transform_files)
    if not transform_files:
        raise ValueError("no transform file given")
    return compose(*(read_composite_h5(path) for path in transform_files))


def resample_image(moving_file: str, transform_file: str | list[str], reference_file: str,
                   out_file: str, interpolation: str = "linear") -> str:
    """Resample ``moving_file`` onto ``reference_file``'s grid through a mode-image transform
    (maps reference points to moving points), or a list of them applied in the listed order
    (:func:`read_transforms`: the first maps reference points), in one resampling step. Linear
    output is float32; nearest/label keep the input's data type."""
    from ..engine.spatial.warp import apply_transform

    moving = load_volume(moving_file, "image to resample")
    reference = load_volume(reference_file, "reference image")
    warped = apply_transform(moving, read_transforms(transform_file), reference.grid,
                             interpolation)
    dtype = np.float32 if interpolation == "linear" else nib.load(moving_file).get_data_dtype()
    return _save(warped, out_file, dtype, xform_codes(reference_file))


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
    _save(Volume(reference.grid, log_jacobian(det)), out_file, codes=xform_codes(reference_file))
    return folding_fraction(det)


def stem(path: str) -> str:
    """File name without folder and without .nii/.nii.gz/.h5 extensions."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".h5"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------------------------
# Labels: propagation, region volumes, multi-atlas fusion


def label_dtype(values: np.ndarray):
    """The smallest integer NIfTI type that holds ``values`` (uint8, int16 or int32)."""
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    raise ValueError(f"label values {low}..{high} do not fit a 32-bit integer")


def _save_labels(volume: Volume, path: str) -> str:
    data = np.rint(volume.data).astype(np.int64)
    return _save(Volume(volume.grid, data), path, label_dtype(data))


def propagate_labels(labels_file: str, transform_file: str | list[str], reference_file: str,
                     out_file: str) -> str:
    """Carry a label map onto ``reference_file``'s grid through a mode-image transform (maps
    reference points to label-map points, e.g. ``from-<space>_to-T1w``), or a list of them
    applied in the listed order (:func:`read_transforms`: the first maps reference points, e.g.
    ``[from-T1w_to-orig, from-MNI_to-T1w]`` for an MNI atlas on a raw grid), in one resampling
    step with ANTs' ``GenericLabel`` semantics
    (:func:`ugi_bids.engine.spatial.warp.apply_transform`, ``"label"``); written as the smallest
    integer type that holds the labels."""
    from ..engine.spatial.warp import apply_transform

    labels = load_volume(labels_file, "label map")
    reference = load_volume(reference_file, "reference image")
    warped = apply_transform(Volume(labels.grid, np.rint(labels.data).astype(np.int32)),
                             read_transforms(transform_file), reference.grid, "label")
    return _save_labels(warped, out_file)


def region_volumes_file(labels_file: str, table_file: str, out_file: str,
                        brain_mask_file: str | None = None) -> float | None:
    """Write the ``volumes.tsv`` of a label map (``index``, ``name``, ``voxels``,
    ``volume_mm3``, in the map's own millimetres; names from the lookup table ``table_file``)
    and return the brain volume (mm³) of ``brain_mask_file`` (None without one)."""
    from ..engine.formats.staging import write_text_atomic
    from ..engine.labels.tables import read_table
    from ..engine.labels.volumes import mask_volume_mm3, region_volumes, volumes_tsv

    labels = load_volume(labels_file, "label map")
    rows = region_volumes(labels, read_table(table_file))
    write_text_atomic(out_file, volumes_tsv(rows), "region volumes")
    if not brain_mask_file:
        return None
    return round(mask_volume_mm3(load_volume(brain_mask_file, "brain mask")), 3)


def warp_library(target_file: str, images: list[str], labels: list[str], out_dir: str, *,
                 target_modality: str = "mri", modalities: list[str] | None = None,
                 prealign: str = "affine", prealign_dof: int = DEFAULT_PREALIGN_DOF,
                 model: str = DEFAULT_MODEL,
                 weights: str | None = None, device: str = DEFAULT_DEVICE,
                 precision: str = DEFAULT_PRECISION,
                 io_checkpointing: str = DEFAULT_IO_CHECKPOINTING,
                 network_size: int = DEFAULT_NETWORK_SIZE, io_iterations: int = IO_STEPS,
                 io_similarity: str = DEFAULT_SIMILARITY,
                 num_threads: int | None = None) -> tuple[list[str], list[str], list[dict]]:
    """Register every labelled library image (``images[i]`` with labels ``labels[i]``) onto
    the target image with uniGradICON (world-space pre-alignment, both directions, the model
    loaded once for all of them: :meth:`Registrar.register_many`), and resample each onto the
    target grid: intensities trilinearly, labels with ``GenericLabel``.

    Returns (warped images, warped labels, one provenance dict per library image), files in
    ``out_dir`` named by position (``library-000_...``); a provenance entry holds the
    pre-alignment's report (``Prealignment``, :func:`prealignment_metadata`) when ``prealign``
    is ``affine``."""
    import torch

    from ..engine.spatial.warp import apply_transform

    if num_threads:
        torch.set_num_threads(int(num_threads))
    modalities = modalities or ["mri"] * len(images)
    registrar = cached_registrar(model, weights, device, int(network_size), precision,
                                 io_checkpointing)
    target = load_volume(target_file, "target image")
    warped_images, warped_labels, provenance = [], [], []
    # one register_many per intensity model (libraries are normally of one modality)
    for modality in dict.fromkeys(modalities):
        chosen = [i for i, m in enumerate(modalities) if m == modality]
        loaded: dict[int, Volume] = {}

        def library_volumes():
            # each image is read once: for its registration, then for its resampling
            for i in chosen:
                loaded[i] = load_volume(images[i], "library image")
                yield loaded[i]

        results = registrar.register_many(
            target, library_volumes(), fixed_modality=target_modality,
            moving_modality=modality, prealign=prealign, prealign_dof=prealign_dof,
            io_iterations=io_iterations, io_similarity=io_similarity)
        for i, result in zip(chosen, results):
            image = loaded.pop(i)
            label_map = load_volume(labels[i], "library label map")
            warped_image = apply_transform(image, result.forward, target.grid, "linear")
            warped_label = apply_transform(
                Volume(label_map.grid, np.rint(label_map.data).astype(np.int32)),
                result.forward, target.grid, "label")
            stem_i = os.path.join(out_dir, f"library-{i:03d}")
            warped_images.append((i, _save(warped_image, f"{stem_i}_image.nii.gz")))
            warped_labels.append((i, _save_labels(warped_label, f"{stem_i}_dseg.nii.gz")))
            entry = {"Image": images[i], "Labels": labels[i],
                     "Seconds": round(sum(result.timings.values()), 3),
                     "Device": str(registrar.device)}
            prealignment = prealignment_metadata(result.settings.get("prealign_report"))
            if prealignment:
                entry["Prealignment"] = prealignment
            provenance.append((i, entry))
    order = lambda pairs: [value for _, value in sorted(pairs, key=lambda p: p[0])]  # noqa: E731
    return order(warped_images), order(warped_labels), order(provenance)


def fuse_label_files(target_file: str, images: list[str], labels: list[str], out_file: str, *,
                     method: str = "jlf", device: str = DEFAULT_DEVICE,
                     parameters: dict | None = None, num_threads: int | None = None) -> dict:
    """Fuse library label maps already on the target grid (:func:`warp_library`) into one
    label map (:func:`ugi_bids.engine.labels.fusion.fuse_labels`), computed within the voxels
    any library image labels (dilated by the patch and search radii); writes ``out_file`` and
    returns the method and its parameters."""
    import torch
    from scipy import ndimage

    from ..engine.labels.fusion import JLF_DEFAULTS, fuse_labels
    from ..engine.model.device import resolve_device

    if num_threads:
        torch.set_num_threads(int(num_threads))
    target = load_volume(target_file, "target image")
    atlas_images = [load_volume(path, "warped library image").data for path in images]
    atlas_labels = [np.rint(load_volume(path, "warped library labels").data).astype(np.int32)
                    for path in labels]
    params = {**JLF_DEFAULTS, **(parameters or {})}
    reach = int(params["patch_radius"]) + int(params["search_radius"])
    labelled = np.any([lab != 0 for lab in atlas_labels], axis=0)
    mask = ndimage.binary_dilation(labelled, iterations=max(reach, 1))
    fused = fuse_labels(target.data, atlas_images, atlas_labels, method=method, mask=mask,
                        device=resolve_device(device), **params)
    _save_labels(Volume(target.grid, np.asarray(fused)), out_file)
    if method != "jlf":
        return {"Method": method, "TieBreak": "summed local patch correlation (Pearson), radius "
                f"{params['patch_radius']}"}
    return {"Method": method, "Alpha": params["alpha"], "Beta": params["beta"],
            "PatchRadius": params["patch_radius"], "SearchRadius": params["search_radius"],
            "PatchMetric": "MSQ", "IntensityNormalisation": "per image, robust z-score"}


def similarity_after(fixed_file: str, warped_file: str, mask_file: str | None = None) -> float:
    """Global normalised cross-correlation (Pearson, -1..1) of the fixed image and the moving
    image resampled onto its grid, over the fixed mask (else the fixed image's non-zero
    voxels): the registrations' QC figure."""
    import torch

    from ..engine.prealign.metrics import ncc_loss

    fixed = load_volume(fixed_file, "fixed image")
    warped = load_volume(warped_file, "resampled image")
    inside = (load_volume(mask_file, "mask").data > 0 if mask_file else fixed.data != 0)
    if inside.shape != fixed.data.shape or not inside.any():
        inside = np.ones(fixed.data.shape, dtype=bool)
    values = [torch.from_numpy(np.ascontiguousarray(v.data[inside], dtype=np.float64))
              for v in (fixed, warped)]
    loss = ncc_loss(values[0], values[1], torch.ones_like(values[0]))
    return round(float(1.0 - loss), 6)


# --------------------------------------------------------------------------------------------
# Templates: sessions of a subject, or a cohort


def build_template_files(in_files: list[str], out_dir: str, *, modality: str = "mri",
                         iterations: int, gradient_step: float, average: str,
                         voxel_size: float | None = None, cache_dir: str | None = None,
                         model: str = DEFAULT_MODEL, weights: str | None = None,
                         device: str = DEFAULT_DEVICE, precision: str = DEFAULT_PRECISION,
                         io_checkpointing: str = DEFAULT_IO_CHECKPOINTING,
                         network_size: int = DEFAULT_NETWORK_SIZE, prealign: str = "affine",
                         io_iterations: int = 0, final_io_iterations: int | None = None,
                         io_similarity: str = DEFAULT_SIMILARITY,
                         num_threads: int | None = None) -> dict:
    """Build the template of ``in_files`` (:func:`~ugi_bids.engine.template.build.build_template`)
    and write it into ``out_dir``, all or nothing: ``template.nii.gz`` (normalised intensities,
    float32), ``input-<i>_forward.h5`` (maps template points to input ``i``'s points: resamples
    the input onto the template) and ``input-<i>_inverse.h5`` (the opposite direction).

    Returns ``{"template", "forward_xfms", "inverse_xfms", "provenance"}``; the provenance has
    the model and weights, the settings and the convergence history (one entry per round).
    """
    import torch

    from ..engine.formats.itk import write_composite_h5
    from ..engine.template.build import build_template

    started = time.perf_counter()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    registrar = cached_registrar(model, weights, device, int(network_size), precision,
                                 io_checkpointing)
    result = build_template(in_files, registrar, iterations=iterations,
                            gradient_step=gradient_step, average=average, modality=modality,
                            prealign=prealign, io_iterations=io_iterations,
                            final_io_iterations=final_io_iterations,
                            io_similarity=io_similarity, voxel_size=voxel_size,
                            cache_dir=cache_dir)
    out = Path(out_dir)
    paths = {"template": str(out / "template.nii.gz"),
             "forward_xfms": [str(out / f"input-{i:04d}_forward.h5") for i in range(len(in_files))],
             "inverse_xfms": [str(out / f"input-{i:04d}_inverse.h5") for i in range(len(in_files))]}
    with staged_outputs(out) as staged:
        nib.save(result.template.to_nifti(), staged.stage(paths["template"]))
        for transform, path in zip(result.forward, paths["forward_xfms"]):
            write_composite_h5(transform, staged.stage(path))
        for transform, path in zip(result.inverse, paths["inverse_xfms"]):
            write_composite_h5(transform, staged.stage(path))
    paths["provenance"] = {
        "Model": registrar.weights.model,
        "WeightsSHA256": registrar.weights.sha256,
        "WeightsURL": registrar.weights.url,
        "NetworkGrid": int(network_size),
        "Device": str(registrar.device),
        "Precision": registrar.precision,
        "PrealignMode": prealign,
        # the engine's template build fits its pre-alignments with the default dof
        "PrealignDOF": DEFAULT_PREALIGN_DOF if prealign == "affine" else None,
        "TemplateIOIterations": int(io_iterations),
        "IOIterations": int(result.settings["final_io_iterations"]),
        "IOSimilarity": io_similarity,
        "TemplateIterations": int(iterations),
        "TemplateGradientStep": float(gradient_step),
        "TemplateAverage": average,
        "TemplateVoxelSize": result.settings.get("voxel_size_mm"),
        "ShapeUpdateCompositions": result.settings.get("shape_update_compositions"),
        "Convergence": [{key: (round(value, 4) if isinstance(value, float) else value)
                         for key, value in entry.items()} for entry in result.history],
        "TemplateSeconds": round(time.perf_counter() - started, 3),
    }
    return paths
