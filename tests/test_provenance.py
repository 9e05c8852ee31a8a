"""dataset_description.json, .bidsignore, crash folders and the citation boilerplate (fast)."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow

from ugi_bids.utils import provenance as prov

VERSION = "0.1.0"


@pytest.fixture()
def bids_dir(tmp_path) -> Path:
    root = tmp_path / "ds000001"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({
        "Name": "Example", "BIDSVersion": "1.8.0", "License": "CC0",
        "DatasetDOI": "10.18112/openneuro.ds000001.v1.0.0"}))
    return root


@pytest.fixture()
def output_dir(bids_dir) -> Path:
    return bids_dir / "derivatives" / "ugi-bids"


def _write(output_dir: Path, bids_dir: Path, **kwargs) -> dict:
    kwargs.setdefault("container", {})
    path = prov.write_dataset_description(output_dir, bids_dir=bids_dir, version=VERSION,
                                          **kwargs)
    assert path == output_dir / "dataset_description.json"
    return json.loads(path.read_text())  # valid JSON


# -- dataset_description.json --------------------------------------------------------------

def test_dataset_description_required_content(output_dir, bids_dir):
    desc = _write(output_dir, bids_dir)
    assert {"Name", "BIDSVersion", "DatasetType", "GeneratedBy"} <= set(desc)
    assert desc["DatasetType"] == "derivative"
    assert desc["BIDSVersion"] == prov.BIDS_VERSION
    assert isinstance(desc["GeneratedBy"], list) and len(desc["GeneratedBy"]) == 1
    generated = desc["GeneratedBy"][0]
    assert generated["Name"] == "ugi-bids" and generated["Version"] == VERSION
    assert "Container" not in generated
    assert generated["Name"] in output_dir.name


def test_dataset_description_links_and_sources(output_dir, bids_dir):
    desc = _write(output_dir, bids_dir)
    assert desc["SourceDatasets"] == [
        {"URL": "bids:raw:", "DOI": "doi:10.18112/openneuro.ds000001.v1.0.0"}]
    assert desc["DatasetLinks"] == {"raw": bids_dir.absolute().as_uri(),
                                    "templateflow": prov.TEMPLATEFLOW_URL}
    assert desc["DatasetLinks"]["raw"].startswith("file:///")
    assert desc["License"] == "CC0"


def test_dataset_description_local_templateflow_and_code_url(output_dir, bids_dir, tmp_path):
    home = tmp_path / "templateflow"
    desc = _write(output_dir, bids_dir, templateflow_home=home,
                  code_url="https://example.org/ugi-bids")
    assert desc["DatasetLinks"]["templateflow"] == home.absolute().as_uri()
    assert desc["GeneratedBy"][0]["CodeURL"] == "https://example.org/ugi-bids"


def test_dataset_description_explicit_container(output_dir, bids_dir):
    container = {"Type": "docker", "Tag": "example/ugi-bids:0.1.0"}
    desc = _write(output_dir, bids_dir, container=container)
    assert desc["GeneratedBy"][0]["Container"] == container


def test_dataset_description_detected_container(output_dir, bids_dir, monkeypatch):
    monkeypatch.setattr(prov, "detect_container",
                        lambda version: {"Type": "apptainer", "Tag": version})
    desc = _write(output_dir, bids_dir, container=None)
    assert desc["GeneratedBy"][0]["Container"] == {"Type": "apptainer", "Tag": VERSION}


@pytest.mark.parametrize("doi", ["10.1/x", "doi:10.1/x", "https://doi.org/10.1/x"])
def test_doi_normalised(output_dir, bids_dir, doi):
    (bids_dir / "dataset_description.json").write_text(json.dumps({"DatasetDOI": doi}))
    assert _write(output_dir, bids_dir)["SourceDatasets"] == [{"URL": "bids:raw:",
                                                               "DOI": "doi:10.1/x"}]


def test_raw_without_or_with_broken_description(output_dir, bids_dir, caplog):
    (bids_dir / "dataset_description.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="ugi_bids.provenance"):
        desc = _write(output_dir, bids_dir)
    assert desc["SourceDatasets"] == [{"URL": "bids:raw:"}] and "License" not in desc
    assert "unreadable" in caplog.text
    (bids_dir / "dataset_description.json").unlink()
    assert _write(output_dir, bids_dir)["SourceDatasets"] == [{"URL": "bids:raw:"}]


@pytest.mark.parametrize("name, warns", [("ugi-bids", False), ("ugi-bids-sloppy", False),
                                          ("my-ugi-bids-run", False), ("registrations", True)])
def test_output_folder_name_rule(bids_dir, caplog, name, warns):
    output_dir = bids_dir / "derivatives" / name
    with caplog.at_level(logging.WARNING, logger="ugi_bids.provenance"):
        desc = _write(output_dir, bids_dir)
    assert ("does not contain the pipeline name" in caplog.text) is warns
    assert desc["GeneratedBy"][0]["Name"] == "ugi-bids"  # written (and valid) either way


def test_version_change_warns(output_dir, bids_dir, caplog):
    prov.write_dataset_description(output_dir, bids_dir=bids_dir, version="0.0.9", container={})
    with caplog.at_level(logging.WARNING, logger="ugi_bids.provenance"):
        _write(output_dir, bids_dir)
    assert "0.0.9" in caplog.text


def test_atomic_write_leaves_no_temporaries(output_dir, bids_dir):
    _write(output_dir, bids_dir)
    _write(output_dir, bids_dir)
    assert sorted(p.name for p in output_dir.iterdir()) == ["dataset_description.json"]
    mode = stat.S_IMODE((output_dir / "dataset_description.json").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


@pytest.mark.parametrize("environ, dockerenv, expected", [
    ({}, False, None),
    ({"APPTAINER_CONTAINER": "/x.sif", "SINGULARITY_CONTAINER": "/x.sif"}, True, "apptainer"),
    ({"SINGULARITY_CONTAINER": "/x.sif"}, False, "singularity"),
    ({}, True, "docker"),
    ({"CH_RUNNING": "Weird Al Yankovic"}, False, "charliecloud"),
    ({"container": "podman"}, False, "podman"),
])
def test_detect_container(tmp_path, environ, dockerenv, expected):
    marker = tmp_path / ".dockerenv"
    if dockerenv:
        marker.touch()
    found = prov.detect_container(VERSION, environ=environ, dockerenv=marker)
    if expected is None:
        assert found is None
    else:
        assert found == {"Type": expected, "Tag": VERSION}


def test_detect_container_tag_from_environment(tmp_path):
    marker = tmp_path / ".dockerenv"
    marker.touch()
    found = prov.detect_container(VERSION, environ={prov.CONTAINER_TAG_ENV: "org/ugi-bids:1.2"},
                                  dockerenv=marker)
    assert found == {"Type": "docker", "Tag": "org/ugi-bids:1.2"}


# -- .bidsignore and crash folders ---------------------------------------------------------

def test_bidsignore_new(tmp_path):
    path = prov.write_bidsignore(tmp_path)
    lines = path.read_text().splitlines()
    assert {"*.html", "logs/", "figures/", "*_xfm.*"} <= set(lines)
    assert len(lines) == len(set(lines))


def test_bidsignore_merges_without_duplicates(tmp_path):
    (tmp_path / ".bidsignore").write_text("# user entries\ncustom/\n*.html\n")
    prov.write_bidsignore(tmp_path, extra=["extra/"])
    prov.write_bidsignore(tmp_path, extra=["extra/"])
    lines = (tmp_path / ".bidsignore").read_text().splitlines()
    assert lines[:3] == ["# user entries", "custom/", "*.html"]
    assert lines.count("*.html") == 1 and lines.count("extra/") == 1
    assert set(prov.BIDSIGNORE_ENTRIES) <= set(lines)


def test_crash_dir(tmp_path):
    run_uuid = "20240101-000000_abc"
    assert prov.crash_dir(tmp_path, "01", run_uuid) == tmp_path / "sub-01" / "log" / run_uuid
    made = prov.crash_dir(tmp_path, "sub-02", run_uuid, create=True)
    assert made == tmp_path / "sub-02" / "log" / run_uuid and made.is_dir()


# -- boilerplate ---------------------------------------------------------------------------

def _literate(name: str, desc: str | None = None, postdesc: str | None = None):
    workflow = LiterateWorkflow(name=name)
    workflow.__desc__ = desc
    workflow.__postdesc__ = postdesc
    workflow.add_nodes([pe.Node(niu.IdentityInterface(fields=["x"]), name="inputnode")])
    return workflow


def _nested_workflow():
    top = _literate("top", "Top paragraph [@unigradicon].", "Closing.")
    first = _literate("first", "\n    First step [@templateflow].\n")
    second = _literate("second", "Second step.")
    repeat = _literate("repeat", "First step [@templateflow].")  # same text: appears once
    inner = _literate("inner", "Inner detail.")
    second.add_nodes([inner])
    top.connect(first, "inputnode.x", second, "inputnode.x")
    top.connect(second, "inputnode.x", repeat, "inputnode.x")
    return top


def test_collect_boilerplate_order_and_deduplication():
    text = prov.collect_boilerplate(_nested_workflow())
    assert text == ("Top paragraph [@unigradicon].\n\nFirst step [@templateflow].\n\n"
                    "Second step.\n\nInner detail.\n\nClosing.\n")


def test_collect_boilerplate_matches_niworkflows_fragments():
    workflow = _nested_workflow()
    ours = [part for part in prov.collect_boilerplate(workflow).split("\n\n") if part.strip()]
    theirs = workflow.visit_desc()
    positions = [theirs.index(part.strip()) for part in ours]
    assert positions == sorted(positions)


def test_collect_boilerplate_plain_nipype_workflow():
    top = pe.Workflow(name="plain")
    top.__desc__ = "Plain description."
    child = pe.Workflow(name="child")
    child.__desc__ = "Child description."
    child.add_nodes([pe.Node(niu.IdentityInterface(fields=["x"]), name="n")])
    top.add_nodes([child])
    assert prov.collect_boilerplate(top) == "Plain description.\n\nChild description.\n"
    assert prov.collect_boilerplate(pe.Workflow(name="empty")) == ""


def test_bibliography_has_the_entries_we_cite():
    bib = prov.load_boilerplate_bib()
    keys = prov.bib_keys(bib)
    assert {"unigradicon", "multigradicon", "gradicon", "nipype1", "nipype2", "niworkflows",
            "templateflow", "mni152nlin2009casym", "fonov2011", "itk", "pytorch", "pybids",
            "mindssc", "bids"} <= keys
    assert bib.count("{") == bib.count("}")
    assert bib.count("\n@") + 1 == len(keys)  # one entry per key, no duplicate keys
    preamble = prov.boilerplate_preamble(VERSION, "1.11.0") + prov.boilerplate_postamble()
    assert prov.cited_keys(preamble) and not prov.missing_citations(preamble)


def test_cited_keys_ignore_emails():
    text = "See [@gradicon; @nipype1] and @pybids. Mail someone@example.org."
    assert prov.cited_keys(text) == {"gradicon", "nipype1", "pybids"}


@pytest.fixture()
def no_pandoc(tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


FAKE_PANDOC = """#!/bin/sh
out=""
while [ $# -gt 0 ]; do
  if [ "$1" = "-o" ]; then out="$2"; fi
  shift
done
{exit}
echo "converted" > "$out"
"""


def _fake_pandoc(tmp_path, monkeypatch, fail: bool = False) -> None:
    bindir = tmp_path / "fake-bin"
    bindir.mkdir()
    script = bindir / "pandoc"
    script.write_text(FAKE_PANDOC.replace("{exit}", "exit 3" if fail else ""))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")


def test_citation_files_without_pandoc(tmp_path, no_pandoc):
    markdown = prov.boilerplate_preamble(VERSION, "1.11.0")
    written = prov.write_citation_files(tmp_path, markdown)
    assert set(written) == {"md", "bib"}
    assert (tmp_path / "logs" / "CITATION.md").read_text() == markdown
    assert (tmp_path / "logs" / "CITATION.bib").read_text() == prov.load_boilerplate_bib()
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["CITATION.bib",
                                                                     "CITATION.md"]


def test_citation_files_with_pandoc(tmp_path, monkeypatch):
    _fake_pandoc(tmp_path, monkeypatch)
    written = prov.write_citation_files(tmp_path / "out", "Text [@itk].\n", "@misc{itk,\n}\n")
    assert set(written) == {"md", "bib", "html", "tex"}
    assert (tmp_path / "out" / "logs" / "CITATION.html").read_text() == "converted\n"
    assert (tmp_path / "out" / "logs" / "CITATION.bib").read_text() == "@misc{itk,\n}\n"


def test_citation_files_with_failing_pandoc(tmp_path, monkeypatch, caplog):
    _fake_pandoc(tmp_path, monkeypatch, fail=True)
    with caplog.at_level(logging.WARNING, logger="ugi_bids.provenance"):
        written = prov.write_citation_files(tmp_path / "out", "Text [@nope].\n")
    assert set(written) == {"md", "bib"}
    assert sorted(p.name for p in (tmp_path / "out" / "logs").iterdir()) == ["CITATION.bib",
                                                                             "CITATION.md"]
    assert "nope" in caplog.text and "pandoc" in caplog.text
