"""Input selection in a raw BIDS dataset, with pybids.

The BIDS-App layer calls, in order: :func:`load_layout` (index ``BIDS_DIR``), :func:`participants`
(``--participant-label``), :func:`collect_anatomicals` (per participant: sessions, suffixes,
``--bids-filter-file``), then :func:`select_reference` on each (session, suffix) list that has
several images. Failures are :class:`BIDSError` subclasses: one-line messages with the BIDS-App
exit code (16 validation failed, 18 filters selected no files, 66 missing input; 2 for a filter
that names an unknown entity, a usage error like the command-line parser's).

Paths are returned as absolute ``str`` (what Nipype nodes take); inputs accept any path-like.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath

from ugi_bids.cli.config import SUFFIX_MODALITY
from ugi_bids.engine.errors import UgiError

LOGGER = logging.getLogger(__name__)

#: File extensions of the images we register.
NIFTI_EXTENSIONS = (".nii", ".nii.gz")

#: How one image is chosen when a session has several of one suffix (see
#: :func:`select_reference`); a complete sentence for the boilerplate.
REFERENCE_RULE = (
    "When a session contained several images of the same kind (e.g., two T1-weighted runs), a "
    "single one was registered: the image with the lowest run index (an image without a run "
    "entity counting as run 0), ties broken by file name in lexicographic order; the others "
    "were not processed."
)

#: Short entity names users write in filter files, and the pybids names they stand for.
_ENTITY_ALIASES = {
    "sub": "subject", "ses": "session", "acq": "acquisition", "rec": "reconstruction",
    "ce": "ceagent", "dir": "direction", "inv": "inversion", "mod": "modality",
}


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

class BIDSError(UgiError):
    """Base class of the input-selection errors (one-line message, BIDS-App exit code)."""

    exit_code = 1


class BIDSValidationError(BIDSError):
    """``BIDS_DIR`` is not a valid BIDS dataset: exit 16."""

    exit_code = 16


class BIDSSelectionError(BIDSError):
    """The participant/session labels or filters selected nothing: exit 18."""

    exit_code = 18


class BIDSFilterError(BIDSError):
    """A ``--bids-filter-file`` is malformed or names an unknown entity: a usage error, exit 2
    (as the command-line parser's ``UsageError``)."""

    exit_code = 2


class BIDSMissingInputError(BIDSError):
    """``BIDS_DIR`` or the filter file does not exist, or the dataset has no participants: 66."""

    exit_code = 66


def _one_line(text: object) -> str:
    """Collapse whitespace so that a message from a library fits on one line."""
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------------
# Layout and participants
# --------------------------------------------------------------------------------------------

def load_layout(bids_dir: str | os.PathLike, database_dir: str | os.PathLike | None = None,
                validate: bool = True):
    """Index ``bids_dir`` with pybids and return the ``BIDSLayout``.

    ``validate`` is pybids' own flag: the folder must hold a ``dataset_description.json`` with
    the mandatory fields, and files with non-BIDS names are left out of the index. A folder that
    is not a BIDS dataset raises :class:`BIDSValidationError` (exit 16) unless ``validate`` is
    False (``--skip-bids-validation``), in which case every file is indexed.

    ``database_dir`` (``--bids-database-dir``): pybids' SQLite index is stored there and reused
    on the next run; an index that was built for another dataset is rebuilt.
    """
    from bids import BIDSLayout
    from bids.layout.validation import BIDSValidationError as PyBIDSValidationError

    root = Path(bids_dir).absolute()
    if not root.is_dir():
        raise BIDSMissingInputError(f"BIDS dataset folder not found: {root}")
    kwargs = {"validate": validate}
    if database_dir is not None:
        database_dir = Path(database_dir).absolute()
        database_dir.mkdir(parents=True, exist_ok=True)
        kwargs["database_path"] = str(database_dir)
    try:
        layout = BIDSLayout(str(root), **kwargs)
        if database_dir is not None and Path(layout.root).absolute() != root:
            LOGGER.info("BIDS database in %s indexes %s, not %s: rebuilding it",
                        database_dir, layout.root, root)
            layout = BIDSLayout(str(root), reset_database=True, **kwargs)
    except PyBIDSValidationError as exc:
        first = _one_line(str(exc).split("\n")[0])
        raise BIDSValidationError(
            f"{root} is not a valid BIDS dataset: {first} "
            "(fix the dataset, or run with --skip-bids-validation)") from None
    except (OSError, ValueError) as exc:
        raise BIDSValidationError(
            f"cannot index the BIDS dataset {root}: {_one_line(exc)}") from None
    return layout


def strip_prefix(label: str, prefix: str) -> str:
    """``"sub-01"`` -> ``"01"`` for ``prefix="sub-"``; labels without the prefix are unchanged."""
    label = str(label).strip()
    return label[len(prefix):] if label.startswith(prefix) else label


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def participants(layout, labels: Sequence[str] = ()) -> list[str]:
    """The participant labels to process (without ``sub-``), in the order given.

    ``labels`` may carry the ``sub-`` prefix or not; empty selects every participant of the
    dataset (sorted). An unknown label raises :class:`BIDSSelectionError` (exit 18) naming the
    missing labels and the available ones; a dataset without any participant raises
    :class:`BIDSMissingInputError` (exit 66).
    """
    available = sorted(layout.get_subjects())
    if not available:
        raise BIDSMissingInputError(
            f"no participants (sub-*) found in the BIDS dataset {layout.root}")
    if not labels:
        return available
    wanted = _unique(strip_prefix(label, "sub-") for label in labels)
    missing = [label for label in wanted if label not in available]
    if missing:
        raise BIDSSelectionError(
            "participant label(s) not found in {}: {}; available: {}".format(
                layout.root, ", ".join(missing), ", ".join(available)))
    return wanted


def sessions_of(layout, participant: str, labels: Sequence[str] = ()) -> list[str | None]:
    """The sessions of ``participant`` to process: all of them (sorted), or those of ``labels``
    (with or without ``ses-``) that the participant has. A participant without sessions gives
    ``[None]`` when no session was asked for, and ``[]`` when some were (nothing matches)."""
    available = sorted(layout.get_sessions(subject=participant))
    wanted = _unique(strip_prefix(label, "ses-") for label in labels)
    if not available:
        return [] if wanted else [None]
    if not wanted:
        return available
    return [label for label in wanted if label in available]


# --------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------

def query_name(suffix: str) -> str:
    """The ``--bids-filter-file`` key of a suffix: ``T1w`` -> ``t1w``, ``FLAIR`` -> ``flair``."""
    return suffix.lower()


def _filter_value(value):
    """JSON filter value -> pybids query value: ``null`` -> Query.NONE, ``"*"`` -> Query.ANY."""
    from bids.layout import Query

    if value is None:
        return Query.NONE
    if isinstance(value, Query):  # already normalized
        return value
    if value == "*":
        return Query.ANY
    if isinstance(value, list):
        return [_filter_value(item) for item in value]
    if isinstance(value, (str, int, float, bool)):
        return value
    raise BIDSFilterError(
        f"BIDS filter value {value!r} is not a string, number, list, null or \"*\"")


def normalize_filters(filters: Mapping | None) -> dict[str, dict]:
    """Check a ``--bids-filter-file`` mapping and convert it for pybids.

    Keys are query names (``t1w``, ``t2w``, ``flair``, ``pdw``, ``ct``; case-insensitive), values
    are entity dicts. JSON ``null`` becomes ``Query.NONE`` (entity must be absent), ``"*"``
    becomes ``Query.ANY`` (entity must be present, any value). Short entity names (``acq``,
    ``rec``, ``ses``...) are expanded to pybids' names. Keys for other query names (``bold``...)
    are ignored with a log note, so that one filter file can serve several BIDS-Apps.
    """
    if not filters:
        return {}
    if not isinstance(filters, Mapping):
        raise BIDSFilterError("the BIDS filter must be a JSON object such as "
                              '{"t1w": {"acquisition": null}}')
    known = {query_name(suffix) for suffix in SUFFIX_MODALITY}
    normalized = {}
    for key, entities in filters.items():
        name = str(key).lower()
        if name not in known:
            LOGGER.info("BIDS filter for %r ignored: ugi-bids queries %s", key,
                        ", ".join(sorted(known)))
            continue
        if not isinstance(entities, Mapping):
            raise BIDSFilterError(
                f"BIDS filter {key!r} must map entity names to values, got {entities!r}")
        normalized[name] = {_ENTITY_ALIASES.get(entity, entity): _filter_value(value)
                            for entity, value in entities.items()}
    return normalized


def load_bids_filters(path: str | os.PathLike) -> dict:
    """Read a ``--bids-filter-file`` (JSON) as plain data (see :func:`normalize_filters`).

    Missing file: exit 66; not JSON or not an object: exit 2."""
    path = Path(path)
    if not path.is_file():
        raise BIDSMissingInputError(f"BIDS filter file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BIDSFilterError(
            f"BIDS filter file {path} is not valid JSON: {_one_line(exc)}") from None
    normalize_filters(data)  # validate now, so that mistakes surface at parse time
    return data


def _matches(label: str | None, wanted, prefix: str) -> bool:
    """Whether a subject/session label satisfies a (normalized) filter value; values may carry
    the ``sub-``/``ses-`` ``prefix``."""
    from bids.layout import Query

    if wanted is Query.NONE:
        return label is None
    if wanted is Query.ANY:
        return label is not None
    values = wanted if isinstance(wanted, list) else [wanted]
    return any(_matches(label, v, prefix) if isinstance(v, Query) else
               label is not None and strip_prefix(str(v), prefix) == label for v in values)


# --------------------------------------------------------------------------------------------
# Collection
# --------------------------------------------------------------------------------------------

def _query(layout, participant: str, session: str | None, suffix: str, entities: dict) -> list[str]:
    from bids.layout import Query

    query = {"datatype": "anat", "suffix": suffix, "extension": list(NIFTI_EXTENSIONS)}
    scope = dict(entities)
    for reserved, label, prefix in (("subject", participant, "sub-"),
                                    ("session", session, "ses-")):
        # filters may narrow subject/session, never widen them
        if reserved in scope and not _matches(label, scope.pop(reserved), prefix):
            return []
    query.update(scope)
    query.update(subject=participant, session=session if session is not None else Query.NONE)
    try:
        files = layout.get(return_type="file", **query)
    except ValueError as exc:  # pybids: unknown entity
        raise BIDSFilterError(f"BIDS filter for {query_name(suffix)!r}: {_one_line(exc)}") from None
    return sorted(str(Path(f).absolute()) for f in files)


def collect_anatomicals(layout, participant: str, *, suffixes: Sequence[str] = ("T1w",),
                        sessions: Sequence[str] = (), filters: Mapping | None = None,
                        ) -> dict[str | None, dict[str, list[str]]]:
    """Anatomical images of one participant: ``{session: {suffix: [path, ...]}}``.

    - ``session`` keys are labels without ``ses-`` (sorted), or ``None`` for a participant
      without sessions. ``sessions`` restricts them (with or without ``ses-``); a participant
      without sessions then gives ``{}``.
    - Each suffix is queried with ``datatype=anat``, extension ``.nii``/``.nii.gz``, plus the
      entities of ``filters[query_name(suffix)]`` (``--bids-filter-file`` data, raw JSON or
      already normalized; ``null`` = entity absent, ``"*"`` = any value). Filter entries may
      override ``datatype``/``extension``; ``subject``/``session`` in a filter only narrow.
    - Every requested suffix has a key; a session or suffix without usable images maps to an
      empty list. Nothing is raised for empty entries: the caller reports or skips them
      (see :func:`has_images`), so one incomplete session does not stop the others.
    """
    normalized = normalize_filters(filters)
    participant = strip_prefix(participant, "sub-")
    found: dict[str | None, dict[str, list[str]]] = {}
    for session in sessions_of(layout, participant, sessions):
        found[session] = {
            suffix: _query(layout, participant, session, suffix,
                           normalized.get(query_name(suffix), {}))
            for suffix in suffixes
        }
    return found


def has_images(collected: Mapping) -> bool:
    """Whether a :func:`collect_anatomicals` result (or one session entry of it) holds any file."""
    values = collected.values()
    return any(has_images(v) if isinstance(v, Mapping) else bool(v) for v in values)


# --------------------------------------------------------------------------------------------
# Reference selection and URIs
# --------------------------------------------------------------------------------------------

_RUN = re.compile(r"(?:^|_)run-0*(\d+)(?=_)")


def run_index(path: str | os.PathLike) -> int:
    """The ``run-`` index in a BIDS file name, 0 when it has none."""
    match = _RUN.search(Path(path).name)
    return int(match.group(1)) if match else 0


def select_reference(files: Sequence[str | os.PathLike]) -> str:
    """The one image to register among several of one session and suffix.

    Rule (:data:`REFERENCE_RULE`): the lowest run index (no ``run-`` counts as 0), ties broken
    by the file name in lexicographic (Python string) order, then by the full path. Other
    entities (``acq-``, ``rec-``...) are not ranked: use ``--bids-filter-file`` to pick one.
    Deterministic: the answer depends only on the file names, not on their order.
    """
    if not files:
        raise ValueError("select_reference() needs at least one file")
    ranked = sorted(files, key=lambda f: (run_index(f), Path(f).name, str(f)))
    if len(ranked) > 1:
        LOGGER.info("Selected %s as the reference; not processed: %s", Path(ranked[0]).name,
                    ", ".join(Path(f).name for f in ranked[1:]))
    return str(ranked[0])


def bids_uri(path: str | os.PathLike, bids_dir: str | os.PathLike, dataset: str = "raw") -> str:
    """A BIDS URI for a file of a dataset: ``bids:raw:sub-01/anat/sub-01_T1w.nii.gz``.

    Symbolic links are kept as they are (DataLad datasets link into ``.git/annex``); only when
    the plain absolute path is not inside ``bids_dir`` are both sides resolved.
    """
    path, root = Path(path).absolute(), Path(bids_dir).absolute()
    try:
        relative = path.relative_to(root)
    except ValueError:
        try:
            relative = (path.parent.resolve() / path.name).relative_to(root.resolve())
        except ValueError:
            raise ValueError(f"{path} is not inside the dataset {root}") from None
    return f"bids:{dataset}:{PurePosixPath(*relative.parts)}"
