"""All-or-nothing outputs: every file is written under a temporary sibling name (same folder,
so same file system; same extension, so format-sniffing writers still work) and renamed into
place only when the whole set is complete, so a failure leaves no partial output.

This is the one atomic-write helper of the package: :func:`staged_outputs` for sets of files,
:func:`atomic_file` for one file written by any writer, :func:`write_text_atomic` for text.
Concurrent writers of the same name each rename a complete file (the last one wins).
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ...errors import OutputError, UgiError, one_line

_DOUBLE_SUFFIXES = (".nii.gz", ".tar.gz")

#: Temporary names of this module's staged files (``.<stem>.partial-<owner>-<token><suffix>``)
#: and of the output sink's staging folders (``.ugi-bids-sink-<owner>-<random>``), where
#: ``<owner>`` is :func:`owner_tag` (absent in names written by ugi-bids before 0.2).
STAGED_NAME = re.compile(r"^\..*\.partial-(?:(?P<host>[A-Za-z0-9-]+)\+(?P<pid>\d+)-)?[0-9a-f]{8}")
SINK_STAGING_PREFIX = ".ugi-bids-sink-"
_SINK_NAME = re.compile(r"^\.ugi-bids-sink-(?:(?P<host>[A-Za-z0-9-]+)\+(?P<pid>\d+)-)?")

#: A staged file or folder whose writer cannot be checked (another host, or a name without an
#: owner) is a dead run's leftover once it is this old, seconds: a live writer renames its
#: files within seconds of writing them.
STALE_AFTER_S = 3600.0


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"


def owner_tag() -> str:
    """``<short host name>+<pid>``: who writes a staged file, so that a later run can tell a
    dead run's leftovers from a live run's files in progress."""
    return f"{_host()}+{os.getpid()}"


def _split_suffix(name: str) -> tuple[str, str]:
    for suffix in _DOUBLE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    stem, dot, ext = name.rpartition(".")
    return (stem, dot + ext) if dot and stem else (name, "")


class StagedOutputs:
    """Hands out temporary paths (same folder, same suffix, hidden) for final paths."""

    def __init__(self):
        self._pending: list[tuple[Path, Path]] = []
        self._token = uuid.uuid4().hex[:8]

    def stage(self, final: str | os.PathLike) -> str:
        """A temporary path to write ``final``'s content to; renamed at commit."""
        final = Path(final)
        stem, suffix = _split_suffix(final.name)
        temporary = final.with_name(f".{stem}.partial-{owner_tag()}-{self._token}{suffix}")
        self._pending.append((temporary, final))
        return str(temporary)

    def commit(self) -> list[str]:
        """Rename every staged file into place; returns the final paths."""
        for temporary, final in self._pending:
            if not temporary.exists():
                raise OutputError(f"output {final} was not produced")
        for temporary, final in self._pending:
            os.replace(temporary, final)
        return [str(final) for _, final in self._pending]

    def discard(self) -> None:
        """Remove every temporary file written so far."""
        for temporary, _ in self._pending:
            try:
                temporary.unlink()
            except FileNotFoundError:
                pass


def check_output_folder(folder: str | os.PathLike, what: str = "output folder") -> None:
    """Fail early (OutputError, exit 73) when ``folder`` cannot be created or written, without
    creating anything: checked on its nearest existing ancestor (a file in the way, a folder
    this user cannot write, a read-only file system)."""
    path = Path(os.path.abspath(folder))
    while not path.exists() and not path.is_symlink():
        path = path.parent
    if not path.is_dir():
        raise OutputError(f"cannot create {what} {folder}: {path} is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        reason = ("is on a read-only file system"
                  if os.statvfs(path).f_flag & os.ST_RDONLY else "is not writable")
        raise OutputError(f"cannot write to {what} {folder}: {path} {reason}")


def make_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` (and its parents); failure is a one-line OutputError (exit 73)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {what} {folder}: {exc.strerror or one_line(exc)}"
                          ) from None
    return folder


def _writer_is_dead(host: str | None, pid: str | None, modified: float, now: float) -> bool:
    if host == _host() and pid is not None:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, OverflowError, ValueError):
            pass  # alive (another user's process), or not a pid
        else:
            return False
    return now - modified > STALE_AFTER_S


def remove_stale_staging(root: str | os.PathLike) -> list[Path]:
    """Remove, under ``root``, the staged files and sink staging folders that dead runs left
    (a ``kill -9``, an out-of-memory kill, a node lost): those of this host whose writer's pid
    is gone, and any other older than :data:`STALE_AFTER_S`. Files of live runs stay, so this
    is safe while other runs write into ``root``. Returns what was removed; a leftover that
    cannot be removed is kept (the next run tries again)."""
    import shutil

    now, removed = time.time(), []
    for folder, subfolders, files in os.walk(root):
        for name in list(subfolders):
            match = _SINK_NAME.match(name)
            if match is None:
                continue
            subfolders.remove(name)  # never descend into a staging folder
            path = Path(folder) / name
            try:
                if _writer_is_dead(match["host"], match["pid"], path.lstat().st_mtime, now):
                    shutil.rmtree(path)
                    removed.append(path)
            except OSError:
                continue
        for name in files:
            match = STAGED_NAME.match(name)
            if match is None:
                continue
            path = Path(folder) / name
            try:
                if _writer_is_dead(match["host"], match["pid"], path.lstat().st_mtime, now):
                    path.unlink()
                    removed.append(path)
            except OSError:
                continue
    return removed


@contextmanager
def staged_outputs(folder: str | os.PathLike | None = None) -> Iterator[StagedOutputs]:
    """Context manager: commit the staged files on success, discard them on any error.

    ``folder`` is created first when given (an uncreatable folder is an OutputError, exit 73).
    """
    if folder is not None:
        make_folder(folder)
    staged = StagedOutputs()
    try:
        yield staged
    except BaseException:
        staged.discard()
        raise
    staged.commit()


@contextmanager
def atomic_file(path: str | os.PathLike, what: str = "file", *, fsync: bool = False
                ) -> Iterator[str]:
    """Context manager: a temporary sibling path to write ``path``'s content to, renamed onto
    ``path`` when the block ends without error, removed otherwise.

    The folder must exist. Any failure of the block (or of the rename) becomes one-line
    :class:`~ugi_bids.errors.OutputError` (exit 73) naming ``what`` and ``path``; an
    ``OutputError`` or a ``UgiError`` raised inside passes unchanged, and ``KeyboardInterrupt``
    too. With ``fsync`` the file's data reach the disk before the rename (for large caches).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"cannot write {what} {path}: folder {folder} does not exist")
    staged = StagedOutputs()
    temporary = staged.stage(path)
    try:
        yield temporary
        if not os.path.exists(temporary):
            raise OSError("the writer produced no file")
        if fsync:
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
        staged.commit()
    except Exception as exc:
        staged.discard()
        if isinstance(exc, UgiError):
            raise
        raise OutputError(f"cannot write {what} {path}: {one_line(exc, 300)}") from None
    except BaseException:
        staged.discard()
        raise


def write_text_atomic(path: str | os.PathLike, text: str, what: str = "file") -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating its folder; readers see the old
    file or the new one, whole. A file that already holds ``text`` is left alone (not even
    its time stamp changes), so concurrent runs into one output folder (a Slurm array) do not
    rewrite the shared top-level files they agree on. Returns ``path``."""
    path = Path(path)
    try:
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return path
    except (OSError, UnicodeDecodeError):
        pass  # unreadable or not text: replaced below
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create folder {path.parent}: {one_line(exc)}") from None
    with atomic_file(path, what) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
    return path
