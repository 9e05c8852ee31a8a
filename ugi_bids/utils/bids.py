"""Input selection in a raw BIDS dataset: niworkflows' BIDS helpers, NiPreps style.

The BIDS-App layer calls, in order: :func:`load_layout` (index ``BIDS_DIR``), :func:`participants`
(``--participant-label``; niworkflows' ``collect_participants``), :func:`collect_anatomicals`
(per participant and session: niworkflows' ``collect_data`` with :data:`ANAT_QUERIES` and the
``--bids-filter-file`` filters merged into them as fMRIPrep does), then :func:`select_reference`
on each (session, suffix) list that has several images. Failures are
:class:`~ugi_bids.errors.UgiError` subclasses: one-line messages with the BIDS-App exit code
(16 validation failed, 18 filters selected no files, 66 missing input; 2 for a filter that names
an unknown entity, a usage error like the command-line parser's).

Hand-written here is only what niworkflows lacks (each place says why): exit-coded one-line
errors, the layout with its reusable database, the sessions of a participant, the filter-file
conventions, the reference rule and BIDS URIs.

Paths are returned as absolute ``str`` (what Nipype nodes take); inputs accept any path-like.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath

from ugi_bids.config import SUFFIX_MODALITY
from ugi_bids.errors import (
    BIDSFilterError,
    BIDSValidationError,
    MissingInputError,
    NoDataError,
    one_line,
)

LOGGER = logging.getLogger(__name__)

#: How one image is chosen when a session has several of one suffix (see
#: :func:`select_reference`); a complete sentence for the boilerplate.
REFERENCE_RULE = (
    "When a session contained several images of the same kind (e.g., two T1-weighted runs), a "
    "single one was registered: the image with the lowest run index (an image without a run "
    "entity counting as run 0), ties broken by file name in lexicographic order; the others "
    "were not processed."
)

#: Short entity names users write in filter files, and the pybids names they stand for
#: (``inv``, ``echo``, ``part``... are pybids' own names already).
_ENTITY_ALIASES = {
    "sub": "subject", "ses": "session", "acq": "acquisition", "rec": "reconstruction",
    "ce": "ceagent", "dir": "direction", "mod": "modality",
}


def query_name(suffix: str) -> str:
    """The ``--bids-filter-file`` key of a suffix: ``T1w`` -> ``t1w``, ``FLAIR`` -> ``flair``."""
    return suffix.lower()


#: The pybids query of each anatomical suffix we register, by ``--bids-filter-file`` name
#: (``t1w``, ``t2w``, ``flair``, ``pdw``, ``ct``): sMRIPrep's anatomical queries (as
#: niworkflows' ``DEFAULT_BIDS_QUERIES`` for t1w/t2w/flair). ``part: ['mag', None]`` keeps the
#: phase (real, imaginary) part of a complex-valued acquisition out: only its magnitude, or an
#: image without ``part-``, is registered. ``collect_data`` adds ``.nii``/``.nii.gz``.
ANAT_QUERIES = {
    query_name(suffix): {"datatype": "anat", "suffix": suffix, "part": ["mag", None]}
    for suffix in SUFFIX_MODALITY
}


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

    (niworkflows' layout helper is private, and neither rebuilds a stale database nor turns
    pybids' errors into exit-coded one-liners.)
    """
    from bids import BIDSLayout
    from bids.layout.validation import BIDSValidationError as PyBIDSValidationError

    root = Path(bids_dir).absolute()
    if not root.is_dir():
        raise MissingInputError(f"BIDS dataset folder not found: {root}")
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
        first = one_line(str(exc).split("\n")[0])
        raise BIDSValidationError(
            f"{root} is not a valid BIDS dataset: {first} "
            "(fix the dataset, or run with --skip-bids-validation)") from None
    except (OSError, ValueError) as exc:
        raise BIDSValidationError(
            f"cannot index the BIDS dataset {root}: {one_line(exc)}") from None
    return layout


def strip_prefix(label: str, prefix: str) -> str:
    """``"sub-01"`` -> ``"01"`` for ``prefix="sub-"``; labels without the prefix are unchanged."""
    label = str(label).strip()
    return label.removeprefix(prefix)


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def participants(layout, labels: Sequence[str] = ()) -> list[str]:
    """The participant labels to process (without ``sub-``), in the order given.

    ``labels`` may carry the ``sub-`` prefix or not; empty selects every participant of the
    dataset (sorted). An unknown label raises :class:`NoDataError` (exit 18) naming the
    missing labels and the available ones; a dataset without any participant raises
    :class:`MissingInputError` (exit 66).
    """
    from niworkflows.utils.bids import BIDSError, collect_participants

    wanted = _unique(strip_prefix(label, "sub-") for label in labels)
    try:
        found = collect_participants(layout, participant_label=wanted, strict=True)
    except BIDSError:
        # niworkflows raises a multi-line banner without an exit code, for both cases: say it on
        # one line, with the BIDS-App code
        available = sorted(layout.get_subjects())
        if not available:
            raise MissingInputError(
                f"no participants (sub-*) found in the BIDS dataset {layout.root}") from None
        raise NoDataError(
            "participant label(s) not found in {}: {}; available: {}".format(
                layout.root, ", ".join(label for label in wanted if label not in available),
                ", ".join(available))) from None
    # niworkflows sorts the labels; ours keep the order they were given in (all exist: strict)
    return wanted or found


def unindexed_participants(layout) -> list[str]:
    """Labels of the ``sub-<label>`` folders of the dataset in which pybids indexed no file
    (an empty ``anat/``, images with non-BIDS names): the caller reports them, where pybids
    would leave them out silently."""
    indexed = set(layout.get_subjects())
    return sorted(path.name[4:] for path in Path(layout.root).glob("sub-*")
                  if path.is_dir() and path.name[4:] not in indexed)


def sessions_of(layout, participant: str, labels: Sequence[str] = ()) -> list[str | None]:
    """The sessions of ``participant`` to process: all of them (sorted), or those of ``labels``
    (with or without ``ses-``) that the participant has. A participant without sessions gives
    ``[None]`` when no session was asked for, and ``[]`` when some were (nothing matches).

    (niworkflows has no such listing: ``collect_data`` takes the session, it does not list them;
    and a session without images must still be reported.)"""
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

def _filter_value(value):
    """JSON filter value -> pybids query value: ``null`` -> Query.NONE, ``"*"`` -> Query.ANY
    (fMRIPrep does this while parsing the file; ``collect_data`` expects it done)."""
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

def _scoped(entities: Mapping, participant: str, session: str | None) -> dict | None:
    """``entities`` without ``subject``/``session``, or None when those exclude this participant
    or session. Our own check: a filter file serves every participant and session, so a filter
    that names another one selects nothing here, where niworkflows' ``collect_data`` raises
    (it also refuses ``"*"`` and lists that merely include the session collected)."""
    scoped = dict(entities)
    for reserved, label, prefix in (("subject", participant, "sub-"),
                                    ("session", session, "ses-")):
        if reserved in scoped and not _matches(label, scoped.pop(reserved), prefix):
            return None
    return scoped


def collect_anatomicals(layout, participant: str, *, suffixes: Sequence[str] = ("T1w",),
                        sessions: Sequence[str] = (), filters: Mapping | None = None,
                        ) -> dict[str | None, dict[str, list[str]]]:
    """Anatomical images of one participant: ``{session: {suffix: [path, ...]}}``.

    - ``session`` keys are labels without ``ses-`` (sorted), or ``None`` for a participant
      without sessions. ``sessions`` restricts them (with or without ``ses-``); a participant
      without sessions then gives ``{}``.
    - Each session is collected by niworkflows' ``collect_data`` with the :data:`ANAT_QUERIES`
      of ``suffixes``, updated (as in fMRIPrep) with ``filters[query_name(suffix)]``
      (``--bids-filter-file`` data, raw or normalized; ``null`` = entity absent, ``"*"`` = any
      value): filter entries override the query's (``part``, ``extension``...), while
      ``subject``/``session`` in a filter only narrow.
    - Every requested suffix has a key; a session or suffix without usable images maps to an
      empty list. Nothing is raised for empty entries: the caller reports or skips them
      (see :func:`has_images`), so one incomplete session does not stop the others.
    """
    from bids.layout import Query
    from niworkflows.utils.bids import collect_data

    normalized = normalize_filters(filters)
    participant = strip_prefix(participant, "sub-")
    names = {suffix: query_name(suffix) for suffix in suffixes}
    found: dict[str | None, dict[str, list[str]]] = {}
    for session in sessions_of(layout, participant, sessions):
        queries, scoped = {}, {}
        for name in names.values():
            entities = _scoped(normalized.get(name, {}), participant, session)
            if entities is not None:  # else the filter names another participant or session
                # a fresh copy: collect_data updates its queries in place
                queries[name], scoped[name] = copy.deepcopy(ANAT_QUERIES[name]), entities
        collected: dict[str, list[str]] = {}
        if queries:
            try:
                collected, _ = collect_data(
                    layout, participant, bids_filters=scoped, queries=queries,
                    session_id=session if session is not None else Query.NONE)
            except ValueError as exc:  # pybids: a filter names an unknown entity; say which
                # (pybids' own advice, "set invalid_filters='allow'", is not a user's option)
                known = set(layout.get_entities())
                unknown = {name: sorted(set(entities) - known)
                           for name, entities in scoped.items() if set(entities) - known}
                if not unknown:
                    raise BIDSFilterError(f"BIDS filter: {one_line(exc)}") from None
                name, entities = next(iter(unknown.items()))
                raise BIDSFilterError(
                    f"BIDS filter for {name!r}: unknown entity {entities[0]!r}; use one of "
                    f"{', '.join(sorted(name for name in known if name.islower()))}") from None
        found[session] = {suffix: collected.get(name, []) for suffix, name in names.items()}
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
