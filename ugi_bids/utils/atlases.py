"""Atlases: ``--atlases`` / ``--atlas-library`` parsing, and resolving them to files.

A TemplateFlow atlas (``NAME[:desc-DESC]``) is looked up in the output spaces in order, the
first TemplateFlow space that has it wins (:func:`ugi_bids.utils.templates.find_templateflow_atlas`:
the template's resolution where the atlas has it, its ``.tsv`` where TemplateFlow has one). A
custom atlas (``NAME=PATH[,labels=TSV][,space=SPACE]``) is a label map in an output space (the
first by default; ``--template`` spaces count). A library (``NAME=DIR``) is a folder of
labelled images: every ``*_dseg.nii[.gz]`` with its intensity image beside it (same entities,
suffix ``T1w``, ``T2w``... or ``CT``) and a ``dseg.tsv`` lookup table at the folder's root.

Everything is checked before any output is written: missing files are exit 66, bad syntax
exit 2, unreadable label maps or tables exit 65.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import AtlasSpec, LibrarySpec, SUFFIX_MODALITY
from ..errors import InputDataError, MissingInputError, TemplateSpecError, UsageError
from ..engine.labels.tables import LabelTable, read_table, table_from_labels

_NAME = re.compile(r"[a-zA-Z0-9]+")
_NIFTI = (".nii.gz", ".nii")


def _name(value: str, what: str) -> str:
    if not _NAME.fullmatch(value):
        raise UsageError(f"{what} {value!r}: names are letters and digits only (they become the "
                         "atlas- entity of the outputs)")
    return value


def _existing(path_text: str, what: str) -> Path:
    path = Path(path_text.strip()).expanduser().absolute()
    if not path_text.strip():
        raise UsageError(f"{what}: empty path")
    if not path.exists():
        raise MissingInputError(f"{what} not found: {path}")
    return path


def parse_atlas(value: str) -> AtlasSpec:
    """Parse one ``--atlases`` value: ``NAME[:desc-DESC]`` (TemplateFlow) or
    ``NAME=PATH[,labels=TSV][,space=SPACE]`` (a label map given by path)."""
    value = str(value).strip()
    if "=" in value.split(",")[0]:
        name, _, rest = value.partition("=")
        name = _name(name.strip(), "--atlases name")
        image, *options = rest.split(",")
        fields: dict = {"path": _existing(image, f"atlas {name}: label map")}
        if not fields["path"].is_file():
            raise MissingInputError(f"atlas {name}: label map {fields['path']} is not a file")
        for option in options:
            key, sep, text = option.partition("=")
            key = key.strip()
            if key == "labels" and sep:
                fields["labels"] = _existing(text, f"atlas {name}: labels table")
            elif key == "space" and sep and _NAME.fullmatch(text.strip()):
                fields["space"] = text.strip()
            else:
                raise UsageError(f"--atlases {name}: unknown option {option!r} (expected "
                                 "labels=TSV or space=SPACE)")
        return AtlasSpec(name, **fields)
    name, *modifiers = value.split(":")
    name = _name(name.strip(), "--atlases name")
    desc = None
    for modifier in modifiers:
        key, sep, label = modifier.partition("-")
        if key != "desc" or not sep or not _NAME.fullmatch(label):
            raise UsageError(f"--atlases {value!r}: expected NAME[:desc-DESC] (a TemplateFlow "
                             "atlas, e.g. Schaefer2018:desc-400Parcels7Networks) or "
                             "NAME=PATH[,labels=TSV][,space=SPACE]")
        desc = label
    return AtlasSpec(name, desc=desc)


def parse_library(value: str) -> LibrarySpec:
    """Parse one ``--atlas-library NAME=DIR``; the folder must exist."""
    name, sep, folder = str(value).partition("=")
    if not sep:
        raise UsageError(f"--atlas-library expects NAME=DIR, got {value!r}")
    path = _existing(folder, f"atlas library {name.strip()}")
    if not path.is_dir():
        raise MissingInputError(f"atlas library {name.strip()}: {path} is not a folder")
    return LibrarySpec(_name(name.strip(), "--atlas-library name"), path)


# --------------------------------------------------------------------------------------------
# Resolution


@dataclass
class ResolvedAtlas:
    """An atlas ready to propagate: its label map in output space ``space`` (a space label),
    its lookup table (every label of the map named), and BIDS/file URIs for provenance."""

    spec: AtlasSpec
    space: str
    image: Path
    table: LabelTable
    uri: str
    table_uri: str | None
    citation: str | None = None

    @property
    def label(self) -> str:
        return self.spec.label


def _labels_of(path: Path, what: str) -> np.ndarray:
    """The integer values of a label map; non-integer values are refused (exit 65)."""
    from ..engine.spatial.volume import load_volume

    data = load_volume(path, what).data
    values = np.unique(data)
    if not np.allclose(values, np.round(values)):
        raise InputDataError(f"{what} {path} holds non-integer values: a label map (dseg) is "
                             "needed, not a probability map")
    return np.round(values).astype(np.int64)


def _checked_table(table: LabelTable | None, labels: np.ndarray, what: str) -> LabelTable:
    import logging

    if table is None:
        return table_from_labels(labels)
    unnamed = sorted(set(labels.tolist()) - set(table.index) - {0})
    if unnamed:
        logging.getLogger(__name__).warning(
            "%s: %d label value(s) have no name in its table (e.g. %s); they are named "
            "label-<index>", what, len(unnamed), unnamed[:5])
    return table.with_labels(labels)


def resolve_atlas(spec: AtlasSpec, templates: list, *, download: bool = True) -> ResolvedAtlas:
    """The files of ``spec`` in one of ``templates`` (the resolved output spaces, in order)."""
    from .templates import find_templateflow_atlas, templateflow_atlases

    labels = [t.label for t in templates]
    if spec.is_custom:
        space = spec.space or labels[0]
        if space not in labels:
            raise TemplateSpecError(f"atlas {spec.name}: space {space!r} is not an output space "
                                    f"({', '.join(labels)}); add it with --output-spaces or "
                                    "--template")
        table = read_table(spec.labels) if spec.labels else None
        values = _labels_of(spec.path, f"atlas {spec.name}")
        return ResolvedAtlas(spec, space, spec.path,
                             _checked_table(table, values, f"atlas {spec.name}"),
                             spec.path.as_uri(), spec.labels.as_uri() if spec.labels else None)
    for template in templates:
        found = find_templateflow_atlas(template, spec.name, spec.desc, download=download)
        if found is None:
            continue
        table = read_table(found.table) if found.table else None
        values = _labels_of(found.image, f"atlas {spec.text}")
        return ResolvedAtlas(spec, template.label, found.image,
                             _checked_table(table, values, f"atlas {spec.text}"), found.uri,
                             found.table_uri)
    known = sorted({name for t in templates for name in templateflow_atlases(t)})
    raise TemplateSpecError(
        f"TemplateFlow atlas {spec.text} is in none of the output spaces "
        f"({', '.join(labels)}); atlases there: {', '.join(known) or 'none'}; or give a label "
        f"map with --atlases {spec.name}=PATH[,labels=TSV][,space=SPACE]")


# --------------------------------------------------------------------------------------------
# Libraries


@dataclass
class LibraryImage:
    """One labelled image of a library: intensities, labels, and their SHA-256."""

    image: Path
    labels: Path
    image_sha256: str
    labels_sha256: str


@dataclass
class ResolvedLibrary:
    spec: LibrarySpec
    images: list[LibraryImage]
    table: LabelTable
    table_path: Path

    @property
    def label(self) -> str:
        return self.spec.label


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _intensity_beside(dseg: Path) -> Path | None:
    name = dseg.name
    ext = next(e for e in _NIFTI if name.endswith(e))
    stem = name[: -len("_dseg" + ext)]
    for suffix in SUFFIX_MODALITY:
        for candidate_ext in _NIFTI:
            candidate = dseg.with_name(f"{stem}_{suffix}{candidate_ext}")
            if candidate.is_file():
                return candidate
    return None


def resolve_library(spec: LibrarySpec) -> ResolvedLibrary:
    """Every ``*_dseg.nii[.gz]`` of the library folder (recursively, sorted) with the intensity
    image beside it, and the root ``dseg.tsv``; fewer than 2 images, a missing intensity image
    or table are one-line errors (exit 66)."""
    where = f"atlas library {spec.name} ({spec.path})"
    tables = sorted(spec.path.glob("*dseg.tsv"))
    if not tables:
        raise MissingInputError(f"{where}: no dseg.tsv lookup table at its root")
    dsegs = sorted(p for ext in _NIFTI for p in spec.path.rglob(f"*_dseg{ext}"))
    images = []
    for dseg in dsegs:
        image = _intensity_beside(dseg)
        if image is None:
            raise MissingInputError(f"{where}: {dseg.relative_to(spec.path)} has no intensity "
                                    f"image beside it (same entities, suffix "
                                    f"{'/'.join(SUFFIX_MODALITY)})")
        images.append(LibraryImage(image, dseg, sha256(image), sha256(dseg)))
    if len(images) < 2:
        raise MissingInputError(f"{where}: label fusion needs at least 2 labelled images, found "
                                f"{len(images)} (*_dseg.nii.gz with an intensity image beside it)")
    values = np.unique(np.concatenate([_labels_of(i.labels, f"{where}: label map")
                                       for i in images]))
    table = _checked_table(read_table(tables[0]), values, where)
    return ResolvedLibrary(spec, images, table, tables[0])
