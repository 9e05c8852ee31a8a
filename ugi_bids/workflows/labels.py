"""Atlas labels in a session's native space: propagation of one atlas, and multi-atlas label
fusion of a library."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from ..engine.options import DEFAULT_FUSION
from ..interfaces.labels import FuseLabels, PropagateLabels, RegionVolumes, WarpLibrary
from .registration import registration_mem_gb

#: Bibliography keys of atlases known by name (``boilerplate.bib``).
ATLAS_CITATIONS = {"Schaefer2018": "schaefer2018", "HOSPA": "harvardoxford",
                   "HOCPA": "harvardoxford", "HOCPAL": "harvardoxford"}

GENERIC_LABEL_TEXT = (
    "with label-aware interpolation (the semantics of ANTs' *GenericLabel* [@ants]: each label's "
    "indicator is interpolated linearly and the largest wins, so that no new label values and no "
    "holes appear at label borders)")


def atlas_reference(name: str, text: str, templateflow: bool) -> str:
    """How the boilerplate names an atlas: its spec, a citation where we know one, and
    TemplateFlow's when it came from there."""
    cites = [key for key in (ATLAS_CITATIONS.get(name),
                             "templateflow" if templateflow else None) if key]
    return f"*{text}*" + (f" [{'; '.join('@' + key for key in cites)}]" if cites else "")


def init_atlas_propagation_wf(*, atlas_text: str, space: str, suffix: str,
                              has_brain_mask: bool, citation: str | None = None,
                              name: str = "atlas_propagation_wf") -> Workflow:
    """Carry an atlas (and the template's brain mask) from a template space into a session's
    native space, and measure its regions.

    Parameters
    ----------
    atlas_text : str
        How the atlas is named in the boilerplate (e.g. ``Schaefer2018:desc-400Parcels7Networks``).
    space : str
        The output space the atlas lives in (the registration whose inverse is used).
    suffix : str
        The anatomical image the labels land on (the first ``--anat-suffixes`` entry).
    has_brain_mask : bool
        Whether ``brain_mask`` will be given (the space's template brain mask, already carried
        into the session: one per session and space, shared by that space's atlases).
    citation : str, optional
        Markdown naming the atlas with its citation (:func:`atlas_reference`).

    Inputs
    ------
    atlas
        The atlas label map in ``space``.
    table
        Its lookup table (BIDS ``dseg.tsv``, every label named).
    inverse_xfm
        ``from-<space>_to-<suffix>_mode-image``: maps native points to ``space`` points.
    reference
        The session's anatomical image (the output grid).
    brain_mask
        The template's brain mask carried into the session's native space (optional).

    Outputs
    -------
    dseg
        Integer label map on the reference grid.
    volumes
        ``volumes.tsv``: index, name, voxels, volume_mm3.
    brain_volume
        The brain mask's volume in native space (mm³), or None.

    .. workflow::
        :graph2use: orig
        :simple_form: yes

        from ugi_bids.workflows.labels import init_atlas_propagation_wf
        wf = init_atlas_propagation_wf(atlas_text="Schaefer2018:desc-400Parcels7Networks",
                                       space="MNI152NLin2009cAsym", suffix="T1w",
                                       has_brain_mask=True)
    """
    workflow = Workflow(name=name)
    workflow.__desc__ = f"""
The atlas {citation or f'*{atlas_text}*'} was carried from *{space}* into each session's
native {suffix} space through the inverse transform of that registration, in a single
resampling step {GENERIC_LABEL_TEXT}; region volumes were counted in native millimetres
(voxels times the native voxel volume){', and the template brain mask, carried the same way, gave the brain volume' if has_brain_mask else ''}.
"""
    inputnode = pe.Node(niu.IdentityInterface(fields=[
        "atlas", "table", "inverse_xfm", "reference", "brain_mask"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["dseg", "volumes", "brain_volume"]),
                         name="outputnode")
    propagate = pe.Node(PropagateLabels(), name="propagate_atlas", mem_gb=1.0)
    volumes = pe.Node(RegionVolumes(), name="region_volumes", mem_gb=0.5)
    workflow.connect([
        (inputnode, propagate, [("atlas", "in_file"), ("inverse_xfm", "transform"),
                                ("reference", "reference")]),
        (propagate, volumes, [("out_file", "in_file")]),
        (inputnode, volumes, [("table", "table")]),
        (propagate, outputnode, [("out_file", "dseg")]),
        (volumes, outputnode, [("out_file", "volumes"), ("brain_volume", "brain_volume")]),
    ])
    if has_brain_mask:
        workflow.connect(inputnode, "brain_mask", volumes, "brain_mask")
    return workflow


def init_label_fusion_wf(*, library_name: str, library_size: int, method: str = DEFAULT_FUSION,
                         modality: str = "mri", library_modalities: list[str] | None = None,
                         model: str = "unigradicon", weights: str | None = None,
                         device: str = "auto", precision: str = "float32",
                         io_checkpointing: str = "auto", prealign: str = "affine",
                         prealign_dof: int = 12,
                         network_size: int = 175, io_iterations: int = 50,
                         io_similarity: str = "lncc", omp_nthreads: int = 1,
                         use_gpu: bool = False, has_brain_mask: bool = False,
                         name: str = "label_fusion_wf") -> Workflow:
    """Segment a session by multi-atlas label fusion: register every library image to it with
    uniGradICON (world-space pre-alignment, the model loaded once for the whole library),
    resample each library label map onto the session's grid, fuse them.

    Parameters
    ----------
    library_name : str
        ``--atlas-library`` NAME (the outputs' ``atlas-`` entity).
    library_size : int
        Number of labelled library images (boilerplate).
    method : {"jlf", "majority"}
        Joint label fusion (Wang & Yushkevich 2013, antsJointFusion's defaults) or a vote.
    modality, library_modalities
        Intensity model of the session image and of each library image.
    model, weights, device, precision, io_checkpointing, prealign, prealign_dof, network_size,
    io_iterations, io_similarity, omp_nthreads, use_gpu
        Registration settings, as in :func:`~ugi_bids.workflows.registration.init_register_to_template_wf`.
    has_brain_mask : bool
        Whether ``brain_mask`` (already in native space) will be given, for the brain volume.

    Inputs
    ------
    reference
        The session's anatomical image.
    library_images, library_labels
        The library's intensity images and label maps (same order).
    table
        The library's lookup table (BIDS ``dseg.tsv``).
    brain_mask
        A native-space brain mask (optional).

    Outputs
    -------
    dseg, volumes, brain_volume
        As :func:`init_atlas_propagation_wf`.
    parameters
        The fusion method and its parameters.
    library_provenance
        Per library image: files, seconds, device.

    .. workflow::
        :graph2use: orig
        :simple_form: yes

        from ugi_bids.workflows.labels import init_label_fusion_wf
        wf = init_label_fusion_wf(library_name="mindboggle", library_size=10)
    """
    from ..engine.labels.fusion import JLF_DEFAULTS

    workflow = Workflow(name=name)
    params = JLF_DEFAULTS
    fusion_text = (
        f"joint label fusion [@jlf] (as antsJointFusion computes it: alpha {params['alpha']}, "
        f"beta {params['beta']}, patch radius {params['patch_radius']}, search radius "
        f"{params['search_radius']} voxels, on intensities normalised per image)"
        if method == "jlf" else
        "a per-voxel majority vote (ties broken by the summed local patch similarity)")
    workflow.__desc__ = f"""
The session was also segmented by multi-atlas label fusion with the *{library_name}* library
({library_size} labelled images): every library image was registered to the session's image
with the same registration (world-space pre-alignment, then uniGradICON{
f', {io_iterations} steps of instance optimisation' if io_iterations else ''}), its labels were
carried onto the session's grid {GENERIC_LABEL_TEXT}, and the warped labels were fused by
{fusion_text}, implemented in PyTorch [@pytorch].
"""
    inputnode = pe.Node(niu.IdentityInterface(fields=[
        "reference", "library_images", "library_labels", "table", "brain_mask"]),
        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=[
        "dseg", "volumes", "brain_volume", "parameters", "library_provenance"]),
        name="outputnode")
    warp = pe.Node(WarpLibrary(
        target_modality=modality, prealign=prealign, prealign_dof=prealign_dof, model=model,
        device=device,
        precision=precision, io_checkpointing=io_checkpointing, network_size=network_size,
        io_iterations=io_iterations, io_similarity=io_similarity, use_gpu=use_gpu,
        num_threads=omp_nthreads, **({"weights": str(weights)} if weights else {}),
        **({"modalities": list(library_modalities)} if library_modalities else {})),
        name="warp_library", n_procs=omp_nthreads,
        mem_gb=registration_mem_gb(network_size, io_iterations, io_checkpointing) + 1.0)
    fuse = pe.Node(FuseLabels(method=method, device=device, use_gpu=use_gpu,
                              num_threads=omp_nthreads),
                   name="fuse_labels", n_procs=omp_nthreads, mem_gb=4.0)
    volumes = pe.Node(RegionVolumes(), name="region_volumes", mem_gb=0.5)
    workflow.connect([
        (inputnode, warp, [("reference", "target"), ("library_images", "images"),
                           ("library_labels", "labels")]),
        (inputnode, fuse, [("reference", "target")]),
        (warp, fuse, [("warped_images", "images"), ("warped_labels", "labels")]),
        (fuse, volumes, [("out_file", "in_file")]),
        (inputnode, volumes, [("table", "table")]),
        (fuse, outputnode, [("out_file", "dseg"), ("parameters", "parameters")]),
        (warp, outputnode, [("provenance", "library_provenance")]),
        (volumes, outputnode, [("out_file", "volumes"), ("brain_volume", "brain_volume")]),
    ])
    if has_brain_mask:
        workflow.connect(inputnode, "brain_mask", volumes, "brain_mask")
    return workflow
