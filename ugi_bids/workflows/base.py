"""Top-level workflows: the whole run, and one participant."""

from __future__ import annotations

import os
import re
from copy import deepcopy

from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from .. import __version__
from ..config import SUFFIX_MODALITY, Config
from .outputs import init_registration_derivatives_wf
from .registration import init_register_to_template_wf


def init_ugi_wf(config: Config, subjects: dict, templates: dict, *,
                use_gpu: bool = False, atlases: list | None = None,
                libraries: list | None = None) -> Workflow:
    """The whole run: one :func:`init_single_subject_wf` per participant.

    Parameters
    ----------
    config : Config
        Run settings.
    subjects : dict
        ``{participant: {session or None: {suffix: reference image path}}}``.
    templates : dict
        ``{suffix: [ResolvedTemplate]}``: every output space resolved to the template image
        matching each anatomical suffix (T1w template for T1w images, T2w for T2w, ...).
    use_gpu : bool
        Whether ``config.device`` resolves to a GPU on this machine (MultiProc's GPU slots; see
        :func:`ugi_bids.workflows.registration.init_register_to_template_wf`).
    atlases : list of ResolvedAtlas
        Atlases to carry into every session (:func:`ugi_bids.utils.atlases.resolve_atlas`).
    libraries : list of ResolvedLibrary
        Labelled libraries to fuse in every session (:func:`ugi_bids.utils.atlases.resolve_library`).
    """
    from ..utils.provenance import boilerplate_postamble, boilerplate_preamble

    workflow = Workflow(name=f"ugi_bids_{__version__.replace('.', '_')}_wf")
    workflow.base_dir = str(config.work_dir)
    workflow.__desc__ = boilerplate_preamble(__version__, _nipype_version())
    workflow.__postdesc__ = boilerplate_postamble()
    for participant, sessions in subjects.items():
        single = init_single_subject_wf(subject_id=participant, sessions=sessions,
                                        templates=templates, config=config, use_gpu=use_gpu,
                                        atlases=atlases or [], libraries=libraries or [])
        # crash files go to sub-X/log/<run_uuid>/, as in fMRIPrep
        single.config["execution"]["crashdump_dir"] = str(
            config.output_dir / f"sub-{participant}" / "log" / config.run_uuid)
        for node in single._get_all_nodes():
            node.config = deepcopy(single.config)
        workflow.add_nodes([single])
    return workflow


def _safe(label: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]", "", label)


def init_single_subject_wf(*, subject_id: str, sessions: dict, templates: dict,
                           config: Config, use_gpu: bool = False, atlases: list | None = None,
                           libraries: list | None = None,
                           name: str | None = None) -> Workflow:
    """Register every session's anatomical references of one participant to every space.

    Parameters
    ----------
    subject_id : str
        Participant label (without ``sub-``).
    sessions : dict
        ``{session label or None: {suffix: reference image path}}``; one reference image per
        session and suffix (the choice is made by :func:`ugi_bids.utils.bids.select_reference`).
    templates : dict
        ``{suffix: [ResolvedTemplate]}`` (see :func:`init_ugi_wf`).
    config : Config
    use_gpu : bool
        See :func:`init_ugi_wf`.
    atlases, libraries : list
        See :func:`init_ugi_wf`; labels land on the first ``--anat-suffixes`` image of each
        session, through its registration to the atlas's space.

    Inputs
    ------
    None: every input is a file known when the workflow is built.

    Outputs
    -------
    None: every result is written by the derivatives sinks into ``config.output_dir``.
    """
    from ..utils.bids import REFERENCE_RULE, bids_uri

    workflow = Workflow(name=name or f"sub_{subject_id}_wf")
    # the same text for every participant, so that the collected boilerplate says it once
    workflow.__desc__ = f"""
#### Anatomical registration
Every session's anatomical images ({', '.join(config.anat_suffixes)}) were registered to each
output space ({', '.join(spec.label for spec in config.output_spaces)}). {REFERENCE_RULE}
"""
    registrations = {}
    for session, suffixes in sessions.items():
        for suffix, image in suffixes.items():
            for template in templates[suffix]:
                tag = "_".join(t for t in (f"ses{_safe(session)}" if session else "", suffix,
                                           _safe(template.spec.label)) if t)
                reg_wf = init_register_to_template_wf(
                    template_label=template.spec.label, modality=SUFFIX_MODALITY[suffix],
                    model=config.model, weights=config.weights, device=config.device,
                    precision=config.precision, io_checkpointing=config.io_checkpointing,
                    prealign=config.prealign, network_size=config.network_size,
                    io_iterations=config.io_iterations, io_similarity=config.io_similarity,
                    omp_nthreads=threads_per_registration(config, use_gpu), use_gpu=use_gpu,
                    template_has_mask=template.mask is not None, name=f"register_{tag}_wf")
                reg_wf.inputs.inputnode.moving_image = str(image)
                reg_wf.inputs.inputnode.template_image = str(template.image)
                if template.mask is not None:
                    reg_wf.inputs.inputnode.template_mask = str(template.mask)
                ds_wf = init_registration_derivatives_wf(
                    output_dir=str(config.output_dir), source_file=str(image), suffix=suffix,
                    space=template.spec.label, resolution=template.spec.resolution,
                    sources=[bids_uri(image, config.bids_dir), template.uri],
                    settings={"PrealignMode": config.prealign, "Sloppy": config.sloppy},
                    name=f"ds_{tag}_wf")
                registrations[session, suffix, template.spec.label] = reg_wf
                workflow.connect([(reg_wf, ds_wf, [
                    ("outputnode.forward_xfm", "inputnode.forward_xfm"),
                    ("outputnode.inverse_xfm", "inputnode.inverse_xfm"),
                    ("outputnode.anat_in_template", "inputnode.anat_in_template"),
                    ("outputnode.log_jacobian", "inputnode.log_jacobian"),
                    ("outputnode.provenance", "inputnode.provenance"),
                ])])
    if atlases or libraries:
        _add_labels(workflow, subject_id=subject_id, sessions=sessions, templates=templates,
                    config=config, registrations=registrations, atlases=atlases or [],
                    libraries=libraries or [], use_gpu=use_gpu)
    return workflow


def atlas_table_path(output_dir, label: str):
    """The run's lookup table of an atlas: ``OUTPUT_DIR/atlas-<A>[_desc-<D>]_dseg.tsv``."""
    from pathlib import Path

    return Path(output_dir) / f"{label}_dseg.tsv"


def _add_labels(workflow: Workflow, *, subject_id: str, sessions: dict, templates: dict,
                config: Config, registrations: dict, atlases: list, libraries: list,
                use_gpu: bool) -> None:
    """Atlas propagation and label fusion for every session that has an image of the first
    ``--anat-suffixes`` entry (the labels land on its grid)."""
    import logging

    from nipype.pipeline import engine as pe

    from ..interfaces.labels import PropagateLabels
    from ..utils.bids import bids_uri
    from .labels import atlas_reference, init_atlas_propagation_wf, init_label_fusion_wf
    from .outputs import derivative_uri, init_labels_derivatives_wf

    suffix = config.anat_suffixes[0]
    spaces = {t.spec.label: t for t in templates[suffix]}
    for session, suffixes in sessions.items():
        if suffix not in suffixes:
            logging.getLogger("ugi_bids").warning(
                "sub-%s%s: no %s image, so no atlas labels", subject_id,
                f" ses-{session}" if session else "", suffix)
            continue
        image = str(suffixes[suffix])
        raw_uri = bids_uri(image, config.bids_dir)
        tag = "_".join(t for t in (f"ses{_safe(session)}" if session else "", suffix) if t)

        brain_masks: dict = {}

        def brain_mask(space: str):
            """The space's template brain mask carried into this session (one node per
            session and space, through the same inverse transform as the labels), or None."""
            if spaces[space].mask is None:
                return None
            if space not in brain_masks:
                node = pe.Node(PropagateLabels(in_file=str(spaces[space].mask), reference=image),
                               name=f"brain_mask_{tag}_{_safe(space)}", mem_gb=1.0)
                workflow.connect(registrations[session, suffix, space],
                                 "outputnode.inverse_xfm", node, "transform")
                brain_masks[space] = node
            return brain_masks[space]

        def xfm_uri(space: str) -> str:
            return derivative_uri(subject=subject_id, session=session, suffix="xfm",
                                  extension=".h5", mode="image", **{"from": space, "to": suffix})

        for atlas in atlases:
            template = spaces[atlas.space]
            reg_wf = registrations[session, suffix, atlas.space]
            atlas_tag = _safe(atlas.label)
            shown = atlas.spec.name if atlas.spec.is_custom else atlas.spec.text
            prop_wf = init_atlas_propagation_wf(
                atlas_text=shown, space=atlas.space, suffix=suffix,
                has_brain_mask=template.mask is not None,
                citation=atlas_reference(atlas.spec.name, shown, not atlas.spec.is_custom),
                name=f"labels_{tag}_{atlas_tag}_wf")
            prop_wf.inputs.inputnode.atlas = str(atlas.image)
            prop_wf.inputs.inputnode.table = str(atlas_table_path(config.output_dir, atlas.label))
            prop_wf.inputs.inputnode.reference = image
            mask_node = brain_mask(atlas.space)
            if mask_node is not None:
                workflow.connect(mask_node, "out_file", prop_wf, "inputnode.brain_mask")
            ds_wf = init_labels_derivatives_wf(
                output_dir=str(config.output_dir), source_file=image, atlas=atlas.spec.name,
                desc=atlas.spec.desc, metadata={
                    "Sources": [atlas.uri, xfm_uri(atlas.space), raw_uri]
                    + ([atlas.table_uri] if atlas.table_uri else []),
                    "SpatialReference": raw_uri,
                    "Atlas": shown, "AtlasSpace": atlas.space,
                    "Interpolation": "GenericLabel",
                    "Description": (
                        f"{shown} labels carried from {atlas.space} into this "
                        f"session's {suffix} space through the inverse transform of the "
                        "registration, with label-aware linear interpolation (ANTs "
                        "GenericLabel semantics: no new label values, no holes at borders)"),
                }, name=f"ds_labels_{tag}_{atlas_tag}_wf")
            workflow.connect([
                (reg_wf, prop_wf, [("outputnode.inverse_xfm", "inputnode.inverse_xfm")]),
                (prop_wf, ds_wf, [("outputnode.dseg", "inputnode.dseg"),
                                  ("outputnode.volumes", "inputnode.volumes"),
                                  ("outputnode.brain_volume", "inputnode.brain_volume")]),
            ])
        if not libraries:
            continue
        fusion_mask = brain_mask(templates[suffix][0].spec.label)
        for library in libraries:
            fusion_wf = init_label_fusion_wf(
                library_name=library.spec.name, library_size=len(library.images),
                method=config.label_fusion, modality=SUFFIX_MODALITY[suffix],
                library_modalities=[library_modality(i.image) for i in library.images],
                model=config.model, weights=config.weights, device=config.device,
                precision=config.precision, io_checkpointing=config.io_checkpointing,
                prealign=config.prealign, network_size=config.network_size,
                io_iterations=config.io_iterations, io_similarity=config.io_similarity,
                omp_nthreads=threads_per_registration(config, use_gpu), use_gpu=use_gpu,
                has_brain_mask=fusion_mask is not None,
                name=f"fusion_{tag}_{_safe(library.spec.name)}_wf")
            fusion_wf.inputs.inputnode.reference = image
            fusion_wf.inputs.inputnode.library_images = [str(i.image) for i in library.images]
            fusion_wf.inputs.inputnode.library_labels = [str(i.labels) for i in library.images]
            fusion_wf.inputs.inputnode.table = str(atlas_table_path(config.output_dir,
                                                                    library.label))
            ds_wf = init_labels_derivatives_wf(
                output_dir=str(config.output_dir), source_file=image, atlas=library.spec.name,
                desc=None, metadata={
                    "Sources": [raw_uri], "SpatialReference": raw_uri,
                    "Atlas": library.spec.name,
                    "Library": [{"Image": i.image.as_uri(), "ImageSHA256": i.image_sha256,
                                 "Labels": i.labels.as_uri(), "LabelsSHA256": i.labels_sha256}
                                for i in library.images],
                    "Description": (
                        f"multi-atlas label fusion of the {library.spec.name} library: every "
                        "library image registered to this session with uniGradICON, its labels "
                        "carried onto this grid (GenericLabel semantics), then fused"),
                }, name=f"ds_fusion_{tag}_{_safe(library.spec.name)}_wf")
            workflow.connect([
                (fusion_wf, ds_wf, [("outputnode.dseg", "inputnode.dseg"),
                                    ("outputnode.volumes", "inputnode.volumes"),
                                    ("outputnode.brain_volume", "inputnode.brain_volume"),
                                    (("outputnode.parameters", _fusion_metadata),
                                     "inputnode.extra_metadata")]),
            ])
            if fusion_mask is not None:
                workflow.connect(fusion_mask, "out_file", fusion_wf, "inputnode.brain_mask")


def library_modality(image) -> str:
    """The intensity model of a library image, from its BIDS suffix (CT or MRI)."""
    from pathlib import Path

    stem = Path(image).name.split(".")[0]
    return SUFFIX_MODALITY.get(stem.rsplit("_", 1)[-1], "mri")


def _fusion_metadata(parameters: dict) -> dict:
    return {"LabelFusion": parameters}


def threads_per_registration(config: Config, use_gpu: bool = False) -> int:
    """``--omp-nthreads``, else the cores the run may use (``--nprocs``, else the machine's):
    all of them, or on a GPU their share among the ``--gpu-procs`` registrations that run at
    once (a registration's threads then serve its pre-alignment and sampling)."""
    if config.omp_nthreads:
        return config.omp_nthreads
    cores = config.nprocs or os.cpu_count() or 1
    return max(1, cores // config.gpu_procs) if use_gpu else cores


def _nipype_version() -> str:
    from nipype import __version__ as version
    return version
