"""Registration of one anatomical image to one template (or any fixed image)."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from ..interfaces.registration import (
    ApplyTransform,
    LogJacobian,
    NormaliseIntensities,
    Prealign,
    Similarity,
    UniGradICON,
)

#: Peak memory (GB) of one registration, measured on CPU as the peak RSS of a whole process,
#: rounded up: inference of both directions (175^3: 2.3 GB in benchmarks/bench_engine.py; sloppy
#: 65^3: 0.96 GB with ``ugi-register``) and with instance optimisation (175^3, one IO step with
#: activation checkpointing: 6.1 GB in the benchmark; sloppy: 2.3 GB before checkpointing).
MEM_GB_INFERENCE = {175: 3.0, "sloppy": 1.0}
MEM_GB_IO = {175: 7.0, "sloppy": 2.5}
#: IO with the U-Nets' activations kept (``io_checkpointing="off"``): 9.5 GB at 175^3.
MEM_GB_IO_KEPT = {175: 10.5, "sloppy": 3.0}

#: Boilerplate sentence for the opt-in TF32 mode (the default, float32, needs none).
TF32_TEXT = (" The network ran with TF32 tensor-core arithmetic for its convolutions (an opt-in "
             "mode; the maps differ from full float32 by up to a few hundredths of a voxel "
             "without instance optimisation).")
#: The fit of each ``--prealign-dof``, for the boilerplate.
PREALIGN_DOF_TEXT = {6: "rigid (6 degrees of freedom)",
                     7: "rigid, then similarity (7 degrees of freedom)",
                     9: "rigid, then rigid plus per-axis scaling (9 degrees of freedom)",
                     12: "rigid, then affine (12 degrees of freedom)"}


def prealign_text(mode: str, dof: int = 12) -> str:
    """Boilerplate sentence (no final full stop) for a pre-alignment ``mode`` and, for
    ``affine``, the degrees of freedom ``dof`` of its fit."""
    if mode == "header":
        return "The images were related through the coordinates in their headers"
    if mode == "none":
        return ("The images were related voxel grid to voxel grid, as in the published "
                "uniGradICON tool (no world-space alignment)")
    fallback = {6: "", 7: "; a fit with implausible scales would have been replaced by the "
                          "rigid one"}.get(dof, "; a fit with implausible scales or shears "
                                                "would have been replaced by the similarity "
                                                "fit, or else the rigid one")
    return ("The images were first aligned in world (scanner) coordinates: from their "
            "intensity centres of mass, a multi-start search (the 24 axis-aligned orientations "
            "and a grid of rotations of up to +-60 degrees about each axis, as in FSL FLIRT and "
            "ANTs antsAI) chose the starting pose, then a multi-resolution fit (8, 4 and 2 mm; "
            f"{PREALIGN_DOF_TEXT[dof]}) maximised Mattes mutual information{fallback}")


#: The sentence of each mode with the default degrees of freedom.
PREALIGN_TEXT = {mode: prealign_text(mode) for mode in ("affine", "header", "none")}


def registration_mem_gb(network_size: int, io_iterations: int,
                        io_checkpointing: str = "auto") -> float:
    """Memory to reserve for one registration node (GB); "auto" recomputes the activations
    on the CPU, where this memory is spent."""
    key = 175 if network_size >= 175 else "sloppy"
    if io_iterations <= 0:
        return MEM_GB_INFERENCE[key]
    return (MEM_GB_IO_KEPT if io_checkpointing == "off" else MEM_GB_IO)[key]


def init_register_to_template_wf(*, template_label: str, modality: str = "mri",
                                 model: str = "unigradicon", weights: str | None = None,
                                 device: str = "auto", precision: str = "float32",
                                 io_checkpointing: str = "auto", prealign: str = "affine",
                                 prealign_dof: int = 12, network_size: int = 175, io_iterations: int = 50,
                                 io_similarity: str = "lncc", omp_nthreads: int = 1,
                                 use_gpu: bool = False, template_has_mask: bool = False,
                                 name: str = "register_template_wf") -> Workflow:
    """Register an anatomical image to a template with uniGradICON, both directions.

    Workflow graph: normalise both images -> pre-align (world space) -> uniGradICON (+ instance
    optimisation) -> resample the anatomical image into the template, log-Jacobian map.

    Parameters
    ----------
    template_label : str
        The space label (e.g. ``MNI152NLin2009cAsym``), used in the boilerplate.
    modality : {"mri", "ct"}
        Intensity model of the anatomical image.
    model, weights, device, precision, io_checkpointing, prealign, prealign_dof, network_size,
    io_iterations, io_similarity
        Engine settings (see ``ugi-register --help``).
    omp_nthreads : int
        Threads the registration node may use (``n_procs`` for the scheduler).
    use_gpu : bool
        Whether the registration will run on a GPU of the machine that schedules it: it then
        takes one of MultiProc's GPU slots. ``device="auto"`` on a machine without a GPU runs
        on the CPU and must not: the GPU slots would serialise the registrations there.
    template_has_mask : bool
        Whether ``template_mask`` will be given (it then restricts the affine fit).

    Inputs
    ------
    moving_image
        The subject's anatomical image (raw, any orientation).
    template_image
        The template image (fixed).
    template_mask
        The template's brain mask (optional; restricts the affine fit).

    Outputs
    -------
    forward_xfm
        ``from-<anat>_to-<template>_mode-image``: maps template points to subject points,
        resamples the subject image onto the template grid.
    inverse_xfm
        ``from-<template>_to-<anat>_mode-image``: the opposite direction.
    anat_in_template
        The subject image resampled onto the template grid (linear).
    log_jacobian
        Log Jacobian determinant of the forward map on the template grid.
    provenance
        Model, weights SHA-256 and URL, settings, timings and folded-voxel fraction.
    """
    workflow = Workflow(name=name)
    io_text = (f"followed by {io_iterations} steps of instance optimisation (Adam, learning rate "
               f"2e-5; loss: {io_similarity.upper()} similarity in both directions plus 1.5 x "
               "GradICON)" if io_iterations else "without instance optimisation")
    workflow.__desc__ = f"""
The anatomical image was registered to the *{template_label}* template with
{'multiGradICON [@multigradicon]' if model == 'multigradicon' else 'uniGradICON [@unigradicon]'},
a registration foundation model built on GradICON [@gradicon], as implemented in *ugi-bids*
(with PyTorch [@pytorch] and ITK [@itk]). {prealign_text(prealign, prealign_dof)}.
Both images were rescaled to [0, 1] ({'CT: -1000 to 1000 HU' if modality == 'ct' else
'MRI: from the minimum to the 99th percentile'}) and resampled to a {network_size}^3 network
grid; the network produced both the forward map and its inverse-consistent partner,
{io_text}.{TF32_TEXT if precision == 'tf32' else ''} Transforms were written as ITK composite
files (an affine and a displacement field in world coordinates), and the anatomical image was
resampled into the template space with trilinear interpolation in a single step.
"""
    inputnode = pe.Node(niu.IdentityInterface(fields=["moving_image", "template_image",
                                                      "template_mask"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=[
        "forward_xfm", "inverse_xfm", "anat_in_template", "log_jacobian", "provenance"]),
        name="outputnode")

    normalise_moving = pe.Node(NormaliseIntensities(modality=modality), name="normalise_moving")
    normalise_template = pe.Node(NormaliseIntensities(modality="mri"), name="normalise_template")
    prealign_node = pe.Node(Prealign(mode=prealign, network_size=network_size, dof=prealign_dof,
                                     fixed_modality="mri", moving_modality=modality),
                            name="prealign", n_procs=1, mem_gb=1.0)
    register = pe.Node(
        UniGradICON(model=model, device=device, precision=precision,
                    io_checkpointing=io_checkpointing,
                    use_gpu=use_gpu,
                    network_size=network_size, io_iterations=io_iterations,
                    io_similarity=io_similarity, keep_storage=prealign == "none",
                    num_threads=omp_nthreads,
                    **({"weights": str(weights)} if weights else {})),
        name="unigradicon", n_procs=omp_nthreads,
        mem_gb=registration_mem_gb(network_size, io_iterations, io_checkpointing))
    resample = pe.Node(ApplyTransform(interpolation="linear"), name="resample_anat", mem_gb=1.0)
    jacobian = pe.Node(LogJacobian(), name="log_jacobian", mem_gb=1.0)
    similarity = pe.Node(Similarity(), name="similarity", mem_gb=1.0)
    provenance = pe.Node(niu.Function(function=_add_folding, output_names=["provenance"]),
                         name="provenance", run_without_submitting=True)

    workflow.connect([
        (inputnode, normalise_moving, [("moving_image", "in_file")]),
        (inputnode, normalise_template, [("template_image", "in_file")]),
        (normalise_template, prealign_node, [("out_file", "fixed_image")]),
        (normalise_moving, prealign_node, [("out_file", "moving_image")]),
        (normalise_template, register, [("out_file", "fixed_image")]),
        (normalise_moving, register, [("out_file", "moving_image")]),
        (prealign_node, register, [("out_file", "prealign_xfm")]),
        (inputnode, resample, [("moving_image", "in_file"), ("template_image", "reference")]),
        (register, resample, [("forward_xfm", "transform")]),
        (inputnode, jacobian, [("template_image", "reference")]),
        (register, jacobian, [("forward_xfm", "transform")]),
        (register, provenance, [("provenance", "provenance")]),
        (jacobian, provenance, [("folded_fraction", "folded_fraction")]),
        (prealign_node, provenance, [("report", "prealignment")]),
        (normalise_moving, provenance, [("warnings", "input_warnings")]),
        (inputnode, similarity, [("template_image", "fixed")]),
        (resample, similarity, [("out_file", "warped")]),
        (similarity, provenance, [("similarity", "similarity")]),
        (register, outputnode, [("forward_xfm", "forward_xfm"), ("inverse_xfm", "inverse_xfm")]),
        (resample, outputnode, [("out_file", "anat_in_template")]),
        (jacobian, outputnode, [("out_file", "log_jacobian")]),
        (provenance, outputnode, [("provenance", "provenance")]),
    ])
    if template_has_mask:
        workflow.connect([(inputnode, prealign_node, [("template_mask", "fixed_mask")]),
                          (inputnode, similarity, [("template_mask", "mask")])])
    return workflow


def _add_folding(provenance: dict, folded_fraction: float, similarity: float,
                 prealignment: dict | None = None, input_warnings: list | None = None) -> dict:
    """The registration provenance plus the pre-alignment's report (``Prealignment``, BIDS-style
    keys; only for the ``affine`` mode), the folded-voxel fraction of the forward map, the
    similarity of the result (NCC of the template and the resampled image, in the template's
    brain mask) and the input image's warnings (``InputWarnings``: intensities that do not look
    like its modality), when there are any."""
    from ugi_bids.interfaces.files import prealignment_metadata

    report = prealignment_metadata(prealignment)
    return dict(provenance, **({"Prealignment": report} if report else {}),
                **({"InputWarnings": list(input_warnings)} if input_warnings else {}),
                FoldedVoxelFraction=float(folded_fraction), SimilarityMetric="NCC",
                Similarity=float(similarity))
