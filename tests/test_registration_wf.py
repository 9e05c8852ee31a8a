"""``init_register_to_template_wf`` hands the engine settings to its registration node and
says in its boilerplate what it did (no registration runs here)."""

from __future__ import annotations

import pytest

from ugi_bids.interfaces import registration as interfaces
from ugi_bids.workflows.registration import init_register_to_template_wf


@pytest.mark.parametrize("precision, mentions_tf32", [("float32", False), ("tf32", True)])
def test_precision_reaches_the_node_and_the_boilerplate(precision, mentions_tf32):
    wf = init_register_to_template_wf(template_label="MNI152NLin2009cAsym", device="cuda",
                                      precision=precision, io_iterations=0)
    node = wf.get_node("unigradicon")
    assert node.inputs.precision == precision and node.inputs.device == "cuda"
    assert ("TF32" in wf.__desc__) == mentions_tf32


def test_interface_passes_precision_to_the_engine(monkeypatch, tmp_path):
    seen = {}

    def register_images(*args, forward_file, inverse_file, **kwargs):
        seen.update(kwargs)
        for path in (forward_file, inverse_file):
            open(path, "wb").close()
        return {}

    monkeypatch.setattr(interfaces.files, "register_images", register_images)
    for name in ("fixed.nii.gz", "moving.nii.gz", "prealign.h5"):
        (tmp_path / name).write_bytes(b"x")
    node = interfaces.UniGradICON(fixed_image=str(tmp_path / "fixed.nii.gz"),
                                  moving_image=str(tmp_path / "moving.nii.gz"),
                                  prealign_xfm=str(tmp_path / "prealign.h5"), precision="tf32",
                                  io_checkpointing="off")
    node.run(cwd=str(tmp_path))
    assert seen["precision"] == "tf32"
    assert seen["io_checkpointing"] == "off"
    assert interfaces.UniGradICON().inputs.precision == "float32"
    assert interfaces.UniGradICON().inputs.io_checkpointing == "auto"


@pytest.mark.parametrize("setting, io_iterations, mem_gb", [
    ("auto", 50, 7.0), ("on", 50, 7.0), ("off", 50, 10.5), ("off", 0, 3.0)])
def test_io_checkpointing_reaches_the_node_and_its_memory(setting, io_iterations, mem_gb):
    """Keeping the activations costs host memory on the CPU: the scheduler reserves it."""
    wf = init_register_to_template_wf(template_label="MNI152NLin2009cAsym",
                                      io_checkpointing=setting, io_iterations=io_iterations)
    node = wf.get_node("unigradicon")
    assert node.inputs.io_checkpointing == setting
    assert node.mem_gb == mem_gb


# --------------------------------------------------------------------------------------------
# --prealign-dof: the node, the modalities, the report in the sidecars, the boilerplate.


@pytest.mark.parametrize("dof, fit", [(6, "rigid (6 degrees of freedom)"),
                                      (7, "similarity (7 degrees of freedom)"),
                                      (9, "per-axis scaling (9 degrees of freedom)"),
                                      (12, "affine (12 degrees of freedom)")])
def test_prealign_dof_reaches_the_node_and_the_boilerplate(dof, fit):
    wf = init_register_to_template_wf(template_label="MNI152NLin2009cAsym", modality="ct",
                                      prealign_dof=dof, io_iterations=0)
    node = wf.get_node("prealign")
    assert (node.inputs.mode, node.inputs.dof) == ("affine", dof)
    # the template is normalised as MRI; a CT's body restricts the fit on the moving side
    assert (node.inputs.fixed_modality, node.inputs.moving_modality) == ("mri", "ct")
    assert fit in wf.__desc__
    assert "24 axis-aligned orientations" in wf.__desc__ and "60 degrees" in wf.__desc__
    assert ("would have been replaced" in wf.__desc__) == (dof != 6)
    header = init_register_to_template_wf(template_label="MNI152NLin2009cAsym",
                                          prealign="header", prealign_dof=dof)
    assert "degrees of freedom" not in header.__desc__


def test_prealign_interface_passes_dof_and_modalities(monkeypatch, tmp_path):
    seen = {}

    def prealign_images(fixed, moving, mode, out_file, **kwargs):
        seen.update(kwargs, mode=mode)
        open(out_file, "wb").close()
        with open(kwargs["report_file"], "w") as handle:
            handle.write("{}")
        return out_file, {"metric": "mi", "dof": kwargs["dof"]}

    monkeypatch.setattr(interfaces.files, "prealign_images", prealign_images)
    for name in ("fixed.nii.gz", "moving.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    node = interfaces.Prealign(fixed_image=str(tmp_path / "fixed.nii.gz"),
                               moving_image=str(tmp_path / "moving.nii.gz"), dof=9,
                               moving_modality="ct")
    outputs = node.run(cwd=str(tmp_path)).outputs
    assert (seen["dof"], seen["fixed_modality"], seen["moving_modality"]) == (9, "mri", "ct")
    assert outputs.report == {"metric": "mi", "dof": 9}
    assert outputs.report_file == str(tmp_path / "prealign_report.json")
    assert interfaces.Prealign().inputs.dof == 12
    with pytest.raises(Exception):
        interfaces.Prealign(dof=5)


def test_prealign_images_writes_the_report_beside_the_affine(tmp_path):
    """The file-level step on real brains (4 mm): .h5 and JSON report, all or nothing."""
    import json

    import nibabel as nib
    import numpy as np

    from tests import realdata
    from ugi_bids.engine.formats.itk import read_composite_h5
    from ugi_bids.engine.spatial.volume import load_volume
    from ugi_bids.interfaces.files import normalise_image, prealign_images

    fixed = realdata.downsampled(load_volume(realdata.mni2009c_brain_path()), 4.0)
    moving = realdata.downsampled(load_volume(realdata.fsl_mni_brain_path()), 4.0)
    change = np.eye(4)
    change[:3, :3] = 1.1 * realdata.rotation_matrix((0.0, 8.0, 0.0))
    for name, volume in (("fixed", fixed), ("moving", realdata.reheader(moving, change))):
        nib.save(volume.to_nifti(), tmp_path / f"{name}_raw.nii.gz")
        _, warnings = normalise_image(str(tmp_path / f"{name}_raw.nii.gz"), "mri",
                                      str(tmp_path / f"{name}.nii.gz"))
        assert warnings == []
    out_file, report = prealign_images(
        str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "affine",
        str(tmp_path / "prealign_xfm.h5"), network_size=65, dof=7,
        report_file=str(tmp_path / "prealign_report.json"))
    assert json.loads((tmp_path / "prealign_report.json").read_text()) == report
    assert report["dof"] == 7 and report["metric"] == "mi"
    matrix = read_composite_h5(out_file).affine[:3, :3]
    singular = np.linalg.svd(matrix, compute_uv=False)
    assert singular.max() - singular.min() < 1e-3  # a similarity: one scale
    assert abs(singular.mean() - 1.0) > 0.02  # the other brain is larger: not rigid
    header = prealign_images(
        str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "header",
        str(tmp_path / "header_xfm.h5"), network_size=65,
        report_file=str(tmp_path / "header_report.json"))[1]
    assert header is None and (tmp_path / "header_report.json").read_text() == "null"


def test_sidecar_provenance_gets_the_report_with_bids_keys():
    from ugi_bids.workflows.registration import _add_folding

    report = {"metric": "mi", "final_cost": -0.5, "dof": 12, "start": "com",
              "fallback": None, "scales": [1.0, 1.1, 0.9], "max_shear": 0.01}
    meta = _add_folding({"Model": "unigradicon"}, 0.0, 0.8, report)
    assert meta["Prealignment"] == {"Metric": "mi", "FinalCost": -0.5, "DOF": 12,
                                    "Start": "com", "Fallback": None,
                                    "Scales": [1.0, 1.1, 0.9], "MaxShear": 0.01}
    assert "Prealignment" not in _add_folding({}, 0.0, 0.8, {})  # header, none
    assert "Prealignment" not in _add_folding({}, 0.0, 0.8)


def test_run_settings_reach_the_prealign_node_and_the_sidecar_settings():
    """ugi-bids' --prealign-dof: the participant workflow's registration node and the settings
    recorded in the transform sidecars (PrealignDOF; null unless the mode is affine)."""
    from pathlib import Path
    from types import SimpleNamespace

    from niworkflows.engine.workflows import LiterateWorkflow as Workflow

    from ugi_bids.config import Config, SpaceSpec
    from ugi_bids.workflows.base import _register_to_space

    template = SimpleNamespace(spec=SpaceSpec("MNI152NLin2009cAsym"), image=Path("/tpl.nii.gz"),
                               mask=None, uri="bids:templateflow:tpl.nii.gz")
    for prealign, dof, recorded in (("affine", 6, 6), ("header", 9, None)):
        config = Config(bids_dir=Path("/data"), output_dir=Path("/out"), prealign=prealign,
                        prealign_dof=dof)
        workflow = Workflow(name="sub_01_wf")
        reg_wf = _register_to_space(
            workflow, config, template, tag="CT", modality="ct", suffix="CT",
            moving="/data/sub-01/anat/sub-01_CT.nii.gz",
            source_file="/data/sub-01/anat/sub-01_CT.nii.gz",
            source_uri="bids:raw:sub-01/anat/sub-01_CT.nii.gz", use_gpu=False)
        node = reg_wf.get_node("prealign")
        assert (node.inputs.mode, node.inputs.dof, node.inputs.moving_modality) == (
            prealign, dof, "ct")
        settings = workflow.get_node("ds_CT_wf").get_node("xfm_meta").inputs.settings
        assert settings["PrealignMode"] == prealign and settings["PrealignDOF"] == recorded


def test_prealign_dof_reaches_the_library_registrations():
    from ugi_bids.workflows.labels import init_label_fusion_wf

    wf = init_label_fusion_wf(library_name="lib", library_size=2, prealign_dof=7)
    assert wf.get_node("warp_library").inputs.prealign_dof == 7
