"""uniGradICON / multiGradICON weights: registry, cache, download, strict loading.

The release files (``Step_2_final.trch``, about 283 MB each) are GitHub release assets with no
published checksum. They are cached under :func:`cache_dir` as
``<cache>/weights/<model>/Step_2_final.trch``, next to a ``Step_2_final.trch.sha256`` sidecar
written at download time (``sha256sum -c`` format plus a ``# size=... mtime_ns=...`` comment, so
that the 283 MB file is not re-hashed on every run while it is unchanged).

Compute nodes usually have no internet: :func:`resolve_weights` never downloads unless asked, and
every failure is a :class:`~ugi_bids.engine.errors.WeightsError` whose message is one line that
says how to pre-fetch (``ugi-bids-weights fetch MODEL`` on a machine with internet, then copy the
file into the cache, or pass ``--weights PATH``).

``torch`` is imported lazily, so that ``ugi-bids-weights path``/``list`` answer instantly.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Mapping, Union

from ugi_bids.engine.errors import OutputError, WeightsError

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

    ``sha256`` is ``None``: upstream publishes no checksum, so the file is identified by the
    SHA-256 recorded at download time (reported in provenance) and by a strict architecture check.
    """

    name: str
    display: str
    url: str
    filename: str = RELEASE_FILENAME
    approx_bytes: int = 283_000_000
    sha256: str | None = None


MODELS: dict[str, ModelInfo] = {
    "unigradicon": ModelInfo(
        "unigradicon", "uniGradICON", f"{_RELEASES}/unigradicon_weights/{RELEASE_FILENAME}"),
    "multigradicon": ModelInfo(
        "multigradicon", "multiGradICON", f"{_RELEASES}/multigradicon_weights/{RELEASE_FILENAME}"),
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


def cache_dir() -> Path:
    """The ugi-bids cache folder: ``$UGI_BIDS_HOME`` if set, else ``$XDG_CACHE_HOME/ugi-bids``
    (only when absolute, as the XDG spec requires), else ``~/.cache/ugi-bids``.

    Never the current directory unless the user points ``UGI_BIDS_HOME`` there.
    """
    home = os.environ.get("UGI_BIDS_HOME")
    if home:
        return Path(home).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "ugi-bids"
    try:
        user_home = Path.home()
    except (RuntimeError, KeyError) as exc:
        raise WeightsError("cannot find the home folder for the weights cache; "
                           "set UGI_BIDS_HOME to a writable folder") from exc
    return user_home / ".cache" / "ugi-bids"


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
            f"to {target} (the cache is $UGI_BIDS_HOME/weights, default ~/.cache/ugi-bids/weights), "
            f"or pass --weights PATH")


def _one_line(text: object, limit: int = 200) -> str:
    """First line of ``text``, whitespace-collapsed and cut to ``limit`` characters."""
    lines = str(text).strip().splitlines()
    line = " ".join(lines[0].split()) if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


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
    and mtime; atomic (temporary name, then ``os.replace``). Returns the sidecar path."""
    path = Path(path)
    stat = path.stat()
    sidecar = sidecar_path(path)
    text = f"# size={stat.st_size} mtime_ns={stat.st_mtime_ns}\n{sha256}  {path.name}\n"
    tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="ascii")
    os.replace(tmp, sidecar)
    return sidecar


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
            except OSError:
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


def load_checkpoint(path: PathLike, *, model: str = "unigradicon") -> dict:
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
        reason = _one_line(exc, 120).split(". ")[0]
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


def _meta_network() -> "nn.Module":
    """The registration network on the ``meta`` device: shapes and dtypes, no memory, no init."""
    import torch

    from ugi_bids.engine.network import build_cascade

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


def checked_state_dict(path: PathLike, model: str = "unigradicon") -> dict:
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


def network_from_file(path: PathLike, model: str = "unigradicon", *,
                      device: "str | torch.device" = "cpu") -> "nn.Module":
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
                           f"network: {_one_line(exc)}") from exc
    leftovers = [name for name, t in [*network.named_parameters(), *network.named_buffers()]
                 if t.is_meta]
    if leftovers:  # a network tensor the checkpoint does not carry: a bug, not a user error
        raise RuntimeError(f"tensors not set by the checkpoint: {leftovers[:3]}")
    return network.to(device).eval()


def load_network(model: str = "unigradicon", weights: PathLike | None = None, *,
                 device: "str | torch.device" = "cpu",
                 download: bool = False) -> tuple["nn.Module", WeightsRecord]:
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


def resolve_weights(model: str = "unigradicon", weights: PathLike | None = None, *,
                    download: bool = False) -> Path:
    """The weights file to use: ``weights`` if given (must exist), else the cached file; when
    that is absent, :func:`fetch` it if ``download`` is true, else raise a one-line WeightsError
    naming the URL and the pre-fetch command."""
    info = model_info(model)
    if weights is not None:
        return _explicit_weights(Path(weights).expanduser(), info)
    target = cached_path(info.name)
    if target.is_file():
        return target
    if download:
        return fetch(info.name)
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


# --------------------------------------------------------------------------------------------
# Download


class _Progress:
    """Plain-text progress bar on a stream: redrawn in place on a terminal, one line per 10 %
    otherwise (logs stay short)."""

    WIDTH = 30

    def __init__(self, label: str, total: int | None, stream: IO[str] | None = None,
                 enabled: bool = True):
        self.label, self.total, self.enabled = label, total, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last_step = -1
        self.last_printed: int | None = None
        self.last_draw = 0.0

    def _text(self, done: int) -> str:
        mb = f"{done / 1e6:7.1f}"
        if not self.total:
            return f"{self.label}: {mb} MB"
        frac = min(done / self.total, 1.0)
        fill = int(round(frac * self.WIDTH))
        bar = "#" * fill + "-" * (self.WIDTH - fill)
        return f"{self.label}: [{bar}] {frac * 100:5.1f}% {mb}/{self.total / 1e6:.1f} MB"

    def update(self, done: int) -> None:
        """Report ``done`` bytes so far."""
        if not self.enabled:
            return
        if self.tty:
            now = time.monotonic()
            if now - self.last_draw >= 0.1:
                self.stream.write("\r" + self._text(done))
                self.stream.flush()
                self.last_draw = now
            return
        step = int(10 * done / self.total) if self.total else done // 50_000_000
        if step > self.last_step:
            self.stream.write(self._text(done) + "\n")
            self.stream.flush()
            self.last_step, self.last_printed = step, done

    def close(self, done: int) -> None:
        """Draw the final state (and end the line on a terminal)."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + self._text(done) + "\n")
        elif self.last_printed != done:
            self.stream.write(self._text(done) + "\n")
        self.stream.flush()


def _network_error(info: ModelInfo, url: str, reason: str) -> WeightsError:
    """One-line WeightsError for a failed download."""
    return WeightsError(f"cannot download the {info.display} weights from {url} ({reason}); "
                        + _prefetch_hint(info.name, cached_path(info.name)))


def _reason(exc: BaseException) -> str:
    """Short human reason for a network exception."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        if not isinstance(exc.reason, BaseException):
            return _one_line(exc.reason, 120) or "URL error"
        exc = exc.reason
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
        return "timed out"
    return _one_line(getattr(exc, "strerror", None) or exc, 120) or type(exc).__name__


def _stream(response, out: IO[bytes], progress: _Progress, info: ModelInfo,
            url: str) -> tuple[int, str]:
    """Copy ``response`` into ``out``, hashing; returns ``(bytes, sha256)``."""
    digest = hashlib.sha256()
    done = 0
    while True:
        try:
            chunk = response.read(_CHUNK)
        except (OSError, http.client.HTTPException) as exc:
            raise _network_error(info, url, f"transfer failed after {done} bytes: "
                                            f"{_reason(exc)}") from exc
        if not chunk:
            break
        try:
            out.write(chunk)
        except OSError as exc:
            raise OutputError(f"cannot write the {info.display} weights into "
                              f"{cached_path(info.name).parent} ({exc.strerror or exc}); set "
                              f"UGI_BIDS_HOME to a writable folder with 300 MB free") from exc
        digest.update(chunk)
        done += len(chunk)
        progress.update(done)
    progress.close(done)
    return done, digest.hexdigest()


def _open_url(url: str, info: ModelInfo, timeout: float):
    """Open ``url`` (following redirects); network failures -> one-line WeightsError."""
    from ugi_bids import __version__

    request = urllib.request.Request(url, headers={"User-Agent": f"ugi-bids/{__version__}"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (http/https/file)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _network_error(info, url, _reason(exc)) from exc


def _content_length(response) -> int | None:
    """Declared size of the body, if any."""
    value = response.headers.get("Content-Length") if hasattr(response, "headers") else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _check_space(folder: Path, total: int | None, info: ModelInfo) -> None:
    """Refuse early when the declared size cannot fit in ``folder``."""
    if total is None:
        return
    free = shutil.disk_usage(folder).free
    if free < total:
        raise OutputError(f"not enough space in {folder} for the {info.display} weights "
                          f"({total / 1e6:.0f} MB needed, {free / 1e6:.0f} MB free); set "
                          f"UGI_BIDS_HOME to a folder with room")


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort; not possible on every platform)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_cache_folder(folder: Path, info: ModelInfo) -> None:
    """Create the model's cache folder (OutputError if impossible)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the weights cache folder {folder} "
                          f"({exc.strerror or exc}); set UGI_BIDS_HOME to a writable folder") \
            from exc


def _download_to(tmp: Path, url: str, info: ModelInfo, progress: bool,
                 timeout: float) -> str:
    """Download ``url`` into the open-able temporary file ``tmp`` (fsynced); returns its SHA-256.
    A body shorter than the declared Content-Length is a network error."""
    with _open_url(url, info, timeout) as response:
        total = _content_length(response)
        _check_space(tmp.parent, total, info)
        if progress:
            sys.stderr.write(f"downloading {info.display} weights from {url}\n")
        bar = _Progress(info.name, total, enabled=progress)
        with open(tmp, "wb") as out:
            done, digest = _stream(response, out, bar, info, url)
            out.flush()
            os.fsync(out.fileno())
    if total is not None and done != total:
        raise _network_error(info, url, f"connection closed after {done} of {total} bytes")
    return digest


def _validate_download(tmp: Path, info: ModelInfo, url: str) -> None:
    """The downloaded file must load strictly; else a one-line WeightsError."""
    try:
        checked_state_dict(tmp, info.name)
    except WeightsError as exc:
        detail = getattr(exc, "detail", str(exc))
        detail = detail.replace(f"weights file {tmp}", f"the file downloaded from {url}")
        raise WeightsError(f"{detail}; nothing was saved (check the URL, or try again)") from exc


def fetch(model: str, *, force: bool = False, progress: bool = True, url: str | None = None,
          timeout: float = 60.0) -> Path:
    """Download ``model``'s weights into the cache and return the cached path.

    Already cached and not ``force``: nothing is downloaded. The download goes to a temporary
    name in the same folder, is fsynced, checked to load strictly, then renamed into place with
    ``os.replace`` (a failure leaves no partial file); its SHA-256 is recorded in the sidecar.
    ``url`` overrides the release URL (a mirror); ``timeout`` is per socket operation.
    """
    info = model_info(model)
    target = cached_path(info.name)
    if target.is_file() and not force:
        return target
    source = url or info.url
    _make_cache_folder(target.parent, info)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{info.filename}.", suffix=".part",
                                    dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from other users/containers
        digest = _download_to(tmp, source, info, progress, timeout)
        _validate_download(tmp, info, source)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    write_sidecar(target, digest)
    if progress:
        sys.stderr.write(f"saved {target} (sha256 {digest})\n")
    return target
