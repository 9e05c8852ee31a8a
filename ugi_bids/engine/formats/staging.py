"""All-or-nothing outputs: every file is written under a temporary sibling name (same folder,
so same file system; same extension, so format-sniffing writers still work) and renamed into
place only when the whole set is complete, so a failure leaves no partial output.

This is the one atomic-write helper of the package: :func:`staged_outputs` for sets of files,
:func:`atomic_file` for one file written by any writer, :func:`write_text_atomic` for text.
Concurrent writers of the same name each rename a complete file (the last one wins).
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ...errors import OutputError, UgiError, one_line

_DOUBLE_SUFFIXES = (".nii.gz", ".tar.gz")


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
        temporary = final.with_name(f".{stem}.partial-{self._token}{suffix}")
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


def check_output_folder(folder: str | os.PathLike) -> None:
    """Fail early (OutputError, exit 73) when ``folder`` cannot be created or written, without
    creating anything: checked on its nearest existing ancestor."""
    path = Path(os.path.abspath(folder))
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        raise OutputError(f"cannot create output folder {folder}: {path} is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to output folder {folder}: {path} is not writable")


@contextmanager
def staged_outputs(folder: str | os.PathLike | None = None) -> Iterator[StagedOutputs]:
    """Context manager: commit the staged files on success, discard them on any error.

    ``folder`` is created first when given (an uncreatable folder is an OutputError, exit 73).
    """
    if folder is not None:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create output folder {folder}: {exc.strerror}") from None
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
