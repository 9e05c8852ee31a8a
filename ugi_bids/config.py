"""The settings of one ``ugi-bids`` run, filled by the command-line parser (and optionally a
``--config-file``), read by the workflow builders.

A :class:`Config` is written as TOML with sections, as fMRIPrep does (:meth:`Config.to_toml`),
and read back (:meth:`Config.from_toml`, or :func:`read_settings` for the settings a file sets).
Keys are the :class:`Config` field names:

* ``[execution]``: paths, BIDS selection, the run's flags, ``verbose`` and ``run_uuid``;
* ``[workflow]``: ``anat_suffixes``, the output spaces (``output_spaces``: TemplateFlow spaces
  in niworkflows' syntax ``SPACE[:cohort-X][:res-N]``; ``templates``: custom templates,
  ``NAME=PATH[,mask=PATH]``), every registration setting, and the labels (``atlases``:
  ``NAME[:desc-DESC]`` or ``NAME=PATH[,labels=TSV][,space=SPACE]``; ``atlas_libraries``:
  ``NAME=DIR``; ``label_fusion``), the anatomical reference (``subject_anatomical_reference``)
  and template building (``template_iterations``, ``template_gradient_step``,
  ``template_average``; ``build_template``: the group level's study template ``tpl-NAME``);
* ``[nipype]``: ``nprocs``, ``omp_nthreads``, ``mem_gb``, ``plugin``, ``gpu_procs``, ``device``;
* ``[environment]``: written for the record (versions, the device and weights the run
  resolved), ignored when read; ``run_uuid`` is kept by :meth:`Config.from_toml` and dropped by
  ``--config-file`` (a new run gets a new id).

An absent key means the default. ``bids_filters`` and ``plugin`` are TOML tables, or a JSON
string where they hold ``null`` (TOML has none). Reading checks what can be checked without
the dataset (types, choices, ranges, label, space and template-name syntax; a custom
template's files must exist), and :meth:`Config.from_settings` checks the settings together
(an output space at least, ``build_template`` at the group level only): a bad value is one
line, :class:`~ugi_bids.errors.UsageError` (exit 2). Nothing here imports ``argparse``; the
checks against the dataset live in :mod:`ugi_bids.cli.parser`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import sys
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .engine.options import (
    ANATOMICAL_REFERENCES,
    DEFAULT_ANATOMICAL_REFERENCE,
    DEFAULT_DEVICE,
    DEFAULT_FUSION,
    DEFAULT_IO_CHECKPOINTING,
    DEFAULT_MODEL,
    DEFAULT_NETWORK_SIZE,
    DEFAULT_PREALIGN,
    DEFAULT_PREALIGN_DOF,
    DEFAULT_PRECISION,
    DEFAULT_SIMILARITY,
    DEFAULT_TEMPLATE_AVERAGE,
    DEFAULT_TEMPLATE_GRADIENT_STEP,
    DEFAULT_TEMPLATE_ITERATIONS,
    DEVICES,
    FUSION_METHODS,
    IO_CHECKPOINTING,
    IO_STEPS,
    MODELS,
    PREALIGN_DOFS,
    PREALIGN_MODES,
    PRECISIONS,
    SIMILARITIES,
    SLOPPY_NETWORK_SIZE,
    TEMPLATE_AVERAGES,
)
from .errors import UgiError, UsageError, one_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as the ``tomli`` package
    import tomli as tomllib

#: BIDS suffixes we register, and the intensity model each one uses.
SUFFIX_MODALITY = {"T1w": "mri", "T2w": "mri", "FLAIR": "mri", "PDw": "mri", "CT": "ct"}
ANALYSIS_LEVELS = ("participant", "group")
#: ``bids_filters`` query names and the BIDS suffix each one selects.
FILTER_QUERIES = {suffix.lower(): suffix for suffix in SUFFIX_MODALITY}
#: Nipype execution plugins (``plugin``, ``--use-plugin``).
PLUGINS = ("MultiProc", "Linear", "SLURM", "SLURMGraph", "SGE", "PBS", "LSF")
_LABEL = re.compile(r"[A-Za-z0-9]+")


@dataclass
class SpaceSpec:
    """One output space: a TemplateFlow name or a custom template given by path.

    ``resolution`` is a TemplateFlow resolution index (``res-``), not millimetres; ``cohort``
    selects a TemplateFlow cohort. ``path``/``mask`` are set only for custom templates
    (``--template NAME=PATH[,mask=PATH]``).
    """

    name: str
    resolution: str | None = None
    cohort: str | None = None
    path: Path | None = None
    mask: Path | None = None

    @property
    def is_custom(self) -> bool:
        return self.path is not None

    @property
    def label(self) -> str:
        """The ``space-`` / ``to-`` label: name plus ``+cohort`` when a cohort is set (NiPreps)."""
        return f"{self.name}+{self.cohort}" if self.cohort else self.name

    @property
    def text(self) -> str:
        """The spec as written on the command line: ``SPACE[:cohort-X][:res-N]`` for a
        TemplateFlow space, ``NAME=PATH[,mask=PATH]`` for a custom template."""
        if self.is_custom:
            return f"{self.name}={self.path}" + (f",mask={self.mask}" if self.mask else "")
        return self.name + (f":cohort-{self.cohort}" if self.cohort else "") + \
            (f":res-{self.resolution}" if self.resolution else "")


@dataclass
class AtlasSpec:
    """One ``--atlases`` value: a TemplateFlow atlas (``NAME[:desc-DESC]``), looked up in the
    first output space that has it, or a label map given by path
    (``NAME=PATH[,labels=TSV][,space=SPACE]``) in the output space ``space`` (default: the
    first one)."""

    name: str
    desc: str | None = None
    path: Path | None = None
    labels: Path | None = None
    space: str | None = None

    @property
    def is_custom(self) -> bool:
        return self.path is not None

    @property
    def label(self) -> str:
        """The entities of the outputs: ``atlas-NAME[_desc-DESC]``."""
        return f"atlas-{self.name}" + (f"_desc-{self.desc}" if self.desc else "")

    @property
    def text(self) -> str:
        """The spec as written on the command line."""
        if self.is_custom:
            return f"{self.name}={self.path}" + (f",labels={self.labels}" if self.labels else "") \
                + (f",space={self.space}" if self.space else "")
        return self.name + (f":desc-{self.desc}" if self.desc else "")


@dataclass
class LibrarySpec:
    """One ``--atlas-library NAME=DIR``: a folder of labelled images fused into ``atlas-NAME``."""

    name: str
    path: Path

    @property
    def label(self) -> str:
        return f"atlas-{self.name}"

    @property
    def text(self) -> str:
        return f"{self.name}={self.path}"


@dataclass
class Config:
    """Everything a run needs. Paths are absolute."""

    # positional arguments
    bids_dir: Path
    output_dir: Path
    analysis_level: str = "participant"
    # BIDS selection
    participant_label: list[str] = field(default_factory=list)  # without "sub-"; empty = all
    session_label: list[str] = field(default_factory=list)  # without "ses-"; empty = all
    bids_filters: dict = field(default_factory=dict)  # query name (t1w, t2w, ...) -> entities
    bids_database_dir: Path | None = None
    skip_bids_validation: bool = False
    anat_suffixes: list[str] = field(default_factory=lambda: ["T1w"])
    # spaces
    output_spaces: list[SpaceSpec] = field(
        default_factory=lambda: [SpaceSpec("MNI152NLin2009cAsym")])
    # labels
    atlases: list[AtlasSpec] = field(default_factory=list)
    atlas_libraries: list[LibrarySpec] = field(default_factory=list)
    label_fusion: str = DEFAULT_FUSION
    # anatomical reference and template building
    subject_anatomical_reference: str = DEFAULT_ANATOMICAL_REFERENCE
    template_iterations: int = DEFAULT_TEMPLATE_ITERATIONS
    template_gradient_step: float = DEFAULT_TEMPLATE_GRADIENT_STEP
    template_average: str = DEFAULT_TEMPLATE_AVERAGE
    build_template: str | None = None  # group level: the study template OUTPUT_DIR/tpl-NAME/
    # registration
    model: str = DEFAULT_MODEL
    weights: Path | None = None
    io_iterations: int = IO_STEPS
    io_similarity: str = DEFAULT_SIMILARITY
    prealign: str = DEFAULT_PREALIGN
    prealign_dof: int = DEFAULT_PREALIGN_DOF  # degrees of freedom of the affine pre-alignment
    device: str = DEFAULT_DEVICE
    precision: str = DEFAULT_PRECISION
    io_checkpointing: str = DEFAULT_IO_CHECKPOINTING
    gpu_procs: int = 1
    sloppy: bool = False
    # performance
    nprocs: int | None = None
    omp_nthreads: int | None = None
    mem_gb: float | None = None
    plugin: dict | None = None  # {"plugin": "MultiProc", "plugin_args": {...}}
    # other
    work_dir: Path = field(default_factory=lambda: Path("work").absolute())
    clean_workdir: bool = False
    stop_on_first_crash: bool = False
    resource_monitor: bool = False
    boilerplate_only: bool = False
    reports_only: bool = False
    notrack: bool = False
    verbose: int = 0
    # set at parse time
    run_uuid: str = field(default_factory=lambda: "{}_{}".format(
        datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"), uuid.uuid4()))

    @property
    def network_size(self) -> int:
        """Network input grid: 175 (released model), or the reduced grid under ``--sloppy``."""
        return SLOPPY_NETWORK_SIZE if self.sloppy else DEFAULT_NETWORK_SIZE

    def to_dict(self) -> dict:
        """JSON-friendly form (paths as strings), for logs and provenance."""
        return _plain(asdict(self))

    def to_sections(self, environment: dict | None = None) -> dict[str, dict]:
        """The settings by TOML section (see the module docstring); ``None`` values are left
        out (they are the defaults), ``environment`` (a flat table) is added for the record."""
        plain = self.to_dict()
        plain["output_spaces"] = [s.text for s in self.output_spaces if not s.is_custom]
        plain["templates"] = [s.text for s in self.output_spaces if s.is_custom]
        plain["atlases"] = [a.text for a in self.atlases]
        plain["atlas_libraries"] = [a.text for a in self.atlas_libraries]
        tables: dict[str, dict] = {}
        for section, keys in SECTIONS.items():
            table = tables[section] = {}
            for key in keys:
                value = plain[key]
                if isinstance(value, dict) and _holds_none(value):
                    value = json.dumps(value)  # TOML has no null
                if value is not None:
                    table[key] = value
        if environment:
            tables["environment"] = {key: value for key, value in _plain(environment).items()
                                     if value is not None}
        return tables

    def to_toml(self, environment: dict | None = None) -> str:
        """The settings as TOML text that :meth:`from_toml` and ``--config-file`` read back."""
        import tomli_w

        return tomli_w.dumps(self.to_sections(environment))

    @classmethod
    def from_toml(cls, text: str, source: str = "TOML") -> Config:
        """The :class:`Config` a TOML text describes (``[execution]`` must give ``bids_dir``
        and ``output_dir``); bad content raises a one-line :class:`UsageError` naming
        ``source``."""
        settings = read_settings(text, source)
        for key in ("bids_dir", "output_dir"):
            if key not in settings:
                raise UsageError(f"{source}: [execution] {key} is missing")
        return cls.from_settings(settings)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> Config:
        """A :class:`Config` from checked settings (:func:`read_settings`' form: field names,
        with the TemplateFlow ``output_spaces`` and the custom ``templates`` apart), checked
        together (:func:`combine_spaces`, :func:`check_build_template`)."""
        values = dict(settings)
        spaces, templates = values.pop("output_spaces", None), values.pop("templates", None)
        if spaces is not None or templates is not None:
            values["output_spaces"] = combine_spaces(spaces or [], templates or [])
        config = cls(**values)
        check_build_template(config)
        return config


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _holds_none(value) -> bool:
    if isinstance(value, dict):
        return any(_holds_none(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_none(v) for v in value)
    return value is None


# --------------------------------------------------------------------------------------------
# The sections, and what each key holds.


@dataclass(frozen=True)
class _Key:
    kind: str  # path, str, int, gb, fraction, bool, labels, strings, filters, plugin, spaces,
    # templates, atlases, libraries, name (a TemplateFlow template name)
    choices: tuple = ()
    minimum: int = 0
    prefix: str = ""


_FLAG = _Key("bool")
#: Section -> key -> what the key holds. Every :class:`Config` field is in exactly one section
#: (``output_spaces`` as two keys: ``output_spaces`` and ``templates``).
SECTIONS: dict[str, dict[str, _Key]] = {
    "execution": {
        "bids_dir": _Key("path"), "output_dir": _Key("path"),
        "analysis_level": _Key("str", ANALYSIS_LEVELS),
        "participant_label": _Key("labels", prefix="sub-"),
        "session_label": _Key("labels", prefix="ses-"),
        "bids_filters": _Key("filters"), "bids_database_dir": _Key("path"),
        "skip_bids_validation": _FLAG, "work_dir": _Key("path"), "clean_workdir": _FLAG,
        "stop_on_first_crash": _FLAG, "resource_monitor": _FLAG, "boilerplate_only": _FLAG,
        "reports_only": _FLAG, "notrack": _FLAG, "verbose": _Key("int"),
        "run_uuid": _Key("str"),
    },
    "workflow": {
        "anat_suffixes": _Key("strings", tuple(SUFFIX_MODALITY)),
        "output_spaces": _Key("spaces"), "templates": _Key("templates"),
        "model": _Key("str", MODELS), "weights": _Key("path"),
        "io_iterations": _Key("int"), "io_similarity": _Key("str", SIMILARITIES),
        "prealign": _Key("str", PREALIGN_MODES), "prealign_dof": _Key("int", PREALIGN_DOFS),
        "precision": _Key("str", PRECISIONS),
        "io_checkpointing": _Key("str", tuple(IO_CHECKPOINTING)), "sloppy": _FLAG,
        "atlases": _Key("atlases"), "atlas_libraries": _Key("libraries"),
        "label_fusion": _Key("str", FUSION_METHODS),
        "subject_anatomical_reference": _Key("str", ANATOMICAL_REFERENCES),
        "template_iterations": _Key("int", minimum=1), "template_gradient_step": _Key("fraction"),
        "template_average": _Key("str", TEMPLATE_AVERAGES), "build_template": _Key("name"),
    },
    "nipype": {
        "nprocs": _Key("int", minimum=1), "omp_nthreads": _Key("int", minimum=1),
        "mem_gb": _Key("gb"), "plugin": _Key("plugin"), "gpu_procs": _Key("int", minimum=1),
        "device": _Key("str", DEVICES),
    },
}
#: Sections written for the record and skipped when read.
RECORD_SECTIONS = ("environment",)


def read_settings(text: str, source: str = "TOML") -> dict[str, Any]:
    """The settings a TOML text sets, checked and converted, by key (see :data:`SECTIONS`):
    paths absolute (a relative one is read from the current directory), labels without their
    ``sub-``/``ses-`` prefix, ``output_spaces``/``templates`` as :class:`SpaceSpec` lists.
    Unknown sections or keys and bad values raise a one-line :class:`UsageError` that starts
    with ``source``; a custom template's missing file keeps its own error (exit 66)."""
    try:
        tables = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source} is not valid TOML: {one_line(exc)}") from None
    settings: dict[str, Any] = {}
    names = ", ".join(f"[{name}]" for name in SECTIONS)
    for section, table in tables.items():
        keys = SECTIONS.get(section)
        if not isinstance(table, dict):
            home = _section_of(section)
            raise UsageError(f"{source}: {section!r} is outside any section; " + (
                f"it belongs in [{home}]" if home else f"sections: {names}"))
        if keys is None and section not in RECORD_SECTIONS:
            raise UsageError(f"{source}: unknown section [{section}] (sections: {names})")
        for key, value in (table.items() if keys is not None else ()):
            if key not in keys:
                raise UsageError(f"{source}: unknown key {key!r} in [{section}]"
                                 f"{_key_hint(key, section)}")
            settings[key] = _convert(value, keys[key], f"{source}: [{section}] {key}")
    return settings


def _section_of(key: str) -> str | None:
    return next((section for section, keys in SECTIONS.items() if key in keys), None)


def _key_hint(key: str, section: str) -> str:
    home = _section_of(key)
    if home:
        return f"; {key} belongs in [{home}]"
    known = [name for keys in SECTIONS.values() for name in keys]
    close = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
    return f"; did you mean {close[0]}?" if close else f"; keys of [{section}]: " + \
        ", ".join(SECTIONS[section])


def _convert(value: Any, key: _Key, where: str) -> Any:
    """``value`` checked and converted for ``key``; :class:`UsageError` naming ``where``."""
    def fail(expected: str):
        return UsageError(f"{where} must be {expected}, got {json.dumps(value, default=str)}")

    kind = key.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if kind == "int":
        if key.choices and (isinstance(value, bool) or not isinstance(value, int)
                            or value not in key.choices):
            raise fail(f"one of {', '.join(map(str, key.choices))}")
        if isinstance(value, bool) or not isinstance(value, int) or value < key.minimum:
            raise fail(f"an integer >= {key.minimum}")
        return value
    if kind == "gb":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise fail("a number of GB above zero")
        return float(value)
    if kind == "fraction":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number in (0, 1]")
        return _checked(fraction, value, None, where)
    if kind in ("filters", "plugin"):
        if isinstance(value, str):  # JSON text, for tables holding null
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise fail("a table, or a JSON object in a string") from None
        return check_bids_filters(value, where) if kind == "filters" else \
            check_plugin(value, where)
    if kind in ("labels", "strings", "spaces", "templates", "atlases", "libraries"):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise fail("a list of strings")
        if kind == "spaces":
            return parse_spaces(items, where) if items else []
        if kind == "templates":
            return parse_templates(items, where)
        if kind == "atlases":
            return parse_atlases(items, where)
        if kind == "libraries":
            return parse_libraries(items, where)
        if kind == "labels":
            items = [_checked(bids_label, item, key.prefix, where) for item in items]
        elif not items or any(item not in key.choices for item in items):
            raise fail(f"a list of {', '.join(key.choices)}")
        return list(dict.fromkeys(items))  # drop repeats, keep the order
    if not isinstance(value, str) or not value:
        raise fail("a non-empty string" if isinstance(value, str) else "a string")
    if kind == "path":
        return absolute(value)
    if kind == "name":
        return _checked(template_name, value, None, where)
    if key.choices and value not in key.choices:
        raise fail(f"one of {', '.join(key.choices)}")
    return value


def _checked(function, value, prefix, where):
    try:
        return function(value) if prefix is None else function(value, prefix)
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Values shared with the command line.


def absolute(text: str | os.PathLike) -> Path:
    """``text`` as an absolute, normalised path (``~`` expanded; symbolic links kept)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(text))))


def bids_label(text: str, prefix: str = "") -> str:
    """A BIDS label, its optional ``prefix`` (``sub-``/``ses-``) stripped; ValueError if it is
    not letters and digits."""
    value = text[len(prefix):] if prefix and text.startswith(prefix) else text
    if not _LABEL.fullmatch(value):
        raise ValueError(f"invalid label {text!r}: BIDS labels are letters and digits only")
    return value


def template_name(text: str) -> str:
    """A name for a template ugi-bids builds (``--build-template``), written as ``tpl-NAME``:
    TemplateFlow's rule, letters and digits only; ValueError otherwise."""
    if not _LABEL.fullmatch(text):
        hint = (f"; leave out the tpl- prefix ({text[4:]!r})" if text.startswith("tpl-")
                and _LABEL.fullmatch(text[4:]) else "")
        raise ValueError(f"invalid template name {text!r}: TemplateFlow template names are "
                         f"letters and digits only (the template is written as tpl-NAME){hint}")
    return text


def fraction(value: float | str) -> float:
    """``value`` as a float in (0, 1] (a shape-update step); ValueError otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not 0 < number <= 1:  # also refuses nan
        raise ValueError(f"must be a number in (0, 1], got {value}")
    return number


def check_build_template(config: Config) -> None:
    """``build_template`` is a group-level setting, and its name must not be that of a
    TemplateFlow output space of the run (:class:`UsageError`). TemplateFlow's whole catalogue
    is not looked up here: listing it takes seconds (:func:`ugi_bids.utils.templates.
    templateflow_names`)."""
    name = config.build_template
    if name is None:
        return
    if config.analysis_level != "group":
        raise UsageError(f"--build-template {name}: a study template is built at the group "
                         f"level; run with the analysis level group (not "
                         f"{config.analysis_level}), or leave --build-template (build_template "
                         "in a --config-file) out")
    clash = next((spec.name for spec in config.output_spaces
                  if not spec.is_custom and spec.name.casefold() == name.casefold()), None)
    if clash:
        raise UsageError(f"--build-template {name}: the name is the TemplateFlow template "
                         f"{clash} (an output space); give the study template another name")


def check_bids_filters(filters: Any, where: str) -> dict:
    """``filters`` checked: ``{query: {entity: value}}`` with the queries of
    :data:`FILTER_QUERIES`; a value is a string, a number, ``None`` (entity absent), ``"*"``
    (any value) or a list of those. Returned as given."""
    if not isinstance(filters, dict):
        raise UsageError(f"{where} must hold a JSON object such as "
                         '{"t1w": {"acq": "mprage"}}')
    for query, entities in filters.items():
        if query not in FILTER_QUERIES:
            raise UsageError(f"{where}: unknown query {query!r}; known queries: "
                             f"{', '.join(FILTER_QUERIES)}")
        if not isinstance(entities, dict):
            raise UsageError(f"{where}: {query!r} must map BIDS entities to values, e.g. "
                             f'{{"acq": "mprage"}}, got {json.dumps(entities)}')
        for entity, value in entities.items():
            items = value if isinstance(value, list) else [value]
            if not all(item is None or (isinstance(item, (str, int))
                                        and not isinstance(item, bool)) for item in items):
                raise UsageError(f"{where}: {query}.{entity} must be a string, a number, null "
                                 f"or a list of them, got {json.dumps(value)}")
    return filters


def check_plugin(data: Any, where: str) -> dict:
    """A Nipype plugin setting checked: ``{"plugin": name, "plugin_args": {...}}``, the name
    matched case-insensitively and returned in Nipype's spelling."""
    if not isinstance(data, dict) or "plugin" not in data:
        raise UsageError(f"{where} must be a mapping with a 'plugin' key, e.g. "
                         "{plugin: MultiProc, plugin_args: {n_procs: 8}}")
    unknown = sorted(set(map(str, data)) - {"plugin", "plugin_args"})
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} (keys: plugin, plugin_args)")
    name = {name.lower(): name for name in PLUGINS}.get(str(data["plugin"]).lower())
    if name is None:
        raise UsageError(f"{where}: unsupported plugin {data['plugin']!r}; choose one of "
                         f"{', '.join(PLUGINS)}")
    plugin_args = data.get("plugin_args") or {}
    if not isinstance(plugin_args, dict):
        raise UsageError(f"{where}: plugin_args must be a mapping")
    return {"plugin": name, "plugin_args": plugin_args}


def parse_spaces(values: list[str], where: str) -> list[SpaceSpec]:
    """TemplateFlow spaces in niworkflows' syntax (``ugi_bids.utils.templates``)."""
    from .utils import templates  # lazy: keeps --help and bad command lines fast

    return _delegate(templates.parse_output_spaces, list(values), where)


def parse_templates(values: list[str], where: str) -> list[SpaceSpec]:
    """Custom templates ``NAME=PATH[,mask=PATH]``, their paths made absolute."""
    from .utils import templates

    specs = [_delegate(templates.parse_custom_template, value, where) for value in values]
    return [dataclasses.replace(spec, path=absolute(spec.path) if spec.path else None,
                                mask=absolute(spec.mask) if spec.mask else None)
            for spec in specs]


def parse_atlases(values: list[str], where: str) -> list[AtlasSpec]:
    """``--atlases`` values (:func:`ugi_bids.utils.atlases.parse_atlas`); repeats dropped."""
    from .utils import atlases

    specs = [_delegate(atlases.parse_atlas, value, where) for value in values]
    return list({spec.label: spec for spec in reversed(specs)}.values())[::-1]


def parse_libraries(values: list[str], where: str) -> list[LibrarySpec]:
    """``--atlas-library NAME=DIR`` values (:func:`ugi_bids.utils.atlases.parse_library`)."""
    from .utils import atlases

    return [_delegate(atlases.parse_library, value, where) for value in values]


def _delegate(function, value, where: str):
    """``function(value)``; its errors become one line that starts with ``where``."""
    try:
        return function(value)
    except UgiError as exc:
        raise type(exc)(f"{where}: {one_line(exc)}") from None
    except ValueError as exc:
        raise UsageError(f"{where}: {one_line(exc)}") from None


def combine_spaces(spaces: list[SpaceSpec], templates: list[SpaceSpec]) -> list[SpaceSpec]:
    """The TemplateFlow ``spaces`` then the custom ``templates``; a custom name that repeats
    another custom name or a TemplateFlow name is a :class:`UsageError`, and so is no space."""
    seen = {spec.name.casefold(): "--output-spaces" for spec in spaces}
    for spec in templates:
        clash = seen.get(spec.name.casefold())
        if clash:
            raise UsageError(f"--template {spec.text}: the name {spec.name!r} is already used "
                             f"by {clash}; give the custom template another name")
        seen[spec.name.casefold()] = "another --template"
    if not spaces and not templates:
        raise UsageError("no output space: give --output-spaces or --template")
    return [*spaces, *templates]
