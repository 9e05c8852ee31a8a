"""The ``ugi-bids`` command line (``ugi_bids.cli.parser``): every option lands in ``Config``, bad
input ends in one line and the BIDS-App exit code, and parsing creates nothing. Fast: no
workflow runs, no torch import.

``ugi_bids.utils.templates`` (space syntax) is replaced by a small stand-in in every test, so
these tests check what the parser hands over and does with the answers; the last test runs the
real module when it is importable.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import ugi_bids
import ugi_bids.utils
from ugi_bids.cli import parser as cli
from ugi_bids.cli.config import SUFFIX_MODALITY, Config, SpaceSpec
from ugi_bids.engine.errors import UgiError

ENGINE = Path(ugi_bids.__file__).parent / "engine"


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
    """Exit code and stderr of a command line that must fail through parse_args_or_exit."""
    with pytest.raises(SystemExit) as info:
        cli.parse_args_or_exit(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ugi-bids: error: "), err
    assert "Traceback" not in err
    return info.value.code, lines[0]


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
    assert (config.nprocs, config.omp_nthreads, config.mem_gb, config.plugin) == \
        (None, None, None, None)
    assert not any((config.sloppy, config.skip_bids_validation, config.clean_workdir,
                    config.stop_on_first_crash, config.resource_monitor,
                    config.boilerplate_only, config.reports_only, config.notrack))
    assert config.verbose == 0 and config.bids_filters == {}
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
        "--resource-monitor", "--boilerplate-only", "--reports-only", "--notrack", "-vv",
        "--model", "multigradicon", "--weights", str(weights), "--io-iterations", "0",
        "--io-similarity", "mind", "--prealign", "header", "--device", "cpu",
        "--precision", "tf32", "--io-checkpointing", "off", "--gpu-procs", "2", "--template", "study=tpl.nii.gz,mask=mask.nii.gz")
    assert config.participant_label == ["01", "02"] and config.session_label == ["A", "B"]
    assert config.bids_filters == {"t1w": {"acq": "mprage", "rec": None}}
    assert config.bids_database_dir == site / "db" and config.skip_bids_validation
    assert [(s.name, s.resolution, s.path, s.mask) for s in config.output_spaces] == [
        ("MNI152NLin6Asym", "2", None, None),
        ("study", None, site / "tpl.nii.gz", site / "mask.nii.gz")]
    assert config.anat_suffixes == ["T1w", "T2w", "CT"]
    assert (config.nprocs, config.omp_nthreads, config.mem_gb) == (8, 4, 16.0)
    assert config.plugin == {"plugin": "Linear", "plugin_args": {}}
    assert config.sloppy and config.network_size < 175
    assert config.work_dir == site / "scratch"
    assert all((config.clean_workdir, config.stop_on_first_crash, config.resource_monitor,
                config.boilerplate_only, config.reports_only, config.notrack))
    assert config.verbose == 2
    assert (config.model, config.weights, config.io_iterations, config.io_similarity,
            config.prealign, config.device, config.gpu_procs) == \
        ("multigradicon", weights, 0, "mind", "header", "cpu", 2)
    assert config.precision == "tf32" and config.io_checkpointing == "off"
    json.dumps(config.to_dict())  # provenance-ready


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
    (["--device", "tpu"], "--device"),
    (["--precision", "bf16"], "--precision"),
    (["--io-checkpointing", "maybe"], "--io-checkpointing"),
    (["--anat-suffixes", "T1map"], "--anat-suffixes"),
    (["--bogus"], "unrecognized"),
    (["--nproc", "2"], "unrecognized"),  # no abbreviations
])
def test_bad_values_are_usage_errors(site, capsys, flags, phrase):
    code, line = fails(["bids", "out", "participant", *flags], capsys)
    assert code == 2 and phrase in line


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


def test_errors_in_a_real_process(site):
    """As a user sees it: one line on stderr, the exit code, no traceback, nothing created."""
    before = snapshot(site)
    env = {**os.environ, "PYTHONPATH": str(Path(ugi_bids.__file__).parents[1])}
    for argv, code in ((["bids", "bids/derivatives", "participant"], 2),
                       (["bids", "out", "level3"], 17),
                       (["bids", "out", "participant", "--weights", "none.pt"], 66)):
        result = subprocess.run([sys.executable, "-m", "ugi_bids.cli.parser", *argv],
                                capture_output=True, text=True, cwd=site, env=env, timeout=60)
        assert result.returncode == code, result.stderr
        assert result.stdout == "" and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
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
io-iterations = 10
io_similarity = "lncc2"
sloppy = true
verbose = 2
mem = "8G"
nthreads = 4
participant-label = ["sub-03", "04"]
output-spaces = ["MNI152NLin6Asym:res-2"]
template = ["study=tpl.nii.gz"]
work-dir = "scratch"
"""


def test_config_file_values_are_defaults(site):
    path = write(site / "ugi.toml", CONFIG)
    config = parse("--config-file", path)
    assert (config.io_iterations, config.io_similarity, config.sloppy, config.verbose,
            config.mem_gb, config.nprocs) == (10, "lncc2", True, 2, 8.0, 4)
    assert config.participant_label == ["03", "04"]
    assert [s.name for s in config.output_spaces] == ["MNI152NLin6Asym", "study"]
    assert config.work_dir == site / "scratch"


def test_command_line_overrides_config_file(site):
    path = write(site / "ugi.toml", CONFIG)
    config = parse("--io-iterations", "5", "--config-file", path, "-v", "--mem", "2000",
                   "--participant-label", "05", "--template", "other=o.nii.gz", "-w", "w2")
    assert (config.io_iterations, config.verbose, config.mem_gb) == (5, 1, 2.0)
    assert config.io_similarity == "lncc2" and config.sloppy  # still from the file
    assert config.participant_label == ["05"]
    # repeatable options on the command line replace the file's, they do not add to them
    assert [s.name for s in config.output_spaces] == ["MNI152NLin6Asym", "other"]
    assert config.work_dir == site / "w2"


@pytest.mark.parametrize("text, phrase", [
    ("io-iterations = ", "not valid TOML"),
    ("iterations = 3", "unknown option 'iterations'"),
    ("config-file = 'other.toml'", "unknown option 'config-file'"),
    ("version = true", "unknown option 'version'"),
    ("bids_dir = 'bids'", "unknown option 'bids_dir'"),
    ("io-iterations = -1", "--io-iterations"),
    ("sloppy = 'yes'", "true or false"),
    ("prealign = ['affine', 'none']", "a single value"),
    ("device = 'gpu'", "--device"),
    ("output-spaces = [[1]]", "string or a number"),
    ("[registration]\nio-iterations = 3", "unknown option 'registration'"),
])
def test_bad_config_file(site, capsys, text, phrase):
    path = write(site / "ugi.toml", text)
    code, line = fails(["bids", "out", "participant", "--config-file", path], capsys)
    assert code == 2 and "--config-file" in line and phrase in line


def test_missing_config_file_exits_66(site, capsys):
    code, line = fails(["bids", "out", "participant", "--config-file", "no.toml"], capsys)
    assert code == 66 and "--config-file" in line


def test_config_file_options_get_the_same_checks(site, capsys):
    path = write(site / "ugi.toml", 'weights = "missing.trch"\n')
    assert fails(["bids", "out", "participant", "--config-file", path], capsys)[0] == 66
    path = write(site / "ugi.toml", 'work-dir = "bids/work"\n')
    assert fails(["bids", "out", "participant", "--config-file", path], capsys)[0] == 2


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
# The choices match the engine's (read from the source: no torch import).


def _assigned(path: Path, name: str):
    for node in ast.parse(path.read_text()).body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(getattr(t, "id", None) == name for t in targets):
            return node.value
    raise AssertionError(f"{name} not found in {path}")


def test_choices_match_the_engine():
    from ugi_bids.engine.weights import MODELS

    assert set(cli.MODELS) == set(MODELS)
    assert tuple(ast.literal_eval(_assigned(ENGINE / "register.py", "PREALIGN_MODES"))) == \
        cli.PREALIGN_MODES
    similarities = _assigned(ENGINE / "similarity.py", "SIMILARITIES")
    assert [key.value for key in similarities.keys] == list(cli.SIMILARITIES)
    assert set(cli.FILTER_QUERIES.values()) == set(SUFFIX_MODALITY)


def test_errors_are_ugi_errors():
    assert issubclass(cli.UsageError, UgiError) and cli.UsageError.exit_code == 2
    assert issubclass(cli.AnalysisLevelError, cli.UsageError)
    assert cli.AnalysisLevelError.exit_code == 17


def test_precision_choices_are_the_engines():
    """The parser keeps its own copy (no torch import at parse time); it must not drift."""
    from ugi_bids.engine.inference import IO_CHECKPOINTING
    from ugi_bids.engine.precision import PRECISIONS

    assert cli.PRECISIONS == PRECISIONS
    assert cli.IO_CHECKPOINTING == tuple(IO_CHECKPOINTING)
