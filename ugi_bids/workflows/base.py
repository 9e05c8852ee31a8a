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
                use_gpu: bool = False) -> Workflow:
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
    """
    from ..utils.provenance import boilerplate_postamble, boilerplate_preamble

    workflow = Workflow(name=f"ugi_bids_{__version__.replace('.', '_')}_wf")
    workflow.base_dir = str(config.work_dir)
    workflow.__desc__ = boilerplate_preamble(__version__, _nipype_version())
    workflow.__postdesc__ = boilerplate_postamble()
    for participant, sessions in subjects.items():
        single = init_single_subject_wf(subject_id=participant, sessions=sessions,
                                        templates=templates, config=config, use_gpu=use_gpu)
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
                           config: Config, use_gpu: bool = False,
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
                workflow.connect([(reg_wf, ds_wf, [
                    ("outputnode.forward_xfm", "inputnode.forward_xfm"),
                    ("outputnode.inverse_xfm", "inputnode.inverse_xfm"),
                    ("outputnode.anat_in_template", "inputnode.anat_in_template"),
                    ("outputnode.log_jacobian", "inputnode.log_jacobian"),
                    ("outputnode.provenance", "inputnode.provenance"),
                ])])
    return workflow


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
