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
:func:`resolve_template` reads ``$TEMPLATEFLOW_HOME`` at call time (TemplateFlow's own default
when unset) and looks at the files itself before asking TemplateFlow for anything: a usable file
is returned without any network access. Only a missing file, an empty placeholder (the pip
package's skeleton ships 0-byte NIfTIs), an S3 error page or a truncated download triggers a
download through ``templateflow``'s client (``TemplateFlowClient.get``, what
``templateflow.api.get`` calls), bounded: the S3 host name must resolve within ``timeout``
seconds (checked in a separate thread, since DNS look-ups ignore socket time-outs), then
``requests`` runs with ``timeout`` for connecting and for each read. Any failure becomes one
line (:class:`TemplateError`, exit 66) that names the template and the file, gives the
``TEMPLATEFLOW_HOME`` in use and the command that pre-fetches it on a machine with internet.
"""

from __future__ import annotations

import difflib
import gzip
import itertools
import logging
import os
import re
import socket
import threading
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from ugi_bids.cli.config import SpaceSpec
from ugi_bids.engine.errors import MissingInputError, UgiError

LOGGER = logging.getLogger(__name__)

#: Resolution index used when a space has no ``res-``.
DEFAULT_RESOLUTION = 1
#: Where TemplateFlow downloads from (module-level so that tests can point it at localhost).
S3_ROOT = "https://templateflow.s3.amazonaws.com"
#: Seconds allowed for the DNS look-up, the connection, and each read of a download.
DOWNLOAD_TIMEOUT = 10.0
#: niworkflows' non-standard spaces (and a few synonyms): not templates, refused as names.
NONSTANDARD_SPACES = frozenset({
    "T1w", "T2w", "anat", "fsnative", "func", "run", "sbref", "session", "individual", "dwi",
    "asl", "orig", "native", "scanner",
})
#: TemplateFlow suffixes that may stand for one of our BIDS suffixes, in order of preference.
_SUFFIX_ALIASES = {"PDw": ("PDw", "PD")}

_NAME = re.compile(r"[a-zA-Z0-9]+")


class TemplateSpecError(UgiError):
    """A space or template specification is malformed or names nothing that exists: a usage
    error, exit 2 (as the command-line parser's ``UsageError``)."""

    exit_code = 2


class TemplateError(MissingInputError):
    """A template file is missing, an empty placeholder, or could not be downloaded: exit 66."""

    exit_code = 66


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


def _one_line(text: object, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    if name in NONSTANDARD_SPACES:
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
    for kind, names in (("a non-standard space", NONSTANDARD_SPACES),
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
# TemplateFlow catalogue: what the home holds, and what TemplateFlow's skeleton lists
# --------------------------------------------------------------------------------------------

def templateflow_home() -> Path:
    """``$TEMPLATEFLOW_HOME`` read now, or TemplateFlow's default (``~/.cache/templateflow``)."""
    value = os.environ.get("TEMPLATEFLOW_HOME")
    if value:
        return Path(value).expanduser().absolute()
    try:
        from platformdirs import user_cache_dir
    except ImportError:  # pragma: no cover - platformdirs comes with templateflow
        return Path("~/.cache/templateflow").expanduser().absolute()
    return Path(user_cache_dir("templateflow")).absolute()


def _home_text(home: Path) -> str:
    if os.environ.get("TEMPLATEFLOW_HOME"):
        return f"TEMPLATEFLOW_HOME={home}"
    return f"TEMPLATEFLOW_HOME is not set, so TemplateFlow's default {home} is used"


@lru_cache(maxsize=1)
def _skeleton_names() -> tuple[str, ...]:
    """Relative paths listed in the templateflow package's skeleton (empty if not installed).

    Found without importing :mod:`templateflow`, whose import initialises a home."""
    import importlib.util
    import zipfile

    spec = importlib.util.find_spec("templateflow")
    if spec is None or not spec.submodule_search_locations:
        return ()
    path = Path(list(spec.submodule_search_locations)[0]) / "conf" / "templateflow-skel.zip"
    try:
        with zipfile.ZipFile(path) as skeleton:
            return tuple(name for name in skeleton.namelist() if not name.endswith("/"))
    except (OSError, zipfile.BadZipFile):
        return ()


def templateflow_names() -> list[str]:
    """TemplateFlow template identifiers known to the installed ``templateflow`` package."""
    return sorted({name.split("/")[0][4:] for name in _skeleton_names() if name.startswith("tpl-")})


@dataclass(frozen=True)
class _Entry:
    """One NIfTI file of a template, parsed from its TemplateFlow name."""

    relpath: str
    cohort: str | None
    res: int | None
    desc: str | None
    suffix: str
    ext: str


_NIFTI = re.compile(r"(\.nii\.gz|\.nii)$")


def _norm_label(label: str | None) -> str | None:
    return str(int(label)) if label is not None and label.isdigit() else label


def _parse_entry(relpath: str) -> _Entry | None:
    """Parse ``tpl-X[_cohort-C][_res-R][_desc-D]_SUFFIX.nii[.gz]``; None for anything else
    (files with other entities: atlases, probseg labels, spaces, transforms...)."""
    name = PurePosixPath(relpath).name
    ext = _NIFTI.search(name)
    if not ext:
        return None
    parts = name[: ext.start()].split("_")
    if len(parts) < 2 or not parts[0].startswith("tpl-"):
        return None
    entities = {}
    for part in parts[1:-1]:
        key, sep, value = part.partition("-")
        if not sep or key not in ("cohort", "res", "desc"):
            return None
        entities[key] = value
    res = entities.get("res")
    return _Entry(relpath, _norm_label(entities.get("cohort")),
                  int(res) if res and res.isdigit() else None,
                  entities.get("desc"), parts[-1], ext.group(1))


def _catalogue(home: Path, name: str) -> tuple[list[_Entry], set[str]]:
    """Volumetric entries of template ``name`` (home and skeleton together), and the relative
    paths that the home itself lists (files, placeholders or dangling links)."""
    folder = home / f"tpl-{name}"
    in_home = set()
    if folder.is_dir():
        for path in folder.rglob("*.nii*"):
            in_home.add(path.relative_to(home).as_posix())
    skeleton = {n for n in _skeleton_names() if n.startswith(f"tpl-{name}/")}
    entries = [entry for relpath in sorted(in_home | skeleton)
               if (entry := _parse_entry(relpath)) is not None]
    return entries, in_home


# --------------------------------------------------------------------------------------------
# File checks and downloads
# --------------------------------------------------------------------------------------------

def _problem(path: Path) -> str | None:
    """Why ``path`` is not a usable template file, or None when it is."""
    try:
        return _content_problem(path)
    except OSError as exc:
        return f"it cannot be read: {_one_line(exc, 100)}"


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
    except Exception as exc:  # nibabel raises many types
        return f"it is not a readable NIfTI file: {_one_line(exc, 100)}"
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
    return f"{type(exc).__name__}: {_one_line(text, 200)}"


def _download(home: Path, name: str, entry: _Entry, listed: bool, timeout: float) -> str | None:
    """Ask TemplateFlow for ``entry``; None on success, else why it failed (one line)."""
    reason = _resolve_host(_first_hop(S3_ROOT), timeout)
    if reason:
        return reason
    path = home / entry.relpath
    try:
        from templateflow.client import TemplateFlowClient

        client = TemplateFlowClient(root=home, timeout=timeout, s3_root=S3_ROOT)
        if not listed:  # the home lacks this template's skeleton entries: add them (no network)
            client.cache.update(local=True, overwrite=False, silent=True)
        query = {"resolution": entry.res, "desc": entry.desc, "suffix": entry.suffix,
                 "extension": entry.ext}
        if entry.cohort is not None:
            query["cohort"] = entry.cohort
        LOGGER.info("Downloading %s from TemplateFlow into %s", entry.relpath, home)
        client.get(name, **query)
    except Exception as exc:  # requests, templateflow and pybids raise many types
        reason = f"download failed: {_download_reason(exc)}"
    problem = _problem(path)
    if problem and path.is_file() and not path.is_symlink() and path.stat().st_size > 0:
        path.write_bytes(b"")  # an interrupted download: back to a placeholder, retried next time
    if problem:
        return reason or f"download did not give a usable file: {problem}"
    return None


def _prefetch_command(name: str, image: _Entry, mask: _Entry | None, listed: bool) -> str:
    def call(entry: _Entry) -> str:
        cohort = "" if entry.cohort is None else ", cohort={}".format(
            entry.cohort if entry.cohort.isdigit() else repr(entry.cohort))
        return (f"get({name!r}{cohort}, resolution={entry.res}, desc={entry.desc!r}, "
                f"suffix={entry.suffix!r})")

    update = ("import templateflow; templateflow.update(local=True, overwrite=False, silent=True); "
              if not listed else "")
    calls = "; ".join(call(entry) for entry in (image, mask) if entry is not None)
    return f'python -c "{update}from templateflow.api import get; {calls}"'


def _ensure_available(home: Path, spec: SpaceSpec, entry: _Entry, image: _Entry,
                      mask: _Entry | None, in_home: set[str], download: bool,
                      timeout: float) -> Path:
    path = home / entry.relpath
    problem = _problem(path)
    if problem is None:
        return path
    listed = entry.relpath in in_home
    if download:
        failure = _download(home, spec.name, entry, listed, timeout)
        if failure is None:
            return path
        problem = f"{problem}; {failure}"
    else:
        problem = f"{problem}; downloads are disabled"
    listed_all = all(e.relpath in in_home for e in (image, mask) if e is not None)
    raise TemplateError(
        f"TemplateFlow template {spec.label}: {entry.relpath} is not available offline: "
        f"{problem}; {_home_text(home)}. Pre-fetch it on a machine with internet access "
        f"(e.g. a login node) into the same TEMPLATEFLOW_HOME: "
        f"{_prefetch_command(spec.name, image, mask, listed_all)}"
        " (or bake it into the container, or give a template by path with --template "
        "NAME=PATH[,mask=PATH])")


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------

def _resolution_text(home: Path, name: str, resolutions) -> str:
    """``res-1 (1 mm), res-2 (2 mm)`` from template_description.json when readable."""
    import json

    zooms = {}
    try:
        description = json.loads((home / f"tpl-{name}" / "template_description.json").read_text())
        zooms = {int(k): v.get("zooms") for k, v in description.get("res", {}).items()
                 if str(k).isdigit()}
    except (OSError, ValueError, AttributeError):
        pass

    def one(res):
        z = zooms.get(res)
        if z and len(set(z)) == 1:
            return f"res-{res} ({z[0]:g} mm)"
        return f"res-{res} ({'x'.join(f'{v:g}' for v in z)} mm)" if z else f"res-{res}"

    return ", ".join(one(r) for r in resolutions) or "none"


def _unknown_template(home: Path, name: str):
    known = templateflow_names()
    if not known:
        return TemplateError(
            f"template {name} not found in the TemplateFlow home ({_home_text(home)}) and the "
            "templateflow package is not installed; give a template by path with --template")
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return TemplateSpecError(
        f"unknown TemplateFlow template {name!r}; {hint}TemplateFlow templates: "
        f"{', '.join(known)}; or give your own with --template {name}=PATH")


def _pick(entries: list[_Entry], suffixes) -> _Entry:
    """Prefer the first suffix of ``suffixes``, then .nii.gz, then the file name."""
    order = {suffix: i for i, suffix in enumerate(suffixes)}
    return min(entries, key=lambda e: (order.get(e.suffix, len(order)), e.ext != ".nii.gz",
                                       e.relpath))


def _resolve_templateflow(spec: SpaceSpec, suffix: str, download: bool,
                          timeout: float) -> ResolvedTemplate:
    home = templateflow_home()
    entries, in_home = _catalogue(home, spec.name)
    if not entries:
        raise _unknown_template(home, spec.name)

    cohorts = sorted({e.cohort for e in entries if e.cohort is not None}, key=lambda c: (len(c), c))
    cohort = _norm_label(spec.cohort)
    if cohorts and cohort is None:
        raise TemplateSpecError(
            f"template {spec.name} needs a cohort ({spec.name}:cohort-<label>); cohorts: "
            f"{', '.join(cohorts)}")
    if cohort is not None and cohort not in cohorts:
        raise TemplateSpecError(
            f"template {spec.name} has no cohort-{spec.cohort}; cohorts: "
            f"{', '.join(cohorts) or 'none'}")
    entries = [e for e in entries if e.cohort == cohort]

    wanted = _SUFFIX_ALIASES.get(suffix, (suffix,))
    images = [e for e in entries if e.desc is None and e.suffix in wanted]
    if not images:
        images = [e for e in entries if e.desc is None and e.suffix == "T1w"]
        if not images:
            raise TemplateSpecError(
                f"template {spec.label} has no volumetric T1w image to register to")
        LOGGER.warning("Template %s has no %s image: %s images are registered to its T1w image",
                       spec.label, suffix, suffix)
        wanted = ("T1w",)

    resolutions = sorted({e.res for e in images if e.res is not None})
    if spec.resolution is not None:
        res = int(spec.resolution)
        if res not in resolutions:
            raise TemplateSpecError(
                f"template {spec.label} has no res-{res} {images[0].suffix} image; resolutions: "
                f"{_resolution_text(home, spec.name, resolutions)}")
    else:
        res = DEFAULT_RESOLUTION if DEFAULT_RESOLUTION in resolutions else (
            resolutions[0] if resolutions else None)
    image = _pick([e for e in images if e.res == res], wanted)
    masks = [e for e in entries if e.res == res and e.desc == "brain" and e.suffix == "mask"]
    mask = _pick(masks, ("mask",)) if masks else None
    if mask is None:
        LOGGER.info("Template %s has no res-%s brain mask", spec.label, res)

    image_path = _ensure_available(home, spec, image, image, mask, in_home, download, timeout)
    mask_path = (_ensure_available(home, spec, mask, image, mask, in_home, download, timeout)
                 if mask is not None else None)
    return ResolvedTemplate(
        spec=spec, image=image_path, mask=mask_path,
        uri=f"bids:templateflow:{image.relpath}",
        mask_uri=f"bids:templateflow:{mask.relpath}" if mask is not None else None,
        suffix=image.suffix, resolution=res)


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
