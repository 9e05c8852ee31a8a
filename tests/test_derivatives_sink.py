"""ugi-bids' DerivativesDataSink: names from ugi_bids/data/derivatives.json, sidecars, and
all-or-nothing writes. Runs the nipype interface directly on tiny files (fast)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from ugi_bids.interfaces.bids import (
    BIDS_DERIV_ENTITIES,
    BIDS_DERIV_PATTERNS,
    STAGING_PREFIX,
    DerivativesDataSink,
)

SPACE = "MNI152NLin2009cAsym"


def _nifti(path: Path, *, codes: int = 1, shape=(4, 5, 6), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    img = nb.Nifti1Image(rng.random(shape, dtype=np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_xyzt_units("mm")
    img.header.set_qform(img.affine, codes)
    img.header.set_sform(img.affine, codes)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.to_filename(path)
    return path


@pytest.fixture()
def raw(tmp_path) -> dict[str, Path]:
    """Raw sources: one subject without sessions, one with session, acq- and run-."""
    root = tmp_path / "raw"
    return {
        "plain": _nifti(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz"),
        "session": _nifti(root / "sub-02" / "ses-A" / "anat"
                          / "sub-02_ses-A_acq-mprage_run-1_T1w.nii.gz"),
    }


@pytest.fixture()
def out(tmp_path) -> Path:
    return tmp_path / "derivatives" / "ugi-bids"


@pytest.fixture()
def files(tmp_path) -> dict[str, Path]:
    """Inputs as a workflow would hand them over (work-directory names)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "composite.h5").write_bytes(b"\x89HDF\r\n\x1a\nnot-really-hdf5")
    (work / "affine.txt").write_text("#Insight Transform File V1.0\n")
    (work / "lut.tsv").write_text("index\tname\n1\tVisual\n2\tSomatomotor\n")
    return {
        "h5": work / "composite.h5",
        "txt": work / "affine.txt",
        "tsv": work / "lut.tsv",
        "image": _nifti(work / "warped.nii.gz", seed=1),
        "field": _nifti(work / "field.nii.gz", codes=0, shape=(4, 5, 6, 1, 3), seed=2),
    }


def _sink(out: Path, in_file, source: Path, **inputs):
    """Run the sink; returns (results, out_file paths relative to ``out``)."""
    result = DerivativesDataSink(base_directory=str(out), in_file=in_file,
                                 source_file=str(source), **inputs).run()
    produced = result.outputs.out_file
    produced = produced if isinstance(produced, list) else [produced]
    return result, [str(Path(p).relative_to(out)) for p in produced]


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) \
        if root.exists() else []


def _xfm(**extra):
    return {"suffix": "xfm", "mode": "image", **extra}


# -- transforms ----------------------------------------------------------------------------

def test_transform_keeps_desc(out, raw, files):
    _, names = _sink(out, str(files["h5"]), raw["plain"],
                     **_xfm(**{"from": "T1w"}, to=SPACE, desc="affine"))
    assert names == [f"sub-01/anat/sub-01_from-T1w_to-{SPACE}_mode-image_desc-affine_xfm.h5"]
    assert (out / names[0]).read_bytes() == files["h5"].read_bytes()


def test_transform_without_desc_and_inverse(out, raw, files):
    _, fwd = _sink(out, str(files["h5"]), raw["plain"], **_xfm(**{"from": "T1w"}, to=SPACE))
    _, inv = _sink(out, str(files["h5"]), raw["plain"], **_xfm(**{"from": SPACE}, to="T1w"))
    assert fwd == [f"sub-01/anat/sub-01_from-T1w_to-{SPACE}_mode-image_xfm.h5"]
    assert inv == [f"sub-01/anat/sub-01_from-{SPACE}_to-T1w_mode-image_xfm.h5"]


def test_transform_txt_with_session_and_dismissed_entities(out, raw, files):
    _, names = _sink(out, str(files["txt"]), raw["session"],
                     dismiss_entities=["acquisition", "run"],
                     **_xfm(**{"from": "T1w"}, to=SPACE, desc="prealign"))
    assert names == [f"sub-02/ses-A/anat/sub-02_ses-A_from-T1w_to-{SPACE}"
                     "_mode-image_desc-prealign_xfm.txt"]


def test_transform_keeps_source_entities_unless_dismissed(out, raw, files):
    _, names = _sink(out, str(files["h5"]), raw["session"], **_xfm(**{"from": "T1w"}, to=SPACE))
    assert names == [f"sub-02/ses-A/anat/sub-02_ses-A_acq-mprage_run-1_from-T1w_to-{SPACE}"
                     "_mode-image_xfm.h5"]


@pytest.mark.parametrize("label", ["MNI152NLin2009cAsym+cohort1", "MNIPediatricAsym+2",
                                   "MyStudyTemplate"])
def test_transform_labels_with_plus(out, raw, files, label):
    _, names = _sink(out, str(files["h5"]), raw["plain"], **_xfm(**{"from": "T1w"}, to=label))
    assert names == [f"sub-01/anat/sub-01_from-T1w_to-{label}_mode-image_xfm.h5"]


def test_nifti_transform_is_copied_verbatim(out, raw, files):
    """A displacement field keeps its header (no qform/sform/units "fixes") and its data."""
    _, names = _sink(out, str(files["field"]), raw["session"],
                     dismiss_entities=["acquisition", "run"],
                     **_xfm(**{"from": "T1w"}, to=SPACE, desc="field"))
    assert names == [f"sub-02/ses-A/anat/sub-02_ses-A_from-T1w_to-{SPACE}"
                     "_mode-image_desc-field_xfm.nii.gz"]
    written, original = nb.load(out / names[0]), nb.load(files["field"])
    assert written.header.binaryblock == original.header.binaryblock
    np.testing.assert_array_equal(written.get_fdata(), original.get_fdata())


# -- images, Jacobians, segmentations ------------------------------------------------------

@pytest.mark.parametrize("suffix", ["T1w", "T2w", "FLAIR", "PDw", "CT"])
def test_image_in_space(out, raw, files, suffix):
    _, names = _sink(out, str(files["image"]), raw["plain"], space=SPACE, desc="preproc",
                     suffix=suffix, compress=True)
    assert names == [f"sub-01/anat/sub-01_space-{SPACE}_desc-preproc_{suffix}.nii.gz"]


def test_image_with_session_res_and_sidecar(out, raw, files):
    sources = ["bids:raw:sub-02/ses-A/anat/sub-02_ses-A_acq-mprage_run-1_T1w.nii.gz",
               f"bids:templateflow:tpl-{SPACE}/tpl-{SPACE}_res-02_T1w.nii.gz"]
    result, names = _sink(out, str(files["image"]), raw["session"], space=SPACE,
                          resolution="2", desc="preproc", compress=True, SkullStripped=False,
                          meta_dict={"Sources": sources, "Model": "unigradicon"})
    stem = f"sub-02/ses-A/anat/sub-02_ses-A_acq-mprage_run-1_space-{SPACE}_res-2_desc-preproc_T1w"
    assert names == [stem + ".nii.gz"]
    assert result.outputs.out_meta == str(out / (stem + ".json"))
    meta = json.loads((out / (stem + ".json")).read_text())
    assert meta["SkullStripped"] is False
    assert meta["Sources"] == sources and meta["Model"] == "unigradicon"
    assert meta["Resolution"].startswith(f"Template {SPACE} (2.0x2.0x2.0 mm^3)")
    image = nb.load(out / names[0])
    assert image.shape == (4, 5, 6)
    assert int(image.header["sform_code"]) == 4  # standard space (niworkflows' convention)


def test_custom_space_keeps_callers_resolution(out, raw, files):
    _, names = _sink(out, str(files["image"]), raw["plain"], space="MyTemplate", resolution="1",
                     desc="preproc", compress=True, SkullStripped=False,
                     Resolution="Study template, 1 mm isotropic")
    meta = json.loads((out / names[0].replace(".nii.gz", ".json")).read_text())
    assert names == ["sub-01/anat/sub-01_space-MyTemplate_res-1_desc-preproc_T1w.nii.gz"]
    assert meta["Resolution"] == "Study template, 1 mm isotropic"


def test_log_jacobian(out, raw, files):
    _, names = _sink(out, str(files["image"]), raw["plain"], space=SPACE, suffix="jacobian",
                     compress=True, Sources=["bids::sub-01/anat/x_xfm.h5"])
    assert names == [f"sub-01/anat/sub-01_space-{SPACE}_desc-log_jacobian.nii.gz"]
    assert (out / f"sub-01/anat/sub-01_space-{SPACE}_desc-log_jacobian.json").is_file()


def test_log_jacobian_with_session_and_res(out, raw, files):
    _, names = _sink(out, str(files["image"]), raw["session"], space=SPACE, resolution="1",
                     desc="log", suffix="jacobian", compress=True,
                     dismiss_entities=["acquisition", "run"])
    assert names == [f"sub-02/ses-A/anat/sub-02_ses-A_space-{SPACE}_res-1_desc-log_jacobian.nii.gz"]


def test_log_jacobian_requires_space(out, raw, files):
    with pytest.raises(ValueError, match="Could not build path"):
        _sink(out, str(files["image"]), raw["plain"], suffix="jacobian")
    assert _all_files(out) == []


def test_atlas_segmentation_and_lookup_table(out, raw, files):
    atlas = {"space": SPACE, "atlas": "Schaefer2018", "segmentation": "7n", "scale": "400"}
    _, image = _sink(out, str(files["image"]), raw["plain"], suffix="dseg", compress=True,
                     **atlas)
    _, table = _sink(out, str(files["tsv"]), raw["plain"], suffix="dseg", **atlas)
    stem = f"sub-01/anat/sub-01_space-{SPACE}_atlas-Schaefer2018_seg-7n_scale-400_dseg"
    assert image == [stem + ".nii.gz"] and table == [stem + ".tsv"]
    assert (out / table[0]).read_text() == files["tsv"].read_text()
    assert nb.load(out / image[0]).get_data_dtype() == np.int16  # labels stored as integers


def test_atlas_segmentation_minimal_with_session(out, raw, files):
    _, names = _sink(out, str(files["image"]), raw["session"], suffix="dseg", space="T1w",
                     atlas="Glasser", compress=True, dismiss_entities=["acquisition", "run"])
    assert names == ["sub-02/ses-A/anat/sub-02_ses-A_space-T1w_atlas-Glasser_dseg.nii.gz"]


def test_atlas_segmentation_requires_atlas(out, raw, files):
    with pytest.raises(ValueError, match="Could not build path"):
        _sink(out, str(files["image"]), raw["plain"], suffix="dseg", space=SPACE)
    assert _all_files(out) == []


def test_native_atlas_segmentation_and_volumes_have_no_space(out, raw, files):
    """Labels carried into the subject's own image space: no space- entity (the raw image's
    grid, named by its participant and session), and their volumes table beside them."""
    _, names = _sink(out, str(files["image"]), raw["session"], suffix="dseg", atlas="DK",
                     desc="aseg", compress=True, dismiss_entities=["acquisition", "run"])
    assert names == ["sub-02/ses-A/anat/sub-02_ses-A_atlas-DK_desc-aseg_dseg.nii.gz"]
    _, names = _sink(out, str(files["tsv"]), raw["session"], suffix="volumes", atlas="DK",
                     extension=".tsv", dismiss_entities=["acquisition", "run"])
    assert names == ["sub-02/ses-A/anat/sub-02_ses-A_atlas-DK_volumes.tsv"]


# -- atomicity -----------------------------------------------------------------------------

def _truncated(path: Path, source: Path) -> Path:
    """A .nii.gz whose header reads fine but whose data stream ends early."""
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_failure_leaves_nothing(out, raw, tmp_path):
    big = _nifti(tmp_path / "big.nii.gz", shape=(40, 40, 40), seed=3)
    broken = _truncated(tmp_path / "broken.nii.gz", big)
    with pytest.raises(EOFError):
        _sink(out, str(broken), raw["plain"], space=SPACE, desc="preproc", SkullStripped=False)
    assert _all_files(out) == []
    assert list(out.glob(STAGING_PREFIX + "*")) == []


def test_failure_of_second_file_publishes_none(out, raw, files, tmp_path):
    big = _nifti(tmp_path / "big.nii.gz", shape=(40, 40, 40), seed=3)
    broken = _truncated(tmp_path / "broken.nii.gz", big)
    with pytest.raises(EOFError):
        _sink(out, [str(files["image"]), str(broken)], raw["plain"], space=SPACE,
              desc=["first", "second"])
    assert _all_files(out) == []


def test_success_leaves_no_staging_and_rerun_replaces(out, raw, files, tmp_path):
    other = _nifti(tmp_path / "other.nii.gz", seed=9)
    _, first = _sink(out, str(files["image"]), raw["plain"], space=SPACE, desc="preproc")
    _, second = _sink(out, str(other), raw["plain"], space=SPACE, desc="preproc")
    assert first == second
    np.testing.assert_array_equal(nb.load(out / first[0]).get_fdata(), nb.load(other).get_fdata())
    assert [p.name for p in out.iterdir()] == ["sub-01"]


def test_inputs_restored_after_run(out, raw, files):
    sink = DerivativesDataSink(base_directory=str(out), in_file=str(files["h5"]),
                               source_file=str(raw["plain"]), **_xfm(**{"from": "T1w"}, to=SPACE))
    result = sink.run()
    assert sink.inputs.base_directory == str(out) and sink.inputs.check_hdr is True
    assert result.inputs["base_directory"] == str(out)


def test_inside_a_nipype_workflow(out, raw, files, tmp_path):
    from nipype.pipeline import engine as pe

    node = pe.Node(DerivativesDataSink(base_directory=str(out), source_file=str(raw["plain"]),
                                       space=SPACE, suffix="jacobian", compress=True),
                   name="ds_jacobian", base_dir=str(tmp_path / "work"))
    node.inputs.in_file = str(files["image"])
    result = node.run()
    assert result.outputs.out_file == str(
        out / f"sub-01/anat/sub-01_space-{SPACE}_desc-log_jacobian.nii.gz")
    assert _all_files(out) == [f"sub-01/anat/sub-01_space-{SPACE}_desc-log_jacobian.nii.gz"]


# -- the configuration itself --------------------------------------------------------------

ENTITY_ORDER = ["subject", "session", "acquisition", "ceagent", "reconstruction", "run", "echo",
                "part", "hemi", "space", "cohort", "atlas", "segmentation", "scale", "resolution",
                "density", "label", "desc"]


def test_config_patterns_use_defined_entities_in_bids_order():
    defined = {entity["name"] for entity in BIDS_DERIV_ENTITIES}
    for pattern in BIDS_DERIV_PATTERNS:
        filename = pattern.rsplit("/", 1)[1]
        used = re.findall(r"\{(\w+)", filename)
        assert set(used) <= defined, pattern
        ordered = [name for name in used if name in ENTITY_ORDER]
        ordered = list(dict.fromkeys(ordered))  # subject appears once in the file name
        assert ordered == sorted(ordered, key=ENTITY_ORDER.index), pattern
