"""The settings of a run as TOML (``ugi_bids.config``): sections, the round trip through
``--config-file``, the ``ugi-bids.toml`` every run writes per participant, and
``--clean-workdir``. Fast: parsing and one tiny in-process Nipype run (no registration)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import types
from pathlib import Path

import pytest

import ugi_bids
import ugi_bids.utils
from ugi_bids import config as config_module
from ugi_bids.cli import parser as cli
from ugi_bids.cli import run as cli_run
from ugi_bids.config import SECTIONS, Config, SpaceSpec, read_settings
from ugi_bids.errors import UsageError


class StandInTemplates(types.ModuleType):
    """Stand-in for ``ugi_bids.utils.templates``' parsing (its TemplateFlow look-ups are slow
    and tested in its own tests): ``NAME[:cohort-X][:res-N]`` and ``NAME=PATH[,mask=PATH]``."""

    def __init__(self):
        super().__init__("ugi_bids.utils.templates")

    @staticmethod
    def parse_output_spaces(values: list[str]) -> list[SpaceSpec]:
        specs = []
        for value in values:
            name, *parts = value.split(":")
            fields = dict(part.split("-", 1) for part in parts)
            specs.append(SpaceSpec(name, resolution=fields.get("res"), cohort=fields.get("cohort")))
        return specs

    @staticmethod
    def parse_custom_template(value: str) -> SpaceSpec:
        name, rest = value.split("=", 1)
        path, *options = rest.split(",")
        mask = dict(option.split("=", 1) for option in options).get("mask")
        return SpaceSpec(name, path=Path(path), mask=Path(mask) if mask else None)


@pytest.fixture(autouse=True)
def templates(monkeypatch):
    stand_in = StandInTemplates()
    monkeypatch.setitem(sys.modules, "ugi_bids.utils.templates", stand_in)
    monkeypatch.setattr(ugi_bids.utils, "templates", stand_in, raising=False)


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    """The current directory, holding a minimal BIDS dataset ``bids/``, a custom template
    and a weights file."""
    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    for name in ("tpl.nii.gz", "mask.nii.gz", "w.trch"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "filters.json").write_text('{"t1w": {"acq": "mprage", "rec": null}}')
    (tmp_path / "plugin.yml").write_text("plugin: MultiProc\nplugin_args: {n_procs: 6}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def parse(*options: str) -> Config:
    return cli.parse_args(["bids", "out", "participant", *options])


EVERYTHING = (
    "--participant-label", "01", "02", "--session-label", "A", "--bids-filter-file",
    "filters.json", "--bids-database-dir", "db", "--skip-bids-validation",
    "--anat-suffixes", "T1w", "T2w", "--output-spaces", "MNI152NLin6Asym:res-2",
    "MNIPediatricAsym:cohort-3", "--template", "study=tpl.nii.gz,mask=mask.nii.gz",
    "--model", "multigradicon", "--weights", "w.trch", "--io-iterations", "7",
    "--io-similarity", "mind", "--prealign", "header", "--prealign-dof", "7", "--device", "cpu",
    "--precision", "tf32",
    "--io-checkpointing", "on", "--gpu-procs", "2", "--sloppy", "--nprocs", "8",
    "--omp-nthreads", "2", "--mem", "12G", "--use-plugin", "plugin.yml", "-w", "scratch",
    "--clean-workdir", "--stop-on-first-crash", "--resource-monitor", "--boilerplate-only",
    "--notrack", "-vv", "--longitudinal", "--template-iterations", "2",
    "--template-gradient-step", "0.5", "--template-average", "median")


def test_every_field_is_in_one_section():
    keys = [key for section in SECTIONS.values() for key in section]
    assert len(keys) == len(set(keys))
    fields = {f.name for f in dataclasses.fields(Config)}
    assert set(keys) == fields | {"templates"}
    assert list(SECTIONS) == ["execution", "workflow", "nipype"]
    assert {"run_uuid", "verbose", "work_dir", "bids_dir"} <= set(SECTIONS["execution"])
    assert {"output_spaces", "templates", "model", "weights", "io_iterations",
            "prealign", "prealign_dof", "sloppy", "subject_anatomical_reference", "template_iterations",
            "template_gradient_step", "template_average",
            "build_template"} <= set(SECTIONS["workflow"])
    assert set(SECTIONS["nipype"]) == {"nprocs", "omp_nthreads", "mem_gb", "plugin",
                                       "gpu_procs", "device"}


def test_toml_round_trip(site):
    config = parse(*EVERYTHING)
    text = config.to_toml({"version": "0.1.0", "weights": site / "cache" / "w.trch"})
    tables = config_module.tomllib.loads(text)
    assert list(tables) == ["execution", "workflow", "nipype", "environment"]
    assert tables["workflow"]["output_spaces"] == ["MNI152NLin6Asym:res-2",
                                                   "MNIPediatricAsym:cohort-3"]
    assert tables["workflow"]["templates"] == [
        f"study={site / 'tpl.nii.gz'},mask={site / 'mask.nii.gz'}"]
    assert tables["nipype"]["plugin"] == {"plugin": "MultiProc", "plugin_args": {"n_procs": 6}}
    # TOML has no null: a filter that needs one is written as JSON text
    assert tables["execution"]["bids_filters"] == '{"t1w": {"acq": "mprage", "rec": null}}'
    assert tables["environment"] == {"version": "0.1.0", "weights": str(site / "cache/w.trch")}
    assert {key: tables["workflow"][key] for key in (
        "subject_anatomical_reference", "template_iterations", "template_gradient_step",
        "template_average")} == {"subject_anatomical_reference": "unbiased",
                                 "template_iterations": 2, "template_gradient_step": 0.5,
                                 "template_average": "median"}
    assert tables["workflow"]["prealign_dof"] == 7 and config.prealign_dof == 7
    assert Config.from_toml(text) == config
    default = parse()
    assert Config.from_toml(default.to_toml()) == default
    written = config_module.tomllib.loads(default.to_toml())["workflow"]
    assert "weights" not in written and "build_template" not in written  # None: left out
    assert (written["subject_anatomical_reference"], written["template_iterations"],
            written["template_gradient_step"], written["template_average"]) == \
        ("sessionwise", 4, 0.25, "mean")
    assert written["prealign_dof"] == 12 and default.prealign_dof == 12


def test_toml_round_trip_of_a_study_template(site):
    """``--build-template`` (group level) is written in [workflow] and read back; the file is
    a valid --config-file for the group level, and the participant level refuses it."""
    config = cli.parse_args(["bids", "out", "group", "--build-template", "Study7",
                             "--template-iterations", "6", "--template-gradient-step", "1",
                             "--template-average", "median"])
    text = config.to_toml()
    workflow = config_module.tomllib.loads(text)["workflow"]
    assert (workflow["build_template"], workflow["template_iterations"],
            workflow["template_gradient_step"], workflow["template_average"]) == \
        ("Study7", 6, 1.0, "median")
    assert Config.from_toml(text) == config
    (site / "run.toml").write_text(text)
    again = cli.parse_args(["bids", "out", "group", "--config-file", "run.toml"])
    assert dataclasses.replace(again, run_uuid=config.run_uuid) == config
    with pytest.raises(UsageError, match="built at the group level"):
        cli.parse_args(["bids", "out", "participant", "--config-file", "run.toml"])


def test_config_file_reproduces_a_command_line(site):
    """Parse a command line, write its TOML, load it with --config-file and an explicit
    override: the same Config but for the override and the new run's id."""
    first = parse(*EVERYTHING)
    (site / "run.toml").write_text(first.to_toml({"version": "0.0.1"}))
    again = parse("--config-file", "run.toml", "--io-iterations", "3")
    assert again.io_iterations == 3 and again.run_uuid != first.run_uuid
    assert dataclasses.replace(again, io_iterations=7, run_uuid=first.run_uuid) == first


def test_config_file_from_another_folder_keeps_absolute_paths(site, tmp_path_factory,
                                                              monkeypatch):
    first = parse("--template", "study=tpl.nii.gz", "-w", "scratch")
    (site / "run.toml").write_text(first.to_toml())
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)
    again = cli.parse_args([str(site / "bids"), str(site / "out"), "participant",
                            "--config-file", str(site / "run.toml")])
    assert again.work_dir == site / "scratch"
    assert again.output_spaces == [SpaceSpec("study", path=site / "tpl.nii.gz")]


def test_record_keys_do_not_break_loading(site):
    text = """\
[execution]
bids_dir = "bids"
output_dir = "out"
run_uuid = "20240101-000000_abc"

[environment]
version = "9.9.9"
weights = "/nowhere/Step_2_final.trch"
anything = {nested = [1, 2]}
"""
    loaded = Config.from_toml(text)
    assert loaded.run_uuid == "20240101-000000_abc" and loaded.weights is None
    assert (loaded.bids_dir, loaded.output_dir) == (site / "bids", site / "out")
    (site / "run.toml").write_text(text)
    parsed = parse("--config-file", "run.toml")
    assert parsed.run_uuid != "20240101-000000_abc"  # a new run, a new id
    assert parsed.weights is None


def test_read_settings_only_what_is_given(site):
    assert read_settings("") == {}
    assert read_settings('[workflow]\nio_iterations = 0\n[nipype]\nmem_gb = 2\n') == {
        "io_iterations": 0, "mem_gb": 2.0}
    assert read_settings("[workflow]\nprealign_dof = 6\n") == {"prealign_dof": 6}
    assert read_settings('[execution]\nparticipant_label = "sub-01"\n') == {
        "participant_label": ["01"]}
    assert read_settings('[workflow]\ntemplate_gradient_step = 1\nbuild_template = "ab1"\n'
                         'subject_anatomical_reference = "unbiased"\n') == {
        "template_gradient_step": 1.0, "build_template": "ab1",
        "subject_anatomical_reference": "unbiased"}


@pytest.mark.parametrize("text, message", [
    ("[execution]\noutput_dir = 'out'\n", "run.toml: [execution] bids_dir is missing"),
    ("[workflow]\nmodel = 'voxelmorph'\n",
     'run.toml: [workflow] model must be one of unigradicon, multigradicon, got "voxelmorph"'),
    ("[execution]\nbids_dir = 3\n", "run.toml: [execution] bids_dir must be a string, got 3"),
    ("[workflow]\ntemplate_iterations = 0\n",
     "run.toml: [workflow] template_iterations must be an integer >= 1, got 0"),
    ("[workflow]\ntemplate_gradient_step = true\n",
     "run.toml: [workflow] template_gradient_step must be a number in (0, 1], got true"),
    ("[workflow]\ntemplate_gradient_step = 1.5\n",
     "run.toml: [workflow] template_gradient_step: must be a number in (0, 1], got 1.5"),
    ("[workflow]\nprealign_dof = 5\n",
     "run.toml: [workflow] prealign_dof must be one of 6, 7, 9, 12, got 5"),
    ("[workflow]\nprealign_dof = 'rigid'\n",
     'run.toml: [workflow] prealign_dof must be one of 6, 7, 9, 12, got "rigid"'),
    ("[workflow]\ntemplate_average = 'max'\n",
     'run.toml: [workflow] template_average must be one of mean, median, got "max"'),
    ("[workflow]\nbuild_template = 'my-template'\n",
     ("run.toml: [workflow] build_template: invalid template name 'my-template': TemplateFlow "
      "template names are letters and digits only (the template is written as tpl-NAME)")),
    ("[execution]\nbids_dir = 'b'\noutput_dir = 'o'\n[workflow]\nbuild_template = 'X'\n",
     ("--build-template X: a study template is built at the group level; run with the analysis "
      "level group (not participant), or leave --build-template (build_template in a "
      "--config-file) out")),
])
def test_from_toml_errors_are_one_line(text, message):
    with pytest.raises(UsageError) as info:
        Config.from_toml(text, source="run.toml")
    assert str(info.value) == message


def test_toml_reader_on_python_310(monkeypatch):
    """On Python 3.10 (no tomllib) the same parser comes from the tomli package."""
    fake = types.ModuleType("tomli")
    monkeypatch.setitem(sys.modules, "tomli", fake)
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    spec = importlib.util.spec_from_file_location("ugi_bids._config_on_310",
                                                  config_module.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    assert module.tomllib is fake


def test_dependencies_declare_the_toml_packages():
    pyproject = Path(ugi_bids.__file__).parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not a source checkout")
    dependencies = config_module.tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    assert 'tomli>=1.1; python_version < "3.11"' in dependencies
    assert "tomli-w>=1.0" in dependencies


# --------------------------------------------------------------------------------------------
# A run writes its settings per participant, then --clean-workdir.


def _step(settings_file: str, marker: str) -> str:
    """A node of the stand-in workflow: records whether the settings were already written."""
    import os

    with open(marker, "w") as handle:
        handle.write("written" if os.path.exists(settings_file) else "missing")
    if "fail" in os.path.basename(marker):
        raise RuntimeError("this step fails on purpose")
    return marker


#: The global Nipype settings ``run()`` changes (restored after each run here).
NIPYPE_OPTIONS = {"execution": ("crashfile_format", "stop_on_first_crash",
                                "remove_unnecessary_outputs", "create_report", "crashdump_dir"),
                  "monitoring": ("enabled",)}


@pytest.fixture
def stand_in_run(site, monkeypatch):
    """``ugi_bids.cli.run.run`` with the data selection, resources and workflow replaced by a
    tiny Nipype workflow (one node per participant) in the real work directory."""
    from nipype import config as nipype_config
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe
    from niworkflows.engine.workflows import LiterateWorkflow

    from ugi_bids.workflows import base

    saved = {section: {option: nipype_config.get(section, option) for option in options}
             for section, options in NIPYPE_OPTIONS.items()}
    markers = site / "markers"
    markers.mkdir()
    participants = {"01": {None: {"T1w": "a.nii.gz"}}, "02": {None: {"T1w": "b.nii.gz"}}}

    def resolve_resources(config):
        config.weights = site / "cache" / "Step_2_final.trch"  # as the real one resolves it
        return {}, [], []

    def init_ugi_wf(config, subjects, templates, use_gpu=False, atlases=(), libraries=()):
        workflow = LiterateWorkflow(name="ugi_bids_test_wf")
        workflow.base_dir = str(config.work_dir)
        workflow.__desc__ = "A stand-in workflow."
        for participant in subjects:
            single = LiterateWorkflow(name=f"sub_{participant}_wf")
            node = pe.Node(niu.Function(function=_step, input_names=["settings_file", "marker"],
                                        output_names=["marker"]), name="step")
            node.inputs.settings_file = str(config.output_dir / f"sub-{participant}" / "log" /
                                            config.run_uuid / "ugi-bids.toml")
            node.inputs.marker = str(markers / f"{stand_in_run_state['marker']}{participant}")
            single.add_nodes([node])
            workflow.add_nodes([single])
        return workflow

    stand_in_run_state = {"marker": "ok-"}
    monkeypatch.setattr(cli_run, "select_inputs", lambda config, skipped=None: participants)
    monkeypatch.setattr(cli_run, "resolve_resources", resolve_resources)
    monkeypatch.setattr(base, "init_ugi_wf", init_ugi_wf)
    yield types.SimpleNamespace(markers=markers, state=stand_in_run_state)
    for section, options in saved.items():  # run() sets Nipype's global configuration
        for option, value in options.items():
            if value is not None:
                nipype_config.set(section, option, value)


def test_run_writes_its_settings_before_the_workflow(site, stand_in_run):
    config = parse("-w", "work", "--nprocs", "1", "--device", "cpu", "--io-iterations", "4")
    assert cli_run.run(config) == 0
    for participant in ("01", "02"):
        assert (stand_in_run.markers / f"ok-{participant}").read_text() == "written"
        path = site / "out" / f"sub-{participant}" / "log" / config.run_uuid / "ugi-bids.toml"
        tables = config_module.tomllib.loads(path.read_text())
        assert tables["environment"]["weights"] == str(site / "cache" / "Step_2_final.trch")
        assert tables["environment"]["device"] == "cpu"
        assert tables["environment"]["version"] == ugi_bids.__version__
        assert "weights" not in tables["workflow"]  # the setting asked for: the cached release
        again = parse("--config-file", str(path))
        assert dataclasses.replace(again, run_uuid=config.run_uuid, weights=config.weights) \
            == config
    assert [p.name for p in (site / "out" / "sub-01" / "log" / config.run_uuid).iterdir()] \
        == ["ugi-bids.toml"]  # atomic: no temporary left
    # without --clean-workdir the work folders stay, for a rerun
    assert sorted(p.name for p in (site / "work" / "ugi_bids_test_wf").iterdir()) == [
        "sub_01_wf", "sub_02_wf"]


def test_clean_workdir_after_success(site, stand_in_run):
    other_run = site / "work" / "ugi_bids_test_wf" / "sub_03_wf"  # a participant run beside
    other_run.mkdir(parents=True)
    (site / "work" / "keep.txt").write_text("mine")
    config = parse("-w", "work", "--nprocs", "1", "--device", "cpu", "--clean-workdir")
    assert cli_run.run(config) == 0
    assert (stand_in_run.markers / "ok-01").read_text() == "written"
    assert sorted(p.name for p in (site / "work" / "ugi_bids_test_wf").iterdir()) == [
        "sub_03_wf"]
    assert (site / "work" / "keep.txt").read_text() == "mine"
    other_run.rmdir()
    config = parse("-w", "work", "--nprocs", "1", "--device", "cpu", "--clean-workdir")
    assert cli_run.run(config) == 0
    assert sorted(p.name for p in (site / "work").iterdir()) == ["keep.txt"]
    assert (site / "out" / "sub-02" / "log" / config.run_uuid / "ugi-bids.toml").is_file()


def test_failed_run_keeps_the_work_dir(site, stand_in_run, capsys):
    stand_in_run.state["marker"] = "fail-"
    config = parse("-w", "work", "--nprocs", "1", "--device", "cpu", "--clean-workdir")
    assert cli_run.run(config) == 1
    err = capsys.readouterr().err
    # one line per failed node: participant, step, cause, crash file
    lines = err.splitlines()
    assert [line.split(" (crash file: ")[0] for line in lines] == [
        f"ugi-bids: error: sub-{label}: step failed: RuntimeError: this step fails on purpose"
        for label in ("01", "02")], err
    assert all(Path(line.split(" (crash file: ")[1].rstrip(")")).is_file() for line in lines)
    assert sorted(p.name for p in (site / "work" / "ugi_bids_test_wf").iterdir()) == [
        "sub_01_wf", "sub_02_wf"]


def test_clean_work_dir_never_leaves_the_work_dir(site):
    outside = site / "precious"
    (outside / "data").mkdir(parents=True)
    top = site / "work" / "top_wf"
    top.mkdir(parents=True)
    (top / "sub_01_wf").symlink_to(outside, target_is_directory=True)  # a link out of -w
    (top / "sub_02_wf" / "out").mkdir(parents=True)  # OUTPUT_DIR inside a run folder
    (top / "sub_03_wf" / "node").mkdir(parents=True)
    config = parse("-w", "work")
    config.output_dir = top / "sub_02_wf" / "out"
    workflow = types.SimpleNamespace(name="top_wf", list_node_names=lambda: [
        "sub_01_wf.a", "sub_02_wf.b", "sub_03_wf.c.d", "sub_04_wf.e"])
    assert cli_run.clean_work_dir(config, workflow) == [top / "sub_03_wf"]
    assert (outside / "data").is_dir() and (top / "sub_02_wf" / "out").is_dir()
    assert sorted(p.name for p in top.iterdir()) == ["sub_01_wf", "sub_02_wf"]
