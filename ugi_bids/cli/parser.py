"""The ``ugi-bids`` command line: ``ugi-bids BIDS_DIR OUTPUT_DIR {participant,group} [options]``.

NiPreps-style options (fMRIPrep/sMRIPrep users will recognise the names and the help groups) plus
the registration options of ``ugi-register``. :func:`parse_args` turns a command line (and an
optional ``--config-file``) into a :class:`~ugi_bids.config.Config`; nothing is created or
written while parsing.

Errors. :func:`parse_args` never exits on bad input: it raises a
:class:`~ugi_bids.errors.UgiError` whose ``str()`` is one line and whose ``exit_code``
follows the BIDS-App draft:

* :class:`UsageError` (exit 2, argparse's own code, one of the draft's "2/64"): bad syntax, bad
  option values, unreadable JSON/YAML/TOML, unknown sections or keys in a ``--config-file``,
  ``OUTPUT_DIR``/``-w``/``--bids-database-dir`` inside ``BIDS_DIR``, ``--reports-only`` (not
  implemented yet), ``--build-template`` at the participant level or named after an output
  space (checked with the other settings by :meth:`Config.from_settings`);
* :class:`AnalysisLevelError` (exit 17): an analysis level other than ``participant``/``group``;
* :class:`~ugi_bids.errors.MissingInputError` (exit 66): ``BIDS_DIR``, ``--config-file``,
  ``--bids-filter-file`` or ``--use-plugin`` missing;
  :class:`~ugi_bids.errors.WeightsError` (exit 66): ``--weights`` missing;
* :class:`~ugi_bids.errors.OutputError` (exit 73): ``OUTPUT_DIR`` or ``-w`` is a file.

Only ``--help`` and ``--version`` raise ``SystemExit(0)`` (argparse prints them). A runner either
runs under :func:`ugi_bids.errors.guarded`, or calls :func:`parse_args_or_exit`,
which prints ``ugi-bids: error: <one line>`` on stderr and exits with the code.

Defaults live in :class:`Config` only: the parser uses ``argparse.SUPPRESS`` defaults, so the
parsed namespace holds exactly the options that were given. That is what lets ``--config-file``
values act as defaults that explicit command-line flags override (repeatable and counted options
included: ``--template`` or ``-v`` on the command line replace the file's, they do not add to them).

The config file is the TOML that :meth:`Config.to_toml` writes (sections ``[execution]``,
``[workflow]``, ``[nipype]``; see :mod:`ugi_bids.config`), read by
:func:`ugi_bids.config.read_settings`; every run writes one per participant, and it reproduces
the run. The command line and the file both become settings (:func:`command_line_settings`,
:func:`read_config_file`), merged setting by setting, then checked together
(:func:`settings_to_config`), so a value gets the same checks wherever it comes from.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import (
    ANALYSIS_LEVELS,
    FILTER_QUERIES,
    PLUGINS,
    SUFFIX_MODALITY,
    Config,
    absolute,
    bids_label,
    check_bids_filters,
    check_plugin,
    fraction,
    parse_atlases,
    parse_libraries,
    parse_spaces,
    parse_templates,
    read_settings,
    template_name,
)
from ..engine.options import (
    ANATOMICAL_REFERENCES,
    DEFAULT_ANATOMICAL_REFERENCE,
    DEFAULT_PREALIGN_DOF,
    DEFAULT_TEMPLATE_AVERAGE,
    DEFAULT_TEMPLATE_GRADIENT_STEP,
    DEFAULT_TEMPLATE_ITERATIONS,
    DEVICES,
    FUSION_METHODS,
    IO_CHECKPOINTING,
    MODELS,
    PREALIGN_DOFS,
    PREALIGN_MODES,
    PRECISIONS,
    SIMILARITIES,
    TEMPLATE_AVERAGES,
)
from ..errors import (
    AnalysisLevelError,
    MissingInputError,
    OutputError,
    UgiError,
    UsageError,
    WeightsError,
    one_line,
    report,
)

PROG = "ugi-bids"
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

--config-file takes the TOML file every run writes (OUTPUT_DIR/sub-<label>/log/<run_uuid>/
ugi-bids.toml), or one of your own with any of its keys: [execution] paths, selection and flags,
[workflow] spaces, templates, registration, labels and template building, [nipype] resources,
plugin and device; e.g.
    [workflow]
    output_spaces = ["MNI152NLin2009cAsym", "MNI152NLin6Asym:res-2"]
    io_iterations = 10
    sloppy = true
    [nipype]
    nprocs = 8
    mem_gb = 16
Its values are defaults: options given on the command line override them. Relative paths in it
are read from the current directory, as on the command line; [environment] is ignored.
"""




class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`UsageError` instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{PROG} --help')")


# --------------------------------------------------------------------------------------------
# Value types (argparse ``type=`` callables): each raises ArgumentTypeError with a clear message.


def _checked(function: Callable[..., Any], *args: Any) -> Callable[[str], Any]:
    """``function(text, *args)`` (a check of :mod:`ugi_bids.config`), its ValueError turned
    into argparse's ArgumentTypeError."""

    def checked(text: str) -> Any:
        try:
            return function(text, *args)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return checked


def _label(prefix: str) -> Callable[[str], str]:
    """A BIDS label with an optional ``prefix`` (``sub-``/``ses-``) stripped."""
    return _checked(bids_label, prefix)


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
    parser = _Parser(
        prog=PROG, allow_abbrev=False, argument_default=argparse.SUPPRESS, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION)
    _add_positionals(parser)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", dest="verbose", action="count",
                        help="increases log verbosity for each occurrence (-v, -vv)")
    _add_filtering(parser)
    _add_performance(parser)
    _add_workflow(parser)
    _add_registration(parser)
    _add_labels(parser)
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
    group.add_argument("--subject-anatomical-reference", dest="subject_anatomical_reference",
                       choices=ANATOMICAL_REFERENCES,
                       help="sessionwise registers every session on its own; unbiased builds, "
                            "for each participant with 2 or more sessions, a deformable unbiased "
                            "within-subject template with uniGradICON (unlike fMRIPrep's rigid "
                            "mri_robust_template); a participant with one session gets the "
                            "ordinary outputs "
                            f"(default: {DEFAULT_ANATOMICAL_REFERENCE})")
    group.add_argument("--longitudinal", dest="subject_anatomical_reference",
                       action="store_const", const="unbiased",
                       help="same as --subject-anatomical-reference unbiased (fMRIPrep's "
                            "deprecated --longitudinal)")
    group.add_argument("--template-iterations", dest="template_iterations", type=_integer(1),
                       metavar="N",
                       help="shape-update iterations when building a template (subject "
                            "templates and --build-template; default: "
                            f"{DEFAULT_TEMPLATE_ITERATIONS})")
    group.add_argument("--template-gradient-step", dest="template_gradient_step",
                       type=_checked(fraction), metavar="S",
                       help="shape-update step in (0, 1] when building a template, as ANTs' "
                            "antsMultivariateTemplateConstruction2.sh -g (default: "
                            f"{DEFAULT_TEMPLATE_GRADIENT_STEP})")
    group.add_argument("--template-average", dest="template_average",
                       choices=TEMPLATE_AVERAGES,
                       help="how the inputs resampled onto a template are averaged "
                            f"(default: {DEFAULT_TEMPLATE_AVERAGE})")
    group.add_argument("--build-template", dest="build_template", type=_checked(template_name),
                       metavar="NAME",
                       help="group level only: build a study template from one image per "
                            "participant and write it in TemplateFlow layout under "
                            "OUTPUT_DIR/tpl-NAME/; NAME is letters and digits only and not a "
                            "TemplateFlow template name")


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
    group.add_argument("--prealign-dof", dest="prealign_dof", type=int, choices=PREALIGN_DOFS,
                       help="degrees of freedom of the affine pre-alignment: 6 (rigid), 7 "
                            "(similarity), 9 (rigid + per-axis scales) or 12 (full affine) "
                            f"(default: {DEFAULT_PREALIGN_DOF})")
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


def _add_labels(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Atlas labels", "carry atlas labels into every session's native space (through the\n"
        "inverse transforms, label-aware interpolation as ANTs' GenericLabel), with region\n"
        "volumes; or segment every session by multi-atlas label fusion")
    group.add_argument("--atlases", dest="atlases", nargs="+", action="extend", metavar="SPEC",
                       help="atlases to propagate: a TemplateFlow atlas NAME[:desc-DESC] of an "
                            "output space (the first space that has it), e.g. "
                            "Schaefer2018:desc-400Parcels7Networks HOSPA:desc-th25; or a label "
                            "map NAME=PATH[,labels=TSV][,space=SPACE] (SPACE: an output space "
                            "or --template name; default: the first output space)")
    group.add_argument("--atlas-library", dest="atlas_libraries", nargs="+", action="extend",
                       metavar="NAME=DIR",
                       help="a folder of labelled images (each *_dseg.nii.gz with its "
                            "intensity image beside it, e.g. sub-01/anat/sub-01_T1w.nii.gz and "
                            "sub-01_dseg.nii.gz, and a dseg.tsv at the root): every image is "
                            "registered to every session and the warped labels are fused into "
                            "atlas-NAME")
    group.add_argument("--label-fusion", dest="label_fusion", choices=FUSION_METHODS,
                       help="how --atlas-library labels are fused: jlf (joint label fusion, "
                            "Wang & Yushkevich 2013, antsJointFusion's defaults; default) or "
                            "majority (a per-voxel vote, ties broken by local similarity)")


def _add_other(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Other options")
    group.add_argument("-w", "--work-dir", dest="work_dir", metavar="WORK_DIR",
                       help="path where intermediate results should be stored; reusing it "
                            "resumes a run (default: ./work; must be outside BIDS_DIR)")
    group.add_argument("--clean-workdir", dest="clean_workdir", action="store_true",
                       help="after a successful run, remove this run's participants' folders "
                            "from the work directory (nothing outside it; a failed run keeps "
                            "them, to resume)")
    group.add_argument("--resource-monitor", dest="resource_monitor", action="store_true",
                       help="enable Nipype's resource monitoring to keep track of memory and "
                            "CPU usage")
    group.add_argument("--config-file", dest="config_file", metavar="FILE",
                       help="a TOML file of settings, such as the ugi-bids.toml a run writes "
                            "into OUTPUT_DIR/sub-<label>/log/<run_uuid>/ (see below); options "
                            "on the command line override it")
    group.add_argument("--stop-on-first-crash", dest="stop_on_first_crash",
                       action="store_true",
                       help="stop at the first failure: a participant without an image or "
                            "with an unusable one (exit 18/65, before anything is written), "
                            "or the first failed step (otherwise those are reported and the "
                            "others processed)")
    group.add_argument("--boilerplate-only", "--boilerplate_only", dest="boilerplate_only",
                       action="store_true", help="generate boilerplate only")
    # fMRIPrep's option, refused with one line until reports exist (hidden from --help)
    group.add_argument("--reports-only", dest="reports_only", action="store_true",
                       help=argparse.SUPPRESS)
    group.add_argument("--notrack", dest="notrack", action="store_true",
                       help="opt out of usage tracking (accepted so that fMRIPrep command "
                            "lines work unchanged)")


# --------------------------------------------------------------------------------------------
# Parsing: command line and --config-file -> settings -> checked Config.


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse a ``ugi-bids`` command line (``sys.argv[1:]`` by default) into a :class:`Config`.

    Raises :class:`UgiError` (one-line message, ``exit_code`` per the BIDS-App draft; see the
    module docstring) on bad input, ``SystemExit(0)`` after ``--help``/``--version``. Creates
    nothing on disk.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    given = vars(build_parser().parse_args(argv))
    check_analysis_level(given["analysis_level"])
    settings = read_config_file(given.pop("config_file")) if "config_file" in given else {}
    settings.update(command_line_settings(given))  # the command line overrides the file
    return settings_to_config(settings)


def parse_args_or_exit(argv: Sequence[str] | None = None) -> Config:
    """:func:`parse_args`, but a bad command line prints one line and exits with its code."""
    try:
        return parse_args(argv)
    except UgiError as error:
        raise SystemExit(report(PROG, error)) from None


def check_analysis_level(level: str) -> None:
    """Raise :class:`AnalysisLevelError` (exit 17) unless ``level`` is a known analysis level."""
    if level not in ANALYSIS_LEVELS:
        raise AnalysisLevelError(
            f"unknown analysis level {level!r}: choose one of {', '.join(ANALYSIS_LEVELS)}")


def read_config_file(path_text: str) -> dict[str, Any]:
    """The settings a ``--config-file`` (TOML, :func:`ugi_bids.config.read_settings`) sets.

    ``run_uuid`` is dropped: it records the run that wrote the file, and a new run gets its own.
    """
    path = _existing_file(path_text, "--config-file")
    settings = read_settings(_read_text(path, "--config-file"), source=f"--config-file {path}")
    settings.pop("run_uuid", None)
    return settings


def command_line_settings(given: dict[str, Any]) -> dict[str, Any]:
    """The settings the parsed options (dest -> value, only those given) set, in
    :func:`~ugi_bids.config.read_settings`' form: option files read, paths absolute, spaces
    parsed, repeats dropped."""
    settings: dict[str, Any] = {}
    for dest, value in given.items():
        if dest == "bids_filter_file":
            settings["bids_filters"] = load_bids_filters(value)
        elif dest == "use_plugin":
            settings["plugin"] = load_plugin(value)
        elif dest == "output_spaces":
            settings["output_spaces"] = parse_spaces(value, "--output-spaces")
        elif dest == "template":
            settings["templates"] = parse_templates(value, "--template")
        elif dest == "atlases":
            settings["atlases"] = parse_atlases(value, "--atlases")
        elif dest == "atlas_libraries":
            settings["atlas_libraries"] = parse_libraries(value, "--atlas-library")
        elif dest in ("bids_dir", "output_dir", "work_dir", "bids_database_dir", "weights"):
            settings[dest] = absolute(value)
        elif dest in ("participant_label", "session_label", "anat_suffixes"):
            settings[dest] = list(dict.fromkeys(value))  # drop repeats, keep the order
        else:
            settings[dest] = value
    return settings


def settings_to_config(settings: dict[str, Any]) -> Config:
    """Check settings (from the command line and a config file) against the file system and
    each other, and build the :class:`Config`; absent settings take its defaults."""
    values = dict(settings)
    bids_dir = values["bids_dir"] = _bids_dir(values["bids_dir"])
    values["output_dir"] = _outside(values["output_dir"], bids_dir, "OUTPUT_DIR")
    _refuse_file(values["output_dir"], "OUTPUT_DIR")
    values["work_dir"] = _outside(values.get("work_dir", "work"), bids_dir,
                                  "the work directory (-w)")
    _refuse_file(values["work_dir"], "the work directory (-w)")
    if values.get("bids_database_dir") is not None:
        values["bids_database_dir"] = _outside(values["bids_database_dir"], bids_dir,
                                               "--bids-database-dir")
    if values.get("weights") is not None:
        values["weights"] = _weights(values["weights"])
    if values.get("reports_only"):
        raise UsageError("--reports-only: reports are not implemented yet; run without it")
    _resources_from_plugin(values)
    _check_threads(values)
    return Config.from_settings(values)


# --------------------------------------------------------------------------------------------
# Checks against the file system, and the option files.


def _bids_dir(text: str | os.PathLike) -> Path:
    path = absolute(text)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise MissingInputError(f"BIDS_DIR {path} {what}")
    return path


def _outside(text: str | os.PathLike, bids_dir: Path, what: str) -> Path:
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


def _weights(text: str | os.PathLike) -> Path:
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
    return check_bids_filters(filters, f"--bids-filter-file {path}")


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
    return check_plugin(data, f"--use-plugin {path}")


def _resources_from_plugin(values: dict[str, Any]) -> None:
    """Take ``n_procs``/``memory_gb`` from the plugin's arguments when not given (fMRIPrep)."""
    plugin_args = (values.get("plugin") or {}).get("plugin_args", {})
    for key, name, convert in (("n_procs", "nprocs", _integer(1)),
                               ("memory_gb", "mem_gb", lambda v: memory_gb(f"{v}G"))):
        if key in plugin_args and values.get(name) is None:
            try:
                values[name] = convert(str(plugin_args[key]))
            except argparse.ArgumentTypeError as exc:
                raise UsageError(f"--use-plugin: plugin_args.{key}: {exc}") from None


def _check_threads(values: dict[str, Any]) -> None:
    nprocs, omp = values.get("nprocs"), values.get("omp_nthreads")
    if nprocs is not None and omp is not None and omp > nprocs:
        raise UsageError(f"--omp-nthreads {omp} exceeds --nprocs {nprocs}: per-process threads "
                         "cannot outnumber the total")


if __name__ == "__main__":  # a dry check: print the settings a command line resolves to
    print(parse_args_or_exit().to_toml(), end="")
