"""The ``ugi-bids`` command line: ``ugi-bids BIDS_DIR OUTPUT_DIR {participant,group} [options]``.

NiPreps-style options (fMRIPrep/sMRIPrep users will recognise the names and the help groups) plus
the registration options of ``ugi-register``. :func:`parse_args` turns a command line (and an
optional ``--config-file``) into a :class:`~ugi_bids.cli.config.Config`; nothing is created or
written while parsing.

Errors. :func:`parse_args` never exits on bad input: it raises a
:class:`~ugi_bids.engine.errors.UgiError` whose ``str()`` is one line and whose ``exit_code``
follows the BIDS-App draft:

* :class:`UsageError` (exit 2, argparse's own code, one of the draft's "2/64"): bad syntax, bad
  option values, unreadable JSON/YAML/TOML, ``OUTPUT_DIR``/``-w``/``--bids-database-dir`` inside
  ``BIDS_DIR``;
* :class:`AnalysisLevelError` (exit 17): an analysis level other than ``participant``/``group``;
* :class:`~ugi_bids.engine.errors.MissingInputError` (exit 66): ``BIDS_DIR``, ``--config-file``,
  ``--bids-filter-file`` or ``--use-plugin`` missing;
  :class:`~ugi_bids.engine.errors.WeightsError` (exit 66): ``--weights`` missing;
* :class:`~ugi_bids.engine.errors.OutputError` (exit 73): ``OUTPUT_DIR`` or ``-w`` is a file.

Only ``--help`` and ``--version`` raise ``SystemExit(0)`` (argparse prints them). A runner either
catches :class:`UgiError` and calls :func:`report_error`, or calls :func:`parse_args_or_exit`,
which prints ``ugi-bids: error: <one line>`` on stderr and exits with the code.

Defaults live in :class:`Config` only: the parser uses ``argparse.SUPPRESS`` defaults, so the
parsed namespace holds exactly the options that were given. That is what lets ``--config-file``
values act as defaults that explicit command-line flags override (repeatable and counted options
included: ``--template`` or ``-v`` on the command line replace the file's, they do not add to them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from .. import __version__
from ..engine.errors import MissingInputError, OutputError, UgiError, WeightsError
from .config import SUFFIX_MODALITY, Config, SpaceSpec

PROG = "ugi-bids"
ANALYSIS_LEVELS = ("participant", "group")
#: ``--bids-filter-file`` query names and the BIDS suffix each one selects.
FILTER_QUERIES = {"t1w": "T1w", "t2w": "T2w", "flair": "FLAIR", "pdw": "PDw", "ct": "CT"}
#: Nipype execution plugins ``--use-plugin`` accepts.
PLUGINS = ("MultiProc", "Linear", "SLURM", "SLURMGraph", "SGE", "PBS", "LSF")
#: Choices of the registration options; kept equal to the engine's (a test checks), spelled out
#: here so that ``--help`` does not import torch.
MODELS = ("unigradicon", "multigradicon")
SIMILARITIES = ("lncc", "lncc2", "mind")
PREALIGN_MODES = ("none", "header", "affine")
DEVICES = ("auto", "cpu", "cuda")
#: Network precisions (the engine's ugi_bids.engine.precision.PRECISIONS; kept here so that
#: parsing the command line does not import torch).
PRECISIONS = ("float32", "tf32")
#: Activation checkpointing in IO (the engine's ugi_bids.engine.inference.IO_CHECKPOINTING).
IO_CHECKPOINTING = ("auto", "on", "off")
#: Options that make no sense inside a ``--config-file``.
_NOT_IN_CONFIG_FILE = ("help", "version", "config_file")
_LABEL = re.compile(r"[A-Za-z0-9]+")
_MEMORY = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?:(?P<unit>[KMGT])B?)?", re.IGNORECASE)
_GB_PER_UNIT = {"K": 1e-6, "M": 1e-3, "G": 1.0, "T": 1e3}

DESCRIPTION = """\
ugi-bids: register the anatomical images of a BIDS dataset to templates with uniGradICON, in
world coordinates; writes NiPreps-style transforms (ANTs/ITK, both directions), resampled images
and reports."""

EPILOG = """\
exit codes (BIDS-App draft): 0 success, 1 failure, 2 usage error, 16 BIDS validation failed,
17 unknown analysis level, 18 the filters selected no files, 65 unusable data, 66 missing input
(data, weights, files named by options), 73 cannot create an output, 74 I/O error.

--config-file takes a TOML file whose keys are the long option names without the dashes, e.g.
    output-spaces = ["MNI152NLin2009cAsym", "MNI152NLin6Asym:res-2"]
    io-iterations = 10
    sloppy = true
Its values are defaults: options given on the command line override them. Relative paths in it
are read from the current directory, as on the command line.
"""


class UsageError(UgiError):
    """The command line (or a file it names) is malformed or asks for something refused: exit 2."""

    exit_code = 2


class AnalysisLevelError(UsageError):
    """The analysis level is neither ``participant`` nor ``group``: exit 17 (BIDS-App draft)."""

    exit_code = 17


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`UsageError` instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{PROG} --help')")


# --------------------------------------------------------------------------------------------
# Value types (argparse ``type=`` callables): each raises ArgumentTypeError with a clear message.


def _label(prefix: str) -> Callable[[str], str]:
    """A BIDS label with an optional ``prefix`` (``sub-``/``ses-``) stripped."""

    def label(text: str) -> str:
        value = text[len(prefix):] if text.startswith(prefix) else text
        if not _LABEL.fullmatch(value):
            raise argparse.ArgumentTypeError(
                f"invalid label {text!r}: BIDS labels are letters and digits only")
        return value

    return label


def memory_gb(text: str) -> float:
    """``--mem`` value in GB: ``16G``, ``16GB``, ``16000M``, ``16000`` (MB), ``1.5T``, ``800K``.

    Units are decimal (1 G = 1000 M), as in fMRIPrep; a bare number is megabytes.
    """
    match = _MEMORY.fullmatch(str(text).strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"invalid memory {text!r}: use a number with an optional unit, e.g. 16G, 16000M, "
            "16000 (MB) or 1.5T")
    unit = (match["unit"] or "M").upper()
    value = float(match["number"]) * _GB_PER_UNIT[unit]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid memory {text!r}: must be more than zero")
    return value


def _integer(minimum: int, none_is: int | None = None) -> Callable[[str], int]:
    """An integer >= ``minimum``; the word ``none`` maps to ``none_is`` when that is given."""

    def integer(text: str) -> int:
        if none_is is not None and str(text).lower() == "none":
            return none_is
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return integer


# --------------------------------------------------------------------------------------------
# The parser.


def build_parser() -> argparse.ArgumentParser:
    """The ``ugi-bids`` parser (for ``--help`` and documentation tools).

    Its namespace holds only the options given (SUPPRESS defaults); use :func:`parse_args` to
    get a validated :class:`Config` with the defaults filled in.
    """
    return _build_parser(positionals=True)


def _build_parser(positionals: bool) -> _Parser:
    """The parser; without positionals it reads the options of a ``--config-file``."""
    parser = _Parser(
        prog=PROG, allow_abbrev=False, argument_default=argparse.SUPPRESS, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION)
    if positionals:
        _add_positionals(parser)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", dest="verbose", action="count",
                        help="increases log verbosity for each occurrence (-v, -vv)")
    _add_filtering(parser)
    _add_performance(parser)
    _add_workflow(parser)
    _add_registration(parser)
    _add_other(parser)
    return parser


def _add_positionals(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bids_dir", metavar="BIDS_DIR",
                        help="the root folder of a BIDS dataset (sub-XXXXX folders at the top "
                             "level); read only")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR",
                        help="the output path for the outcomes of preprocessing and visual "
                             "reports; must be outside BIDS_DIR")
    # No ``choices``: an unknown level must exit 17, not argparse's 2 (checked in parse_args).
    parser.add_argument("analysis_level", metavar="{participant,group}",
                        help="processing stage to be run: participant (per subject) or group")


def _add_filtering(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Options for filtering BIDS queries")
    group.add_argument("--skip-bids-validation", "--skip_bids_validation",
                       dest="skip_bids_validation", action="store_true",
                       help="assume the input dataset is BIDS compliant and skip the validation")
    group.add_argument("--participant-label", "--participant_label", dest="participant_label",
                       nargs="+", type=_label("sub-"), metavar="LABEL",
                       help="a space delimited list of participant identifiers or a single "
                            "identifier (the sub- prefix can be removed); default: all")
    group.add_argument("--session-label", "--session-id", dest="session_label", nargs="+",
                       type=_label("ses-"), metavar="LABEL",
                       help="a space delimited list of session identifiers or a single "
                            "identifier (the ses- prefix can be removed); default: all")
    queries = ", ".join(FILTER_QUERIES)
    group.add_argument("--bids-filter-file", dest="bids_filter_file", metavar="FILE",
                       help="a JSON file describing custom BIDS input filters using PyBIDS; "
                            f"keys are query names ({queries}), values map entities to "
                            'labels, e.g. {"t1w": {"acq": "mprage", "rec": null}} (null: the '
                            'entity is absent, "*": any value)')
    group.add_argument("--bids-database-dir", dest="bids_database_dir", metavar="PATH",
                       help="path to a PyBIDS database folder, for faster indexing (created "
                            "when missing; must be outside BIDS_DIR)")
    group.add_argument("--anat-suffixes", dest="anat_suffixes", nargs="+",
                       choices=tuple(SUFFIX_MODALITY), metavar="SUFFIX",
                       help="anatomical images to register, among "
                            f"{', '.join(SUFFIX_MODALITY)} (default: T1w)")


def _add_performance(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Options to handle performance")
    group.add_argument("--nprocs", "--nthreads", "--n-cpus", "--n_cpus", dest="nprocs",
                       type=_integer(1), metavar="NPROCS",
                       help="maximum number of threads across all processes (default: all "
                            "the CPUs available)")
    group.add_argument("--omp-nthreads", dest="omp_nthreads", type=_integer(1),
                       metavar="OMP_NTHREADS",
                       help="maximum number of threads per process (default: every core of "
                            "--nprocs, or on a GPU their share among the --gpu-procs "
                            "registrations)")
    group.add_argument("--mem", "--mem-mb", "--mem_mb", dest="mem_gb", type=memory_gb,
                       metavar="MEMORY",
                       help="upper bound memory limit for ugi-bids processes, e.g. 16G, "
                            "16000M, 16000 (a bare number is MB) or 1.5T")
    group.add_argument("--use-plugin", "--nipype-plugin-file", dest="use_plugin",
                       metavar="FILE",
                       help="nipype plugin configuration file (YAML), e.g. "
                            "{plugin: MultiProc, plugin_args: {n_procs: 8, memory_gb: 32}}; "
                            f"plugins: {', '.join(PLUGINS)}")
    group.add_argument("--gpu-procs", dest="gpu_procs", type=_integer(1), metavar="N",
                       help="registrations run at the same time on the GPU (MultiProc's "
                            "n_gpu_procs; default: 1)")
    group.add_argument("--sloppy", dest="sloppy", action="store_true",
                       help="use a reduced network grid for speed - TESTING ONLY")


def _add_workflow(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Workflow configuration")
    group.add_argument("--output-spaces", dest="output_spaces", nargs="+", metavar="SPACE",
                       help="TemplateFlow templates to register to, with niworkflows' syntax "
                            "SPACE[:cohort-X][:res-N] (res- is a TemplateFlow resolution "
                            "index, not mm), e.g. MNI152NLin2009cAsym MNI152NLin6Asym:res-2 "
                            "MNIPediatricAsym:cohort-3 (default: MNI152NLin2009cAsym, unless "
                            "only --template is given)")
    group.add_argument("--template", dest="template", action="append",
                       metavar="NAME=PATH[,mask=PATH]",
                       help="a custom template given by path (study-specific, non-brain, "
                            "animal); becomes the output space NAME (space-NAME); repeatable; "
                            "NAME must differ from the --output-spaces names")


def _add_registration(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Registration options")
    group.add_argument("--model", dest="model", choices=MODELS,
                       help="pretrained network (default: unigradicon)")
    group.add_argument("--weights", dest="weights", metavar="PATH",
                       help="weights file to use instead of the cached release of --model "
                            "(must exist)")
    group.add_argument("--io-iterations", "--io_iterations", dest="io_iterations",
                       type=_integer(0, none_is=0), metavar="N",
                       help="instance-optimisation steps after the network's prediction; 0 "
                            "turns it off (default: 50)")
    group.add_argument("--io-similarity", "--io_sim", dest="io_similarity",
                       choices=SIMILARITIES,
                       help="similarity optimised by instance optimisation (default: lncc)")
    group.add_argument("--prealign", dest="prealign", choices=PREALIGN_MODES,
                       help="world-space pre-alignment: none (voxel-grid correspondence, as the "
                            "published tool), header (trust the headers), affine (default)")
    group.add_argument("--device", dest="device", choices=DEVICES,
                       help="where the network runs: auto (a GPU when one is visible; "
                            "default), cpu or cuda")
    group.add_argument("--precision", dest="precision", choices=PRECISIONS,
                       help="network arithmetic on a GPU: float32 (default) or tf32 (opt-in: "
                            "faster on tensor-core GPUs, maps differ slightly; see the README)")
    group.add_argument("--io-checkpointing", dest="io_checkpointing", choices=IO_CHECKPOINTING,
                       help="instance optimisation recomputes the U-Nets' activations (on: "
                            "about 6 GB per registration at full size) or keeps them (off: "
                            "about 10 GB, steps about 15%% shorter on a CPU); auto (default): on "
                            "for the CPU, off on a GPU with room. The maps are the same")


def _add_other(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Other options")
    group.add_argument("-w", "--work-dir", dest="work_dir", metavar="WORK_DIR",
                       help="path where intermediate results should be stored; reusing it "
                            "resumes a run (default: ./work; must be outside BIDS_DIR)")
    group.add_argument("--clean-workdir", dest="clean_workdir", action="store_true",
                       help="clears the working directory of contents; use of this flag is not "
                            "recommended when running concurrent processes of ugi-bids")
    group.add_argument("--resource-monitor", dest="resource_monitor", action="store_true",
                       help="enable Nipype's resource monitoring to keep track of memory and "
                            "CPU usage")
    group.add_argument("--config-file", dest="config_file", metavar="FILE",
                       help="a TOML file with options (keys: long option names, e.g. "
                            "io-iterations = 10); options on the command line override it")
    group.add_argument("--stop-on-first-crash", dest="stop_on_first_crash",
                       action="store_true",
                       help="force stopping on first crash, even if a work directory was "
                            "specified")
    group.add_argument("--boilerplate-only", "--boilerplate_only", dest="boilerplate_only",
                       action="store_true", help="generate boilerplate only")
    group.add_argument("--reports-only", dest="reports_only", action="store_true",
                       help="only generate reports, don't run workflows; this will only rerun "
                            "report aggregation, not reportlet generation for specific nodes")
    group.add_argument("--notrack", dest="notrack", action="store_true",
                       help="opt out of usage tracking (accepted so that fMRIPrep command "
                            "lines work unchanged)")


# --------------------------------------------------------------------------------------------
# Parsing.


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse a ``ugi-bids`` command line (``sys.argv[1:]`` by default) into a :class:`Config`.

    Raises :class:`UgiError` (one-line message, ``exit_code`` per the BIDS-App draft; see the
    module docstring) on bad input, ``SystemExit(0)`` after ``--help``/``--version``. Creates
    nothing on disk.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    given = vars(build_parser().parse_args(argv))
    check_analysis_level(given["analysis_level"])
    options = {**read_config_file(given["config_file"]), **given} if "config_file" in given \
        else given
    return options_to_config(options)


def parse_args_or_exit(argv: Sequence[str] | None = None) -> Config:
    """:func:`parse_args`, but a bad command line prints one line and exits with its code."""
    try:
        return parse_args(argv)
    except UgiError as error:
        raise SystemExit(report_error(error)) from None


def report_error(error: UgiError, stream: TextIO | None = None) -> int:
    """Print ``ugi-bids: error: <message>`` (one line) on ``stream`` (stderr); return the code."""
    print(f"{PROG}: error: {one_line(str(error))}", file=stream or sys.stderr)
    return error.exit_code


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of blanks collapsed to single spaces."""
    return " ".join(str(text).split())


def check_analysis_level(level: str) -> None:
    """Raise :class:`AnalysisLevelError` (exit 17) unless ``level`` is a known analysis level."""
    if level not in ANALYSIS_LEVELS:
        raise AnalysisLevelError(
            f"unknown analysis level {level!r}: choose one of {', '.join(ANALYSIS_LEVELS)}")


# --------------------------------------------------------------------------------------------
# --config-file (TOML).


def read_config_file(path_text: str) -> dict[str, Any]:
    """The options a ``--config-file`` sets, as parsed (converted and checked) values by dest.

    Each key/value is rewritten as command-line tokens and parsed by the same parser, so values
    get exactly the checks they get on the command line.
    """
    path = _existing_file(path_text, "--config-file")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config-file {path} is not valid TOML: {exc}") from None
    parser = _build_parser(positionals=False)
    tokens: list[str] = []
    for key, value in table.items():
        tokens += _config_tokens(parser, key, value, path)
    try:
        return vars(parser.parse_args(tokens))
    except UsageError as exc:
        raise UsageError(f"--config-file {path}: {exc}") from None


def _config_action(parser: argparse.ArgumentParser, key: str, path: Path) -> argparse.Action:
    """The option a config-file key names (``io-iterations``, ``io_iterations``, ``--mem``)."""
    name = key.lstrip("-")
    # argparse keeps the option-string index in a private attribute; it has not changed in years.
    actions = parser._option_string_actions  # noqa: SLF001
    action = actions.get(f"--{name}") or actions.get(f"--{name.replace('_', '-')}")
    if action is None or action.dest in _NOT_IN_CONFIG_FILE:
        raise UsageError(f"--config-file {path}: unknown option {key!r} (keys are long option "
                         f"names without dashes, e.g. io-iterations; see '{PROG} --help')")
    return action


def _config_tokens(parser: argparse.ArgumentParser, key: str, value: Any, path: Path) -> list:
    """Command-line tokens equivalent to ``key = value`` in a config file."""
    action = _config_action(parser, key, path)
    flag = next(s for s in action.option_strings if s.startswith("--"))

    def fail(expected: str):
        return UsageError(f"--config-file {path}: {key} must be {expected}, got {value!r}")

    if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
        if not isinstance(value, bool):
            raise fail("true or false")
        return [flag] if value else []
    if isinstance(action, argparse._CountAction):  # noqa: SLF001
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, int) or value < 0:
            raise fail("a count (0, 1, 2...)")
        return [flag] * value
    items = value if isinstance(value, list) else [value]
    if any(isinstance(item, (bool, dict, list)) for item in items):
        raise fail("a string or a number (or a list of them)")
    items = [str(item) for item in items]
    if isinstance(action, argparse._AppendAction):  # noqa: SLF001
        return [f"{flag}={item}" for item in items]
    if action.nargs == "+":
        return [flag, *items]
    if isinstance(value, list):
        raise fail("a single value")
    return [f"{flag}={items[0]}"]


# --------------------------------------------------------------------------------------------
# From parsed options to Config.


def options_to_config(options: dict[str, Any]) -> Config:
    """Validate parsed options (dest -> value; absent = default) and build the :class:`Config`."""
    bids_dir = _bids_dir(options["bids_dir"])
    output_dir = _outside(options["output_dir"], bids_dir, "OUTPUT_DIR")
    _refuse_file(output_dir, "OUTPUT_DIR")
    work_dir = _outside(options.get("work_dir", "work"), bids_dir, "the work directory (-w)")
    _refuse_file(work_dir, "the work directory (-w)")
    values: dict[str, Any] = {"bids_dir": bids_dir, "output_dir": output_dir,
                              "work_dir": work_dir,
                              "analysis_level": options["analysis_level"]}
    if "bids_database_dir" in options:
        values["bids_database_dir"] = _outside(options["bids_database_dir"], bids_dir,
                                               "--bids-database-dir")
    if "bids_filter_file" in options:
        values["bids_filters"] = load_bids_filters(options["bids_filter_file"])
    if "use_plugin" in options:
        values["plugin"] = load_plugin(options["use_plugin"])
    if "weights" in options:
        values["weights"] = _weights(options["weights"])
    for name in ("participant_label", "session_label", "anat_suffixes"):
        if name in options:
            values[name] = list(dict.fromkeys(options[name]))  # drop repeats, keep the order
    for name in ("skip_bids_validation", "model", "io_iterations", "io_similarity", "prealign",
                 "device", "precision", "io_checkpointing", "gpu_procs", "sloppy", "nprocs", "omp_nthreads", "mem_gb",
                 "clean_workdir", "stop_on_first_crash", "resource_monitor",
                 "boilerplate_only", "reports_only", "notrack", "verbose"):
        if name in options:
            values[name] = options[name]
    _resources_from_plugin(values)
    _check_threads(values)
    if "output_spaces" in options or "template" in options:
        values["output_spaces"] = output_spaces(options.get("output_spaces"),
                                                options.get("template", []))
    return Config(**values)


def absolute(text: str | os.PathLike) -> Path:
    """``text`` as an absolute, normalised path (``~`` expanded; symbolic links kept)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(text))))


def _bids_dir(text: str) -> Path:
    path = absolute(text)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise MissingInputError(f"BIDS_DIR {path} {what}")
    return path


def _outside(text: str, bids_dir: Path, what: str) -> Path:
    """``text`` made absolute; :class:`UsageError` when it is ``bids_dir`` or inside it."""
    path = absolute(text)
    resolved, root = path.resolve(), bids_dir.resolve()
    if resolved == root or root in resolved.parents:
        raise UsageError(f"{what} {path} is inside BIDS_DIR {bids_dir}: the input dataset is "
                         "never written to; choose a folder outside it")
    return path


def _refuse_file(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} exists and is not a directory")


def _existing_file(text: str, option: str) -> Path:
    """``text`` made absolute; :class:`MissingInputError` (66) unless it is a file."""
    path = absolute(text)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise MissingInputError(f"{option} {path} {what}")
    return path


def _read_text(path: Path, option: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{option} {path} is not a UTF-8 text file") from None


def _weights(text: str) -> Path:
    path = absolute(text)
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise WeightsError(f"--weights {path}: {what}; give an existing weights file, or leave "
                           "--weights out to use the cached release")
    return path


def load_bids_filters(text: str) -> dict:
    """Read and check a ``--bids-filter-file``: ``{query: {entity: value}}``.

    Query names are those of :data:`FILTER_QUERIES`; a value is a string, a number, ``null``
    (entity absent), ``"*"`` (any value), or a list of those. Values are kept as written (the
    BIDS query code turns ``null``/``"*"`` into PyBIDS' ``Query.NONE``/``Query.ANY``).
    """
    path = _existing_file(text, "--bids-filter-file")
    try:
        filters = json.loads(_read_text(path, "--bids-filter-file"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"--bids-filter-file {path} is not valid JSON: {exc}") from None
    if not isinstance(filters, dict):
        raise UsageError(f"--bids-filter-file {path} must hold a JSON object such as "
                         '{"t1w": {"acq": "mprage"}}')
    for query, entities in filters.items():
        _check_filter(path, query, entities)
    return filters


def _check_filter(path: Path, query: str, entities: Any) -> None:
    if query not in FILTER_QUERIES:
        raise UsageError(f"--bids-filter-file {path}: unknown query {query!r}; known queries: "
                         f"{', '.join(FILTER_QUERIES)}")
    if not isinstance(entities, dict):
        raise UsageError(f"--bids-filter-file {path}: {query!r} must map BIDS entities to "
                         f'values, e.g. {{"acq": "mprage"}}, got {json.dumps(entities)}')
    for entity, value in entities.items():
        items = value if isinstance(value, list) else [value]
        if not all(item is None or isinstance(item, (str, int)) for item in items):
            raise UsageError(f"--bids-filter-file {path}: {query}.{entity} must be a string, "
                             f"a number, null or a list of them, got {json.dumps(value)}")


def load_plugin(text: str) -> dict:
    """Read and check a ``--use-plugin`` YAML file: ``{"plugin": name, "plugin_args": {...}}``.

    The plugin name is matched case-insensitively and returned in nipype's spelling.
    """
    import yaml

    path = _existing_file(text, "--use-plugin")
    try:
        data = yaml.safe_load(_read_text(path, "--use-plugin"))
    except yaml.YAMLError as exc:
        raise UsageError(f"--use-plugin {path} is not valid YAML: {one_line(exc)}") from None
    if not isinstance(data, dict) or "plugin" not in data:
        raise UsageError(f"--use-plugin {path} must be a YAML mapping with a 'plugin' key, e.g. "
                         "{plugin: MultiProc, plugin_args: {n_procs: 8}}")
    unknown = sorted(set(map(str, data)) - {"plugin", "plugin_args"})
    if unknown:
        raise UsageError(f"--use-plugin {path}: unknown key {unknown[0]!r} (keys: plugin, "
                         "plugin_args)")
    names = {name.lower(): name for name in PLUGINS}
    name = names.get(str(data["plugin"]).lower())
    if name is None:
        raise UsageError(f"--use-plugin {path}: unsupported plugin {data['plugin']!r}; choose "
                         f"one of {', '.join(PLUGINS)}")
    plugin_args = data.get("plugin_args") or {}
    if not isinstance(plugin_args, dict):
        raise UsageError(f"--use-plugin {path}: plugin_args must be a mapping")
    return {"plugin": name, "plugin_args": plugin_args}


def _resources_from_plugin(values: dict[str, Any]) -> None:
    """Take ``n_procs``/``memory_gb`` from the plugin's arguments when not given (fMRIPrep)."""
    plugin_args = (values.get("plugin") or {}).get("plugin_args", {})
    for key, name, convert in (("n_procs", "nprocs", _integer(1)),
                               ("memory_gb", "mem_gb", lambda v: memory_gb(f"{v}G"))):
        if key in plugin_args and name not in values:
            try:
                values[name] = convert(str(plugin_args[key]))
            except argparse.ArgumentTypeError as exc:
                raise UsageError(f"--use-plugin: plugin_args.{key}: {exc}") from None


def _check_threads(values: dict[str, Any]) -> None:
    nprocs, omp = values.get("nprocs"), values.get("omp_nthreads")
    if nprocs is not None and omp is not None and omp > nprocs:
        raise UsageError(f"--omp-nthreads {omp} exceeds --nprocs {nprocs}: per-process threads "
                         "cannot outnumber the total")


# --------------------------------------------------------------------------------------------
# Output spaces (syntax delegated to ugi_bids.utils.templates).


def output_spaces(spaces: list[str] | None, templates: list[str]) -> list[SpaceSpec]:
    """TemplateFlow ``spaces`` then the custom ``templates``, as :class:`SpaceSpec`.

    Without ``spaces`` (no ``--output-spaces``) only the custom templates are used, so a run with
    ``--template`` alone does not also need TemplateFlow's MNI template. A custom name that
    repeats another custom name or a TemplateFlow name of ``spaces`` is a usage error.
    """
    from ..utils import templates as parse  # lazy: keeps --help and bad command lines fast

    specs = _delegate(parse.parse_output_spaces, list(spaces), "--output-spaces") if spaces \
        else []
    seen = {spec.name.casefold(): "--output-spaces" for spec in specs}
    for text in templates:
        spec = _delegate(parse.parse_custom_template, text, "--template")
        clash = seen.get(spec.name.casefold())
        if clash:
            raise UsageError(f"--template {text}: the name {spec.name!r} is already used by "
                             f"{clash}; give the custom template another name")
        seen[spec.name.casefold()] = "another --template"
        specs.append(dataclasses.replace(
            spec, path=absolute(spec.path) if spec.path else None,
            mask=absolute(spec.mask) if spec.mask else None))
    return specs


def _delegate(function: Callable, value: Any, option: str):
    """``function(value)``; a ValueError becomes a one-line :class:`UsageError` for ``option``."""
    try:
        return function(value)
    except UgiError:
        raise
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise UsageError(f"{option}: {one_line(exc)}") from None


if __name__ == "__main__":  # a dry check: print the settings a command line resolves to
    print(json.dumps(parse_args_or_exit().to_dict(), indent=2))
