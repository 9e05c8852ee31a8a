"""Longitudinal sessions: an unbiased deformable within-subject template, and every session in it.

fMRIPrep's ``--subject-anatomical-reference unbiased`` builds a rigid ``mri_robust_template``;
here the template is deformable, built with uniGradICON (:mod:`ugi_bids.engine.template.build`).
Names follow fMRIPrep's longitudinal conventions, where ``T1w`` (the suffix) is the subject
template's space and ``orig`` a session's own image.
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from ..interfaces.bids import DerivativesDataSink
from ..interfaces.registration import ApplyTransform, LogJacobian
from ..interfaces.template import BuildTemplate
from .outputs import DISMISSED_ENTITIES, derivative_uri
from .registration import PREALIGN_TEXT, registration_mem_gb

#: Memory (GB) of a template build beyond one registration: the template, the running sums,
#: the inputs and their normalised copies (sessions at 1 mm: well under this).
TEMPLATE_MEM_GB = 2.0


def template_source_file(bids_dir, subject_id: str, suffix: str) -> str:
    """The (virtual) raw file that names a subject template's derivatives:
    ``sub-X/anat/sub-X_<suffix>.nii.gz``, no session."""
    return str(Path(bids_dir) / f"sub-{subject_id}" / "anat" / f"sub-{subject_id}_{suffix}.nii.gz")


def init_subject_template_wf(*, subject_id: str, sessions: list[str], images: list[str],
                             suffix: str, output_dir: str, sources: list[str],
                             modality: str = "mri", iterations: int = 4,
                             gradient_step: float = 0.25, average: str = "mean",
                             cache_dir: str | None = None, model: str = "unigradicon",
                             weights: str | None = None, device: str = "auto",
                             precision: str = "float32", io_checkpointing: str = "auto",
                             prealign: str = "affine", network_size: int = 175,
                             io_iterations: int = 0, io_similarity: str = "lncc",
                             omp_nthreads: int = 1, use_gpu: bool = False,
                             bids_dir: str = ".", name: str = "subject_template_wf") -> Workflow:
    """Build a subject's unbiased deformable template from its sessions and write, per session,
    both transforms, the session in the template and its log-Jacobian map.

    Parameters
    ----------
    subject_id : str
        Participant label (without ``sub-``).
    sessions, images : list of str
        Session labels and each session's raw image (same order, two or more).
    suffix : str
        The anatomical suffix (``T1w``): the template is ``sub-X_desc-preproc_<suffix>``.
    output_dir : str
        The derivatives dataset root.
    sources : list of str
        BIDS URIs of the session images (the template's ``Sources``).
    iterations, gradient_step, average
        Template-building settings (``--template-*``).
    cache_dir : str, optional
        Where finished rounds are kept (under ``-w``), so that a rerun resumes.
    model, weights, device, precision, io_checkpointing, prealign, network_size, io_iterations,
    io_similarity, omp_nthreads, use_gpu
        Registration settings, as :func:`~ugi_bids.workflows.registration.init_register_to_template_wf`.

    Inputs
    ------
    images
        The sessions' raw images (set from ``images`` when the workflow is built).

    Outputs
    -------
    template
        The subject template (normalised intensities, float32, a RAS grid covering every
        session).
    inverse_xfms
        Per session (in ``sessions`` order): ``from-<suffix>_to-orig_mode-image``, maps session
        points to template points (carries template-space data into the session).

    Files written: ``sub-X/anat/sub-X_desc-preproc_<suffix>.nii.gz`` and, per session,
    ``sub-X_ses-Y_from-orig_to-<suffix>_mode-image_xfm.h5`` (maps template points to session
    points: resamples the session onto the template), ``..._from-<suffix>_to-orig_mode-image_xfm.h5``,
    ``..._space-<suffix>_desc-preproc_<suffix>.nii.gz`` and
    ``..._space-<suffix>_desc-logjacobian_<suffix>.nii.gz`` (log of the local volume of the
    session relative to the template: > 0 where the session is larger).

    .. workflow::
        :graph2use: orig
        :simple_form: yes

        from ugi_bids.workflows.longitudinal import init_subject_template_wf
        wf = init_subject_template_wf(
            subject_id="01", sessions=["1", "2", "3"], suffix="T1w", output_dir=".",
            images=[f"sub-01_ses-{s}_T1w.nii.gz" for s in "123"],
            sources=[f"bids:raw:sub-01/ses-{s}/anat/sub-01_ses-{s}_T1w.nii.gz" for s in "123"])
    """
    if len(sessions) != len(images) or len(images) < 2:
        raise ValueError("a subject template needs two or more sessions, one image each")
    workflow = Workflow(name=name)
    workflow.__desc__ = f"""
#### Longitudinal processing
The {len(images)} sessions' {suffix} images were combined into an unbiased, *deformable*
within-subject template with uniGradICON [@unigradicon], following the template construction of
ANTs [@ants; @avants2010template] with the registration foundation model in place of SyN
(unlike the rigid template of *FreeSurfer*'s longitudinal stream or fMRIPrep's
`--subject-anatomical-reference unbiased`). {PREALIGN_TEXT[prealign]}; the images were first
averaged in the log-Euclidean mean of their affine poses, so that no session served as the
reference. Then, {iterations} times, every session was registered to the current template
(world-space pre-alignment and uniGradICON inference), the intensity-normalised sessions were resampled into it and combined
(voxel-wise {average}), and the template was moved by the inverse of the average
template-to-session displacement (gradient step {gradient_step}) and of the average affine.
Every session was finally registered to the resulting template
({f'with {io_iterations} steps of instance optimisation' if io_iterations else 'without instance optimisation'}); the transforms in both
directions, the sessions resampled into the template (a single trilinear step) and the
logarithm of the Jacobian determinant of each session's map (its local volume relative to the
template, for tensor-based morphometry) were written.
"""
    inputnode = pe.Node(niu.IdentityInterface(fields=["images"]), name="inputnode")
    inputnode.inputs.images = [str(image) for image in images]
    outputnode = pe.Node(niu.IdentityInterface(fields=["template", "inverse_xfms"]),
                         name="outputnode")
    build = pe.Node(
        BuildTemplate(modality=modality, iterations=iterations,
                      gradient_step=gradient_step, average=average, model=model,
                      device=device, precision=precision, io_checkpointing=io_checkpointing,
                      use_gpu=use_gpu, network_size=network_size, prealign=prealign,
                      io_iterations=0, final_io_iterations=io_iterations,
                      io_similarity=io_similarity,
                      num_threads=omp_nthreads,
                      **({"weights": str(weights)} if weights else {}),
                      **({"cache_dir": str(cache_dir)} if cache_dir else {})),
        name="build_template", n_procs=omp_nthreads,
        mem_gb=registration_mem_gb(network_size, io_iterations, io_checkpointing)
        + TEMPLATE_MEM_GB)
    common = {"base_directory": output_dir, "dismiss_entities": DISMISSED_ENTITIES}
    template_meta = pe.Node(niu.Function(function=_template_metadata, output_names=["meta"]),
                            name="template_meta", run_without_submitting=True)
    template_meta.inputs.sources = list(sources)
    ds_template = pe.Node(DerivativesDataSink(
        **common, source_file=template_source_file(bids_dir, subject_id, suffix),
        desc="preproc", suffix=suffix, compress=True, SkullStripped=False),
        name="ds_template", run_without_submitting=True)
    workflow.connect([
        (inputnode, build, [("images", "in_files")]),
        (build, template_meta, [("provenance", "provenance")]),
        (build, ds_template, [("template", "in_file")]),
        (template_meta, ds_template, [("meta", "meta_dict")]),
        (build, outputnode, [("template", "template"), ("inverse_xfms", "inverse_xfms")]),
    ])
    template_uri = derivative_uri(subject=subject_id, desc="preproc", suffix=suffix,
                                  extension=".nii.gz")
    for index, (session, image) in enumerate(zip(sessions, images)):
        tag = f"ses{''.join(c for c in session if c.isalnum())}"
        session_sources = [sources[index], template_uri]
        pick_forward = pe.Node(niu.Select(index=index), name=f"forward_{tag}",
                               run_without_submitting=True)
        pick_inverse = pe.Node(niu.Select(index=index), name=f"inverse_{tag}",
                               run_without_submitting=True)
        pick_image = pe.Node(niu.Select(index=index), name=f"image_{tag}",
                             run_without_submitting=True)
        resample = pe.Node(ApplyTransform(interpolation="linear"), name=f"resample_{tag}",
                           mem_gb=1.0)
        jacobian = pe.Node(LogJacobian(), name=f"log_jacobian_{tag}", mem_gb=1.0)
        xfm_meta = pe.Node(niu.Function(function=_session_xfm_metadata, output_names=["meta"]),
                           name=f"xfm_meta_{tag}", run_without_submitting=True)
        xfm_meta.inputs.sources = session_sources
        session_common = {**common, "source_file": image}
        ds_forward = pe.Node(DerivativesDataSink(
            **session_common, to=suffix, mode="image", suffix="xfm", extension=".h5",
            **{"from": "orig"}), name=f"ds_forward_{tag}", run_without_submitting=True)
        ds_inverse = pe.Node(DerivativesDataSink(
            **session_common, to="orig", mode="image", suffix="xfm", extension=".h5",
            **{"from": suffix}), name=f"ds_inverse_{tag}", run_without_submitting=True)
        ds_resampled = pe.Node(DerivativesDataSink(
            **session_common, space=suffix, desc="preproc", suffix=suffix, compress=True,
            SkullStripped=False, Sources=session_sources),
            name=f"ds_resampled_{tag}", run_without_submitting=True)
        ds_jacobian = pe.Node(DerivativesDataSink(
            **session_common, space=suffix, desc="logjacobian", suffix=suffix, compress=True,
            Sources=session_sources, Description=(
                "natural log of the Jacobian determinant of the map from the subject template "
                "to this session (from-orig_to-template), on the template grid: > 0 where the "
                "session's tissue occupies more volume than the template's")),
            name=f"ds_logjacobian_{tag}", run_without_submitting=True)
        workflow.connect([
            (inputnode, pick_image, [("images", "inlist")]),
            (pick_image, resample, [("out", "in_file")]),
            (build, pick_forward, [("forward_xfms", "inlist")]),
            (build, pick_inverse, [("inverse_xfms", "inlist")]),
            (build, resample, [("template", "reference")]),
            (pick_forward, resample, [("out", "transform")]),
            (build, jacobian, [("template", "reference")]),
            (pick_forward, jacobian, [("out", "transform")]),
            (build, xfm_meta, [("provenance", "provenance")]),
            (jacobian, xfm_meta, [("folded_fraction", "folded_fraction")]),
            (pick_forward, ds_forward, [("out", "in_file")]),
            (pick_inverse, ds_inverse, [("out", "in_file")]),
            (xfm_meta, ds_forward, [("meta", "meta_dict")]),
            (xfm_meta, ds_inverse, [("meta", "meta_dict")]),
            (resample, ds_resampled, [("out_file", "in_file")]),
            (jacobian, ds_jacobian, [("out_file", "in_file")]),
        ])
    return workflow


def _template_metadata(provenance: dict, sources: list) -> dict:
    """Sidecar of a subject or study template: its inputs and how it was built."""
    return {"Sources": list(sources), "Description": (
        "unbiased deformable template built with uniGradICON (ugi-bids): normalised "
        "intensities (about 0 to 1), the voxel-wise average of the inputs resampled into it"),
        **provenance}


def _session_xfm_metadata(provenance: dict, sources: list, folded_fraction: float) -> dict:
    """Sidecar of a session's transforms to and from the subject template."""
    keep = {key: value for key, value in provenance.items() if key != "Convergence"}
    return {"Sources": list(sources), **keep, "FoldedVoxelFraction": float(folded_fraction)}
