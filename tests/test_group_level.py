"""The group level (``ugi_bids.utils.group``): tables of every participant's registrations and
atlas volumes, the participants and sessions still missing or half-finished, and its errors.

Fast: the participant-level outputs are written here as the files of the contract (names,
JSON sidecars, TSV tables, the runs' ``ugi-bids.toml``); no image is read, no registration runs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import pandas as pd
import pytest

from ugi_bids.config import Config, SpaceSpec
from ugi_bids.errors import NoDataError, guarded
from ugi_bids.utils import group

SPACES = ("MNI152NLin2009cAsym", "MNIPediatricAsym+2")
SCHAEFER = "atlas-Schaefer2018_desc-100Parcels7Networks"
HOSPA = "atlas-HOSPA"
#: atlas -> index -> name; HOSPA repeats a name (columns Cortex_1, Cortex_2)
LABELS = {SCHAEFER: {1: "7Networks_LH_Vis_1", 2: "7Networks_RH_Vis_1"},
          HOSPA: {1: "Cortex", 2: "Cortex", 3: "Thalamus"}}
RUN_UUID = "20240101-120000_00000000-0000-4000-8000-000000000000"
LATER_UUID = "20240202-120000_00000000-0000-4000-8000-000000000001"


# --------------------------------------------------------------------------- the datasets

def _json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _tsv(path: Path, columns: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(map(str, row)) + "\n" for row in [columns, *rows]))


def volume(prefix: str, index: int) -> float:
    """A distinct volume per participant, session and label."""
    return 1000.0 * (1 + len(prefix)) + 10.0 * index + 0.25


def seconds(prefix: str, space: str) -> float:
    return round(len(prefix) + len(space) / 10, 3)


def sessions_of(bids: Path) -> list[tuple[str, str]]:
    """(participant label, session label or "") of every anat folder of ``bids``."""
    return sorted((anat.parent.name[4:], "") if anat.parent.name.startswith("sub-") else
                  (anat.parent.parent.name[4:], anat.parent.name[4:])
                  for anat in bids.glob("sub-*/**/anat"))


def make_bids(root: Path, layout: dict[str, list[str]]) -> Path:
    """``{participant: [session, ...]}`` ([] without sessions), one T1w each (empty files)."""
    (root).mkdir(parents=True)
    _json(root / "dataset_description.json", {"Name": "test", "BIDSVersion": "1.8.0"})
    for participant, sessions in layout.items():
        for session in sessions or [""]:
            folder = root / f"sub-{participant}" / (f"ses-{session}" if session else "") / "anat"
            prefix = f"sub-{participant}" + (f"_ses-{session}" if session else "")
            folder.mkdir(parents=True)
            (folder / f"{prefix}_T1w.nii.gz").write_bytes(b"")
            (folder / f"{prefix}_T1w.json").write_text("{}")
    return root


def run_settings_toml(bids: Path, out: Path) -> str:
    spaces = [SpaceSpec("MNI152NLin2009cAsym"), SpaceSpec("MNIPediatricAsym", cohort="2")]
    return Config(bids_dir=bids, output_dir=out, output_spaces=spaces).to_toml({"device": "cpu"})


def write_session(out: Path, bids: Path, participant: str, session: str = "", *,
                  spaces=SPACES, atlases=(SCHAEFER, HOSPA), metadata=None) -> None:
    """The participant level's files of one session (and its run settings)."""
    prefix = f"sub-{participant}" + (f"_ses-{session}" if session else "")
    anat = out / f"sub-{participant}" / (f"ses-{session}" if session else "") / "anat"
    for space in spaces:
        for source, target in (("T1w", space), (space, "T1w")):
            stem = anat / f"{prefix}_from-{source}_to-{target}_mode-image_xfm"
            stem.parent.mkdir(parents=True, exist_ok=True)
            stem.with_suffix(".h5").write_bytes(b"\x89HDF")
            meta = {"Sources": [f"bids:raw:{prefix}_T1w.nii.gz"], "Model": "unigradicon",
                    "WeightsSHA256": "0" * 64, "PrealignMode": "affine", "PrealignDOF": 12,
                    "Sloppy": True,
                    "Device": "cpu", "RegistrationSeconds": seconds(prefix, space),
                    "FoldedVoxelFraction": 0.001, "SimilarityMetric": "NCC",
                    "Similarity": 0.5 + len(space) / 100}
            meta.update((metadata or {}).get(space, {}))
            _json(stem.with_suffix(".json"), meta)
    for atlas in atlases:
        _tsv(anat / f"{prefix}_{atlas}_volumes.tsv", ["index", "name", "voxels", "volume_mm3"],
             [[index, name, 8, volume(prefix, index)] for index, name in LABELS[atlas].items()])
        _json(anat / f"{prefix}_{atlas}_volumes.json",
              {"BrainVolume": 1.5e6 + len(prefix), "Atlas": atlas, "Sources": []})
        (anat / f"{prefix}_{atlas}_dseg.nii.gz").write_bytes(b"")
        _tsv(out / f"{atlas}_dseg.tsv", ["index", "name"], [[0, "Background"]] + [
            [index, name] for index, name in LABELS[atlas].items()])
    log = out / f"sub-{participant}" / "log" / RUN_UUID
    log.mkdir(parents=True, exist_ok=True)
    (log / "ugi-bids.toml").write_text(run_settings_toml(bids, out))


@pytest.fixture()
def dataset(tmp_path) -> tuple[Path, Path]:
    """sub-01 (sessions 1 and 2) and sub-02 (no sessions), both complete."""
    bids = make_bids(tmp_path / "bids", {"01": ["1", "2"], "02": []})
    out = tmp_path / "derivatives" / "ugi-bids"
    for participant, session in sessions_of(bids):
        write_session(out, bids, participant, session,
                      metadata={SPACES[1]: {"Similarity": None}} if participant == "02" else None)
    _json(out / "dataset_description.json", {"Name": "ugi-bids", "DatasetType": "derivative"})
    (out / ".bidsignore").write_text("*_xfm.*\n")
    return bids, out


def config_for(bids: Path, out: Path, **kwargs) -> Config:
    return Config(bids_dir=bids, output_dir=out, analysis_level="group", **kwargs)


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False)


def group_files(out: Path) -> dict[str, str]:
    names = sorted(path.name for path in out.glob("group_*")) + [".bidsignore"]
    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in names}


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ugi-bids: warning:")]


# --------------------------------------------------------------------------- complete results

def test_complete_dataset_tables(dataset, capsys):
    bids, out = dataset
    assert group.run_group(config_for(bids, out)) == 0
    assert warnings(capsys.readouterr().err) == []

    registrations = read(out / "group_registrations.tsv")
    assert list(registrations.columns) == [
        "participant_id", "session_id", "suffix", "space", "folded_fraction", "similarity",
        "similarity_metric", "prealign", "prealign_dof", "device", "seconds"]
    keys = [tuple(row) for row in registrations[["participant_id", "session_id", "space"]]
            .fillna("n/a").itertuples(index=False)]
    assert keys == [("sub-01", "ses-1", SPACES[0]), ("sub-01", "ses-1", SPACES[1]),
                    ("sub-01", "ses-2", SPACES[0]), ("sub-01", "ses-2", SPACES[1]),
                    ("sub-02", "n/a", SPACES[0]), ("sub-02", "n/a", SPACES[1])]
    assert (registrations["suffix"] == "T1w").all()
    assert (registrations["prealign"] == "affine").all()
    assert (registrations["prealign_dof"] == 12).all()
    assert (registrations["similarity_metric"] == "NCC").all()
    assert (registrations["device"] == "cpu").all()
    assert registrations["folded_fraction"].tolist() == [0.001] * 6
    assert registrations["seconds"].tolist() == [
        seconds(prefix, space) for prefix in ("sub-01_ses-1", "sub-01_ses-2", "sub-02")
        for space in SPACES]
    similarity = registrations["similarity"].tolist()
    assert similarity[:5] == [0.5 + len(space) / 100 for space in SPACES * 2 + SPACES[:1]]
    assert pd.isna(similarity[5])  # sub-02's sidecar holds null: an empty cell
    assert "\tn/a\tNCC\t" in (out / "group_registrations.tsv").read_text()

    for atlas, columns in ((SCHAEFER, list(LABELS[SCHAEFER].values())),
                           (HOSPA, ["Cortex_1", "Cortex_2", "Thalamus"])):
        table = read(out / f"group_{atlas}_volumes.tsv")
        assert list(table.columns) == ["participant_id", "session_id", *columns,
                                       "brain_volume_mm3"]
        assert table["participant_id"].tolist() == ["sub-01", "sub-01", "sub-02"]
        assert table["session_id"].fillna("n/a").tolist() == ["ses-1", "ses-2", "n/a"]
        for row, prefix in zip(table.itertuples(index=False),
                               ("sub-01_ses-1", "sub-01_ses-2", "sub-02")):
            assert list(row[2:-1]) == [volume(prefix, index) for index in LABELS[atlas]]
            assert row[-1] == 1.5e6 + len(prefix)
        sidecar = json.loads((out / f"group_{atlas}_volumes.json").read_text())
        assert sidecar["Atlas"] == atlas and sidecar["LookupTable"] == f"{atlas}_dseg.tsv"
        assert sidecar["Incomplete"] == []
        assert all(sidecar[column]["Units"] == "mm^3"
                   for column in [*columns, "brain_volume_mm3"])
        assert sidecar["Cortex_2" if atlas == HOSPA else columns[1]]["Description"].startswith(
            "Volume of label 2 (")
    sidecar = json.loads((out / "group_registrations.json").read_text())
    assert set(registrations.columns) <= set(sidecar) and sidecar["Incomplete"] == []
    assert sidecar["seconds"]["Units"] == "s"
    assert "group_*" in (out / ".bidsignore").read_text().splitlines()
    assert "*_xfm.*" in (out / ".bidsignore").read_text().splitlines()  # kept


def test_rerun_gives_the_same_bytes(dataset, capsys):
    bids, out = dataset
    (bids / "sub-03" / "anat").mkdir(parents=True)  # a missing participant: warnings, sidecars
    (bids / "sub-03" / "anat" / "sub-03_T1w.nii.gz").write_bytes(b"")
    group.run_group(config_for(bids, out))
    first = group_files(out)
    assert len(first) == 7  # 3 tables, 3 sidecars, .bidsignore
    first_err = capsys.readouterr().err
    group.run_group(config_for(bids, out))
    assert group_files(out) == first
    assert capsys.readouterr().err == first_err
    assert not list(out.glob(".*partial*"))  # no temporary file left


def test_participant_label_selects_rows(dataset, capsys):
    bids, out = dataset
    group.run_group(config_for(bids, out, participant_label=["02"]))
    assert read(out / "group_registrations.tsv")["participant_id"].unique().tolist() == ["sub-02"]
    assert read(out / f"group_{HOSPA}_volumes.tsv")["participant_id"].tolist() == ["sub-02"]
    assert warnings(capsys.readouterr().err) == []


# --------------------------------------------------------------------------- missing results

def test_missing_and_half_finished_are_reported(dataset, capsys):
    bids, out = dataset
    make_bids(bids.parent / "more", {"03": [], "01": ["3"]})  # sub-03 and sub-01 ses-3 exist
    for anat in (bids.parent / "more").glob("sub-*/**/anat"):
        target = bids / anat.relative_to(bids.parent / "more")
        target.parent.mkdir(parents=True, exist_ok=True)
        anat.rename(target)
    # sub-02: one space's transform and one atlas' volumes gone, and its latest run crashed
    anat = out / "sub-02" / "anat"
    (anat / f"sub-02_from-T1w_to-{SPACES[1]}_mode-image_xfm.h5").unlink()
    (anat / f"sub-02_{HOSPA}_volumes.tsv").unlink()
    crash = out / "sub-02" / "log" / LATER_UUID
    crash.mkdir()
    (crash / "crash-20240202-120100-user-register-0000.txt").write_text("Traceback\n")

    assert group.run_group(config_for(bids, out)) == 0
    lines = warnings(capsys.readouterr().err)
    crash_folder = f"sub-02/log/{LATER_UUID}"
    assert lines == [
        "ugi-bids: warning: sub-01 ses-3: no participant-level results",
        (f"ugi-bids: warning: sub-02: half-finished: no from-T1w_to-{SPACES[1]} transform, "
         f"no {HOSPA} volumes; crash files in {crash_folder}"),
        "ugi-bids: warning: sub-03: no participant-level results",
    ]
    expected = [
        {"participant_id": "sub-01", "session_id": "ses-3", "Status": "missing",
         "Reason": "no participant-level results"},
        {"participant_id": "sub-02", "session_id": "n/a", "Status": "half-finished",
         "Reason": f"half-finished: no from-T1w_to-{SPACES[1]} transform, no {HOSPA} volumes; "
                   f"crash files in {crash_folder}"},
        {"participant_id": "sub-03", "session_id": "n/a", "Status": "missing",
         "Reason": "no participant-level results"},
    ]
    for name in ("group_registrations.json", f"group_{SCHAEFER}_volumes.json",
                 f"group_{HOSPA}_volumes.json"):
        assert json.loads((out / name).read_text())["Incomplete"] == expected
    # what is there is still tabulated: sub-02's registrations (the forward sidecar of the
    # half-finished one too) and its Schaefer volumes, not its HOSPA volumes
    registrations = read(out / "group_registrations.tsv")
    assert (registrations["participant_id"] == "sub-02").sum() == 2
    assert read(out / f"group_{SCHAEFER}_volumes.tsv")["participant_id"].tolist() == [
        "sub-01", "sub-01", "sub-02"]
    assert read(out / f"group_{HOSPA}_volumes.tsv")["participant_id"].tolist() == [
        "sub-01", "sub-01"]


def test_crash_files_alone_make_a_participant_half_finished(dataset, capsys):
    bids, out = dataset
    crash = out / "sub-01" / "log" / LATER_UUID
    crash.mkdir()
    (crash / "crash-x.txt").write_text("Traceback\n")
    group.run_group(config_for(bids, out))
    assert warnings(capsys.readouterr().err) == [
        f"ugi-bids: warning: sub-01: half-finished: crash files in sub-01/log/{LATER_UUID}"]


def test_an_older_crash_does_not_count(dataset, capsys):
    bids, out = dataset
    (out / "sub-01" / "log" / RUN_UUID / "crash-x.txt").write_text("Traceback\n")
    later = out / "sub-01" / "log" / LATER_UUID
    later.mkdir()
    (later / "ugi-bids.toml").write_text(run_settings_toml(bids, out))
    group.run_group(config_for(bids, out))
    assert warnings(capsys.readouterr().err) == []


def test_expected_spaces_come_from_the_latest_run(dataset, capsys):
    """The latest ugi-bids.toml asks for a custom template since moved away (read_settings
    refuses it) and a key this version may not know: its [workflow] table still says what
    was expected."""
    bids, out = dataset
    later = out / "sub-02" / "log" / LATER_UUID
    later.mkdir()
    text = run_settings_toml(bids, out)
    for key, value in (("templates", '["Study=/nonexistent/tpl.nii.gz"]'),
                       ("atlases", '["HOSPA", "Mine=/nonexistent/labels.nii.gz,space=Study"]'),
                       ("atlas_libraries", '["Lib=/nonexistent/library"]')):
        text = "\n".join(line for line in text.splitlines()
                         if not line.startswith(f"{key} = "))
        text = text.replace("[workflow]\n", f"[workflow]\n{key} = {value}\n")
    text = text.replace("[workflow]\n", "[workflow]\na_key_of_a_later_version = 1\n")
    (later / "ugi-bids.toml").write_text(text)
    assert group.run_settings(later / "ugi-bids.toml") == group.RunSettings(
        ["T1w"], [*SPACES, "Study"], [HOSPA, "atlas-Mine", "atlas-Lib"], longitudinal=False)
    group.run_group(config_for(bids, out))
    assert warnings(capsys.readouterr().err) == [
        ("ugi-bids: warning: sub-02: half-finished: no from-T1w_to-Study transform, "
         "no from-Study_to-T1w transform, no atlas-Lib volumes, no atlas-Mine volumes")]


def test_run_settings_read_through_read_settings(tmp_path):
    path = tmp_path / "ugi-bids.toml"
    path.write_text(run_settings_toml(tmp_path, tmp_path))
    assert group.run_settings(path) == group.RunSettings(["T1w"], list(SPACES), [],
                                                         longitudinal=False)
    path.write_text(Config(bids_dir=tmp_path, output_dir=tmp_path, output_spaces=[
        SpaceSpec("MNI152NLin2009cAsym")], subject_anatomical_reference="unbiased",
    ).to_toml({"device": "cpu"}))
    assert group.run_settings(path).longitudinal
    path.write_text("not toml [")
    assert group.run_settings(path) is None


def test_only_sessions_with_the_first_suffix_expect_atlases(dataset, capsys):
    """Labels land on the grid of the run's first suffix: a T2w-only session has none."""
    bids, out = dataset
    anat = bids / "sub-01" / "ses-3" / "anat"
    anat.mkdir(parents=True)
    (anat / "sub-01_ses-3_T2w.nii.gz").write_bytes(b"")
    text = run_settings_toml(bids, out).replace('    "T1w",\n', '    "T1w",\n    "T2w",\n')
    (out / "sub-01" / "log" / RUN_UUID / "ugi-bids.toml").write_text(text)
    for space in SPACES:
        for source, target in (("T2w", space), (space, "T2w")):
            stem = out / "sub-01" / "ses-3" / "anat" / \
                f"sub-01_ses-3_from-{source}_to-{target}_mode-image_xfm"
            stem.parent.mkdir(parents=True, exist_ok=True)
            stem.with_suffix(".h5").write_bytes(b"")
            _json(stem.with_suffix(".json"), {"Device": "cpu"})
    group.run_group(config_for(bids, out))
    assert warnings(capsys.readouterr().err) == []
    table = read(out / "group_registrations.tsv")
    assert table[table["session_id"] == "ses-3"]["suffix"].tolist() == ["T2w", "T2w"]


def test_no_results_is_exit_18_and_writes_nothing(tmp_path, capsys):
    bids = make_bids(tmp_path / "bids", {"01": []})
    out = tmp_path / "ugi-bids"
    (out / "sub-01" / "log" / RUN_UUID).mkdir(parents=True)
    _json(out / "dataset_description.json", {"Name": "ugi-bids"})
    before = sorted(out.rglob("*"))
    with pytest.raises(NoDataError):
        group.run_group(config_for(bids, out))
    assert guarded("ugi-bids", lambda: group.run_group(config_for(bids, out))) == 18
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith("ugi-bids: error: ") and "no participant-level results" in err
    assert sorted(out.rglob("*")) == before
    # an OUTPUT_DIR that does not exist: the same code, one line, nothing created
    missing = tmp_path / "nowhere"
    assert guarded("ugi-bids", lambda: group.run_group(config_for(bids, missing))) == 18
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "does not exist" in err
    assert not missing.exists()


def test_no_results_for_the_selected_participants(dataset):
    bids, out = dataset
    with pytest.raises(NoDataError, match="participant"):
        group.run_group(config_for(bids, out, participant_label=["05"]))
    assert not list(out.glob("group_*"))


def test_label_columns_are_unique_and_stable():
    assert group.label_columns({3: "b", 1: "a", 2: "a", 4: "", 5: "participant_id",
                                6: "a_1"}) == ["a_1", "a_2", "b", "label_4",
                                               "participant_id_5", "a_1_6"]


# --------------------------------------------------------------------------- the command line

def _wired() -> bool:
    from ugi_bids.cli import run

    return "run_group" in inspect.getsource(run)


@pytest.mark.skipif(not _wired(), reason="ugi_bids.cli.run does not call run_group yet")
def test_group_level_through_the_command_line(dataset, tmp_path, monkeypatch, capsys):
    from ugi_bids.cli.run import main

    bids, out = dataset
    monkeypatch.chdir(tmp_path)
    assert main([str(bids), str(out), "group"]) == 0
    assert read(out / "group_registrations.tsv").shape == (6, 11)
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main([str(bids), str(empty), "group"]) == 18
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert list(empty.iterdir()) == []
