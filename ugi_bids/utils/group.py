"""The group level: ``ugi-bids BIDS_DIR OUTPUT_DIR group``.

It reads what the participant level left in ``OUTPUT_DIR`` (file names, JSON sidecars, TSV
tables and the runs' ``ugi-bids.toml``; never an image) and writes, at the output root:

* ``group_registrations.tsv`` (+ ``.json``): one row per registration, i.e. per forward
  transform sidecar ``sub-X[_ses-Y]_from-<suffix>_to-<space>_mode-image_xfm.json`` (with
  ``--longitudinal``: the subject template's ``sub-X_from-<suffix>_to-<space>`` and each
  session's ``from-orig_to-<suffix>``, whose space is the subject template, ``<suffix>``);
* ``group_atlas-<A>[_desc-<D>]_volumes.tsv`` (+ ``.json``) for every atlas found (a root lookup
  table ``atlas-<A>[_desc-<D>]_dseg.tsv`` or a participant's ``*_volumes.tsv``): one row per
  participant and session that has the atlas' volumes, one column per label of the lookup
  table (index order, background 0 left out, repeated names made unique with ``_<index>``),
  and ``brain_volume_mm3``, all in mm^3;
* ``group_*`` is added to ``.bidsignore`` (these names are not BIDS).

Rows exist only for results that exist; a cell the participant level left empty is ``n/a``.
What is missing is never silently absent: every participant or session still missing or
half-finished is one ``ugi-bids: warning:`` line on stderr and an entry of ``Incomplete`` in
every sidecar.

Expected:

* participants: ``BIDS_DIR/sub-*`` folders (``--participant-label`` restricts them, and a
  label it names is expected even where no folder exists), and every participant with results;
* sessions: ``BIDS_DIR/sub-X[/ses-Y]/anat`` folders holding an image (by name only) of a suffix
  of the participant's latest run (``--session-label`` restricts them), and every session with
  results;
* per session: each suffix with an image there (or, where ``BIDS_DIR`` has no such folder, each
  suffix with a forward transform) x each space of the latest run, both directions (``.h5`` and
  ``.json``); and, where the session has an image of the run's first suffix (the labels' grid),
  the ``_volumes.tsv`` and ``.json`` of every atlas: those of the latest run (``--atlases``,
  ``--atlas-library``) and those with a root lookup table or a participant's volumes. "The
  latest run" is the last ``sub-X/log/<run_uuid>/ugi-bids.toml`` (``run_uuid`` sorts by
  time); without one, or where it cannot be read, this run's own settings.

A session is missing when nothing expected is there, half-finished when only some of it is (or a
file is unreadable); crash files in a participant's latest log folder mark it half-finished too.

Errors: an ``OUTPUT_DIR`` that does not exist, or holds no ``sub-*/**/*_xfm.json`` (for the
selected participants), is :class:`~ugi_bids.errors.NoDataError` (exit 18: nothing to
summarise, as "the filters selected nothing"; both cases get the same code so that a script
need not tell "never run" from "wrong folder"); nothing is written then. Every file is written
atomically and deterministically (sorted rows, ``repr`` floats, no time stamps): a rerun on the
same results gives the same bytes.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ..config import SUFFIX_MODALITY, Config, read_settings
from ..engine.formats.staging import write_text_atomic
from ..errors import NoDataError, UgiError, one_line
from .provenance import PIPELINE_NAME, SETTINGS_FILE, dump_json, write_bidsignore

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as the ``tomli`` package
    import tomli as tomllib

LOGGER = logging.getLogger("ugi_bids.group")

NA = "n/a"
REGISTRATIONS_FILE = "group_registrations.tsv"
#: Columns of ``group_registrations.tsv`` after the four identifying ones: forward sidecar key,
#: whether the value is a number, description, units.
REGISTRATION_COLUMNS = {
    "folded_fraction": ("FoldedVoxelFraction", True, (
        "Fraction of the template's voxels where the forward map folds (Jacobian determinant "
        "not positive)"), None),
    "similarity": ("Similarity", True, (
        "Similarity of the registered pair after registration, by similarity_metric"), None),
    "similarity_metric": ("SimilarityMetric", False, "The metric of the similarity column",
                          None),
    "prealign": ("PrealignMode", False, "Pre-alignment mode: affine, header or none", None),
    "prealign_dof": ("PrealignDOF", False, (
        "Degrees of freedom of the affine pre-alignment: 6 (rigid), 7 (similarity), 9 or 12 "
        "(affine); n/a unless the pre-alignment mode is affine"), None),
    "device": ("Device", False, "Device the registration ran on (cpu, cuda:0, ...)", None),
    "seconds": ("RegistrationSeconds", True, "Time the registration took", "s"),
}
_ENTITY = "[A-Za-z0-9+]+"
_TRANSFORM = re.compile(
    rf"from-(?P<source>{_ENTITY})_to-(?P<target>{_ENTITY})_mode-image_xfm\.(?P<ext>h5|json)")
_VOLUMES = re.compile(rf"(?P<atlas>atlas-{_ENTITY}(?:_desc-{_ENTITY})?)_volumes\.(?P<ext>tsv|json)")
_LOOKUP = re.compile(rf"(?P<atlas>atlas-{_ENTITY}(?:_desc-{_ENTITY})?)_dseg\.tsv")
_IDS = ("participant_id", "session_id")
_IDS_DESCRIPTION = {
    "participant_id": {"Description": "Participant label (sub-<label>)"},
    "session_id": {"Description": "Session label (ses-<label>), n/a without sessions"},
}


@dataclass(frozen=True, order=True)
class Unit:
    """One participant and session (``session`` empty where the participant has none)."""

    participant: str
    session: str = ""

    @property
    def participant_id(self) -> str:
        return f"sub-{self.participant}"

    @property
    def session_id(self) -> str:
        return f"ses-{self.session}" if self.session else NA

    @property
    def prefix(self) -> str:
        """The file-name prefix, ``sub-X[_ses-Y]``."""
        return self.participant_id + (f"_ses-{self.session}" if self.session else "")

    @property
    def where(self) -> str:
        """``sub-X[ ses-Y]``, for messages."""
        return self.participant_id + (f" ses-{self.session}" if self.session else "")

    def anat(self, root: Path) -> Path:
        """Its ``anat`` folder under ``root`` (BIDS_DIR or OUTPUT_DIR)."""
        folder = root / self.participant_id
        return (folder / f"ses-{self.session}" if self.session else folder) / "anat"


@dataclass(frozen=True, order=True)
class Issue:
    """A participant or session still missing or half-finished."""

    unit: Unit
    status: str  # "missing" or "half-finished"
    reason: str

    @property
    def line(self) -> str:
        return f"{self.unit.where}: {self.reason}"

    def record(self) -> dict[str, str]:
        return {"participant_id": self.unit.participant_id, "session_id": self.unit.session_id,
                "Status": self.status, "Reason": self.reason}


@dataclass
class UnitResults:
    """What the participant level left for one :class:`Unit` (read from names and tables)."""

    names: set[str] = field(default_factory=set)  # file names without the "sub-X[_ses-Y]_"
    sidecars: dict[tuple[str, str], dict] = field(default_factory=dict)  # (suffix, space)
    volumes: dict[str, dict[int, float | None]] = field(default_factory=dict)  # atlas: index
    labels: dict[str, dict[int, str]] = field(default_factory=dict)  # atlas: index -> name
    brain: dict[str, float | None] = field(default_factory=dict)  # atlas: BrainVolume
    problems: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# The entry point


def run_group(config: Config) -> int:
    """Run the group level for ``config`` (see the module docstring); returns the exit code (0).

    Raises :class:`~ugi_bids.errors.NoDataError` (exit 18, nothing written) when ``OUTPUT_DIR``
    does not exist or holds no participant-level results for the selected participants.
    """
    out = config.output_dir
    with_results = participants_with_results(out, config.participant_label)
    if not with_results:
        selection = (" for participant(s) " + ", ".join(config.participant_label)
                     if config.participant_label else "")
        state = "does not exist" if not out.is_dir() else \
            "holds no participant-level results (no sub-*/**/*_xfm.json" + selection + ")"
        raise NoDataError(f"OUTPUT_DIR {out} {state}: run the participant level first")
    units, issues = collect_results(config, with_results)
    files = {REGISTRATIONS_FILE: registrations_table(units)}
    files.update(atlas_tables(out, units))
    incomplete = [issue.record() for issue in issues]
    for name, (text, sidecar) in files.items():
        write_text_atomic(out / name, text, "group table")
        sidecar["Incomplete"] = incomplete
        write_text_atomic(out / name.replace(".tsv", ".json"), dump_json(sidecar),
                          "group table sidecar")
    write_bidsignore(out, extra=("group_*",))
    for issue in issues:
        print(f"{PIPELINE_NAME}: warning: {issue.line}", file=sys.stderr)
    LOGGER.info("group level: %d table(s) written to %s; %d participant(s)/session(s) "
                "missing or half-finished", len(files), out, len(issues))
    return 0


# --------------------------------------------------------------------------------------------
# What is there, what is expected


def participants_with_results(out: Path, labels: Sequence[str] = ()) -> list[str]:
    """Labels (no ``sub-``) of the participants with a ``sub-X/**/*_xfm.json`` in ``out``,
    sorted; only those of ``labels`` when given."""
    found = {path.relative_to(out).parts[0][4:] for path in out.glob("sub-*/**/*_xfm.json")}
    return sorted(label for label in found if not labels or label in labels)


def collect_results(config: Config, with_results: list[str]
                    ) -> tuple[dict[Unit, UnitResults], list[Issue]]:
    """The results of every participant and session of ``OUTPUT_DIR`` that has some, and the
    sorted list of participants and sessions missing or half-finished."""
    out, bids = config.output_dir, config.bids_dir
    in_bids = sorted(path.name[4:] for path in bids.glob("sub-*") if path.is_dir())
    participants = sorted(set(config.participant_label or in_bids) | set(with_results))
    found = {label: _result_units(out, label, config.session_label) for label in with_results}
    atlases = sorted({atlas for units in found.values() for results in units.values()
                      for atlas in results.volumes} | set(lookup_tables(out)))
    units: dict[Unit, UnitResults] = {}
    issues: list[Issue] = []
    for label in participants:
        crash = _latest_crash_folder(out, label)
        if label not in found:
            where = "" if label in in_bids else "not in BIDS_DIR and "
            issues.append(Issue(Unit(label), "missing", _with_crash(
                f"{where}no participant-level results", crash)))
            continue
        run = latest_run_settings(out, label, config)
        expected = bids_units(bids, label, run.suffixes, config.session_label)
        run_atlases = sorted(set(atlases) | set(run.atlases))
        template_suffix = longitudinal_suffix(run, expected)
        if template_suffix:  # the subject template: registered to the spaces, labelled
            expected[Unit(label)] = [template_suffix]
        own: list[Issue] = []
        for unit in sorted(set(expected) | set(found[label])):
            results = found[label].get(unit, UnitResults())
            unit_suffixes = expected.get(unit) or sorted({s for s, _ in results.sidecars})
            # the labels land on the grid of the run's first suffix: no image, no labels
            unit_atlases = run_atlases if run.suffixes and run.suffixes[0] in unit_suffixes \
                else []
            gaps = missing_outputs(results, unit_suffixes, run.spaces, unit_atlases,
                                   template_suffix if unit.session else None) + \
                results.problems
            if not results.names:
                own.append(Issue(unit, "missing", _with_crash("no participant-level results",
                                                              crash)))
            elif gaps:
                own.append(Issue(unit, "half-finished", _with_crash(
                    "half-finished: " + ", ".join(gaps), crash)))
            if results.names:
                units[unit] = results
        if crash and not own:
            own.append(Issue(Unit(label), "half-finished",
                             f"half-finished: crash files in {crash}"))
        issues.extend(own)
    return units, sorted(issues)


def _with_crash(reason: str, crash: str | None) -> str:
    return reason + (f"; crash files in {crash}" if crash else "")


def missing_outputs(results: UnitResults, suffixes: Sequence[str], spaces: Sequence[str],
                    atlases: Sequence[str], through_template: str | None = None) -> list[str]:
    """What one session lacks of the expected registrations (both directions, ``.h5`` and
    ``.json``) and atlas volumes (``.tsv`` and ``.json``), as message fragments.

    ``through_template``: the suffix whose image went into the subject template
    (``--longitudinal``): it is expected registered to the template (``from-orig_to-<suffix>``
    and back) instead of to the spaces."""
    gaps = []
    for suffix in suffixes:
        pairs = ([("orig", suffix), (suffix, "orig")] if suffix == through_template else
                 [pair for space in spaces for pair in ((suffix, space), (space, suffix))])
        for source, target in pairs:
            stem = f"from-{source}_to-{target}_mode-image_xfm"
            if not {f"{stem}.h5", f"{stem}.json"} <= results.names:
                gaps.append(f"no from-{source}_to-{target} transform")
    for atlas in atlases:
        if not {f"{atlas}_volumes.tsv", f"{atlas}_volumes.json"} <= results.names:
            gaps.append(f"no {atlas} volumes")
    return gaps


def bids_units(bids: Path, label: str, suffixes: Sequence[str], sessions: Sequence[str] = ()
               ) -> dict[Unit, list[str]]:
    """The participant's sessions in ``BIDS_DIR`` (only ``sessions`` when given) whose ``anat``
    folder holds an image of one of ``suffixes`` (by file name), with the suffixes found."""
    root = bids / f"sub-{label}"
    units = [Unit(label)] + [Unit(label, path.name[4:]) for path in sorted(root.glob("ses-*"))
                             if path.is_dir()]
    expected = {}
    for unit in units:
        if unit.session and sessions and unit.session not in sessions:
            continue
        anat = unit.anat(bids)
        names = [path.name for path in anat.iterdir()] if anat.is_dir() else []
        present = sorted(suffix for suffix in suffixes if any(
            name.startswith(unit.prefix + "_") and "_part-phase_" not in name
            and name.endswith((f"_{suffix}.nii", f"_{suffix}.nii.gz")) for name in names))
        if present:
            expected[unit] = present
    return expected


def _result_units(out: Path, label: str, sessions: Sequence[str] = ()
                  ) -> dict[Unit, UnitResults]:
    """The results of every session of a participant in ``OUTPUT_DIR`` that has some."""
    root = out / f"sub-{label}"
    units = [Unit(label)] + [Unit(label, path.name[4:]) for path in sorted(root.glob("ses-*"))
                             if path.is_dir()]
    found = {}
    for unit in units:
        anat = unit.anat(out)
        if (unit.session and sessions and unit.session not in sessions) or not anat.is_dir():
            continue
        start = unit.prefix + "_"
        files = {path.name[len(start):]: path for path in sorted(anat.iterdir())
                 if path.is_file() and path.name.startswith(start)}
        if files:
            found[unit] = read_unit(files)
    return found


def read_unit(files: dict[str, Path]) -> UnitResults:
    """Read one session's results: ``files`` maps names without the ``sub-X[_ses-Y]_`` prefix
    to paths. Unreadable sidecars and tables are recorded in ``problems``."""
    results = UnitResults(names=set(files))
    for name, path in sorted(files.items()):
        transform, volumes = _TRANSFORM.fullmatch(name), _VOLUMES.fullmatch(name)
        key = _registration_key(transform) if transform and transform["ext"] == "json" else None
        if key:
            sidecar = _read_json(path)
            if sidecar is None:
                results.problems.append(f"unreadable {path.name}")
            results.sidecars[key] = sidecar or {}
        elif volumes and volumes["ext"] == "tsv":
            _read_volumes(path, volumes["atlas"], results)
    return results


def _registration_key(transform: re.Match) -> tuple[str, str] | None:
    """(suffix, space) of a forward transform's name, or None for an inverse: ``from-<suffix>_to-<space>``,
    and ``from-orig_to-<suffix>`` (a session registered to its subject template, whose space
    is ``<suffix>`` as in ``space-T1w``)."""
    source, target = transform["source"], transform["target"]
    if source == "orig" and target in SUFFIX_MODALITY:
        return target, target
    if source in SUFFIX_MODALITY and target != "orig":
        return source, target
    return None


def _read_volumes(path: Path, atlas: str, results: UnitResults) -> None:
    """Add one ``_volumes.tsv`` (and its sidecar's ``BrainVolume``) to ``results``."""
    rows = _read_tsv(path, ("index", "volume_mm3"))
    sidecar_path = path.with_suffix(".json")
    sidecar = _read_json(sidecar_path) if sidecar_path.is_file() else {}
    for name, content in ((path.name, rows), (sidecar_path.name, sidecar)):
        if content is None:
            results.problems.append(f"unreadable {name}")
    if rows is not None:
        results.volumes[atlas] = {index: _number(row["volume_mm3"]) for index, row in rows}
        results.labels[atlas] = {index: row.get("name") or "" for index, row in rows}
        results.brain[atlas] = _number((sidecar or {}).get("BrainVolume"))


class RunSettings(NamedTuple):
    """What a participant-level run was asked for: anatomical suffixes, space labels (``to-``),
    atlas labels (``atlas-<A>[_desc-<D>]``, atlases and atlas libraries) and whether sessions
    went through a subject template (``--subject-anatomical-reference unbiased``)."""

    suffixes: list[str]
    spaces: list[str]
    atlases: list[str]
    longitudinal: bool = False


def longitudinal_suffix(run: RunSettings, expected: dict) -> str | None:
    """The suffix of the participant's subject template, or None: the run asked for one and
    two or more sessions have an image of its first suffix (the participant level's rule)."""
    if not run.longitudinal or not run.suffixes:
        return None
    with_image = [unit for unit, suffixes in expected.items()
                  if unit.session and run.suffixes[0] in suffixes]
    return run.suffixes[0] if len(with_image) >= 2 else None


def latest_run_settings(out: Path, label: str, config: Config) -> RunSettings:
    """The settings of the participant's latest run (its last ``ugi-bids.toml``), or those of
    ``config`` when there is none or it cannot be read."""
    for path in reversed(_log_folders(out, label)):
        if (path / SETTINGS_FILE).is_file():
            settings = run_settings(path / SETTINGS_FILE)
            if settings is not None:
                return settings
            LOGGER.warning("%s cannot be read; expecting this run's suffixes, spaces and "
                           "atlases", path / SETTINGS_FILE)
            break
    return RunSettings(list(config.anat_suffixes), [s.label for s in config.output_spaces],
                       [a.label for a in (*config.atlases, *config.atlas_libraries)],
                       config.subject_anatomical_reference == "unbiased")


def run_settings(path: Path) -> RunSettings | None:
    """The :class:`RunSettings` a run's ``ugi-bids.toml`` sets (defaults for absent keys),
    through :func:`~ugi_bids.config.read_settings`; where that refuses the file (a custom
    template or atlas since moved, a key this version does not know), from its ``[workflow]``
    table as written. None when the file is not readable TOML."""
    try:
        text = path.read_text(encoding="utf-8")
        try:
            settings = read_settings(text, str(path))
            spaces = [spec.label for spec in (*settings.get("output_spaces", []),
                                              *settings.get("templates", []))]
            atlases = [spec.label for spec in (*settings.get("atlases", []),
                                               *settings.get("atlas_libraries", []))]
        except UgiError:
            from .templates import parse_output_spaces

            settings = tomllib.loads(text).get("workflow", {})
            spaces = [spec.label for spec in parse_output_spaces(
                settings.get("output_spaces", []))] + [
                str(value).partition("=")[0].strip() for value in settings.get("templates", [])]
            atlases = [_atlas_label(str(value)) for key in ("atlases", "atlas_libraries")
                       for value in settings.get(key, [])]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, UgiError, AttributeError,
            TypeError) as exc:
        LOGGER.debug("%s: %s", path, one_line(exc))
        return None
    if "output_spaces" not in settings and "templates" not in settings:
        spaces = [spec.label for spec in _default("output_spaces")]
    return RunSettings(list(settings.get("anat_suffixes", _default("anat_suffixes"))),
                       spaces, atlases,
                       settings.get("subject_anatomical_reference") == "unbiased")


def _atlas_label(text: str) -> str:
    """``atlas-<A>[_desc-<D>]`` of an ``--atlases`` (``NAME[:desc-D]``, ``NAME=PATH,...``) or
    ``--atlas-library`` (``NAME=DIR``) value as written."""
    name, custom, _ = text.partition("=")
    if custom:
        return f"atlas-{name.strip()}"
    name, *modifiers = text.split(":")
    desc = next((m[5:] for m in modifiers if m.startswith("desc-")), None)
    return f"atlas-{name.strip()}" + (f"_desc-{desc}" if desc else "")


def _default(name: str) -> Any:
    """The default value of a :class:`Config` field."""
    return Config.__dataclass_fields__[name].default_factory()


def _log_folders(out: Path, label: str) -> list[Path]:
    """The participant's ``log/<run_uuid>`` folders, oldest first."""
    return sorted(path for path in (out / f"sub-{label}" / "log").glob("*") if path.is_dir())


def _latest_crash_folder(out: Path, label: str) -> str | None:
    """The participant's latest log folder (relative to ``out``) when it holds crash files."""
    folders = _log_folders(out, label)
    if folders and any(folders[-1].glob("crash-*")):
        return folders[-1].relative_to(out).as_posix()
    return None


# --------------------------------------------------------------------------------------------
# The tables


def registrations_table(units: dict[Unit, UnitResults]) -> tuple[str, dict[str, Any]]:
    """``group_registrations.tsv``'s text and its sidecar (without ``Incomplete``)."""
    columns = [*_IDS, "suffix", "space", *REGISTRATION_COLUMNS]
    rows = []
    for unit, results in sorted(units.items()):
        for (suffix, space), sidecar in sorted(results.sidecars.items()):
            cells = [_number(sidecar.get(key)) if numeric else sidecar.get(key)
                     for key, numeric, _, _ in REGISTRATION_COLUMNS.values()]
            rows.append([unit.participant_id, unit.session_id, suffix, space, *cells])
    described = dict(_IDS_DESCRIPTION)
    described["suffix"] = {"Description": "BIDS suffix of the registered anatomical image"}
    described["space"] = {"Description": "Output space (template) label; +<cohort> for a "
                                         "TemplateFlow cohort"}
    for column, (key, _, description, units_) in REGISTRATION_COLUMNS.items():
        described[column] = {"Description": f"{description} (forward transform sidecar's "
                                            f"{key})", **({"Units": units_} if units_ else {})}
    sidecar = {"Description": "One row per registration of the participant level, from the "
                              "sub-*/[ses-*/]anat/*_from-<suffix>_to-<space>_mode-image_xfm.json "
                              "sidecars", **described}
    return _tsv(columns, rows), sidecar


def lookup_tables(out: Path) -> dict[str, dict[int, str]]:
    """The root ``atlas-<A>[_desc-<D>]_dseg.tsv`` lookup tables: atlas label -> index -> name
    (background 0 left out)."""
    tables = {}
    for path in sorted(out.glob("atlas-*_dseg.tsv")):
        match, rows = _LOOKUP.fullmatch(path.name), _read_tsv(path, ("index", "name"))
        if match and rows is not None:
            tables[match["atlas"]] = {index: row["name"] for index, row in rows if index}
        elif match:
            LOGGER.warning("%s cannot be read; the labels come from the participants' tables",
                           path)
    return tables


def atlas_tables(out: Path, units: dict[Unit, UnitResults]
                 ) -> dict[str, tuple[str, dict[str, Any]]]:
    """``group_<atlas>_volumes.tsv`` by name: its text and its sidecar (without
    ``Incomplete``), for every atlas with a lookup table or a participant's volumes."""
    lookups = lookup_tables(out)
    atlases = sorted(set(lookups) | {atlas for r in units.values() for atlas in r.volumes})
    tables = {}
    for atlas in atlases:
        lookup = lookups.get(atlas)
        if lookup is None:  # no root table: the participants' names, first one seen wins
            lookup = {}
            for _, results in sorted(units.items()):
                for index, name in results.labels.get(atlas, {}).items():
                    lookup.setdefault(index, name)
        indices = sorted(index for index in lookup if index)
        columns = label_columns({index: lookup[index] for index in indices})
        rows = [[unit.participant_id, unit.session_id,
                 *(results.volumes[atlas].get(index) for index in indices),
                 results.brain.get(atlas)]
                for unit, results in sorted(units.items()) if atlas in results.volumes]
        table = f"{atlas}_dseg.tsv" if atlas in lookups else None
        sidecar = {
            "Description": f"Label volumes of {atlas}, one row per participant and session, "
                           f"from the sub-*/[ses-*/]anat/*_{atlas}_volumes.tsv tables",
            "Atlas": atlas,
            "LookupTable": table,
            **_IDS_DESCRIPTION,
            **{column: {"Description": f"Volume of label {index} ({lookup[index]}) of "
                                       f"{table or atlas}", "Units": "mm^3"}
               for index, column in zip(indices, columns)},
            "brain_volume_mm3": {"Description": "Brain volume (the participant-level sidecar's "
                                                "BrainVolume)", "Units": "mm^3"},
        }
        tables[f"group_{atlas}_volumes.tsv"] = (
            _tsv([*_IDS, *columns, "brain_volume_mm3"], rows), sidecar)
    return tables


def label_columns(labels: dict[int, str]) -> list[str]:
    """One unique column name per label (index order): its name; ``<name>_<index>`` where the
    name repeats, is empty or is one of the table's other columns."""
    counts: dict[str, int] = {}
    for name in labels.values():
        counts[name] = counts.get(name, 0) + 1
    taken = {*_IDS, "brain_volume_mm3"}
    columns = []
    for index, name in sorted(labels.items()):
        column = name if name and counts[name] == 1 and name not in taken else \
            f"{name or 'label'}_{index}"
        while column in taken:
            column += f"_{index}"
        taken.add(column)
        columns.append(column)
    return columns


# --------------------------------------------------------------------------------------------
# Reading and writing cells


def _read_json(path: Path) -> dict | None:
    """The JSON object in ``path``; None when it cannot be read or is not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_tsv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]] | None:
    """``(index, row)`` of a BIDS TSV with an ``index`` column, by index; None when it cannot be
    read, lacks a ``required`` column or has a row without an integer index."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            rows = list(reader)
            if not set(required) <= set(reader.fieldnames or ()):
                return None
        return sorted(((int(row["index"]), row) for row in rows), key=lambda item: item[0])
    except (OSError, UnicodeDecodeError, csv.Error, TypeError, ValueError):
        return None


def _number(value: Any) -> float | None:
    """A finite float, or None (absent, null, ``n/a``, text, NaN, a boolean)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _cell(value: Any) -> str:
    """A TSV cell: ``n/a`` for None or empty text, ``repr`` for floats (exact, stable), text on
    one line otherwise."""
    if value is None:
        return NA
    if isinstance(value, float):
        return repr(value)
    return " ".join(str(value).split()) or NA


def _tsv(columns: list[str], rows: list[list[Any]]) -> str:
    return "".join("\t".join(_cell(cell) for cell in row) + "\n" for row in [columns, *rows])
