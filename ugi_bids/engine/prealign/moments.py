"""Intensities, masks and centres of mass for the pre-alignment, in world RAS millimetres."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ...errors import InputDataError
from ..spatial.geometry import apply_affine
from ..spatial.volume import Volume


def check_finite(volume: Volume, what: str) -> None:
    """Refuse (InputDataError, exit 65) a volume that is not a non-empty 3D array of finite
    values."""
    if volume.data.ndim != 3 or min(volume.data.shape) < 1:
        raise InputDataError(f"{what} must be a non-empty 3D volume, got shape {volume.data.shape}")
    if not np.all(np.isfinite(volume.data)):
        raise InputDataError(f"{what} contains NaN or infinite values; fix or mask them first")


def mask_on_grid(mask, volume: Volume, what: str) -> np.ndarray | None:
    """A mask as a boolean array on ``volume``'s voxels, or None.

    ``mask`` may be an array of the volume's shape (non-zero = inside) or a :class:`Volume` on any
    grid, which is resampled in world space (nearest neighbour). An empty mask is refused.
    """
    if mask is None:
        return None
    if isinstance(mask, Volume):
        same_grid = (mask.grid.shape == volume.grid.shape
                     and np.allclose(mask.grid.affine, volume.grid.affine, atol=1e-6))
        if same_grid:
            array = np.asarray(mask.data) > 0.5
        else:
            index = mask.grid.world_to_index(volume.grid.world_coordinates())
            inside = (np.asarray(mask.data) > 0.5).astype(np.float32)
            array = ndimage.map_coordinates(inside, np.moveaxis(index, -1, 0), order=0,
                                            mode="constant", cval=0.0) > 0.5
    else:
        array = np.asarray(mask)
        if array.shape != volume.data.shape:
            raise InputDataError(f"{what} has shape {array.shape}, but its image has shape "
                                 f"{volume.data.shape}; give a mask on the image's grid")
        array = array > 0.5 if array.dtype != bool else array
    if not array.any():
        raise InputDataError(f"{what} is empty (no voxel inside the image is set)")
    return array


def intensity_window(data: np.ndarray, mask: np.ndarray | None = None,
                     what: str = "image") -> tuple[float, float]:
    """A robust intensity range ``(lo, hi)`` (image units) for mapping ``data`` to [0, 1].

    ``lo`` is the minimum, ``hi`` the 99.5th percentile (so a few hot voxels cannot squash the
    histogram); falls back to the maximum when that percentile equals the minimum. Raises
    :class:`InputDataError` for a constant image (within ``mask`` when given).
    """
    values = data[mask] if mask is not None else data.ravel(order="K")
    lo = float(values.min())
    hi = float(np.percentile(values, 99.5))
    if not hi > lo:
        hi = float(values.max())
    if not hi > lo:
        raise InputDataError(f"{what} is constant (every voxel = {lo:g}); cannot pre-align it")
    return lo, hi


def unit_intensities(data: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """``data`` mapped linearly from ``window`` to [0, 1] and clipped, float32."""
    lo, hi = window
    return np.clip((np.asarray(data, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)


def com_weights(data: np.ndarray, mask: np.ndarray | None = None,
                what: str = "image") -> np.ndarray:
    """Non-negative voxel weights for the centre of mass (float64, unitless).

    Intensities are shifted by the median and clipped to ``[median, p99.5]``: the background
    (air, the bulk of most fields of view, whatever its value: 0 in MR, -1000 HU or -3024 padding
    in CT) weighs nothing, negative values are harmless and a few very bright voxels cannot pull
    the centre. When the median is already the top of the range (an object filling most of the
    field of view), the minimum is used instead of the median.
    """
    # ravel(order="K") is a view of NIfTI's Fortran-ordered arrays; one percentile call with
    # two ranks selects both values in one fast partition.
    values = data[mask] if mask is not None else data.ravel(order="K")
    lo, hi = (float(v) for v in np.percentile(values, [50.0, 99.5]))
    if not hi > lo:
        lo, hi = float(values.min()), float(values.max())
        if not hi > lo:
            raise InputDataError(f"{what} is constant (every voxel = {lo:g}); cannot pre-align it")
    weights = np.clip(np.asarray(data, dtype=np.float64), lo, hi) - lo
    if mask is not None:
        weights = weights * mask
    if not weights.sum() > 0:
        raise InputDataError(f"{what} has no voxel above its background level; cannot pre-align it")
    return weights


def centre_of_mass(volume: Volume, mask=None) -> np.ndarray:
    """Intensity-weighted centre of mass of ``volume`` in world RAS millimetres, shape (3,).

    Weights are the intensities shifted and clipped to be non-negative (see :func:`com_weights`),
    so CT (negative HU) and MR give the centre of the object rather than of the field of view.
    ``mask`` (an array on the volume's grid, or a :class:`Volume` anywhere in world space)
    restricts the voxels that count. Raises :class:`InputDataError` for a constant image or an
    empty mask. The result depends only on world positions, not on how the voxels are stored.
    """
    check_finite(volume, "image")
    mask_array = mask_on_grid(mask, volume, "mask")
    weights = com_weights(volume.data, mask_array)
    total = weights.sum()
    index = np.array([
        (weights.sum(axis=tuple(b for b in range(3) if b != a)) * np.arange(n)).sum() / total
        for a, n in enumerate(weights.shape)
    ])
    return apply_affine(volume.grid.affine, index)
