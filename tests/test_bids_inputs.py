"""BIDS input selection (ugi_bids.utils.bids) on a tiny real-image dataset: layout, participants,
sessions, suffixes, --bids-filter-file semantics, reference selection, BIDS URIs."""

from __future__ import annotations

import itertools
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("bids")  # pybids

from tests.bidsdata import make_bids_dataset
from ugi_bids import errors
from ugi_bids.utils import bids as ub


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_bids_dataset(tmp_path_factory.mktemp("ds") / "bids")


@pytest.fixture(scope="module")
def layout(dataset):
    return ub.load_layout(dataset["bids_dir"])


@pytest.fixture
def acq_dataset(tmp_path, dataset):
    """A copy of the dataset where sub-02 also has an ``acq-lowres`` T1w."""
    root = tmp_path / "bids"
    shutil.copytree(dataset["bids_dir"], root)
    anat = root / "sub-02" / "anat"
    shutil.copy(anat / "sub-02_T1w.nii.gz", anat / "sub-02_acq-lowres_T1w.nii.gz")
    return root


@pytest.fixture
def part_dataset(tmp_path, dataset):
    """A copy of the dataset where sub-01's ses-1 T1w is a magnitude/phase pair (``part-mag``,
    ``part-phase``) and ses-2 holds only phase images."""
    root = tmp_path / "bids"
    shutil.copytree(dataset["bids_dir"], root)
    ses1, ses2 = root / "sub-01" / "ses-1" / "anat", root / "sub-01" / "ses-2" / "anat"
    (ses1 / "sub-01_ses-1_T1w.nii.gz").rename(ses1 / "sub-01_ses-1_part-mag_T1w.nii.gz")
    shutil.copy(ses1 / "sub-01_ses-1_part-mag_T1w.nii.gz",
                ses1 / "sub-01_ses-1_part-phase_T1w.nii.gz")
    for run in (1, 2):
        (ses2 / f"sub-01_ses-2_run-{run}_T1w.nii.gz").rename(
            ses2 / f"sub-01_ses-2_run-{run}_part-phase_T1w.nii.gz")
    return root


def _names(files):
    return [f.rsplit("/", 1)[-1] for f in files]


def _assert_one_line(error):
    assert "\n" not in str(error) and str(error)


# ---------------------------------------------------------------- the test data themselves

def test_dataset_geometry_variety(dataset):
    lps = nib.load(dataset["sub-01_ses-1_T1w"])
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    oblique = nib.load(dataset["sub-01_ses-2_run-1_T1w"])
    rotation = oblique.affine[:3, :3] / np.linalg.norm(oblique.affine[:3, :3], axis=0)
    assert np.abs(rotation - np.diag(np.diag(rotation))).max() > 0.1  # not axis-aligned
    assert np.allclose(sorted(oblique.header.get_zooms()), [3.0, 3.0, 4.5])
    assert nib.aff2axcodes(nib.load(dataset["sub-02_T1w"]).affine) == ("P", "I", "R")
    for key in ("sub-01_ses-1_T1w", "sub-02_T1w"):
        assert json.loads(dataset[key].with_name(dataset[key].name.replace(".nii.gz", ".json"))
                          .read_text())["RepetitionTime"] > 0


# ---------------------------------------------------------------- layout

def test_layout_indexes_the_dataset(layout):
    assert layout.get_subjects() == ["01", "02"]
    assert layout.get_sessions(subject="01") == ["1", "2"]


def test_not_a_bids_dataset_exit_16_unless_validation_skipped(tmp_path):
    folder = tmp_path / "notbids"
    (folder / "sub-01" / "anat").mkdir(parents=True)
    (folder / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(b"")
    with pytest.raises(errors.BIDSValidationError) as info:
        ub.load_layout(folder)
    assert info.value.exit_code == 16
    _assert_one_line(info.value)
    assert "dataset_description.json" in str(info.value)
    assert "--skip-bids-validation" in str(info.value)
    assert ub.load_layout(folder, validate=False).get_subjects() == ["01"]


def test_missing_bids_dir_exit_66(tmp_path):
    with pytest.raises(errors.MissingInputError) as info:
        ub.load_layout(tmp_path / "absent")
    assert info.value.exit_code == 66
    _assert_one_line(info.value)


def test_database_dir_is_reused_and_rebuilt_for_another_dataset(tmp_path, dataset, acq_dataset):
    database = tmp_path / "db"
    first = ub.load_layout(dataset["bids_dir"], database_dir=database)
    assert any(database.iterdir())
    again = ub.load_layout(dataset["bids_dir"], database_dir=database)
    assert again.get_subjects() == first.get_subjects()
    other = ub.load_layout(acq_dataset, database_dir=database)
    assert str(other.root) == str(acq_dataset)
    assert "sub-02_acq-lowres_T1w.nii.gz" in _names(other.get(subject="02", return_type="file"))


# ---------------------------------------------------------------- participants and sessions

def test_participants_with_and_without_prefix(layout):
    assert ub.participants(layout, []) == ["01", "02"]
    assert ub.participants(layout, ["sub-02", "01", "02"]) == ["02", "01"]


def test_dataset_without_participants_exit_66(tmp_path, dataset):
    root = tmp_path / "empty"
    root.mkdir()
    shutil.copy(dataset["bids_dir"] / "dataset_description.json", root)
    with pytest.raises(errors.MissingInputError) as info:
        ub.participants(ub.load_layout(root))
    assert info.value.exit_code == 66
    _assert_one_line(info.value)
    assert "no participants" in str(info.value)


def test_unknown_participant_exit_18(layout):
    with pytest.raises(errors.NoDataError) as info:
        ub.participants(layout, ["01", "sub-03", "04"])
    error = info.value
    assert error.exit_code == 18
    _assert_one_line(error)
    assert "03, 04" in str(error) and "available: 01, 02" in str(error)


def test_sessions(layout, dataset):
    found = ub.collect_anatomicals(layout, "01")
    assert list(found) == ["1", "2"]
    assert _names(found["1"]["T1w"]) == ["sub-01_ses-1_T1w.nii.gz"]
    assert _names(found["2"]["T1w"]) == ["sub-01_ses-2_run-1_T1w.nii.gz",
                                         "sub-01_ses-2_run-2_T1w.nii.gz"]
    assert found["1"]["T1w"] == [str(dataset["sub-01_ses-1_T1w"])]
    assert list(ub.collect_anatomicals(layout, "sub-01", sessions=["ses-2"])) == ["2"]
    assert ub.collect_anatomicals(layout, "01", sessions=["3"]) == {}


def test_participant_without_sessions(layout):
    found = ub.collect_anatomicals(layout, "02")
    assert list(found) == [None]
    assert _names(found[None]["T1w"]) == ["sub-02_T1w.nii.gz"]
    assert ub.collect_anatomicals(layout, "02", sessions=["1"]) == {}


def test_absent_suffix_is_an_empty_entry(layout):
    found = ub.collect_anatomicals(layout, "02", suffixes=("T1w", "T2w"))
    assert found[None]["T2w"] == []
    assert _names(found[None]["T1w"]) == ["sub-02_T1w.nii.gz"]
    assert ub.has_images(found) is True
    only_t2 = ub.collect_anatomicals(layout, "01", suffixes=("T2w",))
    assert only_t2 == {"1": {"T2w": []}, "2": {"T2w": []}}
    assert ub.has_images(only_t2) is False and ub.has_images(only_t2["1"]) is False


def test_queries_are_the_filter_queries_and_skip_phase_images():
    from ugi_bids.cli.parser import FILTER_QUERIES

    assert {name: query["suffix"] for name, query in ub.ANAT_QUERIES.items()} == FILTER_QUERIES
    for query in ub.ANAT_QUERIES.values():
        assert query["datatype"] == "anat" and query["part"] == ["mag", None]


def test_magnitude_chosen_and_phase_only_session_yields_no_image(part_dataset, tmp_path, caplog):
    layout = ub.load_layout(part_dataset)
    found = ub.collect_anatomicals(layout, "01")
    assert _names(found["1"]["T1w"]) == ["sub-01_ses-1_part-mag_T1w.nii.gz"]
    assert found["2"]["T1w"] == []
    assert ub.has_images(found["2"]) is False
    # a filter entry overrides the query's, as in fMRIPrep: here, every part
    every = ub.collect_anatomicals(layout, "01", filters={"t1w": {"part": "*"}})
    assert _names(every["2"]["T1w"]) == ["sub-01_ses-2_run-1_part-phase_T1w.nii.gz",
                                         "sub-01_ses-2_run-2_part-phase_T1w.nii.gz"]
    # through the app: the phase-only session is reported and skipped, never registered
    from ugi_bids.cli.run import select_inputs
    from ugi_bids.config import Config

    with caplog.at_level("WARNING"):
        selected = select_inputs(Config(bids_dir=part_dataset, output_dir=tmp_path / "out",
                                        participant_label=["01"]))
    assert selected == {"01": {"1": {"T1w": str(part_dataset / "sub-01" / "ses-1" / "anat"
                                                 / "sub-01_ses-1_part-mag_T1w.nii.gz")}}}
    assert "sub-01 ses-2: no usable T1w image" in caplog.text


# ---------------------------------------------------------------- filters

def test_filter_star_means_entity_present(layout):
    found = ub.collect_anatomicals(layout, "01", filters={"t1w": {"run": "*"}})
    assert found["1"]["T1w"] == []
    assert len(found["2"]["T1w"]) == 2


def test_filter_null_means_entity_absent(layout):
    found = ub.collect_anatomicals(layout, "01", filters={"t1w": {"run": None}})
    assert _names(found["1"]["T1w"]) == ["sub-01_ses-1_T1w.nii.gz"]
    assert found["2"]["T1w"] == []


def test_filter_values_lists_and_session_narrowing(layout):
    found = ub.collect_anatomicals(layout, "01", filters={"t1w": {"run": 2}})
    assert _names(found["2"]["T1w"]) == ["sub-01_ses-2_run-2_T1w.nii.gz"]
    found = ub.collect_anatomicals(layout, "01", filters={"t1w": {"run": [1, 2]}})
    assert len(found["2"]["T1w"]) == 2
    for session in ("1", "ses-1", ["1"], ["1", "3"]):
        found = ub.collect_anatomicals(layout, "01", filters={"t1w": {"session": session}})
        assert _names(found["1"]["T1w"]) == ["sub-01_ses-1_T1w.nii.gz"]
        assert found["2"]["T1w"] == []
    # a filter naming another participant or session selects nothing there (no error)
    assert ub.collect_anatomicals(layout, "01", filters={"t1w": {"subject": "sub-02"}}
                                  ) == {"1": {"T1w": []}, "2": {"T1w": []}}
    assert ub.collect_anatomicals(layout, "01", sessions=["2"],
                                  filters={"t1w": {"session": "1"}}) == {"2": {"T1w": []}}
    found = ub.collect_anatomicals(layout, "02", filters={"t1w": {"session": None}})
    assert _names(found[None]["T1w"]) == ["sub-02_T1w.nii.gz"]
    assert ub.collect_anatomicals(layout, "02", filters={"t1w": {"session": "*"}}
                                  )[None]["T1w"] == []
    # already-normalized filters are accepted as they are
    normalized = ub.normalize_filters({"t1w": {"run": "*"}})
    assert ub.collect_anatomicals(layout, "01", filters=normalized)["1"]["T1w"] == []


def test_filter_keys_case_aliases_and_foreign_queries(acq_dataset):
    layout = ub.load_layout(acq_dataset)
    both = ub.collect_anatomicals(layout, "02")[None]["T1w"]
    assert _names(both) == ["sub-02_T1w.nii.gz", "sub-02_acq-lowres_T1w.nii.gz"]
    plain = ub.collect_anatomicals(layout, "02", filters={"T1w": {"acq": None},
                                                          "bold": {"task": "rest"}})
    assert _names(plain[None]["T1w"]) == ["sub-02_T1w.nii.gz"]
    acq = ub.collect_anatomicals(layout, "02", filters={"t1w": {"acquisition": "*"}})
    assert _names(acq[None]["T1w"]) == ["sub-02_acq-lowres_T1w.nii.gz"]
    # filters apply per query name: a t2w filter leaves t1w alone
    assert ub.collect_anatomicals(layout, "02", filters={"t2w": {"acquisition": None}}
                                  )[None]["T1w"] == both
    assert ub.select_reference(both).endswith("sub-02_T1w.nii.gz")


def test_bad_filters_are_usage_errors(layout):
    with pytest.raises(errors.BIDSFilterError) as info:
        ub.collect_anatomicals(layout, "01", filters={"t1w": {"colour": "red"}})
    assert info.value.exit_code == 2
    _assert_one_line(info.value)
    assert "colour" in str(info.value)
    with pytest.raises(errors.BIDSFilterError):
        ub.normalize_filters({"t1w": ["run", 1]})
    with pytest.raises(errors.BIDSFilterError):
        ub.normalize_filters({"t1w": {"run": {"nested": 1}}})
    # the error names the query whose filter is wrong
    with pytest.raises(errors.BIDSFilterError) as info:
        ub.collect_anatomicals(layout, "01", suffixes=("T1w", "T2w"),
                               filters={"t1w": {"run": 1}, "t2w": {"colour": "red"}})
    assert str(info.value).startswith("BIDS filter for 't2w': unknown entity 'colour'; use one of ")
    assert "invalid_filters" not in str(info.value)


def test_short_entity_names_are_pybids_names(layout):
    assert ub.normalize_filters({"t1w": {"acq": "a", "rec": "b", "ce": "c", "dir": "d",
                                         "mod": "e", "inv": 1, "part": "mag"}}) == {
        "t1w": {"acquisition": "a", "reconstruction": "b", "ceagent": "c", "direction": "d",
                "modality": "e", "inv": 1, "part": "mag"}}
    found = ub.collect_anatomicals(layout, "01", filters={"t1w": {"inv": None, "run": 1}})
    assert _names(found["2"]["T1w"]) == ["sub-01_ses-2_run-1_T1w.nii.gz"]


def test_load_bids_filters(tmp_path):
    from bids.layout import Query

    from ugi_bids.cli.parser import load_bids_filters

    good = tmp_path / "filter.json"
    good.write_text(json.dumps({"t1w": {"reconstruction": None, "run": "*"}}))
    data = load_bids_filters(str(good))
    assert data == {"t1w": {"reconstruction": None, "run": "*"}}
    assert ub.normalize_filters(data) == {"t1w": {"reconstruction": Query.NONE, "run": Query.ANY}}
    with pytest.raises(errors.MissingInputError) as info:
        load_bids_filters(str(tmp_path / "absent.json"))
    assert info.value.exit_code == 66
    bad = tmp_path / "bad.json"
    bad.write_text("{t1w: }")
    with pytest.raises(errors.UsageError) as info:
        load_bids_filters(str(bad))
    assert info.value.exit_code == 2
    _assert_one_line(info.value)


# ---------------------------------------------------------------- reference rule and URIs

def test_select_reference_rule():
    runs = ["/d/sub-01_run-10_T1w.nii.gz", "/d/sub-01_run-2_T1w.nii.gz",
            "/d/sub-01_run-3_T1w.nii.gz"]
    for order in itertools.permutations(runs):
        assert ub.select_reference(list(order)) == "/d/sub-01_run-2_T1w.nii.gz"  # numeric order
    assert ub.select_reference(["/d/sub-01_run-1_T1w.nii.gz", "/d/sub-01_T1w.nii.gz"]
                               ) == "/d/sub-01_T1w.nii.gz"  # no run counts as 0
    ties = ["/d/sub-01_acq-b_run-1_T1w.nii.gz", "/d/sub-01_acq-a_run-1_T1w.nii.gz"]
    assert ub.select_reference(ties) == "/d/sub-01_acq-a_run-1_T1w.nii.gz"
    assert ub.select_reference(["/d/sub-01_run-02_T1w.nii"]) == "/d/sub-01_run-02_T1w.nii"
    assert ub.run_index("sub-01_ses-2_run-07_T1w.nii.gz") == 7
    with pytest.raises(ValueError):
        ub.select_reference([])
    assert "lowest run index" in ub.REFERENCE_RULE and "{" not in ub.REFERENCE_RULE


def test_select_reference_on_the_dataset(layout):
    runs = ub.collect_anatomicals(layout, "01")["2"]["T1w"]
    assert ub.select_reference(list(reversed(runs))).endswith("sub-01_ses-2_run-1_T1w.nii.gz")


def test_bids_uri(dataset, tmp_path):
    bids_dir = dataset["bids_dir"]
    path = dataset["sub-01_ses-2_run-1_T1w"]
    assert ub.bids_uri(path, bids_dir) == "bids:raw:sub-01/ses-2/anat/sub-01_ses-2_run-1_T1w.nii.gz"
    assert ub.bids_uri(str(path), str(bids_dir), dataset="in").startswith("bids:in:sub-01/")
    link = tmp_path / "linked"
    link.symlink_to(bids_dir, target_is_directory=True)
    assert ub.bids_uri(path, link) == "bids:raw:sub-01/ses-2/anat/sub-01_ses-2_run-1_T1w.nii.gz"
    with pytest.raises(ValueError):
        ub.bids_uri(tmp_path / "elsewhere.nii.gz", bids_dir)
