"""Concurrent runs into one OUTPUT_DIR (a Slurm array, several ``ugi-bids`` on one machine):
the shared top-level files are written atomically, and not rewritten when their content is
the same. Real processes race here, without any scheduler."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from ugi_bids.engine.formats.staging import write_text_atomic
from ugi_bids.utils.provenance import (
    write_bidsignore,
    write_citation_files,
    write_dataset_description,
)

MARKDOWN = "Registration was performed with uniGradICON [@unigradicon].\n"


def _raw_dataset(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "shared output test", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    return root


def _writer(out: str, bids: str, rounds: int, text: str) -> None:
    for _ in range(rounds):
        write_dataset_description(out, bids_dir=bids, version="0.1.0")
        write_bidsignore(out)
        write_citation_files(out, MARKDOWN)
        write_text_atomic(Path(out) / "shared.txt", text)


def _reader(out: str, seconds: float, queue) -> None:
    """Parse the shared files for ``seconds``; report what was seen broken (nothing, we hope)."""
    broken, reads = [], 0
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        for name in ("dataset_description.json",):
            path = Path(out) / name
            if path.exists():
                try:
                    json.loads(path.read_text())
                    reads += 1
                except (ValueError, FileNotFoundError) as error:
                    broken.append(f"{name}: {error}")
        shared = Path(out) / "shared.txt"
        if shared.exists():
            text = shared.read_text()
            if text not in ("A" * 100_000, "B" * 100_000):
                broken.append(f"shared.txt: {len(text)} characters, mixed or torn")
    queue.put((broken, reads))


@pytest.mark.slow
def test_concurrent_writers_leave_whole_files_and_no_leftovers(tmp_path):
    bids = _raw_dataset(tmp_path / "bids")
    out = tmp_path / "derivatives" / "ugi-bids"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    reader = context.Process(target=_reader, args=(str(out), 6.0, queue))
    reader.start()
    writers = [context.Process(target=_writer, args=(str(out), str(bids), 15,
                                                     "A" * 100_000 if i % 2 else "B" * 100_000))
               for i in range(6)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(60)
        assert process.exitcode == 0
    broken, reads = queue.get(timeout=60)
    reader.join(60)
    assert broken == [] and reads > 0
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == \
        "derivative"
    assert (out / "logs" / "CITATION.md").read_text() == MARKDOWN
    leftovers = [p.name for p in out.rglob("*") if ".partial" in p.name]
    assert leftovers == []


def test_unchanged_content_is_not_rewritten(tmp_path):
    bids = _raw_dataset(tmp_path / "bids")
    out = tmp_path / "out-ugi-bids"
    _writer(str(out), str(bids), 1, "same")
    files = [out / "dataset_description.json", out / ".bidsignore",
             out / "logs" / "CITATION.md", out / "logs" / "CITATION.bib", out / "shared.txt"]
    stamps = {path: path.stat().st_mtime_ns for path in files}
    time.sleep(0.05)
    _writer(str(out), str(bids), 1, "same")
    assert {path: path.stat().st_mtime_ns for path in files} == stamps
    write_text_atomic(out / "shared.txt", "changed")
    assert (out / "shared.txt").read_text() == "changed"
