"""Writing one registration's results into the derivatives dataset."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from ..interfaces.bids import DerivativesDataSink

#: Entities of the raw file that do not name a registration's outputs: one reference image per
#: session and suffix is registered, so outputs are named by participant and session alone.
DISMISSED_ENTITIES = ("acquisition", "reconstruction", "run", "ceagent", "part", "echo")


def init_registration_derivatives_wf(*, output_dir: str, source_file: str, suffix: str,
                                     space: str, resolution: str | None, sources: list,
                                     settings: dict, name: str = "ds_registration_wf"
                                     ) -> Workflow:
    """Sinks for one registration of an anatomical image (``suffix``) to ``space``.

    Parameters
    ----------
    output_dir : str
        The derivatives dataset root.
    source_file : str
        The raw anatomical image (names the outputs: participant, session).
    suffix : str
        ``T1w``, ``T2w``, ... (the ``from-``/``to-`` label of the subject side).
    space : str
        Space label (``MNI152NLin2009cAsym``, a custom template name, ``Name+cohort``).
    resolution : str or None
        TemplateFlow resolution index of the template image, written as ``res-``.
    sources : list of str
        BIDS URIs of the direct parents: the raw image and the template.
    settings : dict
        Run settings to record in the transform sidecars (pre-alignment mode, ...).

    Inputs
    ------
    forward_xfm, inverse_xfm, anat_in_template, log_jacobian, provenance

    Outputs
    -------
    None (files written under ``output_dir``):
    ``sub-X[_ses-Y]_from-<suffix>_to-<space>_mode-image_xfm.h5`` (resamples the subject image
    onto the template), ``..._from-<space>_to-<suffix>_mode-image_xfm.h5``,
    ``..._space-<space>[_res-R]_desc-preproc_<suffix>.nii.gz`` and
    ``..._space-<space>[_res-R]_desc-log_jacobian.nii.gz``, each with a JSON sidecar.
    """
    workflow = Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=[
        "forward_xfm", "inverse_xfm", "anat_in_template", "log_jacobian", "provenance"]),
        name="inputnode")
    xfm_meta = pe.Node(niu.Function(function=_transform_metadata, output_names=["meta"]),
                       name="xfm_meta", run_without_submitting=True)
    xfm_meta.inputs.sources = sources
    xfm_meta.inputs.settings = settings
    res = {"resolution": resolution} if resolution else {}
    common = {"base_directory": output_dir, "source_file": source_file,
              "dismiss_entities": DISMISSED_ENTITIES}
    ds_forward = pe.Node(DerivativesDataSink(
        **common, to=space, mode="image", suffix="xfm", extension=".h5", **{"from": suffix}),
        name="ds_forward_xfm", run_without_submitting=True)
    ds_inverse = pe.Node(DerivativesDataSink(
        **common, to=suffix, mode="image", suffix="xfm", extension=".h5", **{"from": space}),
        name="ds_inverse_xfm", run_without_submitting=True)
    ds_anat = pe.Node(DerivativesDataSink(
        **common, space=space, desc="preproc", suffix=suffix, compress=True,
        SkullStripped=False, Sources=sources, **res),
        name="ds_anat_in_template", run_without_submitting=True)
    ds_jacobian = pe.Node(DerivativesDataSink(
        **common, space=space, desc="log", suffix="jacobian", compress=True, Sources=sources,
        **res), name="ds_log_jacobian", run_without_submitting=True)
    workflow.connect([
        (inputnode, xfm_meta, [("provenance", "provenance")]),
        (inputnode, ds_forward, [("forward_xfm", "in_file")]),
        (inputnode, ds_inverse, [("inverse_xfm", "in_file")]),
        (xfm_meta, ds_forward, [("meta", "meta_dict")]),
        (xfm_meta, ds_inverse, [("meta", "meta_dict")]),
        (inputnode, ds_anat, [("anat_in_template", "in_file")]),
        (inputnode, ds_jacobian, [("log_jacobian", "in_file")]),
    ])
    return workflow


def _transform_metadata(provenance: dict, sources: list, settings: dict) -> dict:
    """Sidecar of a transform: its parents, and how it was computed."""
    return {"Sources": list(sources), **settings, **provenance}


def derivative_uri(**entities) -> str:
    """The BIDS URI (``bids::<path>``: this derivatives dataset) of an output named by
    ``entities`` (``subject``, ``session``, ``suffix``, ``extension``...), built with our
    path patterns, as the sinks name it."""
    from bids.layout.writing import build_path

    from ..interfaces.bids import BIDS_DERIV_PATTERNS

    entities = {key: value for key, value in entities.items() if value is not None}
    entities.setdefault("datatype", "anat")
    path = build_path(entities, list(BIDS_DERIV_PATTERNS), strict=False)
    if path is None:
        raise ValueError(f"no derivative path pattern matches {entities}")
    return f"bids::{path}"


def init_labels_derivatives_wf(*, output_dir: str, source_file: str, atlas: str,
                               desc: str | None, metadata: dict,
                               name: str = "ds_labels_wf") -> Workflow:
    """Sinks for a session's native-space labels of one atlas (propagated or fused).

    Parameters
    ----------
    output_dir : str
        The derivatives dataset root.
    source_file : str
        The raw anatomical image the labels lie on (names the outputs).
    atlas, desc : str
        The outputs' ``atlas-`` and ``desc-`` entities.
    metadata : dict
        The label map's sidecar: ``Sources``, ``SpatialReference``, how it was made.

    Inputs
    ------
    dseg, volumes, brain_volume
        From :func:`~ugi_bids.workflows.labels.init_atlas_propagation_wf` or
        :func:`~ugi_bids.workflows.labels.init_label_fusion_wf`.
    extra_metadata
        More sidecar entries known only at run time (fusion parameters, library), or {}.

    Outputs
    -------
    None (files written under ``output_dir``): ``sub-X[_ses-Y]_atlas-A[_desc-D]_dseg.nii.gz``
    (integer map on the native grid) and ``..._volumes.tsv`` (``index``, ``name``, ``voxels``,
    ``volume_mm3``), each with a JSON sidecar (the volumes' records ``BrainVolume``, mm³).
    """
    workflow = Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=[
        "dseg", "volumes", "brain_volume", "extra_metadata"]), name="inputnode")
    inputnode.inputs.extra_metadata = {}
    entities = {"atlas": atlas, **({"desc": desc} if desc else {})}
    common = {"base_directory": output_dir, "source_file": source_file,
              "dismiss_entities": DISMISSED_ENTITIES}
    dseg_meta = pe.Node(niu.Function(function=_merge_metadata, output_names=["meta"]),
                        name="dseg_meta", run_without_submitting=True)
    dseg_meta.inputs.metadata = metadata
    volumes_meta = pe.Node(niu.Function(function=_volumes_metadata, output_names=["meta"]),
                           name="volumes_meta", run_without_submitting=True)
    volumes_meta.inputs.atlas_label = f"atlas-{atlas}" + (f"_desc-{desc}" if desc else "")
    volumes_meta.inputs.sources = [metadata["SpatialReference"]]
    ds_dseg = pe.Node(DerivativesDataSink(**common, **entities, suffix="dseg", compress=True),
                      name="ds_dseg", run_without_submitting=True)
    ds_volumes = pe.Node(DerivativesDataSink(**common, **entities, suffix="volumes",
                                             extension=".tsv"),
                         name="ds_volumes", run_without_submitting=True)
    workflow.connect([
        (inputnode, dseg_meta, [("extra_metadata", "extra")]),
        (inputnode, ds_dseg, [("dseg", "in_file")]),
        (dseg_meta, ds_dseg, [("meta", "meta_dict")]),
        (inputnode, volumes_meta, [("brain_volume", "brain_volume")]),
        (ds_dseg, volumes_meta, [("out_file", "dseg_file")]),
        (inputnode, ds_volumes, [("volumes", "in_file")]),
        (volumes_meta, ds_volumes, [("meta", "meta_dict")]),
    ])
    return workflow


def _merge_metadata(metadata: dict, extra: dict) -> dict:
    return {**metadata, **(extra or {})}


def _volumes_metadata(atlas_label: str, sources: list, brain_volume, dseg_file) -> dict:
    """Sidecar of a ``volumes.tsv``: the atlas, the label map counted, the brain volume."""
    from pathlib import Path

    out = Path(dseg_file[0] if isinstance(dseg_file, list) else dseg_file)
    root = next(p for p in out.parents if p.name.startswith("sub-")).parent
    return {
        "Atlas": atlas_label,
        "Sources": [f"bids::{out.relative_to(root).as_posix()}", *sources],
        "BrainVolume": brain_volume,
        "BrainVolumeDescription": (
            "volume (mm^3) of the template's brain mask carried into this session's native "
            "space through the same transform as the labels" if brain_volume is not None
            else "unknown: the space has no brain mask"),
        "index": {"Description": "label value in the dseg map"},
        "name": {"Description": "region name, from the atlas lookup table"},
        "voxels": {"Description": "number of voxels of the region in the native dseg map"},
        "volume_mm3": {"Description": "voxels times the native voxel volume",
                       "Units": "mm^3"},
    }
