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
