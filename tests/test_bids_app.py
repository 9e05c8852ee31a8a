"""End-to-end tests of the ``ugi-bids`` command line on a tiny BIDS dataset built from real
images (two participants, one with two sessions, stored LPS and oblique), with a temporary
TemplateFlow home holding the real MNI152NLin2009cAsym brain and random official-format
weights. Everything runs through the console entry point, as a user would run it."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.bidsdata import app_environment, make_bids_dataset, make_templateflow_home
from tests.checkpoints import write_random_checkpoint

SPACE = "MNI152NLin2009cAsym"
PROVENANCE_KEYS = ("Sources", "Model", "WeightsSHA256", "WeightsURL", "IOIterations",
                   "IOSimilarity", "PrealignMode", "Device", "RegistrationSeconds",
                   "FoldedVoxelFraction", "Sloppy")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    templateflow_home = make_templateflow_home(root / "templateflow")
    paths = make_bids_dataset(root / "bids")
    weights = write_random_checkpoint(root / "Step_2_final.trch", seed=3, lastconv_scale=0.3)
    env = app_environment(root, templateflow_home)
    return {"root": root, "bids": root / "bids", "weights": weights, "env": env,
            "paths": paths}


def ugi_bids(args, env, cwd) -> subprocess.CompletedProcess:
    """Run the installed entry point module as a user would run ``ugi-bids``."""
    command = [sys.executable, "-m", "ugi_bids.cli.run", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=1200)


def checksums(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def first_run(setup):
    before = checksums(setup["bids"])
    out, work = setup["root"] / "derivatives" / "ugi-bids", setup["root"] / "work"
    args = [setup["bids"], out, "participant", "-w", work, "--output-spaces", SPACE,
            "--sloppy", "--io-iterations", "0", "--weights", setup["weights"], "--device", "cpu",
            "--nprocs", "2", "--omp-nthreads", "1"]
    result = ugi_bids(args, setup["env"], setup["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    return {"out": out, "work": work, "args": args, "before": before, "result": result}


EXPECTED = [
    "sub-01/ses-1/anat/sub-01_ses-1_from-T1w_to-{space}_mode-image_xfm.h5",
    "sub-01/ses-1/anat/sub-01_ses-1_from-{space}_to-T1w_mode-image_xfm.h5",
    "sub-01/ses-1/anat/sub-01_ses-1_space-{space}_desc-preproc_T1w.nii.gz",
    "sub-01/ses-1/anat/sub-01_ses-1_space-{space}_desc-log_jacobian.nii.gz",
    "sub-01/ses-2/anat/sub-01_ses-2_from-T1w_to-{space}_mode-image_xfm.h5",
    "sub-01/ses-2/anat/sub-01_ses-2_from-{space}_to-T1w_mode-image_xfm.h5",
    "sub-01/ses-2/anat/sub-01_ses-2_space-{space}_desc-preproc_T1w.nii.gz",
    "sub-01/ses-2/anat/sub-01_ses-2_space-{space}_desc-log_jacobian.nii.gz",
    "sub-02/anat/sub-02_from-T1w_to-{space}_mode-image_xfm.h5",
    "sub-02/anat/sub-02_from-{space}_to-T1w_mode-image_xfm.h5",
    "sub-02/anat/sub-02_space-{space}_desc-preproc_T1w.nii.gz",
    "sub-02/anat/sub-02_space-{space}_desc-log_jacobian.nii.gz",
    "dataset_description.json",
    ".bidsignore",
    "logs/CITATION.md",
]


@pytest.mark.slow
def test_every_expected_file_exists(first_run):
    out = first_run["out"]
    missing = [name for name in EXPECTED if not (out / name.format(space=SPACE)).exists()]
    assert missing == []
    for name in EXPECTED:
        if name.endswith((".h5", ".nii.gz")):
            sidecar = out / name.format(space=SPACE).replace(".nii.gz", ".json").replace(".h5", ".json")
            assert sidecar.exists(), sidecar
    leftovers = [p for p in out.rglob("*") if ".partial" in p.name or "staging" in p.name]
    assert leftovers == []


@pytest.mark.slow
def test_transform_sidecars_carry_provenance(first_run, setup):
    out = first_run["out"]
    sidecar = json.loads((out / f"sub-02/anat/sub-02_from-T1w_to-{SPACE}_mode-image_xfm.json").read_text())
    for key in PROVENANCE_KEYS:
        assert key in sidecar, key
    assert sidecar["IOIterations"] == 0 and sidecar["Sloppy"] is True
    assert "IOCheckpointing" not in sidecar  # no IO ran
    assert sidecar["PrealignMode"] == "affine" and sidecar["Device"] == "cpu"
    assert sidecar["PrealignDOF"] == 12 and sidecar["Prealignment"]["DOF"] == 12
    assert set(sidecar["Prealignment"]) == {"Metric", "FinalCost", "DOF", "Start", "Fallback",
                                            "Scales", "MaxShear"}
    weights_sha = hashlib.sha256(Path(setup["weights"]).read_bytes()).hexdigest()
    assert sidecar["WeightsSHA256"] == weights_sha
    assert sidecar["Sources"][0] == "bids:raw:sub-02/anat/sub-02_T1w.nii.gz"
    assert sidecar["Sources"][1].startswith("bids:templateflow:tpl-MNI152NLin2009cAsym/")
    assert 0.0 <= sidecar["FoldedVoxelFraction"] < 0.05


@pytest.mark.slow
def test_dataset_description_is_valid(first_run):
    description = json.loads((first_run["out"] / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["BIDSVersion"]
    generated = description["GeneratedBy"]
    assert isinstance(generated, list) and generated[0]["Name"] == "ugi-bids"
    assert generated[0]["Name"] in first_run["out"].name
    assert generated[0]["Version"]
    assert "raw" in description.get("DatasetLinks", {})


@pytest.mark.slow
def test_independent_reader_reproduces_the_space_image(first_run, setup):
    ants = pytest.importorskip("ants")
    out = first_run["out"]
    template = Path(setup["env"]["TEMPLATEFLOW_HOME"]) / f"tpl-{SPACE}" / f"tpl-{SPACE}_res-01_T1w.nii.gz"
    for prefix, raw in (("sub-01/ses-1/anat/sub-01_ses-1", setup["paths"]["sub-01_ses-1_T1w"]),
                        ("sub-02/anat/sub-02", setup["paths"]["sub-02_T1w"])):
        xfm = out / f"{prefix}_from-T1w_to-{SPACE}_mode-image_xfm.h5"
        ours = nib.load(out / f"{prefix}_space-{SPACE}_desc-preproc_T1w.nii.gz")
        theirs = ants.apply_transforms(fixed=ants.image_read(str(template)),
                                       moving=ants.image_read(str(raw)),
                                       transformlist=[str(xfm)], interpolator="linear").numpy()
        ours_data = np.asanyarray(ours.dataobj, dtype=np.float32)
        assert ours_data.shape == theirs.shape
        assert np.corrcoef(ours_data.ravel(), theirs.ravel())[0, 1] >= 0.999
        # and voxel by voxel: measured 2.3e-7 (sub-01) and 8.3e-7 (sub-02) of the raw image's
        # intensity range (float32 rounding); bound 1e-4 of it
        raw_range = np.ptp(np.asanyarray(nib.load(raw).dataobj, dtype=np.float32))
        assert np.abs(ours_data - theirs).max() <= 1e-4 * raw_range


@pytest.mark.slow
def test_bids_dir_untouched(first_run, setup):
    assert checksums(setup["bids"]) == first_run["before"]


@pytest.mark.slow
def test_rerun_reuses_finished_registrations(first_run, setup):
    node_outputs = sorted(first_run["work"].rglob("unigradicon/forward_xfm.h5"))
    assert len(node_outputs) == 3
    stamps = {p: p.stat().st_mtime_ns for p in node_outputs}
    xfm = first_run["out"] / f"sub-02/anat/sub-02_from-T1w_to-{SPACE}_mode-image_xfm.h5"
    digest = hashlib.sha256(xfm.read_bytes()).hexdigest()
    result = ugi_bids(first_run["args"], setup["env"], setup["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in node_outputs} == stamps  # not recomputed
    assert hashlib.sha256(xfm.read_bytes()).hexdigest() == digest


@pytest.mark.slow
def test_one_io_step(setup):
    out = setup["root"] / "derivatives-io" / "ugi-bids"
    args = [setup["bids"], out, "participant", "-w", setup["root"] / "work-io",
            "--participant-label", "sub-02", "--output-spaces", SPACE, "--sloppy",
            "--io-iterations", "1", "--io-checkpointing", "off", "--weights", setup["weights"],
            "--device", "cpu", "--nprocs", "1"]
    result = ugi_bids(args, setup["env"], setup["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    sidecar = json.loads((out / f"sub-02/anat/sub-02_from-T1w_to-{SPACE}_mode-image_xfm.json").read_text())
    assert sidecar["IOIterations"] == 1 and np.isfinite(sidecar["IOFinalLoss"])
    assert sidecar["IOCheckpointing"] == "off"
    assert not (out / "sub-01").exists()


# ------------------------------------------------------------------ error paths

def _assert_failed_cleanly(result, code, out: Path):
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_unknown_participant(setup, tmp_path):
    out = tmp_path / "ugi-bids"
    result = ugi_bids([setup["bids"], out, "participant", "--participant-label", "99",
                       "--weights", setup["weights"], "--sloppy"], setup["env"], tmp_path)
    _assert_failed_cleanly(result, 18, out)


def test_output_inside_bids_dir(setup, tmp_path):
    out = setup["bids"] / "derivatives" / "ugi-bids"
    before = checksums(setup["bids"])
    result = ugi_bids([setup["bids"], out, "participant", "--weights", setup["weights"]],
                      setup["env"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert checksums(setup["bids"]) == before


@pytest.mark.slow
def test_missing_weights(setup, tmp_path):
    out = tmp_path / "ugi-bids"
    result = ugi_bids([setup["bids"], out, "participant", "--sloppy"], setup["env"], tmp_path)
    _assert_failed_cleanly(result, 66, out)
    assert "ugi-bids-weights fetch unigradicon" in result.stderr


@pytest.mark.slow
def test_offline_missing_template(setup, tmp_path):
    out = tmp_path / "ugi-bids"
    result = ugi_bids([setup["bids"], out, "participant", "--output-spaces", "MNI152NLin6Asym",
                       "--weights", setup["weights"], "--sloppy"], setup["env"], tmp_path)
    _assert_failed_cleanly(result, 66, out)
    assert "TEMPLATEFLOW_HOME" in result.stderr


@pytest.mark.slow
def test_corrupt_nifti(setup, tmp_path):
    bids = tmp_path / "bids"
    shutil.copytree(setup["bids"], bids)
    image = bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    payload = image.read_bytes()
    image.write_bytes(payload[: len(payload) // 2])
    out = tmp_path / "ugi-bids"
    # the only participant selected: nothing can be done (one with a good image would run, and
    # the run would exit 1 at the end: tests/test_reliability.py)
    result = ugi_bids([bids, out, "participant", "--participant-label", "02", "--weights",
                       setup["weights"], "--sloppy"], setup["env"], tmp_path)
    _assert_failed_cleanly(result, 65, out)
    assert "sub-02: T1w image" in result.stderr and "truncated" in result.stderr


@pytest.mark.slow
def test_blank_image_is_refused_before_any_step_runs(setup, tmp_path):
    """A blank image used to fail inside the normalisation node (a crash file, exit 1): it is
    refused while the inputs are checked, before any folder is made. (A step that fails:
    tests/test_reliability.py.)"""
    bids = tmp_path / "bids"
    shutil.copytree(setup["bids"], bids)
    image = bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    blank = nib.load(image)
    nib.save(nib.Nifti1Image(np.zeros(blank.shape, np.float32), blank.affine), image)
    out = tmp_path / "ugi-bids"
    result = ugi_bids([bids, out, "participant", "--participant-label", "02", "-w",
                       tmp_path / "work", "--weights", setup["weights"], "--sloppy",
                       "--io-iterations", "0", "--nprocs", "1"], setup["env"], tmp_path)
    _assert_failed_cleanly(result, 65, out)
    assert "no contrast" in result.stderr
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_truncated_weights_stop_before_any_output(setup, tmp_path):
    weights = tmp_path / "Step_2_final.trch"
    weights.write_bytes(Path(setup["weights"]).read_bytes()[:1_000_000])
    out = tmp_path / "ugi-bids"
    result = ugi_bids([setup["bids"], out, "participant", "--weights", weights, "--sloppy"],
                      setup["env"], tmp_path)
    _assert_failed_cleanly(result, 66, out)


@pytest.mark.slow
def test_participant_without_usable_image_is_skipped_or_stops_the_run(setup, tmp_path):
    bids = tmp_path / "bids"
    shutil.copytree(setup["bids"], bids)
    anat = bids / "sub-02" / "anat"
    for path in anat.iterdir():
        path.rename(anat / path.name.replace("_T1w", "_T2w"))
    common = [bids, tmp_path / "out" / "ugi-bids", "participant", "--weights", setup["weights"],
              "--sloppy", "--boilerplate-only", "-w", tmp_path / "work"]
    skipped = ugi_bids(common, setup["env"], tmp_path)
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "sub-02: no usable T1w image; skipped" in skipped.stderr
    assert (tmp_path / "out" / "ugi-bids" / "logs" / "CITATION.md").exists()
    out = tmp_path / "out-stop" / "ugi-bids"
    common[1] = out
    stopped = ugi_bids(common + ["--stop-on-first-crash"], setup["env"], tmp_path)
    _assert_failed_cleanly(stopped, 18, out)


@pytest.mark.slow
def test_template_space_images_carry_the_templates_codes(first_run, setup):
    """An image resampled into a template lies in its space: it gets the template's qform and
    sform codes (4, MNI, for TemplateFlow's) and mm units, the header niworkflows' sink wants
    for a standard space, so the sink copies it instead of re-encoding it."""
    template = next(Path(setup["env"]["TEMPLATEFLOW_HOME"]).rglob(f"tpl-{SPACE}_res-01_T1w.nii.gz"))
    expected = tuple(int(nib.load(template).header[name]) for name in ("qform_code", "sform_code"))
    images = sorted(first_run["out"].rglob(f"*_space-{SPACE}_*.nii.gz"))
    assert images
    for image in images:
        header = nib.load(image).header
        assert (int(header["qform_code"]), int(header["sform_code"])) == expected, image
        assert header.get_xyzt_units()[0] == "mm", image
