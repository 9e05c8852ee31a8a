"""Output spaces: ``--output-spaces`` / ``--template`` parsing, and resolving a space to files.

Resolution semantics
--------------------
``res-N`` is a TemplateFlow resolution *index*, not millimetres (for MNI152NLin2009cAsym,
``res-1`` is the 1 mm grid and ``res-2`` the 2 mm grid; other templates define their own, see
their ``template_description.json``). Without ``res-``, index 1 is used, or the lowest index the
template has when it has no index 1. ``res-native`` is refused: in ugi-bids the template-space
outputs are always on the template's own grid (native-space outputs are written regardless).

TemplateFlow offline
--------------------
Lookups go through TemplateFlow's own client (:class:`templateflow.client.TemplateFlowClient`,
``ls``/``templates``/``get``/``get_metadata``), on two roots: ``$TEMPLATEFLOW_HOME`` (read at call
time; TemplateFlow's default when unset) and a private copy of the skeleton that the installed
package ships, which the client extracts itself, offline, on first use (every template's
metadata and 0-byte placeholders: what TemplateFlow knows of, whatever the home holds). The home
is never written to unless a download is tried; importing :mod:`templateflow` (niworkflows does)
still initialises an empty home, as TemplateFlow always does.

A file found in the home is checked by us before use, since TemplateFlow only tells a 0-byte
placeholder apart: a usable file is returned without any network access. A missing file, an
empty placeholder (the pip package's skeleton ships 0-byte NIfTIs), an S3 error page or a
truncated download triggers ``TemplateFlowClient.get`` (what ``templateflow.api.get`` calls),
bounded: the S3 host name must resolve within ``timeout`` seconds (checked in a separate thread,
since DNS look-ups ignore socket time-outs), then ``requests`` runs with ``timeout`` for
connecting and for each read. Any failure becomes one line (:class:`TemplateError`, exit 66)
that names the template and the file, gives the ``TEMPLATEFLOW_HOME`` in use and the command
that pre-fetches it on a machine with internet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import gzip
import itertools
import logging
import os
import re
import socket
import shutil
import tempfile
import threading
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from ugi_bids.config import SpaceSpec
from ugi_bids.errors import TemplateError, TemplateSpecError, UgiError, one_line

LOGGER = logging.getLogger(__name__)

#: Resolution index used when a space has no ``res-``.
DEFAULT_RESOLUTION = 1
#: Where downloads come from; None: TemplateFlow's own S3 bucket (tests point it at localhost).
S3_ROOT: str | None = None
#: Seconds allowed for the DNS look-up, the connection, and each read of a download.
DOWNLOAD_TIMEOUT = 10.0
#: Refused as template names besides niworkflows' ``NONSTANDARD_REFERENCES``: names for the
#: subject's own image space that niworkflows' list lacks (``scanner``: BIDS' image-based
#: coordinate system; ``orig``: NiPreps' ``from-orig_to-T1w``; ``native``: what ugi-bids calls
#: the subject-space outputs). A template so named would make output names ambiguous.
_MORE_NONSTANDARD = frozenset({"orig", "native", "scanner"})
#: TemplateFlow suffixes that may stand for one of our BIDS suffixes, in order of preference.
_SUFFIX_ALIASES = {"PDw": ("PDw", "PD")}
#: TemplateFlow entities absent from a plain template image or mask (they mark atlases,
#: segmentations, surfaces...): queried as None, i.e. "must not have it".
_PLAIN = dict.fromkeys(("atlas", "density", "hemi", "label", "roi", "scale", "segmentation",
                        "space"))
_NIFTI = (".nii.gz", ".nii")  # in order of preference

_NAME = re.compile(r"[a-zA-Z0-9]+")


@dataclass
class ResolvedTemplate:
    """The files of one output space.

    ``uri`` / ``mask_uri`` are BIDS URIs (``bids:templateflow:tpl-X/...``) for TemplateFlow and
    ``file://`` URIs for custom templates. ``suffix`` is the template image's suffix actually used
    (``T1w`` after a fall-back; None for custom templates) and ``resolution`` the TemplateFlow
    resolution index used (None for custom templates).
    """

    spec: SpaceSpec
    image: Path
    mask: Path | None
    uri: str
    mask_uri: str | None
    suffix: str | None = None
    resolution: int | None = None

    @property
    def label(self) -> str:
        """The ``space-`` / ``to-`` label (``name`` or ``name+cohort``)."""
        return self.spec.label


def _library_error(exc: Exception) -> TemplateError:
    """Importing templateflow (directly or through niworkflows) initialises an empty home and
    indexes it; a failure there (an unwritable home...) becomes one line, not a stack trace."""
    return TemplateError(
        f"cannot start TemplateFlow ({_home_text(templateflow_home())}): "
        f"{type(exc).__name__}: {one_line(exc, 200)}")


@lru_cache(maxsize=1)
def _nonstandard_spaces() -> frozenset[str]:
    """niworkflows' non-standard spaces (``T1w``, ``fsnative``...) and ours: not templates."""
    try:  # lazy: niworkflows' import indexes the TemplateFlow home (seconds)
        from niworkflows.utils.spaces import NONSTANDARD_REFERENCES
    except Exception as exc:  # noqa: BLE001 - ImportError, OSError, pybids errors
        raise _library_error(exc) from None
    return frozenset(NONSTANDARD_REFERENCES) | _MORE_NONSTANDARD


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

def _parse_resolution(value: str, spec: str) -> str:
    if value.lower() == "native":
        raise TemplateSpecError(
            f"{spec}: res-native is not meaningful in ugi-bids (template-space outputs are on the "
            "template's grid, native-space outputs are always written); give a TemplateFlow "
            "resolution index such as res-1 (1 mm for MNI152NLin2009cAsym) or res-2, or leave "
            "res- out for res-1")
    if not value.isdigit() or int(value) == 0:
        raise TemplateSpecError(
            f"{spec}: res-{value} is not a TemplateFlow resolution index (a positive integer such "
            "as 1 or 2; the index is not in millimetres)")
    return str(int(value))


def _parse_space(value: str) -> list[SpaceSpec]:
    parts = value.strip().split(":")
    name = parts[0]
    if not _NAME.fullmatch(name):
        raise TemplateSpecError(
            f"output space {value!r}: expected SPACE[:cohort-X][:res-N] with SPACE made of "
            "letters and digits")
    if name in _nonstandard_spaces():
        raise TemplateSpecError(
            f"output space {name!r} is not a template: give a TemplateFlow template (e.g. "
            "MNI152NLin2009cAsym) or a custom one declared with --template NAME=PATH")
    options: dict[str, list[str]] = {"cohort": [], "res": []}
    for modifier in parts[1:]:
        key, sep, label = modifier.partition("-")
        if key not in options or not sep or not label:
            raise TemplateSpecError(
                f"output space {value!r}: unknown modifier {modifier!r}; volumetric templates "
                "take cohort-<label> and res-<index> (e.g. MNIPediatricAsym:cohort-2:res-1)")
        if key == "res":
            label = _parse_resolution(label, value)
        elif not _NAME.fullmatch(label):
            raise TemplateSpecError(f"output space {value!r}: bad cohort label {label!r}")
        options[key].append(label)
    return [SpaceSpec(name, resolution=res, cohort=cohort)
            for cohort, res in itertools.product(options["cohort"] or [None],
                                                 options["res"] or [None])]


def parse_output_spaces(values) -> list[SpaceSpec]:
    """Parse ``--output-spaces`` values in niworkflows' syntax ``SPACE[:cohort-X][:res-N]``.

    Repeated modifiers expand like niworkflows (``MNIPediatricAsym:cohort-1:cohort-2:res-1``
    gives two spaces); duplicates are dropped, order kept. ``res`` is stored as the index
    without zero padding (``res-01`` -> ``"1"``), ``resolution=None`` when not given.
    Non-standard spaces (``T1w``, ``fsnative``...), ``res-native``, non-integer resolutions and
    surface modifiers (``den-``) raise :class:`TemplateSpecError` (exit 2). Names are not looked
    up here (see :func:`resolve_template`); a name declared with ``--template`` is accepted as is.
    """
    if isinstance(values, str):
        values = [values]
    specs: dict[tuple, SpaceSpec] = {}
    for value in values:
        for spec in _parse_space(str(value)):
            specs.setdefault((spec.name, spec.cohort, spec.resolution), spec)
    return list(specs.values())


def _custom_path(name: str, what: str, value: str) -> Path:
    if not value.strip():
        raise TemplateSpecError(f"--template {name}: empty {what} path")
    path = Path(value.strip()).expanduser().absolute()
    if not path.is_file():
        raise TemplateError(f"custom template {name}: {what} not found: {path}")
    return path


def _reserved_name(name: str) -> str | None:
    """What a custom template name would clash with (case-insensitively), or None."""
    folded = name.casefold()
    for kind, names in (("a non-standard space", _nonstandard_spaces()),
                        ("a TemplateFlow template", templateflow_names())):
        clash = next((n for n in names if n.casefold() == folded), None)
        if clash:
            return f"{kind}: {clash}"
    return None


def parse_custom_template(value: str) -> SpaceSpec:
    """Parse ``--template NAME=PATH[,mask=PATH]`` (a template given by path).

    ``NAME`` ([a-zA-Z0-9]+) becomes the ``space-`` label, so it may be neither a non-standard
    space (``T1w``...) nor a TemplateFlow template name. Paths are made absolute (relative to the
    current folder) and must exist: a missing file raises :class:`TemplateError` (exit 66), a
    malformed value :class:`TemplateSpecError` (exit 2). Paths may not contain commas.
    """
    name, sep, rest = str(value).partition("=")
    name = name.strip()
    if not sep or not rest.strip():
        raise TemplateSpecError(f"--template expects NAME=PATH[,mask=PATH], got {value!r}")
    if not _NAME.fullmatch(name):
        raise TemplateSpecError(
            f"--template name {name!r} must be letters and digits only: it becomes the space- "
            "label of the outputs")
    reserved = _reserved_name(name)
    if reserved:
        raise TemplateSpecError(
            f"--template name {name!r} is reserved ({reserved}); choose another name for a "
            "custom template")
    image, *options = rest.split(",")
    mask = None
    for option in options:
        key, sep, path = option.partition("=")
        if key.strip() != "mask" or not sep:
            raise TemplateSpecError(
                f"--template {name}: unknown option {option!r} (expected mask=PATH)")
        mask = _custom_path(name, "mask", path)
    return SpaceSpec(name, path=_custom_path(name, "image", image), mask=mask)


# --------------------------------------------------------------------------------------------
# TemplateFlow catalogue: the home and the package's skeleton, through TemplateFlow's client
# --------------------------------------------------------------------------------------------

def templateflow_home() -> Path:
    """``$TEMPLATEFLOW_HOME`` read now, or TemplateFlow's default (``~/.cache/templateflow``).

    Ours rather than ``templateflow.conf.env.get_templateflow_home``: importing that initialises
    a home, and it neither expands ``~`` nor treats an empty variable as unset."""
    value = os.environ.get("TEMPLATEFLOW_HOME")
    if value:
        return Path(value).expanduser().absolute()
    from platformdirs import user_cache_dir  # what TemplateFlow uses

    return Path(user_cache_dir("templateflow")).absolute()


def _home_text(home: Path) -> str:
    if os.environ.get("TEMPLATEFLOW_HOME"):
        return f"TEMPLATEFLOW_HOME={home}"
    return f"TEMPLATEFLOW_HOME is not set, so TemplateFlow's default {home} is used"


def _client(root: Path, **config):
    """A TemplateFlow client on ``root`` whose layout indexes file names only.

    TemplateFlow's layout also indexes every JSON sidecar, which took 3 of the 4.6 s that a run
    spent indexing; we query entities only (``template_description.json`` is read directly,
    :func:`_metadata`), so the cache given to the client leaves the sidecars out."""
    try:
        from templateflow.client import TemplateFlowClient
        from templateflow.conf.cache import CacheConfig
    except Exception as exc:  # noqa: BLE001 - see _library_error
        raise _library_error(exc) from None
    return TemplateFlowClient(cache=_names_only_cache()(CacheConfig(root=root, **config)))


@lru_cache(maxsize=1)
def _names_only_cache():
    """TemplateFlow's cache class with a layout that does not index metadata (see _client)."""
    import re
    from functools import cached_property

    from bids.layout.index import BIDSLayoutIndexer
    from templateflow.conf.bids import Layout
    from templateflow.conf.cache import TemplateFlowCache

    class NamesOnlyCache(TemplateFlowCache):
        @cached_property
        def layout(self):
            self.ensure()
            return Layout(self.config.root, validate=False, config="templateflow",
                          indexer=BIDSLayoutIndexer(
                              validate=False, index_metadata=False,
                              ignore=(re.compile(r"scripts/"), re.compile(r"/\."),
                                      re.compile(r"^\."))))

    return NamesOnlyCache


@lru_cache(maxsize=1)
def _skeleton():
    """A client on the skeleton the installed templateflow package ships (offline), and the
    holder of its folder when that folder is temporary.

    The client unpacks the skeleton into its root on first use; unpacking its 2,644
    placeholders took 1.9 s, so the root is kept in ugi-bids' cache (one folder per skeleton
    checksum) and reused by later runs. Where the cache cannot be written (a read-only
    container home), a temporary root serves this run."""
    root = _cached_skeleton_root()
    if root is not None:
        return _client(root, autoupdate=False), None
    folder = tempfile.TemporaryDirectory(prefix="ugi-bids-templateflow-")
    return _client(Path(folder.name) / "skeleton", autoupdate=False), folder


def _cached_skeleton_root() -> Path | None:
    """``<ugi-bids cache>/templateflow-skeleton/<md5 of the skeleton>``, unpacked once (into a
    staging folder renamed into place, so concurrent runs never see half a skeleton); None
    where the cache cannot be written."""
    from importlib.resources import files

    from ..engine.cache import cache_dir

    try:
        checksum = (files("templateflow.conf") / "templateflow-skel.md5").read_text().split()[0]
        root = cache_dir() / "templateflow-skeleton" / checksum
        if not root.is_dir():
            root.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root.parent))
            # mkdtemp makes the folder 0700: give it the umask's mode, so that other users of a
            # shared cache (a container image's, a lab's UGI_BIDS_HOME) can read the skeleton
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(staging, 0o777 & ~umask)
            try:
                _client(staging, autoupdate=False).cache.ensure()
                os.rename(staging, root)
            except OSError:  # another run put it in place first
                shutil.rmtree(staging, ignore_errors=True)
        return root if root.is_dir() else None
    except (OSError, UgiError):
        return None


_HOME_CLIENTS: dict[Path, object] = {}


def _home_client(home: Path):
    """A client on the home; None when the home is missing or empty, since the client would
    fill it with the skeleton on first use and a lookup must not write there."""
    if home not in _HOME_CLIENTS:
        client = _client(home)
        import templateflow.api
        import templateflow.conf

        if Path(templateflow.conf.TF_HOME) == home:  # the global client, maybe indexed already
            client = templateflow.api  # (niworkflows does); TemplateFlow documents it as a client
        if not client.cache.cached:
            return None
        _HOME_CLIENTS[home] = client
    return _HOME_CLIENTS[home]


def _clients(home: Path) -> list:
    return [c for c in (_home_client(home), _skeleton()[0]) if c is not None]


def templateflow_names() -> list[str]:
    """TemplateFlow template identifiers known to the installed ``templateflow`` package."""
    return list(_skeleton_names())


@lru_cache(maxsize=1)
def _skeleton_names() -> tuple[str, ...]:
    return tuple(_skeleton()[0].templates())  # seconds: pybids builds every file's object


@dataclass(frozen=True)
class _Entry:
    """One NIfTI file of a template, and the query that finds it."""

    relpath: str
    cohort: str | None
    res: int | None
    desc: str | None
    suffix: str
    ext: str
    atlas: str | None = None

    @property
    def query(self) -> dict:
        return {**_PLAIN, "cohort": self.cohort, "resolution": self.res, "desc": self.desc,
                "suffix": self.suffix, "extension": self.ext, "atlas": self.atlas}


def _norm_label(label: str | None) -> str | None:
    return str(int(label)) if label is not None and label.isdigit() else label


def _ls(clients, name: str, **query) -> list[str]:
    """Relative paths (``tpl-X/...``) of the plain template NIfTIs of ``name`` matching
    ``query``, home and skeleton together."""
    query = {**_PLAIN, "extension": list(_NIFTI), **query}
    return sorted({path.relative_to(client.cache.layout.root).as_posix()
                   for client in clients for path in client.ls(name, **query)})


def _values(clients, entity: str, name: str, **query) -> list:
    """The values of ``entity`` over the plain template NIfTIs of ``name`` matching ``query``."""
    query = {**_PLAIN, "extension": list(_NIFTI), "template": name, **query}
    return sorted({v for client in clients for v in getattr(client, f"get_{entity}s")(**query)})


def _find(clients, name: str, cohort, res, desc, suffixes) -> _Entry | None:
    """The file wanted: the first suffix of ``suffixes`` that exists, .nii.gz before .nii."""
    for suffix, ext in itertools.product(suffixes, _NIFTI):
        found = _ls(clients, name, cohort=cohort, resolution=res, desc=desc, suffix=suffix,
                    extension=ext)
        if found:
            return _Entry(found[0], cohort, res, desc, suffix, ext)
    return None


def _metadata(clients, name: str) -> dict:
    """``template_description.json``: the home's, else the skeleton's, else {}."""
    for client in clients:
        # without the file in the home, templateflow 25.1 calls DataLad with the wrong
        # arguments (TypeError); a bad JSON raises too
        with contextlib.suppress(Exception):
            return client.get_metadata(name)
    return {}


# --------------------------------------------------------------------------------------------
# File checks and downloads
# --------------------------------------------------------------------------------------------

def _problem(path: Path) -> str | None:
    """Why ``path`` is not a usable template file, or None when it is. Ours: TemplateFlow only
    tells 0-byte placeholders apart (and S3 error pages, inside ``get``), not damaged files."""
    try:
        return _content_problem(path)
    except OSError as exc:
        return f"it cannot be read: {one_line(exc, 100)}"


def _content_problem(path: Path) -> str | None:
    if not path.exists():
        if path.is_symlink():
            return "it is a dangling symbolic link (DataLad content not fetched)"
        return "it is missing from the TemplateFlow home"
    size = path.stat().st_size
    if size == 0:
        return "it is an empty placeholder, as the templateflow package ships it until downloaded"
    if size < 1024 and path.read_bytes().startswith(b"<?xml"):
        return "it is an S3 error page left by a failed download"
    if path.name.endswith(".tsv"):
        return None
    if path.name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as stream:
                while stream.read(1 << 22):
                    pass
        except (OSError, EOFError, zlib.error):
            return ("it is damaged: truncated or corrupt compressed data, maybe an interrupted "
                    "download")
    try:
        import nibabel as nib

        nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types
        return f"it is not a readable NIfTI file: {one_line(exc, 100)}"
    return None


def _resolve_host(host: str, timeout: float) -> str | None:
    """None when ``host`` resolves within ``timeout`` seconds, else the reason."""
    outcome: dict[str, object] = {}

    def probe():
        try:
            socket.getaddrinfo(host, 443)
            outcome["ok"] = True
        except OSError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=probe, name="templateflow-dns", daemon=True)
    thread.start()
    thread.join(timeout)
    if "ok" in outcome:
        return None
    if "error" in outcome:
        return f"no network: cannot resolve {host}"
    return f"no network: resolving {host} took more than {timeout:g} s"


def _first_hop(url: str) -> str:
    """The host a download of ``url`` connects to first: its proxy's, when one is set."""
    from urllib.request import getproxies, proxy_bypass

    parsed = urlparse(url)
    host = parsed.hostname or url
    proxy = getproxies().get(parsed.scheme)
    if proxy and not proxy_bypass(host):
        return urlparse(proxy if "://" in proxy else f"http://{proxy}").hostname or host
    return host


def _download_reason(exc: Exception) -> str:
    """A short reason: the socket error inside a requests/urllib3 message when there is one."""
    text = str(exc)
    errno = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if errno:
        return f"{type(exc).__name__}: {errno.group(0).strip()}"
    return f"{type(exc).__name__}: {one_line(text, 200)}"


def _download(home: Path, name: str, entry: _Entry, listed: bool, timeout: float) -> str | None:
    """Ask TemplateFlow for ``entry``; None on success, else why it failed (one line)."""
    client = _client(home, timeout=timeout, **({"s3_root": S3_ROOT} if S3_ROOT else {}))
    # TemplateFlow bounds connections and reads but not the DNS look-up: a compute node behind
    # a firewall can hang there for minutes, so the first hop must resolve in time first.
    reason = _resolve_host(_first_hop(client.cache.config.s3_root), timeout)
    if reason:
        return reason
    path = home / entry.relpath
    try:
        if not listed:  # the home lacks this template's skeleton entries: add them (no network)
            client.cache.update(local=True, overwrite=False, silent=True)
        LOGGER.info("Downloading %s from TemplateFlow into %s", entry.relpath, home)
        client.get(name, **entry.query)
    except Exception as exc:  # noqa: BLE001 - requests, templateflow, pybids raise many
        reason = f"download failed: {_download_reason(exc)}"
    finally:
        _HOME_CLIENTS.pop(home, None)  # the home may have changed: index it again next time
    problem = _problem(path)
    if problem and path.is_file() and not path.is_symlink() and path.stat().st_size > 0:
        # TemplateFlow only compares the byte count with the server's: a damaged download
        # goes back to a placeholder, retried next time
        path.write_bytes(b"")
    if problem:
        return reason or f"download did not give a usable file: {problem}"
    return None


def _prefetch_command(name: str, image: _Entry, mask: _Entry | None, listed: bool) -> str:
    def call(entry: _Entry) -> str:
        cohort = "" if entry.cohort is None else f", cohort={entry.cohort}"
        atlas = "" if entry.atlas is None else f", atlas={entry.atlas!r}"
        ext = "" if entry.ext == ".nii.gz" else f", extension={entry.ext!r}"
        return (f"get({name!r}{cohort}, resolution={entry.res}{atlas}, desc={entry.desc!r}, "
                f"suffix={entry.suffix!r}{ext})")

    update = ("import templateflow; templateflow.update(local=True, overwrite=False, silent=True); "
              if not listed else "")
    calls = "; ".join(call(entry) for entry in (image, mask) if entry is not None)
    return f'python -c "{update}from templateflow.api import get; {calls}"'


def _ensure_available(home: Path, spec: SpaceSpec, entry: _Entry, image: _Entry,
                      mask: _Entry | None, download: bool, timeout: float,
                      what: str = "template") -> Path:
    path = home / entry.relpath
    problem = _problem(path)
    if problem is None:
        return path
    listed = os.path.lexists(path)  # a file, placeholder or dangling link
    if download:
        failure = _download(home, spec.name, entry, listed, timeout)
        if failure is None:
            return path
        problem = f"{problem}; {failure}"
    else:
        problem = f"{problem}; downloads are disabled"
    listed_all = all(os.path.lexists(home / e.relpath) for e in (image, mask) if e is not None)
    raise TemplateError(
        f"TemplateFlow {what} {spec.label}: {entry.relpath} is not available offline: "
        f"{problem}; {_home_text(home)}. Pre-fetch it on a machine with internet access "
        f"(e.g. a login node) into the same TEMPLATEFLOW_HOME: "
        f"{_prefetch_command(spec.name, image, mask, listed_all)}"
        " (or bake it into the container, or give " + (
            "a label map by path with --atlases NAME=PATH[,labels=TSV]"
            if what == "atlas" else "a template by path with --template NAME=PATH[,mask=PATH]")
        + ")")


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------

def _resolution_text(clients, name: str, resolutions) -> str:
    """``res-1 (1 mm), res-2 (2 mm)`` from template_description.json when readable."""
    zooms = {}
    try:
        zooms = {int(k): v.get("zooms") for k, v in _metadata(clients, name).get("res", {}).items()
                 if str(k).isdigit()}
    except (AttributeError, TypeError):
        pass

    def one(res):
        z = zooms.get(res)
        if z and len(set(z)) == 1:
            return f"res-{res} ({z[0]:g} mm)"
        return f"res-{res} ({'x'.join(f'{v:g}' for v in z)} mm)" if z else f"res-{res}"

    return ", ".join(one(r) for r in resolutions) or "none"


def _resolve_templateflow(spec: SpaceSpec, suffix: str, download: bool,
                          timeout: float) -> ResolvedTemplate:
    home = templateflow_home()
    clients = _clients(home)
    name = spec.name
    if not any(client.ls(name) for client in clients):
        known = sorted({n for client in clients for n in client.templates()})
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise TemplateSpecError(
            f"unknown TemplateFlow template {name!r}; {hint}TemplateFlow templates: "
            f"{', '.join(known)}; or give your own with --template {name}=PATH")

    cohorts = [str(c) for c in _values(clients, "cohort", name)]
    cohort = _norm_label(spec.cohort)
    if cohorts and cohort is None:
        raise TemplateSpecError(
            f"template {name} needs a cohort ({name}:cohort-<label>); cohorts: "
            f"{', '.join(cohorts)}")
    if cohort is not None and cohort not in cohorts:
        raise TemplateSpecError(
            f"template {name} has no cohort-{spec.cohort}; cohorts: {', '.join(cohorts) or 'none'}")

    used = next((s for s in _SUFFIX_ALIASES.get(suffix, (suffix,))
                 if _ls(clients, name, cohort=cohort, desc=None, suffix=s)), None)
    if used is None:
        if not _ls(clients, name, cohort=cohort, desc=None, suffix="T1w"):
            raise TemplateSpecError(
                f"template {spec.label} has no volumetric T1w image to register to")
        LOGGER.warning("Template %s has no %s image: %s images are registered to its T1w image",
                       spec.label, suffix, suffix)
        used = "T1w"

    resolutions = _values(clients, "resolution", name, cohort=cohort, desc=None, suffix=used)
    if spec.resolution is not None:
        res = int(spec.resolution)
        if res not in resolutions:
            raise TemplateSpecError(
                f"template {spec.label} has no res-{res} {used} image; resolutions: "
                f"{_resolution_text(clients, name, resolutions)}")
    else:
        res = DEFAULT_RESOLUTION if DEFAULT_RESOLUTION in resolutions else (
            resolutions[0] if resolutions else None)
    image = _find(clients, name, cohort, res, None, (used,))
    mask = _find(clients, name, cohort, res, "brain", ("mask",))
    if mask is None:
        LOGGER.info("Template %s has no res-%s brain mask", spec.label, res)

    image_path = _ensure_available(home, spec, image, image, mask, download, timeout)
    mask_path = (_ensure_available(home, spec, mask, image, mask, download, timeout)
                 if mask is not None else None)
    return ResolvedTemplate(
        spec=spec, image=image_path, mask=mask_path,
        uri=f"bids:templateflow:{image.relpath}",
        mask_uri=f"bids:templateflow:{mask.relpath}" if mask is not None else None,
        suffix=used, resolution=res)


def _resolve_custom(spec: SpaceSpec) -> ResolvedTemplate:
    image = _custom_path(spec.name, "image", str(spec.path))
    mask = _custom_path(spec.name, "mask", str(spec.mask)) if spec.mask is not None else None
    return ResolvedTemplate(spec=spec, image=image, mask=mask, uri=image.as_uri(),
                            mask_uri=mask.as_uri() if mask is not None else None)


def resolve_template(spec: SpaceSpec, suffix: str = "T1w", *, download: bool = True,
                     timeout: float | None = None) -> ResolvedTemplate:
    """The image (and brain mask) of an output space, for registering ``suffix`` images.

    Custom templates (``spec.path`` set): the given files, checked to exist (exit 66).

    TemplateFlow templates, from ``$TEMPLATEFLOW_HOME`` (read at call time):

    - the image ``tpl-X[_cohort-C]_res-R_<suffix>.nii.gz`` (no ``desc-``); ``PDw`` also
      matches TemplateFlow's ``PD``. A template without an image of that suffix falls back to
      its ``T1w`` image, with a logged warning (``ResolvedTemplate.suffix`` tells which);
    - the brain mask ``..._res-R_desc-brain_mask.nii.gz`` when the template has one, else None;
    - ``R`` = ``spec.resolution``, or 1 (the lowest index when there is no 1).

    A file that is not usable locally is downloaded when ``download`` is True (bounded by
    ``timeout`` seconds per step, default :data:`DOWNLOAD_TIMEOUT`); otherwise, or when that
    fails, :class:`TemplateError` (exit 66) explains how to pre-fetch it. Unknown names,
    cohorts or resolutions raise :class:`TemplateSpecError` (exit 2) with the choices.
    """
    if spec.is_custom:
        return _resolve_custom(spec)
    return _resolve_templateflow(spec, suffix, download,
                                 DOWNLOAD_TIMEOUT if timeout is None else float(timeout))


# --------------------------------------------------------------------------------------------
# Atlases of a TemplateFlow space
# --------------------------------------------------------------------------------------------

@dataclass
class TemplateFlowAtlas:
    """The files of a TemplateFlow atlas in one space: its label map (``dseg``) and lookup table
    (None when TemplateFlow has none), with their BIDS URIs."""

    image: Path
    table: Path | None
    uri: str
    table_uri: str | None
    resolution: int | None


def _atlas_files(clients, name: str, cohort, atlas: str, desc: str | None, ext,
                 **more) -> list[str]:
    query = {**_PLAIN, "cohort": cohort, "atlas": atlas, "desc": desc, "suffix": "dseg",
             "extension": ext, **more}
    return sorted({path.relative_to(client.cache.layout.root).as_posix()
                   for client in clients for path in client.ls(name, **query)})


def find_templateflow_atlas(template: ResolvedTemplate, atlas: str, desc: str | None, *,
                            download: bool = True, timeout: float | None = None
                            ) -> TemplateFlowAtlas | None:
    """The atlas ``tpl-<space>[_cohort-C]_res-<r>_atlas-<atlas>[_desc-<desc>]_dseg.nii.gz`` of a
    resolved TemplateFlow space, and its ``..._dseg.tsv`` where TemplateFlow has one; None when
    the space has no such atlas. The resolution is the template's own when the atlas has it,
    else the finest (lowest index) the atlas has. A listed file that is not usable locally is
    fetched like a template file (:func:`resolve_template`), and failing that raises the same
    one-line :class:`TemplateError` (exit 66)."""
    if template.spec.is_custom:
        return None
    timeout = DOWNLOAD_TIMEOUT if timeout is None else float(timeout)
    home = templateflow_home()
    clients = _clients(home)
    name, cohort = template.spec.name, _norm_label(template.spec.cohort)
    images = _atlas_files(clients, name, cohort, atlas, desc, list(_NIFTI))
    if not images:
        return None
    resolutions = sorted({int(r) for client in clients for r in client.get_resolutions(
        template=name, **{**_PLAIN, "cohort": cohort, "atlas": atlas, "desc": desc,
                          "suffix": "dseg", "extension": list(_NIFTI)})})
    res = template.resolution if template.resolution in resolutions else (
        resolutions[0] if resolutions else None)
    image = next(_Entry(path, cohort, res, desc, "dseg", ext, atlas)
                 for ext in _NIFTI for path in _atlas_files(
                     clients, name, cohort, atlas, desc, ext, resolution=res))
    tables = _atlas_files(clients, name, cohort, atlas, desc, ".tsv")
    table = _Entry(tables[0], cohort, None, desc, "dseg", ".tsv", atlas) if tables else None
    spec = dataclasses.replace(template.spec, name=name)
    image_path = _ensure_available(home, spec, image, image, table, download, timeout, "atlas")
    table_path = (_ensure_available(home, spec, table, image, table, download, timeout, "atlas")
                  if table is not None else None)
    return TemplateFlowAtlas(image_path, table_path, f"bids:templateflow:{image.relpath}",
                             f"bids:templateflow:{table.relpath}" if table else None, res)


def templateflow_atlases(template: ResolvedTemplate) -> list[str]:
    """``atlas[:desc-D]`` names TemplateFlow lists for a resolved space (for error messages)."""
    if template.spec.is_custom:
        return []
    clients = _clients(templateflow_home())
    found = set()
    for client in clients:
        for path in client.ls(template.spec.name, suffix="dseg", extension=list(_NIFTI)):
            match = re.search(r"_atlas-([a-zA-Z0-9]+)(?:_desc-([a-zA-Z0-9]+))?_", path.name)
            if match:
                found.add(match.group(1) + (f":desc-{match.group(2)}" if match.group(2) else ""))
    return sorted(found)
