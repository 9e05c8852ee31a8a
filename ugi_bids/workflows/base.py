"""Top-level workflows: the whole run, and one participant."""

from __future__ import annotations

import os
import re
from copy import deepcopy
from dataclasses import dataclass

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

    With ``--subject-anatomical-reference unbiased`` (``--longitudinal``) and two or more
    sessions with an image of the first ``--anat-suffixes`` entry, those images build a
    subject template (:func:`~ugi_bids.workflows.longitudinal.init_subject_template_wf`), which
    alone is registered to the output spaces; labels reach the template and each session
    through the composed transforms. Other suffixes are registered session by session.

    Inputs
    ------
    None: every input is a file known when the workflow is built.

    Outputs
    -------
    None: every result is written by the derivatives sinks into ``config.output_dir``.
    """
    from ..utils.bids import REFERENCE_RULE, bids_uri

    workflow = Workflow(name=name or f"sub_{subject_id}_wf")
    longitudinal = longitudinal_sessions(subject_id, sessions, config)
    through_template = (
        f" For participants with two or more sessions, the {config.anat_suffixes[0]} images "
        "were registered to the output spaces through their subject template (see "
        "*Longitudinal processing*)." if longitudinal else "")
    # the same text for every participant of a kind, so that the collected boilerplate says
    # it once
    workflow.__desc__ = f"""
#### Anatomical registration
Every session's anatomical images ({', '.join(config.anat_suffixes)}) were registered to each
output space ({', '.join(spec.label for spec in config.output_spaces)}). {REFERENCE_RULE}{through_template}
"""
    registrations = {}
    for session, suffixes in sessions.items():
        for suffix, image in suffixes.items():
            if longitudinal and suffix == config.anat_suffixes[0]:
                continue  # registered to the spaces through the subject template
            for template in templates[suffix]:
                tag = "_".join(t for t in (f"ses{_safe(session)}" if session else "", suffix,
                                           _safe(template.spec.label)) if t)
                registrations[session, suffix, template.spec.label] = _register_to_space(
                    workflow, config, template, tag=tag, modality=SUFFIX_MODALITY[suffix],
                    suffix=suffix, moving=str(image), source_file=str(image),
                    source_uri=bids_uri(image, config.bids_dir), use_gpu=use_gpu)
    targets = _label_targets(subject_id, sessions, config, registrations)
    if longitudinal:
        targets = _add_longitudinal(workflow, subject_id=subject_id, sessions=sessions,
                                    longitudinal=longitudinal, templates=templates,
                                    config=config, use_gpu=use_gpu, targets=targets)
    if atlases or libraries:
        _add_labels(workflow, subject_id=subject_id, targets=targets, templates=templates,
                    config=config, atlases=atlases or [], libraries=libraries or [],
                    use_gpu=use_gpu)
    return workflow


def _register_to_space(workflow: Workflow, config: Config, template, *, tag: str,
                       modality: str, suffix: str, moving, source_file: str, source_uri: str,
                       use_gpu: bool) -> Workflow:
    """Register one image (a path, or a ``(node, output)`` pair) to one output space and sink
    the results named after ``source_file``; returns the registration workflow."""
    reg_wf = init_register_to_template_wf(
        template_label=template.spec.label, modality=modality, model=config.model,
        weights=config.weights, device=config.device, precision=config.precision,
        io_checkpointing=config.io_checkpointing, prealign=config.prealign,
        prealign_dof=config.prealign_dof,
        network_size=config.network_size, io_iterations=config.io_iterations,
        io_similarity=config.io_similarity,
        omp_nthreads=threads_per_registration(config, use_gpu), use_gpu=use_gpu,
        template_has_mask=template.mask is not None, name=f"register_{tag}_wf")
    if isinstance(moving, tuple):
        workflow.connect(moving[0], moving[1], reg_wf, "inputnode.moving_image")
    else:
        reg_wf.inputs.inputnode.moving_image = moving
    reg_wf.inputs.inputnode.template_image = str(template.image)
    if template.mask is not None:
        reg_wf.inputs.inputnode.template_mask = str(template.mask)
    ds_wf = init_registration_derivatives_wf(
        output_dir=str(config.output_dir), source_file=source_file, suffix=suffix,
        space=template.spec.label, resolution=template.spec.resolution,
        sources=[source_uri, template.uri],
        settings={"PrealignMode": config.prealign,
                  "PrealignDOF": config.prealign_dof if config.prealign == "affine" else None,
                  "Sloppy": config.sloppy},
        name=f"ds_{tag}_wf")
    workflow.connect([(reg_wf, ds_wf, [
        ("outputnode.forward_xfm", "inputnode.forward_xfm"),
        ("outputnode.inverse_xfm", "inputnode.inverse_xfm"),
        ("outputnode.anat_in_template", "inputnode.anat_in_template"),
        ("outputnode.log_jacobian", "inputnode.log_jacobian"),
        ("outputnode.provenance", "inputnode.provenance"),
    ])])
    return reg_wf


def longitudinal_sessions(subject_id: str, sessions: dict, config: Config) -> list:
    """The sessions that build the subject template (``--subject-anatomical-reference
    unbiased``): those with an image of the first ``--anat-suffixes`` entry, when there are two
    or more; otherwise none (a log line says why)."""
    import logging

    if config.subject_anatomical_reference != "unbiased":
        return []
    suffix = config.anat_suffixes[0]
    with_image = [session for session, suffixes in sessions.items()
                  if session is not None and suffix in suffixes]
    if len(with_image) < 2:
        logging.getLogger("ugi_bids").info(
            "sub-%s: %s %s session%s, so no subject template: the ordinary cross-sectional "
            "outputs are written", subject_id, "only one" if with_image else "no", suffix,
            "" if with_image else "s")
        return []
    return with_image


@dataclass
class LabelTarget:
    """An image that atlas labels land on: a session's raw image or the subject template.

    ``reference`` is a path, or a ``(node, output)`` pair of the workflow that produces it;
    ``chain(space)`` lists ``(node, output, uri)`` of the transforms that carry ``space`` onto
    it, in the listed order (the first maps the target's points; a list as
    :func:`ugi_bids.interfaces.files.read_transforms` takes it)."""

    tag: str
    session: str | None
    source_file: str
    reference: object
    uri: str
    chain: object


def _label_targets(subject_id: str, sessions: dict, config: Config,
                   registrations: dict) -> list:
    """The sessions registered on their own (cross-sectional) that have an image of the first
    ``--anat-suffixes`` entry."""
    from ..utils.bids import bids_uri
    from .outputs import derivative_uri

    suffix = config.anat_suffixes[0]
    targets = []
    for session, suffixes in sessions.items():
        if suffix not in suffixes or not any(key[:2] == (session, suffix)
                                             for key in registrations):
            continue
        image = str(suffixes[suffix])

        def chain(space, session=session):
            return [(registrations[session, suffix, space], "outputnode.inverse_xfm",
                     derivative_uri(subject=subject_id, session=session, suffix="xfm",
                                    extension=".h5", mode="image",
                                    **{"from": space, "to": suffix}))]

        targets.append(LabelTarget(
            tag="_".join(t for t in (f"ses{_safe(session)}" if session else "", suffix) if t),
            session=session, source_file=image, reference=image,
            uri=bids_uri(image, config.bids_dir), chain=chain))
    return targets


def _add_longitudinal(workflow: Workflow, *, subject_id: str, sessions: dict,
                      longitudinal: list, templates: dict, config: Config, use_gpu: bool,
                      targets: list) -> list:
    """The subject template of the first ``--anat-suffixes`` entry, its registration to every
    output space, and the label targets it adds (the template and each of its sessions)."""
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from ..utils.bids import bids_uri
    from .longitudinal import init_subject_template_wf, template_source_file
    from .outputs import derivative_uri

    suffix = config.anat_suffixes[0]
    images = [str(sessions[session][suffix]) for session in longitudinal]
    template_wf = init_subject_template_wf(
        subject_id=subject_id, sessions=list(longitudinal), images=images, suffix=suffix,
        output_dir=str(config.output_dir), bids_dir=str(config.bids_dir),
        sources=[bids_uri(image, config.bids_dir) for image in images],
        modality=SUFFIX_MODALITY[suffix], iterations=config.template_iterations,
        gradient_step=config.template_gradient_step, average=config.template_average,
        cache_dir=str(config.work_dir / "template_cache" / f"sub-{_safe(subject_id)}"),
        model=config.model, weights=config.weights, device=config.device,
        precision=config.precision, io_checkpointing=config.io_checkpointing,
        prealign=config.prealign, network_size=config.network_size,
        io_iterations=config.io_iterations, io_similarity=config.io_similarity,
        omp_nthreads=threads_per_registration(config, use_gpu), use_gpu=use_gpu,
        name=f"sub_{_safe(subject_id)}_template_wf")
    template_file = template_source_file(config.bids_dir, subject_id, suffix)
    template_uri = derivative_uri(subject=subject_id, desc="preproc", suffix=suffix,
                                  extension=".nii.gz")
    to_space = {}
    for template in templates[suffix]:
        to_space[template.spec.label] = _register_to_space(
            workflow, config, template, tag=f"template_{suffix}_{_safe(template.spec.label)}",
            modality="mri", suffix=suffix, moving=(template_wf, "outputnode.template"),
            source_file=template_file, source_uri=template_uri, use_gpu=use_gpu)

    def template_chain(space):
        return [(to_space[space], "outputnode.inverse_xfm",
                 derivative_uri(subject=subject_id, suffix="xfm", extension=".h5",
                                mode="image", **{"from": space, "to": suffix}))]

    targets = list(targets) + [LabelTarget(
        tag=f"template_{suffix}", session=None, source_file=template_file,
        reference=(template_wf, "outputnode.template"), uri=template_uri, chain=template_chain)]
    for index, session in enumerate(longitudinal):
        pick = pe.Node(niu.Select(index=index), name=f"template_inverse_ses{_safe(session)}",
                       run_without_submitting=True)
        workflow.connect(template_wf, "outputnode.inverse_xfms", pick, "inlist")

        def session_chain(space, session=session, pick=pick):
            return [(pick, "out", derivative_uri(
                subject=subject_id, session=session, suffix="xfm", extension=".h5",
                mode="image", **{"from": suffix, "to": "orig"}))] + template_chain(space)

        targets.append(LabelTarget(
            tag=f"ses{_safe(session)}_{suffix}", session=session, source_file=images[index],
            reference=images[index], uri=bids_uri(images[index], config.bids_dir),
            chain=session_chain))
    return targets


def atlas_table_path(output_dir, label: str):
    """The run's lookup table of an atlas: ``OUTPUT_DIR/atlas-<A>[_desc-<D>]_dseg.tsv``."""
    from pathlib import Path

    return Path(output_dir) / f"{label}_dseg.tsv"


def _connect_reference(workflow: Workflow, target: LabelTarget, node, field: str) -> None:
    """Give ``node.field`` the target's image: a path, or the output that produces it."""
    if isinstance(target.reference, tuple):
        workflow.connect(target.reference[0], target.reference[1], node, field)
    elif "." in field:  # a sub-workflow's input node
        inner, name = field.split(".")
        setattr(getattr(node.inputs, inner), name, target.reference)
    else:
        node.set_input(field, target.reference)


def _connect_chain(workflow: Workflow, chain: list, node, field: str, name: str) -> None:
    """Feed ``node.field`` the transforms of ``chain`` as one list, in order (a Merge node
    when there are several)."""
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    if len(chain) == 1:
        workflow.connect(chain[0][0], chain[0][1], node, field)
        return
    merge = workflow.get_node(name)
    if merge is None:
        merge = pe.Node(niu.Merge(len(chain)), name=name, run_without_submitting=True)
        for index, (source, output, _) in enumerate(chain, start=1):
            workflow.connect(source, output, merge, f"in{index}")
    workflow.connect(merge, "out", node, field)


def _add_labels(workflow: Workflow, *, subject_id: str, targets: list, templates: dict,
                config: Config, atlases: list, libraries: list, use_gpu: bool) -> None:
    """Atlas propagation and label fusion for every label target (:class:`LabelTarget`): the
    sessions' images of the first ``--anat-suffixes`` entry (the labels land on their grids)
    and, with ``--longitudinal``, the subject template."""
    import logging

    from nipype.pipeline import engine as pe

    from ..interfaces.labels import PropagateLabels
    from .labels import atlas_reference, init_atlas_propagation_wf, init_label_fusion_wf
    from .outputs import init_labels_derivatives_wf

    suffix = config.anat_suffixes[0]
    spaces = {t.spec.label: t for t in templates[suffix]}
    if not targets:
        logging.getLogger("ugi_bids").warning("sub-%s: no %s image, so no atlas labels",
                                              subject_id, suffix)
    for target in targets:
        tag = target.tag
        brain_masks: dict = {}

        def brain_mask(space: str):
            """The space's template brain mask carried onto this target (one node per target
            and space, through the same transforms as the labels), or None."""
            if spaces[space].mask is None:
                return None
            if space not in brain_masks:
                node = pe.Node(PropagateLabels(in_file=str(spaces[space].mask)),
                               name=f"brain_mask_{tag}_{_safe(space)}", mem_gb=1.0)
                _connect_reference(workflow, target, node, "reference")
                _connect_chain(workflow, target.chain(space), node, "transform",
                               f"chain_{tag}_{_safe(space)}")
                brain_masks[space] = node
            return brain_masks[space]

        for atlas in atlases:
            template = spaces[atlas.space]
            atlas_tag = _safe(atlas.label)
            shown = atlas.spec.name if atlas.spec.is_custom else atlas.spec.text
            chain = target.chain(atlas.space)
            prop_wf = init_atlas_propagation_wf(
                atlas_text=shown, space=atlas.space, suffix=suffix,
                has_brain_mask=template.mask is not None,
                citation=atlas_reference(atlas.spec.name, shown, not atlas.spec.is_custom),
                name=f"labels_{tag}_{atlas_tag}_wf")
            prop_wf.inputs.inputnode.atlas = str(atlas.image)
            prop_wf.inputs.inputnode.table = str(atlas_table_path(config.output_dir, atlas.label))
            _connect_reference(workflow, target, prop_wf, "inputnode.reference")
            _connect_chain(workflow, chain, prop_wf, "inputnode.inverse_xfm",
                           f"chain_{tag}_{_safe(atlas.space)}")
            mask_node = brain_mask(atlas.space)
            if mask_node is not None:
                workflow.connect(mask_node, "out_file", prop_wf, "inputnode.brain_mask")
            through = ("the inverse transform of the registration" if len(chain) == 1 else
                       "the composed inverse transforms (space to subject template, template "
                       "to session), in one resampling step")
            ds_wf = init_labels_derivatives_wf(
                output_dir=str(config.output_dir), source_file=target.source_file,
                atlas=atlas.spec.name, desc=atlas.spec.desc, metadata={
                    "Sources": [atlas.uri, *(uri for _, _, uri in chain), target.uri]
                    + ([atlas.table_uri] if atlas.table_uri else []),
                    "SpatialReference": target.uri,
                    "Atlas": shown, "AtlasSpace": atlas.space,
                    "Interpolation": "GenericLabel",
                    "Description": (
                        f"{shown} labels carried from {atlas.space} into this "
                        f"{'session' if target.session else 'image'}'s {suffix} space through "
                        f"{through}, with label-aware linear interpolation (ANTs "
                        "GenericLabel semantics: no new label values, no holes at borders)"),
                }, name=f"ds_labels_{tag}_{atlas_tag}_wf")
            workflow.connect([
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
                prealign=config.prealign, prealign_dof=config.prealign_dof,
                network_size=config.network_size,
                io_iterations=config.io_iterations, io_similarity=config.io_similarity,
                omp_nthreads=threads_per_registration(config, use_gpu), use_gpu=use_gpu,
                has_brain_mask=fusion_mask is not None,
                name=f"fusion_{tag}_{_safe(library.spec.name)}_wf")
            _connect_reference(workflow, target, fusion_wf, "inputnode.reference")
            fusion_wf.inputs.inputnode.library_images = [str(i.image) for i in library.images]
            fusion_wf.inputs.inputnode.library_labels = [str(i.labels) for i in library.images]
            fusion_wf.inputs.inputnode.table = str(atlas_table_path(config.output_dir,
                                                                    library.label))
            ds_wf = init_labels_derivatives_wf(
                output_dir=str(config.output_dir), source_file=target.source_file,
                atlas=library.spec.name, desc=None, metadata={
                    "Sources": [target.uri], "SpatialReference": target.uri,
                    "Atlas": library.spec.name,
                    "Library": [{"Image": i.image.as_uri(), "ImageSHA256": i.image_sha256,
                                 "Labels": i.labels.as_uri(), "LabelsSHA256": i.labels_sha256}
                                for i in library.images],
                    "Description": (
                        f"multi-atlas label fusion of the {library.spec.name} library: every "
                        "library image registered to this image with uniGradICON, its labels "
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
