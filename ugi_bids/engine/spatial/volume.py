"""Reading images into :class:`Volume` objects, with the checks that turn bad input into one-line
errors instead of stack traces."""

from __future__ import annotations

import os
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from ...errors import InputDataError, MissingInputError
from .geometry import Grid, canonical, grid_of


@dataclass
class Volume:
    """A 3D scalar image: ``data`` (i, j, k) float32 on ``grid`` (world RAS)."""

    grid: Grid
    data: np.ndarray

    def __post_init__(self):
        if tuple(self.data.shape) != tuple(self.grid.shape):
            raise ValueError(f"data {self.data.shape} do not match grid {self.grid.shape}")

    def canonical(self) -> "Volume":
        """The same voxels stored in the closest RAS+ orientation (exact, no resampling)."""
        grid, data = canonical(self.grid, self.data)
        return Volume(grid, data)

    def to_nifti(self, dtype=np.float32) -> nib.Nifti1Image:
        """A NIfTI image with this data and geometry (qform and sform both set)."""
        img = nib.Nifti1Image(np.asarray(self.data, dtype=dtype), self.grid.affine)
        img.set_qform(self.grid.affine, code=1)
        img.set_sform(self.grid.affine, code=1)
        return img


def load_nifti(path: str | os.PathLike, what: str = "image") -> nib.Nifti1Image:
    """Open a NIfTI file, with one-line errors for a missing or unreadable file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingInputError(f"{what} not found: {path}")
    try:
        img = nib.load(path)
        # Touch the data now so that a truncated file fails here, with a clear message.
        img.dataobj[(0,) * len(img.shape)]
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputDataError(f"cannot read {what} {path}: {exc.__class__.__name__}: {exc}") from None
    return img


def volume_from_image(img: nib.spatialimages.SpatialImage, what: str = "image") -> Volume:
    """A :class:`Volume` from a nibabel image: refuses non-3D, non-finite and empty data."""
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputDataError(
            f"{what} must be a 3D volume, got shape {tuple(img.shape)}; "
            "extract one volume first (e.g. a single frame or the mean)")
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except Exception as exc:
        raise InputDataError(f"cannot read the data of {what}: {exc}") from None
    if not np.all(np.isfinite(data)):
        raise InputDataError(f"{what} contains NaN or infinite values; fix or mask them first")
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        raise InputDataError(f"{what} has an invalid (singular or non-finite) affine in its header")
    return Volume(grid_of(img), data)


def load_volume(path: str | os.PathLike, what: str = "image") -> Volume:
    """Read a 3D NIfTI file as a :class:`Volume` in its stored orientation."""
    return volume_from_image(load_nifti(path, what), f"{what} {os.fspath(path)}")
