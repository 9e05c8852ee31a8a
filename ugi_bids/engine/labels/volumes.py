"""Region volumes of a label map, in the map's own millimetres."""

from __future__ import annotations

import numpy as np

from ..spatial.volume import Volume
from .tables import LabelTable

#: Columns of a ``volumes.tsv``.
VOLUME_COLUMNS = ("index", "name", "voxels", "volume_mm3")


def voxel_volume_mm3(volume: Volume) -> float:
    """Volume of one voxel (mm³): the absolute determinant of the grid's voxel-to-world
    matrix, so oblique and anisotropic grids count right."""
    return float(abs(np.linalg.det(volume.grid.affine[:3, :3])))


def label_counts(labels: np.ndarray) -> dict[int, int]:
    """Voxels per integer label value."""
    values, counts = np.unique(np.asarray(labels).astype(np.int64, copy=False),
                               return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def region_volumes(labels: Volume, table: LabelTable) -> list[tuple[int, str, int, float]]:
    """``(index, name, voxels, volume_mm3)`` for every region of ``table`` (index 0, the
    background, excluded) and for any other non-zero value the map holds (named
    ``label-<index>``), by index; regions absent from the map have 0 voxels."""
    counts = label_counts(labels.data)
    full = table.with_labels(value for value in counts if value != 0)
    per_voxel = voxel_volume_mm3(labels)
    names = full.names()
    return [(index, names[index], counts.get(index, 0), counts.get(index, 0) * per_voxel)
            for index in full.regions()]


def volumes_tsv(rows: list[tuple[int, str, int, float]]) -> str:
    """The ``volumes.tsv`` text of :func:`region_volumes` rows (volumes to 1e-3 mm³)."""
    lines = ["\t".join(VOLUME_COLUMNS)]
    lines += [f"{index}\t{name}\t{voxels}\t{volume:.3f}" for index, name, voxels, volume in rows]
    return "\n".join(lines) + "\n"


def mask_volume_mm3(mask: Volume) -> float:
    """Volume (mm³) of the non-zero voxels of ``mask``."""
    return float(np.count_nonzero(mask.data)) * voxel_volume_mm3(mask)
