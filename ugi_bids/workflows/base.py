"""Top-level workflows: the whole run, and one participant."""

from __future__ import annotations

import re
from copy import deepcopy
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from .. import __version__
from ..cli.config import SUFFIX_MODALITY, Config
from .outputs import init_registration_derivatives_wf
from .registration import init_register_to_template_wf


def init_ugi_wf(config: Config, subjects: dict, templates: list) -> Workflow:
    """The whole run: one :func:`init_single_subject_wf` per participant.

    Parameters
    ----------
    config : Config
        Run settings.
    subjects : dict
        ``{participant: {session or None: {suffix: reference image path}}}``.
    templates : list of ResolvedTemplate
        Output spaces, resolved to files.
    """
    workflow = Workflow(name=f"ugi_bids_{__version__.replace('.', '_')}_wf")
    workflow.base_dir = str(config.work_dir)
    for participant, sessions in subjects.items():
        single = init_single_subject_wf(subject_id=participant, sessions=sessions,
                                        templates=templates, config=config)
        # crash files go to sub-X/log/<run_uuid>/, as in fMRIPrep
        single.config["execution"]["crashdump_dir"] = str(
            config.output_dir / f"sub-{participant}" / "log" / config.run_uuid)
        for node in single._get_all_nodes():
            node.config = deepcopy(single.config)
        workflow.add_nodes([single])
    return workflow


def _safe(label: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]", "", label)


def init_single_subject_wf(*, subject_id: str, sessions: dict, templates: list,
                           config: Config, name: str | None = None) -> Workflow:
    """Register every session's anatomical references of one participant to every space.

    Parameters
    ----------
    subject_id : str
        Participant label (without ``sub-``).
    sessions : dict
        ``{session label or None: {suffix: reference image path}}``; one reference image per
        session and suffix (the choice is made by :func:`ugi_bids.utils.bids.select_reference`).
    templates : list of ResolvedTemplate
        Output spaces.
    config : Config

    Inputs
    ------
    None: every input is a file known when the workflow is built.

    Outputs
    -------
    None: every result is written by the derivatives sinks into ``config.output_dir``.
    """
    from ..utils.bids import REFERENCE_RULE, bids_uri

    workflow = Workflow(name=name or f"sub_{subject_id}_wf")
    n_images = sum(len(suffixes) for suffixes in sessions.values())
    session_text = (f"{len(sessions)} session(s)" if any(s is not None for s in sessions)
                    else "a single session")
    workflow.__desc__ = f"""
Results included in this manuscript come from registrations performed using *ugi-bids*
{__version__}, which is based on *Nipype* {_nipype_version()} [@nipype1] and *NiWorkflows*
[@niworkflows]; templates were obtained from TemplateFlow [@templateflow].

#### Anatomical registration
For participant {subject_id}, {n_images} anatomical image(s) from {session_text} were
registered. {REFERENCE_RULE}
"""
    for session, suffixes in sessions.items():
        for suffix, image in suffixes.items():
            for template in templates:
                tag = "_".join(t for t in (f"ses{_safe(session)}" if session else "", suffix,
                                           _safe(template.spec.label)) if t)
                reg_wf = init_register_to_template_wf(
                    template_label=template.spec.label, modality=SUFFIX_MODALITY[suffix],
                    model=config.model, weights=config.weights, device=config.device,
                    prealign=config.prealign, network_size=config.network_size,
                    io_iterations=config.io_iterations, io_similarity=config.io_similarity,
                    omp_nthreads=config.omp_nthreads or 1,
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


def _nipype_version() -> str:
    from nipype import __version__ as version
    return version
