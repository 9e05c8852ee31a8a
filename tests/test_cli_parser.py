"""The ``ugi-bids`` command line (``ugi_bids.cli.parser``): every option lands in ``Config``, bad
input ends in one line and the BIDS-App exit code, and parsing creates nothing. Fast: no
workflow runs, no torch import. Errors go through ``ugi_bids.cli.run.main`` in-process, as the
console script runs it; one test runs the console entry point itself.

``ugi_bids.utils.templates`` (space syntax) is replaced by a small stand-in in every test, so
these tests check what the parser hands over and does with the answers; the last test runs the
real module when it is importable.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import ugi_bids
import ugi_bids.utils
from ugi_bids import errors
from ugi_bids.cli import parser as cli
from ugi_bids.cli import run as cli_run
from ugi_bids.config import SUFFIX_MODALITY, Config, SpaceSpec
from ugi_bids.errors import UgiError

# --------------------------------------------------------------------------------------------
# Fixtures and helpers.


class FakeTemplates(types.ModuleType):
    """Stand-in for ``ugi_bids.utils.templates`` that records what the parser hands over."""

    def __init__(self):
        super().__init__("ugi_bids.utils.templates")
        self.calls: list[tuple[str, object]] = []

    def parse_output_spaces(self, values: list[str]) -> list[SpaceSpec]:
        self.calls.append(("parse_output_spaces", list(values)))
        specs = []
        for value in values:
            name, *parts = value.split(":")
            fields = dict(part.split("-", 1) for part in parts)
            if set(fields) - {"cohort", "res"}:
                raise ValueError(f"invalid space {value!r}")
            specs.append(SpaceSpec(name, resolution=fields.get("res"), cohort=fields.get("cohort")))
        return specs

    def parse_custom_template(self, value: str) -> SpaceSpec:
        self.calls.append(("parse_custom_template", value))
        if "=" not in value:
            raise ValueError(f"invalid template {value!r}: expected NAME=PATH[,mask=PATH]")
        name, rest = value.split("=", 1)
        path, *options = rest.split(",")
        mask = dict(option.split("=", 1) for option in options).get("mask")
        return SpaceSpec(name, path=Path(path), mask=Path(mask) if mask else None)


@pytest.fixture(autouse=True)
def templates(monkeypatch) -> FakeTemplates:
    """Install the stand-in templates module (whether or not the real one exists)."""
    fake = FakeTemplates()
    monkeypatch.setitem(sys.modules, "ugi_bids.utils.templates", fake)
    monkeypatch.setattr(ugi_bids.utils, "templates", fake, raising=False)
    return fake


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    """A folder holding a minimal BIDS dataset ``bids/``; the current directory."""
    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def parse(*options: str, level: str = "participant") -> Config:
    """Parse ``bids out LEVEL *options`` (relative to the current directory)."""
    return cli.parse_args(["bids", "out", level, *options])


def snapshot(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def fails(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr line of a command line that must fail before any work, run as the
    ``ugi-bids`` console script runs it (``ugi_bids.cli.run.main``), in this process."""
    code = cli_run.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ugi-bids: error: "), captured.err
    assert captured.out == "" and "Traceback" not in captured.err
    assert code != 0
    return code, lines[0]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------------------------
# Every option lands in Config.


def test_defaults(site):
    before = snapshot(site)
    config = parse()
    assert config.bids_dir == site / "bids" and config.output_dir == site / "out"
    assert config.work_dir == site / "work"
    assert all(p.is_absolute() for p in (config.bids_dir, config.output_dir, config.work_dir))
    assert config.analysis_level == "participant"
    assert [s.name for s in config.output_spaces] == ["MNI152NLin2009cAsym"]
    assert config.anat_suffixes == ["T1w"] and config.participant_label == []
    assert (config.model, config.weights, config.io_iterations, config.io_similarity,
            config.prealign, config.device, config.gpu_procs) == \
        ("unigradicon", None, 50, "lncc", "affine", "auto", 1)
    assert config.precision == "float32" and config.io_checkpointing == "auto"
    assert config.prealign_dof == 12
    assert (config.nprocs, config.omp_nthreads, config.mem_gb, config.plugin) == \
        (None, None, None, None)
    assert (config.sloppy, config.skip_bids_validation, config.clean_workdir,
            config.stop_on_first_crash, config.resource_monitor, config.boilerplate_only,
            config.reports_only, config.notrack) == (False,) * 8
    assert config.verbose == 0 and config.bids_filters == {}
    assert (config.subject_anatomical_reference, config.template_iterations,
            config.template_gradient_step, config.template_average, config.build_template) == \
        ("sessionwise", 4, 0.25, "mean", None)
    assert snapshot(site) == before  # parsing creates nothing
    assert parse(level="group").analysis_level == "group"


def test_every_flag(site, tmp_path):
    weights = tmp_path / "w.trch"
    weights.write_bytes(b"x")
    filters = write(tmp_path / "f.json", '{"t1w": {"acq": "mprage", "rec": null}}')
    plugin = write(tmp_path / "p.yml", "plugin: Linear\n")
    config = parse(
        "--participant-label", "sub-01", "02", "--session-label", "ses-A", "B",
        "--bids-filter-file", filters, "--bids-database-dir", "db", "--skip-bids-validation",
        "--output-spaces", "MNI152NLin6Asym:res-2", "--anat-suffixes", "T1w", "T2w", "CT",
        "--nprocs", "8", "--omp-nthreads", "4", "--mem", "16G", "--use-plugin", plugin,
        "--sloppy", "-w", "scratch", "--clean-workdir", "--stop-on-first-crash",
        "--resource-monitor", "--boilerplate-only", "--notrack", "-vv",
        "--model", "multigradicon", "--weights", str(weights), "--io-iterations", "0",
        "--io-similarity", "mind", "--prealign", "header", "--prealign-dof", "9",
        "--device", "cpu", "--precision", "tf32", "--io-checkpointing", "off", "--gpu-procs", "2",
        "--template", "study=tpl.nii.gz,mask=mask.nii.gz")
    assert config.participant_label == ["01", "02"] and config.session_label == ["A", "B"]
    assert config.bids_filters == {"t1w": {"acq": "mprage", "rec": None}}
    assert config.bids_database_dir == site / "db" and config.skip_bids_validation is True
    assert [(s.name, s.resolution, s.path, s.mask) for s in config.output_spaces] == [
        ("MNI152NLin6Asym", "2", None, None),
        ("study", None, site / "tpl.nii.gz", site / "mask.nii.gz")]
    assert config.anat_suffixes == ["T1w", "T2w", "CT"]
    assert (config.nprocs, config.omp_nthreads, config.mem_gb) == (8, 4, 16.0)
    assert config.plugin == {"plugin": "Linear", "plugin_args": {}}
    assert config.sloppy is True and config.network_size == 65
    assert config.work_dir == site / "scratch"
    assert (config.clean_workdir, config.stop_on_first_crash, config.resource_monitor,
            config.boilerplate_only, config.reports_only, config.notrack) == \
        (True, True, True, True, False, True)
    assert config.verbose == 2
    assert (config.model, config.weights, config.io_iterations, config.io_similarity,
            config.prealign, config.device, config.gpu_procs) == \
        ("multigradicon", weights, 0, "mind", "header", "cpu", 2)
    assert config.precision == "tf32" and config.io_checkpointing == "off"
    assert config.prealign_dof == 9
    assert json.loads(json.dumps(config.to_dict()))["weights"] == str(weights)  # provenance


def test_reports_only_is_refused(site, capsys):
    before = snapshot(site)
    code, line = fails(["bids", "out", "participant", "--reports-only"], capsys)
    assert code == 2 and line == ("ugi-bids: error: --reports-only: reports are not "
                                  "implemented yet; run without it")
    assert snapshot(site) == before


@pytest.mark.parametrize("dof", [6, 7, 9, 12])
def test_every_prealign_dof_is_accepted(site, dof):
    assert parse("--prealign-dof", str(dof)).prealign_dof == dof
    path = write(site / "ugi.toml", f"[workflow]\nprealign_dof = {dof}\n")
    assert parse("--config-file", path).prealign_dof == dof
    other = 6 if dof != 6 else 12  # the command line overrides the file
    assert parse("--config-file", path, "--prealign-dof", str(other)).prealign_dof == other


def test_parse_args_or_exit(site, capsys):
    assert cli.parse_args_or_exit(["bids", "out", "participant"]).output_dir == site / "out"
    with pytest.raises(SystemExit) as info:
        cli.parse_args_or_exit(["bids", "out", "level3"])
    assert info.value.code == 17
    assert capsys.readouterr().err.startswith("ugi-bids: error: unknown analysis level")


@pytest.mark.parametrize("flags, field, value", [
    (["--participant_label", "01"], "participant_label", ["01"]),
    (["--session-id", "ses-1"], "session_label", ["1"]),
    (["--skip_bids_validation"], "skip_bids_validation", True),
    (["--nthreads", "3"], "nprocs", 3),
    (["--n-cpus", "3"], "nprocs", 3),
    (["--n_cpus", "3"], "nprocs", 3),
    (["--mem-mb", "2000"], "mem_gb", 2.0),
    (["--mem_mb", "2000"], "mem_gb", 2.0),
    (["--work-dir", "w2"], "work_dir", "w2"),
    (["--io_iterations", "none"], "io_iterations", 0),
    (["--verbose", "-v", "--verbose"], "verbose", 3),
])
def test_aliases(site, flags, field, value):
    expected = site / value if field == "work_dir" else value
    assert getattr(parse(*flags), field) == expected


def test_longitudinal_is_the_unbiased_reference(site):
    """fMRIPrep's deprecated ``--longitudinal`` is ``--subject-anatomical-reference unbiased``."""
    longitudinal = parse("--longitudinal")
    explicit = parse("--subject-anatomical-reference", "unbiased")
    assert longitudinal.subject_anatomical_reference == "unbiased"
    assert dataclasses.replace(longitudinal, run_uuid=explicit.run_uuid) == explicit
    assert parse("--subject-anatomical-reference", "sessionwise") \
        .subject_anatomical_reference == "sessionwise"


def test_template_building_options(site):
    config = parse("--template-iterations", "2", "--template-gradient-step", "1",
                   "--template-average", "median", "--build-template", "Study01",
                   "--longitudinal", level="group")
    assert (config.subject_anatomical_reference, config.template_iterations,
            config.template_gradient_step, config.template_average, config.build_template) == \
        ("unbiased", 2, 1.0, "median", "Study01")
    assert parse("--template-gradient-step", "0.1").template_gradient_step == 0.1
    # they apply to subject templates too: accepted at the participant level
    assert parse("--template-iterations", "1").template_iterations == 1


def test_build_template_at_participant_level_is_refused(site, capsys):
    before = snapshot(site)
    code, line = fails(["bids", "out", "participant", "--build-template", "Study"], capsys)
    assert code == 2 and line == (
        "ugi-bids: error: --build-template Study: a study template is built at the group "
        "level; run with the analysis level group (not participant), or leave "
        "--build-template (build_template in a --config-file) out")
    assert snapshot(site) == before


@pytest.mark.parametrize("name", ["MNI152NLin2009cAsym", "mni152nlin2009casym"])
def test_build_template_name_clashes_with_an_output_space(site, capsys, name):
    code, line = fails(["bids", "out", "group", "--build-template", name], capsys)
    assert code == 2 and "the TemplateFlow template MNI152NLin2009cAsym" in line
    code, line = fails(["bids", "out", "group", "--output-spaces", "MNI152NLin6Asym:res-2",
                        "--build-template", "MNI152NLin6Asym"], capsys)
    assert code == 2 and "MNI152NLin6Asym (an output space)" in line


def test_labels_stripped_and_deduplicated(site):
    config = parse("--participant-label", "sub-01", "01", "sub-02", "--session-label", "ses-pre")
    assert config.participant_label == ["01", "02"] and config.session_label == ["pre"]


@pytest.mark.parametrize("label", ["sub-01_ses-1", "sub-", "a b"])
def test_bad_label(site, capsys, label):
    code, line = fails(["bids", "out", "participant", "--participant-label", label], capsys)
    assert code == 2 and "label" in line


@pytest.mark.parametrize("text, gb", [
    ("16G", 16.0), ("16GB", 16.0), ("16g", 16.0), ("16000M", 16.0), ("16000MB", 16.0),
    ("16000", 16.0), ("1.5T", 1500.0), ("500000K", 0.5), (".5G", 0.5), ("2.5", 0.0025),
])
def test_memory_units(site, text, gb):
    assert parse("--mem", text).mem_gb == pytest.approx(gb)


@pytest.mark.parametrize("text", ["lots", "16X", "-4G", "0", "G", "16 G B"])
def test_bad_memory(site, capsys, text):
    code, line = fails(["bids", "out", "participant", f"--mem={text}"], capsys)
    assert code == 2 and "--mem" in line


@pytest.mark.parametrize("flags, phrase", [
    (["--nprocs", "0"], "--nprocs"),
    (["--io-iterations", "-1"], "--io-iterations"),
    (["--io-iterations", "ten"], "--io-iterations"),
    (["--gpu-procs", "0"], "--gpu-procs"),
    (["--nprocs", "2", "--omp-nthreads", "4"], "exceeds"),
    (["--model", "voxelmorph"], "--model"),
    (["--io-similarity", "mse"], "--io-similarity"),
    (["--prealign", "rigid"], "--prealign"),
    (["--prealign-dof", "5"], "--prealign-dof: invalid choice: 5 (choose from 6, 7, 9, 12)"),
    (["--prealign-dof", "rigid"], "--prealign-dof: invalid int value: 'rigid'"),
    (["--prealign-dof", "12.0"], "--prealign-dof: invalid int value"),
    (["--device", "tpu"], "--device"),
    (["--precision", "bf16"], "--precision"),
    (["--io-checkpointing", "maybe"], "--io-checkpointing"),
    (["--anat-suffixes", "T1map"], "--anat-suffixes"),
    (["--subject-anatomical-reference", "first-lex"], "--subject-anatomical-reference"),
    (["--longitudinal", "yes"], "unrecognized"),
    (["--template-iterations", "0"], "--template-iterations: must be >= 1, got 0"),
    (["--template-iterations", "2.5"], "--template-iterations: invalid integer"),
    (["--template-gradient-step", "0"], "--template-gradient-step: must be a number in (0, 1]"),
    (["--template-gradient-step", "1.5"], "must be a number in (0, 1], got 1.5"),
    (["--template-gradient-step", "-0.1"], "--template-gradient-step"),
    (["--template-gradient-step", "nan"], "--template-gradient-step"),
    (["--template-gradient-step", "big"], "must be a number in (0, 1], got big"),
    (["--template-average", "max"], "--template-average: invalid choice: 'max'"),
    (["--build-template", "my-template"], "--build-template: invalid template name"),
    (["--build-template", "tpl-X"], "leave out the tpl- prefix ('X')"),
    (["--build-template", "my_template"], "letters and digits only"),
    (["--build-template", ""], "--build-template: invalid template name"),
    (["--bogus"], "unrecognized"),
    (["--nproc", "2"], "unrecognized"),  # no abbreviations
])
def test_bad_values_are_usage_errors(site, capsys, flags, phrase):
    code, line = fails(["bids", "out", "participant", *flags], capsys)
    assert code == 2 and phrase in line
    if "--build-template" in flags:  # the name is checked before the level
        assert fails(["bids", "out", "group", *flags], capsys) == (code, line)


def test_missing_positionals(site, capsys):
    code, line = fails(["bids", "out"], capsys)
    assert code == 2 and "required" in line


# --------------------------------------------------------------------------------------------
# Exit codes of the positional arguments and --weights.


@pytest.mark.parametrize("level", ["foo", "Participant", "session"])
def test_unknown_analysis_level_exits_17(site, capsys, level):
    before = snapshot(site)
    code, line = fails(["bids", "out", level], capsys)
    assert code == 17 and "analysis level" in line and level in line
    assert snapshot(site) == before


def test_missing_bids_dir_exits_66(site, capsys):
    code, line = fails(["nowhere", "out", "participant"], capsys)
    assert code == 66 and "BIDS_DIR" in line and "nowhere" in line
    (site / "afile").write_text("")
    assert fails(["afile", "out", "participant"], capsys)[0] == 66


@pytest.mark.parametrize("output", ["bids", "bids/", "bids/derivatives/ugi-bids", "bids/sub-01",
                                    "./bids/../bids/new"])
def test_output_inside_bids_dir_refused(site, capsys, output):
    before = snapshot(site)
    code, line = fails(["bids", output, "participant"], capsys)
    assert code == 2 and "OUTPUT_DIR" in line and "inside BIDS_DIR" in line
    assert snapshot(site) == before


def test_output_inside_bids_dir_through_a_link_refused(site, capsys):
    (site / "link").symlink_to(site / "bids")
    code, line = fails(["bids", "link/derivatives", "participant"], capsys)
    assert code == 2 and "OUTPUT_DIR" in line


@pytest.mark.parametrize("flag, value, phrase", [
    ("-w", "bids/work", "work directory"),
    ("--work-dir", "bids", "work directory"),
    ("--bids-database-dir", "bids/code/db", "--bids-database-dir"),
])
def test_work_dirs_inside_bids_dir_refused(site, capsys, flag, value, phrase):
    before = snapshot(site)
    code, line = fails(["bids", "out", "participant", flag, value], capsys)
    assert code == 2 and phrase in line and "inside BIDS_DIR" in line
    assert snapshot(site) == before


def test_output_or_work_dir_that_is_a_file_exits_73(site, capsys):
    (site / "taken").write_text("")
    assert fails(["bids", "taken", "participant"], capsys)[0] == 73
    assert fails(["bids", "out", "participant", "-w", "taken"], capsys)[0] == 73


def test_weights_must_exist(site, capsys):
    code, line = fails(["bids", "out", "participant", "--weights", "missing.trch"], capsys)
    assert code == 66 and "--weights" in line and "missing.trch" in line
    (site / "w.trch").write_bytes(b"x")
    assert parse("--weights", "w.trch").weights == site / "w.trch"


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.parse_args(["--version"])
    assert info.value.code in (0, None)
    assert capsys.readouterr().out.strip() == f"ugi-bids {ugi_bids.__version__}"


def test_help_has_the_nipreps_groups(capsys):
    with pytest.raises(SystemExit) as info:
        cli.parse_args(["--help"])
    assert info.value.code in (0, None)
    out = capsys.readouterr().out
    for title in ("Options for filtering BIDS queries", "Options to handle performance",
                  "Workflow configuration", "Registration options", "Other options",
                  "BIDS_DIR OUTPUT_DIR {participant,group}", "exit codes"):
        assert title in out


def test_help_of_the_template_options(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    out = capsys.readouterr().out
    workflow = " ".join(out.split("Workflow configuration:")[1]
                        .split("Registration options:")[0].split())
    for option in ("--subject-anatomical-reference {sessionwise,unbiased}", "--longitudinal",
                   "--template-iterations N", "--template-gradient-step S",
                   "--template-average {mean,median}", "--build-template NAME"):
        assert option in workflow, option
    for phrase in ("deformable unbiased within-subject template with uniGradICON",
                   "unlike fMRIPrep's rigid mri_robust_template",
                   "a participant with one session gets the ordinary outputs",
                   "(default: sessionwise)", "default: 4", "(default: 0.25)", "(default: mean)",
                   "group level only", "OUTPUT_DIR/tpl-NAME/"):
        assert phrase in workflow, phrase


def test_console_entry_point(site):
    """As a user sees it: the installed ``ugi-bids`` script (else ``python -m``) prints one line
    on stderr and exits with the code; no traceback, nothing created."""
    before = snapshot(site)
    env = {**os.environ, "PYTHONPATH": str(Path(ugi_bids.__file__).parents[1])}
    script = shutil.which("ugi-bids", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "ugi_bids.cli.run"]
    result = subprocess.run([*command, "bids", "out", "participant", "--weights", "none.pt"],
                            capture_output=True, text=True, cwd=site, env=env, timeout=120,
                            check=False)
    assert result.returncode == 66, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("ugi-bids: error: --weights ") and \
        len(result.stderr.strip().splitlines()) == 1
    assert snapshot(site) == before


# --------------------------------------------------------------------------------------------
# --bids-filter-file.


def test_bids_filter_file(site):
    path = write(site / "filters.json", json.dumps({
        "t1w": {"acq": "mprage", "rec": None, "run": 1},
        "t2w": {"acq": ["spc", "*"]}, "ct": {}}))
    assert parse("--bids-filter-file", path).bids_filters == {
        "t1w": {"acq": "mprage", "rec": None, "run": 1}, "t2w": {"acq": ["spc", "*"]}, "ct": {}}


@pytest.mark.parametrize("text, phrase", [
    ('{"t1w": {"acq": "mprage",}}', "not valid JSON"),
    ("", "not valid JSON"),
    ('{"bold": {"task": "rest"}}', "unknown query 'bold'"),
    ('{"T1w": {"acq": "mprage"}}', "unknown query 'T1w'"),
    ('[{"t1w": {}}]', "JSON object"),
    ('{"t1w": "mprage"}', "must map BIDS entities"),
    ('{"t1w": {"acq": {"x": 1}}}', "t1w.acq"),
])
def test_bad_bids_filter_file(site, capsys, text, phrase):
    path = write(site / "filters.json", text)
    code, line = fails(["bids", "out", "participant", "--bids-filter-file", path], capsys)
    assert code == 2 and phrase in line


def test_missing_bids_filter_file_exits_66(site, capsys):
    code, line = fails(["bids", "out", "participant", "--bids-filter-file", "no.json"], capsys)
    assert code == 66 and "--bids-filter-file" in line


# --------------------------------------------------------------------------------------------
# --use-plugin.


def test_use_plugin_yaml(site):
    path = write(site / "plugin.yml",
                 "plugin: multiproc\nplugin_args:\n  n_procs: 6\n  memory_gb: 12\n"
                 "  raise_insufficient: false\n")
    config = parse("--use-plugin", path)
    assert config.plugin == {"plugin": "MultiProc", "plugin_args": {
        "n_procs": 6, "memory_gb": 12, "raise_insufficient": False}}
    assert (config.nprocs, config.mem_gb) == (6, 12.0)  # taken from plugin_args (fMRIPrep)
    explicit = parse("--use-plugin", path, "--nprocs", "2", "--mem", "4G")
    assert (explicit.nprocs, explicit.mem_gb) == (2, 4.0)  # explicit flags win


@pytest.mark.parametrize("plugin", ["MultiProc", "Linear", "SLURM", "SLURMGraph", "SGE", "PBS",
                                    "LSF"])
def test_every_plugin(site, plugin):
    path = write(site / "plugin.yml", f"plugin: {plugin}\nplugin_args: {{sbatch_args: -p gpu}}\n")
    assert parse("--use-plugin", path).plugin["plugin"] == plugin


@pytest.mark.parametrize("text, phrase", [
    ("plugin: Dask\n", "unsupported plugin 'Dask'"),
    ("plugin: [MultiProc\n", "not valid YAML"),
    ("plugin_args: {n_procs: 2}\n", "'plugin' key"),
    ("- MultiProc\n", "'plugin' key"),
    ("plugin: Linear\nplugin_arg: {}\n", "unknown key 'plugin_arg'"),
    ("plugin: Linear\nplugin_args: [1]\n", "plugin_args"),
    ("plugin: MultiProc\nplugin_args: {n_procs: 0}\n", "n_procs"),
])
def test_bad_plugin_file(site, capsys, text, phrase):
    path = write(site / "plugin.yml", text)
    code, line = fails(["bids", "out", "participant", "--use-plugin", path], capsys)
    assert code == 2 and phrase in line


def test_missing_plugin_file_exits_66(site, capsys):
    assert fails(["bids", "out", "participant", "--use-plugin", "no.yml"], capsys)[0] == 66


# --------------------------------------------------------------------------------------------
# --config-file.


CONFIG = """\
[execution]
participant_label = ["sub-03", "04"]
work_dir = "scratch"
verbose = 2

[workflow]
io_iterations = 10
io_similarity = "lncc2"
sloppy = true
output_spaces = ["MNI152NLin6Asym:res-2"]
templates = ["study=tpl.nii.gz"]

[nipype]
mem_gb = 8
nprocs = 4

[environment]
version = "0.0.1"
weights = "/gone/Step_2_final.trch"
"""


def test_config_file_values_are_defaults(site):
    path = write(site / "ugi.toml", CONFIG)
    config = parse("--config-file", path)
    assert (config.io_iterations, config.io_similarity, config.sloppy, config.verbose,
            config.mem_gb, config.nprocs) == (10, "lncc2", True, 2, 8.0, 4)
    assert config.participant_label == ["03", "04"]
    assert [(s.name, s.resolution, s.path) for s in config.output_spaces] == [
        ("MNI152NLin6Asym", "2", None), ("study", None, site / "tpl.nii.gz")]
    assert config.work_dir == site / "scratch"
    assert config.weights is None  # [environment] is a record, not a setting


def test_command_line_overrides_config_file(site):
    path = write(site / "ugi.toml", CONFIG)
    config = parse("--io-iterations", "5", "--config-file", path, "-v", "--mem", "2000",
                   "--participant-label", "05", "--template", "other=o.nii.gz", "-w", "w2")
    assert (config.io_iterations, config.verbose, config.mem_gb) == (5, 1, 2.0)
    assert (config.io_similarity, config.sloppy) == ("lncc2", True)  # still from the file
    assert config.participant_label == ["05"]
    # repeatable options on the command line replace the file's, they do not add to them
    assert [s.name for s in config.output_spaces] == ["MNI152NLin6Asym", "other"]
    assert config.work_dir == site / "w2"


def test_config_file_filters_and_plugin(site):
    path = write(site / "ugi.toml", """\
[execution]
bids_filters = '{"t1w": {"acq": "mprage", "rec": null}}'
[nipype]
plugin = {plugin = "multiproc", plugin_args = {n_procs = 3, memory_gb = 6}}
""")
    config = parse("--config-file", path)
    assert config.bids_filters == {"t1w": {"acq": "mprage", "rec": None}}
    assert config.plugin == {"plugin": "MultiProc", "plugin_args": {"n_procs": 3, "memory_gb": 6}}
    assert (config.nprocs, config.mem_gb) == (3, 6.0)


@pytest.mark.parametrize("text, phrase", [
    ("[workflow]\nio_iterations = ", "not valid TOML"),
    ("io_iterations = 3", "'io_iterations' is outside any section; it belongs in [workflow]"),
    ("[registration]\nio_iterations = 3", "unknown section [registration]"),
    ("[workflow]\niterations = 3", "unknown key 'iterations' in [workflow]"),
    ("[workflow]\nio-iterations = 3", "did you mean io_iterations?"),
    ("[workflow]\nnprocs = 3", "nprocs belongs in [nipype]"),
    ("[execution]\nconfig_file = 'other.toml'", "unknown key 'config_file'"),
    ("[workflow]\nio_iterations = -1", "[workflow] io_iterations must be an integer >= 0"),
    ("[nipype]\nnprocs = true", "[nipype] nprocs must be an integer >= 1, got true"),
    ("[nipype]\nmem_gb = '16G'", "[nipype] mem_gb must be a number of GB above zero"),
    ("[workflow]\nsloppy = 'yes'", "true or false"),
    ("[workflow]\nprealign = ['affine', 'none']", "[workflow] prealign must be a string"),
    ("[workflow]\nprealign_dof = 5", "[workflow] prealign_dof must be one of 6, 7, 9, 12, got 5"),
    ("[workflow]\nprealign_dof = '12'",
     "[workflow] prealign_dof must be one of 6, 7, 9, 12, got \"12\""),
    ("[workflow]\nprealign_dof = 12.0", "[workflow] prealign_dof must be one of 6, 7, 9, 12"),
    ("[workflow]\nprealign_dof = true", "[workflow] prealign_dof must be one of 6, 7, 9, 12"),
    ("[nipype]\ndevice = 'gpu'", "[nipype] device must be one of auto, cpu, cuda"),
    ("[workflow]\noutput_spaces = [[1]]", "a list of strings"),
    ("[workflow]\noutput_spaces = ['MNI152NLin6Asym:den-91k']", "output_spaces: invalid space"),
    ("[workflow]\nanat_suffixes = ['T1map']", "anat_suffixes must be a list of T1w"),
    ("[execution]\nparticipant_label = ['sub-01_ses-1']", "invalid label"),
    ("[execution]\nbids_filters = {bold = {task = 'rest'}}", "unknown query 'bold'"),
    ("[execution]\nbids_filters = '{oops'", "a table, or a JSON object in a string"),
    ("[nipype]\nplugin = {plugin = 'Dask'}", "unsupported plugin 'Dask'"),
    ("[execution]\nreports_only = true", "reports are not implemented yet"),
    ("[workflow]\noutput_spaces = []", "no output space"),
    ("[workflow]\nsubject_anatomical_reference = 'longitudinal'",
     "[workflow] subject_anatomical_reference must be one of sessionwise, unbiased"),
    ("[workflow]\ntemplate_iterations = 0",
     "[workflow] template_iterations must be an integer >= 1"),
    ("[workflow]\ntemplate_gradient_step = 1.5",
     "[workflow] template_gradient_step: must be a number in (0, 1], got 1.5"),
    ("[workflow]\ntemplate_gradient_step = 0", "template_gradient_step: must be a number in"),
    ("[workflow]\ntemplate_gradient_step = '0.5'",
     "[workflow] template_gradient_step must be a number in (0, 1], got \"0.5\""),
    ("[workflow]\ntemplate_average = 'max'",
     "[workflow] template_average must be one of mean, median"),
    ("[workflow]\nbuild_template = 'tpl-X'",
     "[workflow] build_template: invalid template name 'tpl-X'"),
    ("[workflow]\nbuild_template = 'Study'", "a study template is built at the group level"),
])
def test_bad_config_file(site, capsys, text, phrase):
    path = write(site / "ugi.toml", text)
    code, line = fails(["bids", "out", "participant", "--config-file", path], capsys)
    assert code == 2 and phrase in line
    if not any(text in phrase for text in ("reports", "no output space", "group level")):
        assert line.startswith(f"ugi-bids: error: --config-file {path}")


def test_missing_config_file_exits_66(site, capsys):
    code, line = fails(["bids", "out", "participant", "--config-file", "no.toml"], capsys)
    assert code == 66 and line == (f"ugi-bids: error: --config-file {site / 'no.toml'} does "
                                   "not exist")


def test_config_file_options_get_the_same_checks(site, capsys):
    path = write(site / "ugi.toml", '[workflow]\nweights = "missing.trch"\n')
    code, line = fails(["bids", "out", "participant", "--config-file", path], capsys)
    assert code == 66 and "--weights" in line
    path = write(site / "ugi.toml", '[execution]\nwork_dir = "bids/work"\n')
    code, line = fails(["bids", "out", "participant", "--config-file", path], capsys)
    assert code == 2 and "inside BIDS_DIR" in line
    path = write(site / "ugi.toml", '[nipype]\nnprocs = 2\nomp_nthreads = 4\n')
    assert fails(["bids", "out", "participant", "--config-file", path], capsys)[0] == 2
    path = write(site / "ugi.toml", '[execution]\nbids_dir = "nowhere"\n')
    assert parse("--config-file", path).bids_dir == site / "bids"  # positionals win


# --------------------------------------------------------------------------------------------
# Output spaces and --template (syntax delegated to ugi_bids.utils.templates).


def test_output_spaces_delegated(site, templates):
    config = parse("--output-spaces", "MNI152NLin2009cAsym", "MNIPediatricAsym:cohort-3:res-1")
    assert templates.calls == [("parse_output_spaces",
                                ["MNI152NLin2009cAsym", "MNIPediatricAsym:cohort-3:res-1"])]
    assert [s.label for s in config.output_spaces] == ["MNI152NLin2009cAsym",
                                                       "MNIPediatricAsym+3"]


def test_default_space_needs_no_parsing(site, templates):
    assert [s.name for s in parse().output_spaces] == ["MNI152NLin2009cAsym"]
    assert templates.calls == []


def test_templates_delegated_and_appended(site, templates):
    config = parse("--template", "study=tpl.nii.gz,mask=m.nii.gz", "--template", "pig=/abs/p.nii",
                   "--output-spaces", "MNI152NLin6Asym")
    assert ("parse_custom_template", "study=tpl.nii.gz,mask=m.nii.gz") in templates.calls
    assert ("parse_custom_template", "pig=/abs/p.nii") in templates.calls
    assert [(s.name, s.is_custom) for s in config.output_spaces] == [
        ("MNI152NLin6Asym", False), ("study", True), ("pig", True)]
    study = config.output_spaces[1]
    assert study.path == site / "tpl.nii.gz" and study.mask == site / "m.nii.gz"


def test_template_alone_replaces_the_default_space(site):
    config = parse("--template", "study=tpl.nii.gz")
    assert [s.name for s in config.output_spaces] == ["study"]


@pytest.mark.parametrize("flags, phrase", [
    (["--output-spaces", "MNI152NLin6Asym", "--template", "MNI152NLin6Asym=t.nii.gz"],
     "already used by --output-spaces"),
    (["--output-spaces", "MNI152NLin6Asym:res-2", "--template", "mni152nlin6asym=t.nii.gz"],
     "already used by --output-spaces"),
    (["--template", "a=t.nii.gz", "--template", "a=u.nii.gz"], "already used by another"),
    (["--template", "t.nii.gz"], "--template: invalid template"),
    (["--output-spaces", "MNI152NLin6Asym:den-91k"], "--output-spaces: invalid space"),
])
def test_bad_spaces(site, capsys, flags, phrase):
    code, line = fails(["bids", "out", "participant", *flags], capsys)
    assert code == 2 and phrase in line


def test_template_errors_keep_their_exit_code(site, capsys, templates, monkeypatch):
    def missing(value):
        raise cli.MissingInputError(f"--template {value}: file not found")

    monkeypatch.setattr(templates, "parse_custom_template", missing)
    code, line = fails(["bids", "out", "participant", "--template", "a=none.nii.gz"], capsys)
    assert code == 66 and "not found" in line


def test_real_templates_module(site, monkeypatch):
    """With the real ``ugi_bids.utils.templates`` (skipped until it exists)."""
    monkeypatch.delitem(sys.modules, "ugi_bids.utils.templates")
    monkeypatch.delattr(ugi_bids.utils, "templates")
    try:
        importlib.import_module("ugi_bids.utils.templates")
    except ImportError:
        pytest.skip("ugi_bids.utils.templates is not written yet")
    config = parse("--output-spaces", "MNI152NLin6Asym:res-2")
    assert [(s.name, s.resolution, s.is_custom) for s in config.output_spaces] == [
        ("MNI152NLin6Asym", "2", False)]


# --------------------------------------------------------------------------------------------
# The choices are the engine's (ugi_bids.engine.options, one table for every front end).


def _choices(parser, dest: str) -> tuple:
    return tuple(next(a for a in parser._actions if a.dest == dest).choices)


def test_choices_are_the_engines():
    from ugi_bids.cli.register import build_parser as build_register_parser
    from ugi_bids.engine import options
    from ugi_bids.engine.model.weights import MODELS
    from ugi_bids.engine.optimise import similarity

    assert tuple(MODELS) == options.MODELS
    assert tuple(similarity._FUNCTIONS) == options.SIMILARITIES
    for parser in (cli.build_parser(), build_register_parser()):
        assert _choices(parser, "model") == options.MODELS
        assert _choices(parser, "prealign") == options.PREALIGN_MODES
        assert _choices(parser, "prealign_dof") == options.PREALIGN_DOFS
        assert _choices(parser, "io_similarity") == options.SIMILARITIES
        assert _choices(parser, "precision") == options.PRECISIONS
        assert _choices(parser, "io_checkpointing") == tuple(options.IO_CHECKPOINTING)
    ugi_bids_parser = cli.build_parser()
    assert _choices(ugi_bids_parser, "subject_anatomical_reference") == \
        options.ANATOMICAL_REFERENCES
    assert _choices(ugi_bids_parser, "template_average") == options.TEMPLATE_AVERAGES
    assert set(cli.FILTER_QUERIES.values()) == set(SUFFIX_MODALITY)


def test_template_defaults_are_the_engines():
    from ugi_bids.engine import options

    config = Config(bids_dir=Path("/b"), output_dir=Path("/o"))
    assert (config.subject_anatomical_reference, config.template_iterations,
            config.template_gradient_step, config.template_average) == (
        options.DEFAULT_ANATOMICAL_REFERENCE, options.DEFAULT_TEMPLATE_ITERATIONS,
        options.DEFAULT_TEMPLATE_GRADIENT_STEP, options.DEFAULT_TEMPLATE_AVERAGE)
    assert options.DEFAULT_ANATOMICAL_REFERENCE in options.ANATOMICAL_REFERENCES
    assert options.DEFAULT_TEMPLATE_AVERAGE in options.TEMPLATE_AVERAGES


def test_defaults_are_the_engines():
    """Config, ugi-register, the interfaces' traits and the Registrar take their defaults
    from ugi_bids.engine.options: one place to change one."""
    import inspect

    from ugi_bids.cli.register import build_parser as build_register_parser
    from ugi_bids.engine import options
    from ugi_bids.engine.registrar import Registrar
    from ugi_bids.interfaces import registration as interfaces

    expected = {"model": options.DEFAULT_MODEL, "prealign": options.DEFAULT_PREALIGN,
                "io_similarity": options.DEFAULT_SIMILARITY, "device": options.DEFAULT_DEVICE,
                "precision": options.DEFAULT_PRECISION, "io_iterations": options.IO_STEPS,
                "io_checkpointing": options.DEFAULT_IO_CHECKPOINTING}
    config = Config(bids_dir=Path("/b"), output_dir=Path("/o"))
    register_defaults = vars(build_register_parser().parse_args(
        ["--fixed", "f", "--moving", "m", "--fixed-modality", "mri", "--moving-modality", "mri",
         "--out-prefix", "p"]))
    node = interfaces.UniGradICON().inputs
    for name, value in expected.items():
        assert getattr(config, name) == value, name
        assert register_defaults[name] == value, name
        if name != "prealign":  # the node's is Prealign.mode, checked below
            assert getattr(node, name) == value, name
    assert interfaces.Prealign().inputs.mode == options.DEFAULT_PREALIGN
    assert (config.prealign_dof, register_defaults["prealign_dof"],
            interfaces.Prealign().inputs.dof) == (options.DEFAULT_PREALIGN_DOF,) * 3
    assert register_defaults["masking"] == options.DEFAULT_MASKING
    assert interfaces.ApplyTransform().inputs.interpolation == options.DEFAULT_INTERPOLATION
    init = inspect.signature(Registrar.__init__).parameters
    register = inspect.signature(Registrar.register).parameters
    assert (init["model"].default, init["device"].default, init["precision"].default,
            init["io_checkpointing"].default) == (
        options.DEFAULT_MODEL, options.DEFAULT_DEVICE, options.DEFAULT_PRECISION,
        options.DEFAULT_IO_CHECKPOINTING)
    assert (register["prealign"].default, register["io_similarity"].default,
            register["masking"].default, register["fixed_modality"].default,
            register["prealign_dof"].default) == (
        options.DEFAULT_PREALIGN, options.DEFAULT_SIMILARITY, options.DEFAULT_MASKING,
        options.DEFAULT_MODALITY, options.DEFAULT_PREALIGN_DOF)


def test_errors_are_ugi_errors():
    assert issubclass(errors.UsageError, UgiError) and errors.UsageError.exit_code == 2
    assert issubclass(errors.AnalysisLevelError, errors.UsageError)
    assert errors.AnalysisLevelError.exit_code == 17
