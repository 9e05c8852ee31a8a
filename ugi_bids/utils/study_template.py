"""The group level's study template: ``ugi-bids BIDS_DIR OUTPUT_DIR group --build-template NAME``.

One image per participant goes into an unbiased deformable template
(:func:`ugi_bids.engine.template.build.build_template`): the subject template
``sub-X/anat/sub-X_desc-preproc_<suffix>.nii.gz`` where ``--longitudinal`` made one, otherwise the
first session's image (``--anat-suffixes``' first entry). Written, all or nothing:

* ``OUTPUT_DIR/tpl-NAME/`` in TemplateFlow layout: ``tpl-NAME_res-01_<suffix>.nii.gz``,
  ``template_description.json`` (with the ``res-01`` grid), and, when the first output space has
  a brain mask, ``tpl-NAME_res-01_desc-brain_mask.nii.gz`` (carried over through a registration
  of the study template to that space) with ``tpl-NAME_from-<space>_mode-image_xfm.h5``
  (resamples that space's images onto the study template, TemplateFlow's naming);
* per participant, beside its other transforms: ``sub-X[_ses-Y]_from-<suffix>_to-NAME_mode-image_xfm.h5``
  (resamples the participant's image onto the study template) and
  ``..._from-NAME_to-<suffix>_mode-image_xfm.h5``, each with a JSON sidecar.

The folder then works as an output space: ``--template NAME=OUTPUT_DIR/tpl-NAME/tpl-NAME_res-01_T1w.nii.gz,mask=...``,
or with ``TEMPLATEFLOW_HOME`` pointing at a folder that holds ``tpl-NAME``. Finished rounds are
kept under ``WORK_DIR/template_cache/tpl-NAME/``, so a rerun with the same ``-w`` resumes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np

from .. import __version__
from ..config import SUFFIX_MODALITY, Config
from ..engine.formats.staging import staged_outputs
from ..engine.options import DEFAULT_PREALIGN_DOF
from ..errors import NoDataError
from .provenance import PIPELINE_NAME, dump_json, write_bidsignore

LOGGER = logging.getLogger("ugi_bids.group")

#: The resolution label of the study template's only grid.
RESOLUTION = "01"


@dataclass(frozen=True)
class StudyInput:
    """One participant's image in the study template, and where its transforms go."""

    participant: str
    session: str | None  # None for a subject template
    image: Path
    uri: str
    anat: Path  # OUTPUT_DIR/sub-X[/ses-Y]/anat
    prefix: str  # sub-X[_ses-Y]


def study_inputs(config: Config, subjects: dict) -> list[StudyInput]:
    """One image per participant of ``subjects`` (``{participant: {session: {suffix: path}}}``,
    as :func:`ugi_bids.cli.run.select_inputs` gives it): its subject template where the output
    has one, otherwise its first session's image of the first ``--anat-suffixes`` entry."""
    from .bids import bids_uri

    suffix = config.anat_suffixes[0]
    out = config.output_dir
    chosen = []
    for participant in sorted(subjects):
        subject_template = out / f"sub-{participant}" / "anat" / \
            f"sub-{participant}_desc-preproc_{suffix}.nii.gz"
        if subject_template.is_file():
            chosen.append(StudyInput(
                participant, None, subject_template,
                f"bids::{PurePosixPath(*subject_template.relative_to(out).parts)}",
                subject_template.parent, f"sub-{participant}"))
            continue
        sessions = sorted((s for s, suffixes in subjects[participant].items() if suffix in suffixes),
                          key=lambda s: (s is not None, s or ""))
        if not sessions:
            LOGGER.warning("sub-%s: no %s image, not in the study template", participant, suffix)
            continue
        session = sessions[0]
        image = Path(subjects[participant][session][suffix])
        anat = out / f"sub-{participant}" / (f"ses-{session}" if session else "") / "anat"
        chosen.append(StudyInput(participant, session, image, bids_uri(image, config.bids_dir),
                                 anat, f"sub-{participant}" + (f"_ses-{session}" if session else "")))
    return chosen


def template_description(name: str, grid, inputs: list[StudyInput], provenance: dict) -> dict:
    """``template_description.json`` of the study template (TemplateFlow's fields, and how it
    was built)."""
    zooms = [float(z) for z in grid.spacing]
    return {
        "Name": f"{name}: a study template built by {PIPELINE_NAME} from {len(inputs)} participants",
        "Identifier": name,
        "Authors": [],
        "BIDSVersion": "1.9.0",
        "TemplateFlowVersion": "1.0.0",
        "License": "See the license of the source dataset",
        "ReferencesAndLinks": ["https://doi.org/10.1007/978-3-031-72069-7_70"],
        "res": {RESOLUTION: {"zooms": zooms, "shape": list(grid.shape),
                             "origin": [float(v) for v in grid.affine[:3, 3]]}},
        "GeneratedBy": [{"Name": PIPELINE_NAME, "Version": __version__}],
        "Sources": [item.uri for item in inputs],
        "TemplateBuilding": provenance,
    }


def build_study_template(config: Config, subjects: dict, space=None) -> Path:
    """Build and write the study template ``config.build_template`` (module notes).

    ``space`` is the first output space's :class:`~ugi_bids.utils.templates.ResolvedTemplate`
    (its brain mask is carried onto the study template), or None. Returns the template's
    folder. Raises :class:`~ugi_bids.errors.NoDataError` (exit 18, nothing written) when fewer
    than two participants have an image.
    """
    from ..engine.formats.itk import write_composite_h5
    from ..engine.registrar import Registrar
    from ..engine.spatial.jacobian import folding_fraction, jacobian_determinant
    from ..engine.spatial.volume import load_volume
    from ..engine.spatial.warp import apply_transform
    from ..engine.template.build import build_template

    name, suffix, out = config.build_template, config.anat_suffixes[0], config.output_dir
    inputs = study_inputs(config, subjects)
    if len(inputs) < 2:
        raise NoDataError(f"--build-template {name}: a study template needs two or more "
                          f"participants with a {suffix} image; found {len(inputs)}")
    LOGGER.info("study template %s from %d participants: %s", name, len(inputs),
                ", ".join(str(item.image) for item in inputs))
    registrar = Registrar(config.model, config.weights, device=config.device,
                          network_size=config.network_size, precision=config.precision,
                          io_checkpointing=config.io_checkpointing)
    modality = "mri" if any(item.session is None for item in inputs) else SUFFIX_MODALITY[suffix]
    result = build_template(
        [item.image for item in inputs], registrar, iterations=config.template_iterations,
        gradient_step=config.template_gradient_step, average=config.template_average,
        modality=modality, prealign=config.prealign, io_iterations=0,
        final_io_iterations=config.io_iterations, io_similarity=config.io_similarity,
        cache_dir=config.work_dir / "template_cache" / f"tpl-{name}")
    provenance = {
        "Model": registrar.weights.model, "WeightsSHA256": registrar.weights.sha256,
        "WeightsURL": registrar.weights.url, "NetworkGrid": registrar.network_size,
        "Device": str(registrar.device), "Precision": registrar.precision,
        "PrealignMode": config.prealign,
        # the engine's template build fits its pre-alignments with the default dof
        "PrealignDOF": DEFAULT_PREALIGN_DOF if config.prealign == "affine" else None,
        "IOIterations": config.io_iterations,
        "IOSimilarity": config.io_similarity,
        "TemplateIterations": config.template_iterations,
        "TemplateGradientStep": config.template_gradient_step,
        "TemplateAverage": config.template_average,
        "Convergence": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items()}
                        for e in result.history]}
    folder = out / f"tpl-{name}"
    stem = f"tpl-{name}_res-{RESOLUTION}"
    template_uri = f"bids::tpl-{name}/{stem}_{suffix}.nii.gz"
    mask_volume = to_space = None
    if space is not None and space.mask is not None:
        # the study template (moving) to the space (fixed); the inverse maps study points to
        # space points and carries the space's mask onto the study template's grid
        registration = registrar.register(
            load_volume(space.image, "output-space template"), result.template,
            moving_modality="mri", fixed_mask=load_volume(space.mask, "template brain mask"),
            prealign=config.prealign, io_iterations=config.io_iterations,
            io_similarity=config.io_similarity)
        to_space = registration.inverse
        mask = load_volume(space.mask, "template brain mask")
        mask.data = (mask.data > 0.5).astype(np.uint8)
        mask_volume = apply_transform(mask, to_space, result.template.grid, "label")
    elif space is not None:
        LOGGER.info("%s has no brain mask: the study template gets none", space.spec.label)

    folder.mkdir(parents=True, exist_ok=True)
    with staged_outputs(out) as staged:
        nib.save(result.template.to_nifti(), staged.stage(folder / f"{stem}_{suffix}.nii.gz"))
        Path(staged.stage(folder / "template_description.json")).write_text(dump_json(
            template_description(name, result.template.grid, inputs, provenance)))
        if mask_volume is not None:
            nib.save(mask_volume.to_nifti(np.uint8),
                     staged.stage(folder / f"{stem}_desc-brain_mask.nii.gz"))
            xfm = folder / f"tpl-{name}_from-{space.spec.label}_mode-image_xfm.h5"
            write_composite_h5(to_space, staged.stage(xfm))
            Path(staged.stage(xfm.with_suffix(".json"))).write_text(dump_json({
                "Sources": [template_uri, space.uri], **provenance,
                "Description": f"maps {name} points to {space.spec.label} points: resamples "
                               f"{space.spec.label} images onto {name}"}))
        for index, item in enumerate(inputs):
            item.anat.mkdir(parents=True, exist_ok=True)
            folded = folding_fraction(jacobian_determinant(result.forward[index],
                                                           result.template.grid))
            for transform, (source, target) in ((result.forward[index], (suffix, name)),
                                                 (result.inverse[index], (name, suffix))):
                path = item.anat / f"{item.prefix}_from-{source}_to-{target}_mode-image_xfm.h5"
                write_composite_h5(transform, staged.stage(path))
                Path(staged.stage(path.with_suffix(".json"))).write_text(dump_json({
                    "Sources": [item.uri, template_uri], **provenance,
                    "FoldedVoxelFraction": folded}))
    write_bidsignore(out, extra=(f"tpl-{name}/",))
    LOGGER.info("study template written: %s (final mean displacement of the average map "
                "%.3f mm)", folder, result.history[-1]["mean_displacement_mm"])
    return folder
