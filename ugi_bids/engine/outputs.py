"""All-or-nothing output sets: every file is written under a temporary sibling name and renamed
into place only when the whole set is complete, so a failure leaves no partial output."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputError

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
