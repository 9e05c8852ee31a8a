"""uniGradICON / multiGradICON weights: registry, cache, download, strict loading.

The release files (``Step_2_final.trch``, about 283 MB each) are GitHub release assets with no
published checksum. They are cached under :func:`cache_dir` as
``<cache>/weights/<model>/Step_2_final.trch``, next to a ``Step_2_final.trch.sha256`` sidecar
written at download time (``sha256sum -c`` format plus a ``# size=... mtime_ns=...`` comment, so
that the 283 MB file is not re-hashed on every run while it is unchanged). A model whose
:attr:`ModelInfo.sha256` is filled in is held to it (download, ``verify``, the cached file);
without one the SHA-256 recorded at the first download is what later checks compare against.

Downloads go through :func:`pooch.retrieve` (a tqdm progress bar where tqdm is installed) into a
temporary name in the cache folder; the file is checked to load strictly before it is renamed
into place, so the cache never holds half a file.

Compute nodes usually have no internet: :func:`resolve_weights` never downloads unless asked, and
every failure is a :class:`~ugi_bids.errors.WeightsError` whose message is one line that
says how to pre-fetch (``ugi-bids-weights fetch MODEL`` on a machine with internet, then copy the
file into the cache, or pass ``--weights PATH``).

``torch``, ``pooch`` and ``requests`` are imported lazily, so that ``ugi-bids-weights
path``/``list`` answer instantly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

from ugi_bids.engine.cache import cache_dir, image_contents
from ugi_bids.engine.options import DEFAULT_MODEL
from ugi_bids.engine.formats.staging import atomic_file, write_text_atomic
from ugi_bids.errors import OutputError, UgiError, WeightsError, one_line

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

PathLike = Union[str, "os.PathLike[str]"]

#: Name of the release asset (the same for both models).
RELEASE_FILENAME = "Step_2_final.trch"
_RELEASES = "https://github.com/uncbiag/uniGradICON/releases/download"
_CHUNK = 1 << 20
_SIDECAR_META = re.compile(r"^#\s*size=(\d+)\s+mtime_ns=(\d+)\s*$")
_SIDECAR_HASH = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_MAX_PROBLEMS = 4


@dataclass(frozen=True)
class ModelInfo:
    """One released model.

    ``sha256`` pins the release file (64 hex digits): :func:`fetch` refuses a download that does
    not match it, and ``verify`` and the cached file are checked against it. ``None`` means
    unknown: the file is then identified by the SHA-256 recorded at download time (reported in
    provenance) and by the strict architecture check.
    """

    name: str
    display: str
    url: str
    filename: str = RELEASE_FILENAME
    approx_bytes: int = 283_000_000
    sha256: str | None = None


# The pins are None because upstream publishes no checksum for these release files, and the
# files cannot be downloaded on the machines this package is built and tested on, so their
# SHA-256 could not be taken here (never write one down that was not computed from the official
# file). ModelInfo.sha256 is enforced as soon as it is filled in: fetch, verify and the cached file.
MODELS: dict[str, ModelInfo] = {
    "unigradicon": ModelInfo(
        "unigradicon", "uniGradICON", f"{_RELEASES}/unigradicon_weights/{RELEASE_FILENAME}",
        sha256=None),
    "multigradicon": ModelInfo(
        "multigradicon", "multiGradICON", f"{_RELEASES}/multigradicon_weights/{RELEASE_FILENAME}",
        sha256=None),
}


@dataclass(frozen=True)
class WeightsRecord:
    """Provenance of loaded weights: model name, file, its SHA-256 and the model's release URL
    (the URL the model is published at, not necessarily where this copy came from)."""

    model: str
    path: Path
    sha256: str
    url: str

    def as_dict(self) -> dict[str, str]:
        """JSON-friendly form (for reports and sidecars)."""
        return {"model": self.model, "path": str(self.path), "sha256": self.sha256,
                "url": self.url}


# --------------------------------------------------------------------------------------------
# Registry and cache


def model_info(model: str) -> ModelInfo:
    """The :class:`ModelInfo` of ``model`` (case-insensitive); unknown names -> WeightsError."""
    info = MODELS.get(str(model).lower())
    if info is None:
        raise WeightsError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    return info


def cached_path(model: str) -> Path:
    """Where ``model``'s weights live in the cache (whether or not they are there)."""
    info = model_info(model)
    return cache_dir() / "weights" / info.name / info.filename


def sidecar_path(path: PathLike) -> Path:
    """The ``<file>.sha256`` sidecar of a weights file."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _prefetch_hint(model: str, target: Path) -> str:
    """The common 'how to get the weights here' advice (one line)."""
    return (f"on a machine with internet run `ugi-bids-weights fetch {model}` and copy the file "
            f"to {target} (the cache is $UGI_BIDS_HOME/weights when UGI_BIDS_HOME is set), "
            f"or pass --weights PATH")


# --------------------------------------------------------------------------------------------
# Checksums


def sha256_file(path: PathLike) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_sidecar(path: PathLike, sha256: str) -> Path:
    """Write ``<file>.sha256`` (``sha256sum -c`` compatible) recording the file's current size
    and mtime, atomically (OutputError if it cannot be written). Returns the sidecar path."""
    path = Path(path)
    stat = path.stat()
    text = f"# size={stat.st_size} mtime_ns={stat.st_mtime_ns}\n{sha256}  {path.name}\n"
    return write_text_atomic(sidecar_path(path), text, "weights checksum")


def read_sidecar(path: PathLike) -> tuple[str, int, int] | None:
    """``(sha256, size, mtime_ns)`` recorded beside ``path``, or ``None`` if there is no readable,
    well-formed sidecar."""
    try:
        text = sidecar_path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return None
    meta = digest = None
    for line in text.splitlines():
        meta = meta or _SIDECAR_META.match(line.strip())
        digest = digest or _SIDECAR_HASH.match(line.strip())
    if not (meta and digest):
        return None
    return digest.group(1).lower(), int(meta.group(1)), int(meta.group(2))


def recorded_sha256(path: PathLike) -> str | None:
    """The sidecar's SHA-256 if the sidecar still describes the file (same size and mtime)."""
    record = read_sidecar(path)
    if record is None:
        return None
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    digest, size, mtime_ns = record
    return digest if (size, mtime_ns) == (stat.st_size, stat.st_mtime_ns) else None


_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: PathLike) -> str:
    """SHA-256 of a weights file, cheaply: a matching sidecar, else an in-process memo, else a
    full hash (then written as a sidecar when the file is in the cache, best effort)."""
    path = Path(path)
    digest = recorded_sha256(path)
    if digest:
        return digest
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASH_MEMO:
        _HASH_MEMO[key] = sha256_file(path)
        if _is_in_cache(path):
            try:
                write_sidecar(path, _HASH_MEMO[key])
            except (OSError, UgiError):
                pass
    return _HASH_MEMO[key]


def _is_in_cache(path: Path) -> bool:
    """Whether ``path`` lies inside the weights cache (the only place we write sidecars)."""
    try:
        path.resolve().relative_to((cache_dir() / "weights").resolve())
    except (ValueError, OSError, WeightsError):
        return False
    return True


# --------------------------------------------------------------------------------------------
# Loading and architecture check


def load_checkpoint(path: PathLike, *, model: str = DEFAULT_MODEL) -> dict:
    """Load a state_dict with ``torch.load(path, map_location="cpu", weights_only=True)``.

    A missing, truncated, corrupt or non-checkpoint file raises a one-line WeightsError that
    names the file and how to re-fetch it (``model`` only shapes that hint).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise WeightsError(f"weights file {path} {what}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        reason = one_line(exc, 120).split(". ")[0]
        raise _bad_file(f"weights file {path} is truncated or not a uniGradICON checkpoint "
                        f"({reason})", model) from exc
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise _bad_file(f"weights file {path} is not a uniGradICON checkpoint (it holds a "
                        f"{type(state).__name__}, not a state_dict of tensors)", model)
    return dict(state)


def _bad_file(detail: str, model: str) -> WeightsError:
    """WeightsError for an unusable file: ``detail`` plus how to replace the file. The bare
    ``detail`` stays available as ``error.detail`` (used to word download failures)."""
    error = WeightsError(f"{detail}; re-fetch it with `ugi-bids-weights fetch {model} --force` "
                         f"or pass another --weights PATH")
    error.detail = detail
    return error


def _meta_network() -> nn.Module:
    """The registration network on the ``meta`` device: shapes and dtypes, no memory, no init."""
    import torch

    from ugi_bids.engine.model.network import build_cascade

    with torch.device("meta"):
        return build_cascade()


def _shape(shape) -> str:
    """``(1, 2, 3)`` style shape text."""
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def check_state_dict(state: Mapping, reference: Mapping) -> list[str]:
    """Problems that keep ``state`` from loading strictly into a network whose state_dict is
    ``reference``: missing keys, unexpected keys, non-tensors and wrong shapes (in that order)."""
    problems = [f"missing {key}" for key in reference if key not in state]
    problems += [f"unexpected {key}" for key in state if key not in reference]
    for key, expected in reference.items():
        value = state.get(key)
        if value is None:
            continue
        if not hasattr(value, "shape"):
            problems.append(f"{key} is not a tensor")
        elif tuple(value.shape) != tuple(expected.shape):
            problems.append(f"shape of {key} is {_shape(value.shape)} not {_shape(expected.shape)}")
    return problems


def _mismatch_message(path: Path, display: str, problems: list[str], n_state: int,
                      n_expected: int) -> str:
    """One-line summary of the first few architecture problems."""
    shown = "; ".join(problems[:_MAX_PROBLEMS])
    more = len(problems) - _MAX_PROBLEMS
    extra = f"; and {more} more problem{'s' if more > 1 else ''}" if more > 0 else ""
    return (f"weights file {path} does not match the {display} architecture: {shown}{extra} "
            f"({n_state} tensors, expected {n_expected})")


def checked_state_dict(path: PathLike, model: str = DEFAULT_MODEL) -> dict:
    """Load ``path`` and check it against the architecture (one-line WeightsError if it does not
    fit); returns the state_dict with each tensor in the network's dtype."""
    info = model_info(model)
    path = Path(path)
    state = load_checkpoint(path, model=info.name)
    reference = _meta_network().state_dict()
    problems = check_state_dict(state, reference)
    if problems:
        raise _bad_file(_mismatch_message(path, info.display, problems, len(state),
                                          len(reference)), info.name)
    return _owned({key: state[key].to(reference[key].dtype) for key in reference})


def _owned(state: dict) -> dict:
    """The tensors themselves when each is contiguous and alone in its storage (the release
    files), else copies: parameters are assigned, not copied, and must not alias each other
    (instance optimisation updates them in place)."""
    seen: set[int] = set()
    owned = {}
    for key, tensor in state.items():
        tensor = tensor.contiguous()
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        owned[key] = tensor
    return owned


def network_from_file(path: PathLike, model: str = DEFAULT_MODEL, *,
                      device: str | torch.device = "cpu") -> nn.Module:
    """The registration network with the weights of ``path`` loaded strictly (no cache lookup,
    no checksum), on ``device``, in eval mode. Bad files raise a one-line WeightsError."""
    info = model_info(model)
    path = Path(path)
    state = checked_state_dict(path, info.name)
    network = _meta_network()  # no random init: every tensor is assigned from the file
    try:
        network.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # checked above; kept so that no traceback can escape
        raise WeightsError(f"weights file {path} does not load into the {info.display} "
                           f"network: {one_line(exc, 200)}") from exc
    leftovers = [name for name, t in [*network.named_parameters(), *network.named_buffers()]
                 if t.is_meta]
    if leftovers:  # a network tensor the checkpoint does not carry: a bug, not a user error
        raise RuntimeError(f"tensors not set by the checkpoint: {leftovers[:3]}")
    return network.to(device).eval()


def load_network(model: str = DEFAULT_MODEL, weights: PathLike | None = None, *,
                 device: str | torch.device = "cpu",
                 download: bool = False) -> tuple[nn.Module, WeightsRecord]:
    """The registration network with ``model``'s weights, strictly loaded, on ``device``, in
    eval mode, and the :class:`WeightsRecord` of the file it came from.

    ``weights`` overrides the cache; ``download`` allows fetching into the cache when absent.
    """
    info = model_info(model)
    path = resolve_weights(info.name, weights, download=download)
    network = network_from_file(path, info.name, device=device)
    return network, WeightsRecord(info.name, path, file_sha256(path), info.url)


# --------------------------------------------------------------------------------------------
# Resolution


def resolve_weights(model: str = DEFAULT_MODEL, weights: PathLike | None = None, *,
                    download: bool = False) -> Path:
    """The weights file to use: ``weights`` if given (must exist), else the cached file; when
    that is absent, :func:`fetch` it if ``download`` is true, else raise a one-line WeightsError
    naming the URL and the pre-fetch command. The cached file (also when ``weights`` names it)
    must match the model's pinned SHA-256, if there is one; other files are the user's own."""
    info = model_info(model)
    target = cached_path(info.name)
    if weights is not None:
        path = _explicit_weights(Path(weights).expanduser(), info)
        if info.sha256 and _same_file(path, target):
            check_pin(path, info.name)
        return path
    if target.is_file():
        if info.sha256:
            check_pin(target, info.name)
        return target
    if download:
        return fetch(info.name)
    contents = image_contents()
    if contents is not None and info.name not in contents.get("weights", {}):
        raise WeightsError(
            f"this ugi-bids container image was built without the {info.display} weights: "
            f"bind a weights file into the container and pass --weights PATH, or use an image "
            f"built with them (docker build --build-arg WEIGHTS=fetch, or WEIGHTS=<file in the "
            f"build context>)")
    raise WeightsError(
        f"the {info.display} weights are not in the cache ({target}); download them from "
        f"{info.url} with `ugi-bids-weights fetch {info.name}` (on a machine with internet if "
        f"this one has none, then copy the file to {target}; set UGI_BIDS_HOME to move the "
        f"cache), or pass --weights PATH")


def _explicit_weights(path: Path, info: ModelInfo) -> Path:
    """Check a user-given weights path (exists, is a file)."""
    if path.is_dir():
        raise WeightsError(f"weights path {path} is a folder; pass the checkpoint file itself "
                           f"(the {info.display} release file is {info.filename})")
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; pass the path of a "
                           f"{info.display} checkpoint ({info.filename}) or leave out --weights "
                           f"to use the cache ({cached_path(info.name)})")
    return path


def _same_file(path: Path, other: Path) -> bool:
    """Whether ``path`` and ``other`` are the same existing file."""
    try:
        return path.samefile(other)
    except OSError:
        return False


def check_pin(path: PathLike, model: str = DEFAULT_MODEL, digest: str | None = None) -> str:
    """SHA-256 of ``path`` (``digest`` if already known, else :func:`file_sha256`); a one-line
    WeightsError when ``model`` pins another SHA-256 (no pin: nothing to check)."""
    info = model_info(model)
    path = Path(path)
    digest = (digest or file_sha256(path)).lower()
    if info.sha256 and digest != info.sha256.lower():
        raise WeightsError(
            f"weights file {path} has sha256 {digest}, not {info.sha256.lower()} of the "
            f"{info.display} release (the file is corrupt or another file); re-fetch it with "
            f"`ugi-bids-weights fetch {info.name} --force` or pass another --weights PATH")
    return digest


def is_cached(model: str) -> bool:
    """Whether ``model``'s weights are in the cache (and match its pinned SHA-256, if any)."""
    info = model_info(model)
    target = cached_path(info.name)
    if not target.is_file():
        return False
    return not info.sha256 or file_sha256(target).lower() == info.sha256.lower()


# --------------------------------------------------------------------------------------------
# Download


def _network_error(info: ModelInfo, url: str, reason: str) -> WeightsError:
    """One-line WeightsError for a failed download."""
    return WeightsError(f"cannot download the {info.display} weights from {url} ({reason}); "
                        + _prefetch_hint(info.name, cached_path(info.name)))


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps (requests -> urllib3 -> socket), breadth first."""
    queue, seen = [exc], set()
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [*getattr(current, "args", ()), getattr(current, "reason", None),
                  current.__cause__, current.__context__]
        queue += [item for item in linked if isinstance(item, BaseException)]


def _reason(exc: BaseException) -> str:
    """Short human reason for a requests/urllib3 exception."""
    import requests

    response = getattr(exc, "response", None)
    if isinstance(exc, requests.HTTPError) and response is not None:
        return f"HTTP {response.status_code} {response.reason}"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    for cause in _causes(exc):
        read, left = getattr(cause, "partial", None), getattr(cause, "expected", None)
        if isinstance(read, bytes):  # http.client's IncompleteRead
            read = len(read)
        if isinstance(read, int) and isinstance(left, int):  # the body ended early
            return f"connection closed after {read} of {read + left} bytes"
        if isinstance(cause, OSError) and cause.strerror:  # refused, unknown host, ...
            return one_line(cause.strerror, 120)
    return one_line(exc, 120)


def _make_cache_folder(folder: Path) -> None:
    """Create the model's cache folder (OutputError if impossible)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the weights cache folder {folder} "
                          f"({exc.strerror or exc}); set UGI_BIDS_HOME to a writable folder") \
            from exc


def _tqdm_installed() -> bool:
    """Whether pooch can draw its tqdm progress bar."""
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def _quiet_pooch() -> Iterator[None]:
    """Hide pooch's INFO log lines (its "use this hash as known_hash" advice is for pooch users,
    not ours); warnings still show."""
    import pooch

    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _retrieve(url: str, destination: Path, info: ModelInfo, progress: bool,
              timeout: float) -> str:
    """Download ``url`` to ``destination`` with :func:`pooch.retrieve` (checked against the
    model's pinned SHA-256, if any); returns the file's SHA-256. Network failures and a pin
    mismatch -> one-line WeightsError; a write failure -> OutputError."""
    import pooch
    import requests

    from ugi_bids import __version__

    if not url.lower().startswith(("http://", "https://")):
        raise _network_error(info, url, "not an http:// or https:// URL")
    downloader = pooch.HTTPDownloader(
        progressbar=progress and _tqdm_installed(), chunk_size=_CHUNK, timeout=timeout,
        headers={"User-Agent": f"ugi-bids/{__version__}"})
    known_hash = f"sha256:{info.sha256.lower()}" if info.sha256 else None
    try:
        with _quiet_pooch():
            pooch.retrieve(url, known_hash, fname=destination.name, path=destination.parent,
                           downloader=downloader)
    except requests.RequestException as exc:  # before OSError: requests' errors are OSErrors
        raise _network_error(info, url, _reason(exc)) from exc
    except ValueError as exc:  # pooch: the download does not match known_hash
        if not known_hash:
            raise _network_error(info, url, one_line(exc, 120)) from exc
        got = re.search(r"but got ([0-9a-fA-F]{64})", str(exc))
        raise WeightsError(
            f"the file downloaded from {url} has sha256 {got.group(1) if got else 'unknown'}, "
            f"not {info.sha256.lower()} of the {info.display} release; nothing was saved "
            f"(check the URL, or try again)") from exc
    except OSError as exc:
        raise OutputError(f"cannot write the {info.display} weights into {destination.parent} "
                          f"({exc.strerror or one_line(exc, 120)}); set UGI_BIDS_HOME to a "
                          f"writable folder with 300 MB free") from exc
    return info.sha256.lower() if info.sha256 else sha256_file(destination)


def install(model: str, source: PathLike) -> Path:
    """Copy a local weights file into the cache (for machines and image builds with no internet)
    and return the cached path.

    The copy goes to a temporary name beside the target, must load strictly as ``model``'s network
    and match its pinned SHA-256 (if any), and is then renamed into place with its sidecar, as
    :func:`fetch` does with a download; a failure leaves the cache as it was.
    """
    info = model_info(model)
    source = Path(source).expanduser()
    if not source.is_file():
        raise WeightsError(f"weights file {source} "
                           f"{'is a folder' if source.is_dir() else 'does not exist'}; give the "
                           f"{info.display} checkpoint file to install ({info.filename})")
    target = cached_path(info.name)
    _make_cache_folder(target.parent)
    with atomic_file(target, f"the {info.display} weights", fsync=True) as temporary:
        tmp = Path(temporary)
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o644)
        _validate_copy(tmp, info, f"weights file {source}", "nothing was installed")
        digest = check_pin(tmp, info.name, sha256_file(tmp))
    write_sidecar(target, digest)
    return target


def _validate_copy(tmp: Path, info: ModelInfo, source: str, advice: str) -> None:
    """The temporary copy ``tmp`` of ``source`` must load strictly; else a one-line WeightsError
    that names ``source`` (not the temporary name) and ends with ``advice``."""
    try:
        checked_state_dict(tmp, info.name)
    except WeightsError as exc:
        detail = getattr(exc, "detail", str(exc))
        detail = detail.replace(f"weights file {tmp}", source)
        raise WeightsError(f"{detail}; {advice}") from exc


def fetch(model: str, *, force: bool = False, progress: bool = True, url: str | None = None,
          timeout: float = 60.0) -> Path:
    """Download ``model``'s weights into the cache and return the cached path.

    Already cached (and matching the pinned SHA-256, if any) and not ``force``: nothing is
    downloaded. The download goes to a temporary name in the same folder, is checked against the
    pin (pooch's ``known_hash``) and to load strictly, fsynced, then renamed into place (a
    failure leaves no partial file); its SHA-256 is recorded in the sidecar. ``url`` overrides
    the release URL (a mirror; the pin still applies); ``timeout`` is per socket operation.
    ``progress``: the "downloading"/"saved" lines and pooch's tqdm bar (where tqdm is installed).
    """
    info = model_info(model)
    target = cached_path(info.name)
    if not force and is_cached(info.name):
        return target
    source = url or info.url
    _make_cache_folder(target.parent)
    if progress:
        sys.stderr.write(f"downloading {info.display} weights from {source}\n")
    with atomic_file(target, f"the {info.display} weights", fsync=True) as temporary:
        tmp = Path(temporary)
        digest = _retrieve(source, tmp, info, progress, timeout)
        os.chmod(tmp, 0o644)  # pooch's temporary file is 0600: the cache may be shared
        _validate_copy(tmp, info, f"the file downloaded from {source}",
                       "nothing was saved (check the URL, or try again)")
    write_sidecar(target, digest)
    if progress:
        sys.stderr.write(f"saved {target} (sha256 {digest})\n")
    return target
