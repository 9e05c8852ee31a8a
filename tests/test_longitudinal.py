"""End to end: ``ugi-bids --longitudinal`` (a deformable subject template per participant with
two or more sessions), then ``group --build-template`` (a study template in TemplateFlow layout)
and a participant run that uses it, through the console entry point as a user runs them.

Dataset (:func:`tests.bidsdata.make_longitudinal_dataset`): sub-01 has three sessions of one real
brain with different geometry (LPS; oblique with 3 x 3 x 4.5 mm voxels; RAS, rotated), sub-02 one
session. Weights: :func:`tests.checkpoints.write_difference_checkpoint`, random official-format
weights whose maps are the identity for equal images and non-affine otherwise, so that the
deformable path runs; what the templates look like with the real weights is not shown here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.bidsdata import (
    app_environment,
    make_longitudinal_dataset,
    make_templateflow_home,
)
from tests.checkpoints import write_difference_checkpoint
from tests.realdata import dk_atlas_path
from tests.test_bids_app import checksums, ugi_bids

SPACE = "MNI152NLin2009cAsym"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("longitudinal")
    templateflow_home = make_templateflow_home(root / "templateflow")
    paths = make_longitudinal_dataset(root / "bids")
    weights = write_difference_checkpoint(root / "Step_2_final.trch", seed=1, lastconv_scale=1.0)
    env = app_environment(root, templateflow_home)
    return {"root": root, "bids": root / "bids", "weights": weights, "env": env,
            "paths": paths, "templateflow": templateflow_home}


@pytest.fixture(scope="module")
def first_run(setup):
    out, work = setup["root"] / "derivatives" / "ugi-bids", setup["root"] / "work"
    args = [setup["bids"], out, "participant", "-w", work, "--longitudinal",
            "--output-spaces", SPACE, "--atlases", f"DK={dk_atlas_path()},space={SPACE}",
            "--template-iterations", "1", "--sloppy", "--io-iterations", "0",
            "--weights", setup["weights"], "--device", "cpu", "--nprocs", "2",
            "--omp-nthreads", "1"]
    started = time.perf_counter()
    result = ugi_bids(args, setup["env"], setup["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    return {"out": out, "work": work, "args": args, "result": result,
            "seconds": time.perf_counter() - started}


SESSION_FILES = [
    "sub-01/ses-{s}/anat/sub-01_ses-{s}_from-orig_to-T1w_mode-image_xfm.h5",
    "sub-01/ses-{s}/anat/sub-01_ses-{s}_from-T1w_to-orig_mode-image_xfm.h5",
    "sub-01/ses-{s}/anat/sub-01_ses-{s}_space-T1w_desc-preproc_T1w.nii.gz",
    "sub-01/ses-{s}/anat/sub-01_ses-{s}_space-T1w_desc-logjacobian_T1w.nii.gz",
    "sub-01/ses-{s}/anat/sub-01_ses-{s}_atlas-DK_dseg.nii.gz",
    "sub-01/ses-{s}/anat/sub-01_ses-{s}_atlas-DK_volumes.tsv",
]
SUBJECT_FILES = [
    "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz",
    f"sub-01/anat/sub-01_from-T1w_to-{SPACE}_mode-image_xfm.h5",
    f"sub-01/anat/sub-01_from-{SPACE}_to-T1w_mode-image_xfm.h5",
    f"sub-01/anat/sub-01_space-{SPACE}_desc-preproc_T1w.nii.gz",
    "sub-01/anat/sub-01_atlas-DK_dseg.nii.gz",
    "sub-01/anat/sub-01_atlas-DK_volumes.tsv",
    # the one-session participant: the ordinary cross-sectional outputs
    f"sub-02/ses-1/anat/sub-02_ses-1_from-T1w_to-{SPACE}_mode-image_xfm.h5",
    f"sub-02/ses-1/anat/sub-02_ses-1_from-{SPACE}_to-T1w_mode-image_xfm.h5",
    f"sub-02/ses-1/anat/sub-02_ses-1_space-{SPACE}_desc-preproc_T1w.nii.gz",
    "sub-02/ses-1/anat/sub-02_ses-1_atlas-DK_dseg.nii.gz",
]


def _sidecar(path: Path) -> Path:
    return Path(str(path).replace(".nii.gz", ".json").replace(".h5", ".json")
                .replace(".tsv", ".json"))


def test_every_expected_file_exists(first_run):
    out = first_run["out"]
    expected = SUBJECT_FILES + [name.format(s=s) for s in "123" for name in SESSION_FILES]
    missing = [name for name in expected if not (out / name).exists()]
    assert missing == []
    assert all(_sidecar(out / name).exists() for name in expected)
    # sessions of a longitudinal participant are registered to the spaces only through the
    # template; the one-session participant gets no subject template
    assert not list(out.glob(f"sub-01/ses-*/anat/*_to-{SPACE}_*"))
    assert not (out / "sub-02/anat/sub-02_desc-preproc_T1w.nii.gz").exists()
    assert "sub-02: only one T1w session, so no subject template" in first_run["result"].stderr
    assert not [p for p in out.rglob("*") if ".partial" in p.name or "staging" in p.name]


def test_sidecars_and_boilerplate(first_run):
    out = first_run["out"]
    template = json.loads((out / "sub-01/anat/sub-01_desc-preproc_T1w.json").read_text())
    assert len(template["Sources"]) == 3 and template["TemplateIterations"] == 1
    assert [entry["iteration"] for entry in template["Convergence"]] == [0, 1]
    assert all(entry["mean_displacement_mm"] >= 0 for entry in template["Convergence"])
    forward = json.loads((out / "sub-01/ses-2/anat/"
                          "sub-01_ses-2_from-orig_to-T1w_mode-image_xfm.json").read_text())
    assert forward["Sources"] == ["bids:raw:sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz",
                                  "bids::sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"]
    assert 0.0 <= forward["FoldedVoxelFraction"] < 0.01
    dseg = json.loads((out / "sub-01/ses-3/anat/sub-01_ses-3_atlas-DK_dseg.json").read_text())
    assert f"bids::sub-01/anat/sub-01_from-{SPACE}_to-T1w_mode-image_xfm.h5" in dseg["Sources"]
    assert "bids::sub-01/ses-3/anat/sub-01_ses-3_from-T1w_to-orig_mode-image_xfm.h5" in \
        dseg["Sources"]
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "deformable" in citation and "within-subject template" in citation
    assert "avants2010template" in (out / "logs" / "CITATION.bib").read_text()


def test_independent_reader_reproduces_every_session_in_the_template(first_run, setup):
    """antspyx applying our ``from-orig_to-T1w`` file to the raw session reproduces our
    ``space-T1w`` image."""
    ants = pytest.importorskip("ants")
    out = first_run["out"]
    template = out / "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"
    for session in "123":
        prefix = out / f"sub-01/ses-{session}/anat/sub-01_ses-{session}"
        raw = setup["paths"][f"sub-01_ses-{session}_T1w"]
        theirs = ants.apply_transforms(
            fixed=ants.image_read(str(template)), moving=ants.image_read(str(raw)),
            transformlist=[f"{prefix}_from-orig_to-T1w_mode-image_xfm.h5"],
            interpolator="linear").numpy()
        ours = np.asanyarray(nib.load(f"{prefix}_space-T1w_desc-preproc_T1w.nii.gz").dataobj,
                             dtype=np.float32)
        assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] >= 0.999
        raw_range = np.ptp(np.asanyarray(nib.load(raw).dataobj, dtype=np.float32))
        assert np.abs(ours - theirs).max() <= 1e-4 * raw_range


def test_session_to_mni_through_the_template_as_the_readme_says(first_run, setup):
    """The README's composition: ``antsApplyTransforms -r MNI -t sub-X_from-T1w_to-MNI...h5
    -t sub-X_ses-Y_from-orig_to-T1w...h5`` (the first maps MNI points to template points, the
    second template points to session points) equals our one-step resampling through the same
    two files, and a session's atlas labels equal ANTs' GenericLabel through the inverse
    chain."""
    ants = pytest.importorskip("ants")
    from ugi_bids.interfaces.files import propagate_labels, resample_image

    out = first_run["out"]
    mni = setup["templateflow"] / f"tpl-{SPACE}" / f"tpl-{SPACE}_res-01_T1w.nii.gz"
    chain = [out / f"sub-01/anat/sub-01_from-T1w_to-{SPACE}_mode-image_xfm.h5",
             out / "sub-01/ses-2/anat/sub-01_ses-2_from-orig_to-T1w_mode-image_xfm.h5"]
    raw = setup["paths"]["sub-01_ses-2_T1w"]
    ours = nib.load(resample_image(str(raw), [str(p) for p in chain], str(mni),
                                   str(setup["root"] / "ses2_in_mni.nii.gz")))
    theirs = ants.apply_transforms(fixed=ants.image_read(str(mni)),
                                   moving=ants.image_read(str(raw)),
                                   transformlist=[str(p) for p in chain],
                                   interpolator="linear").numpy()
    ours = np.asanyarray(ours.dataobj, dtype=np.float32)
    raw_range = np.ptp(np.asanyarray(nib.load(raw).dataobj, dtype=np.float32))
    assert np.abs(ours - theirs).max() <= 1e-4 * raw_range
    assert ours.std() > 0  # the session lands in MNI space

    inverse = [out / "sub-01/ses-2/anat/sub-01_ses-2_from-T1w_to-orig_mode-image_xfm.h5",
               out / f"sub-01/anat/sub-01_from-{SPACE}_to-T1w_mode-image_xfm.h5"]
    ours_labels = np.asanyarray(
        nib.load(out / "sub-01/ses-2/anat/sub-01_ses-2_atlas-DK_dseg.nii.gz").dataobj)
    theirs_labels = ants.apply_transforms(
        fixed=ants.image_read(str(raw)), moving=ants.image_read(str(dk_atlas_path())),
        transformlist=[str(p) for p in inverse], interpolator="genericLabel").numpy()
    labelled = (ours_labels > 0) | (theirs_labels > 0)
    assert labelled.sum() > 1000
    assert (ours_labels == theirs_labels)[labelled].mean() >= 0.999
    again = propagate_labels(str(dk_atlas_path()), [str(p) for p in inverse], str(raw),
                             str(setup["root"] / "dk_ses2.nii.gz"))
    assert np.array_equal(np.asanyarray(nib.load(again).dataobj), ours_labels)


def test_rerun_reuses_the_template(first_run, setup):
    out, work = first_run["out"], first_run["work"]
    node_outputs = sorted(work.rglob("build_template/template.nii.gz"))
    assert len(node_outputs) == 1
    stamp = node_outputs[0].stat().st_mtime_ns
    before = checksums(out / "sub-01")
    started = time.perf_counter()
    result = ugi_bids(first_run["args"], setup["env"], setup["root"])
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert node_outputs[0].stat().st_mtime_ns == stamp  # not rebuilt
    after = checksums(out / "sub-01")
    assert {k: v for k, v in after.items() if not k.startswith("log/")} == \
        {k: v for k, v in before.items() if not k.startswith("log/")}
    print(f"first run {first_run['seconds']:.0f} s, rerun {seconds:.0f} s")
    assert seconds < first_run["seconds"]


@pytest.fixture(scope="module")
def study(first_run, setup):
    out, work = first_run["out"], first_run["work"]
    args = [setup["bids"], out, "group", "-w", work, "--build-template", "Study",
            "--output-spaces", SPACE, "--template-iterations", "1", "--sloppy",
            "--io-iterations", "0", "--weights", setup["weights"], "--device", "cpu"]
    result = ugi_bids(args, setup["env"], setup["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "tpl-Study"


def test_group_builds_a_study_template(study, first_run):
    out = first_run["out"]
    image = study / "tpl-Study_res-01_T1w.nii.gz"
    mask = study / "tpl-Study_res-01_desc-brain_mask.nii.gz"
    assert image.exists() and mask.exists()
    assert (study / f"tpl-Study_from-{SPACE}_mode-image_xfm.h5").exists()
    description = json.loads((study / "template_description.json").read_text())
    grid = nib.load(image)
    assert description["Identifier"] == "Study"
    assert description["res"]["01"]["shape"] == list(grid.shape)
    assert np.allclose(description["res"]["01"]["zooms"], grid.header.get_zooms())
    # the longitudinal participant enters through its subject template, the other through
    # its first session
    assert description["Sources"] == ["bids::sub-01/anat/sub-01_desc-preproc_T1w.nii.gz",
                                      "bids:raw:sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz"]
    brain = np.asanyarray(nib.load(mask).dataobj) > 0
    intensities = np.asanyarray(grid.dataobj, dtype=np.float32)
    assert brain.sum() > 1000
    assert intensities[brain].mean() > 3 * intensities[~brain].mean()  # on the brain
    for name in ("sub-01/anat/sub-01_from-T1w_to-Study_mode-image_xfm",
                 "sub-01/anat/sub-01_from-Study_to-T1w_mode-image_xfm",
                 "sub-02/ses-1/anat/sub-02_ses-1_from-T1w_to-Study_mode-image_xfm",
                 "sub-02/ses-1/anat/sub-02_ses-1_from-Study_to-T1w_mode-image_xfm"):
        assert (out / f"{name}.h5").exists() and (out / f"{name}.json").exists()
    rows = [line.split("\t") for line in
            (out / "group_registrations.tsv").read_text().splitlines()[1:]]
    study_rows = [row for row in rows if row[3] == "Study"]
    assert [row[:2] for row in study_rows] == [["sub-01", "n/a"], ["sub-02", "ses-1"]]
    assert all(0.0 <= float(row[4]) < 0.01 for row in study_rows)  # folded-voxel fraction
    assert ["sub-01", "ses-2", "T1w", "T1w"] in [row[:4] for row in rows]


def test_participant_run_in_the_study_template(study, setup):
    """The study template as an output space: through TEMPLATEFLOW_HOME, and as
    ``--template NAME=PATH,mask=PATH``."""
    from ugi_bids.utils.templates import parse_custom_template, resolve_template

    home = setup["root"] / "templateflow-study"
    home.mkdir()
    (home / f"tpl-{SPACE}").symlink_to(setup["templateflow"] / f"tpl-{SPACE}")
    (home / "tpl-Study").symlink_to(study)
    out = setup["root"] / "derivatives-study" / "ugi-bids"
    args = [setup["bids"], out, "participant", "-w", setup["root"] / "work-study",
            "--participant-label", "02", "--output-spaces", "Study", "--sloppy",
            "--io-iterations", "0", "--weights", setup["weights"], "--device", "cpu"]
    result = ugi_bids(args, dict(setup["env"], TEMPLATEFLOW_HOME=str(home)), setup["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    prefix = out / "sub-02/ses-1/anat/sub-02_ses-1"
    assert Path(f"{prefix}_from-T1w_to-Study_mode-image_xfm.h5").exists()
    space_image = nib.load(f"{prefix}_space-Study_desc-preproc_T1w.nii.gz")
    assert space_image.shape == nib.load(study / "tpl-Study_res-01_T1w.nii.gz").shape
    sidecar = json.loads(Path(f"{prefix}_from-T1w_to-Study_mode-image_xfm.json").read_text())
    assert "bids:templateflow:tpl-Study/tpl-Study_res-01_T1w.nii.gz" in sidecar["Sources"]

    custom = resolve_template(parse_custom_template(
        f"Study={study / 'tpl-Study_res-01_T1w.nii.gz'},"
        f"mask={study / 'tpl-Study_res-01_desc-brain_mask.nii.gz'}"))
    assert custom.mask is not None and custom.image.name == "tpl-Study_res-01_T1w.nii.gz"
