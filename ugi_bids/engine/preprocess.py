"""Intensity preprocessing, identical at training and test time (uniGradICON):

* CT: clip to [-1000, 1000] HU, rescale to [0, 1].
* MRI: clip to [image minimum, 99th percentile], rescale to [0, 1].

Masks are binarised (non-zero = inside). "Input masking" multiplies the mask into the normalised
image; "loss masking" restricts the instance-optimisation similarity to the mask instead.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputDataError
from .options import MODALITIES
from .spatial.volume import Volume

CT_WINDOW_HU = (-1000.0, 1000.0)


def kth_quantile(values: np.ndarray, q: float) -> float:
    """The reference's quantile: the k-th smallest value with k = clip(int(q * n), 1, n)."""
    flat = np.asarray(values).ravel(order="K")  # a view, whatever the memory order
    k = max(1, min(int(q * flat.size), flat.size))
    # Asking for a second, neighbouring rank selects the same value ~10x faster on images
    # with many equal voxels (numpy's single-rank partition slows down on long runs of zeros).
    neighbour = k if k < flat.size else max(k - 2, 0)
    return float(np.partition(flat, sorted({k - 1, neighbour}))[k - 1])


def intensity_window(data: np.ndarray, modality: str) -> tuple[float, float]:
    """(low, high) clipping window of an image for ``modality`` ("mri" or "ct")."""
    if modality == "ct":
        return CT_WINDOW_HU
    if modality == "mri":
        return float(np.min(data)), kth_quantile(data, 0.99)
    raise ValueError(f"unknown modality {modality!r}; choose from {', '.join(MODALITIES)}")


def normalise_intensities(volume: Volume, modality: str, what: str = "image") -> Volume:
    """Clip to the modality's window and rescale to [0, 1] (float32).

    Raises InputDataError for an image that cannot be normalised (constant over the window).
    """
    data = volume.data
    low, high = intensity_window(data, modality)
    if not high > low:
        raise InputDataError(
            f"{what} cannot be normalised: its intensities are constant over the {modality.upper()} "
            f"window [{low:g}, {high:g}] (an empty or blank image?)")
    scaled = (np.clip(data, low, high) - low) / (high - low)
    return Volume(volume.grid, scaled.astype(np.float32))


def binarise_mask(mask: Volume, like: Volume, what: str = "mask") -> np.ndarray:
    """Boolean mask array; the mask must share the image's grid (shape and affine)."""
    if tuple(mask.grid.shape) != tuple(like.grid.shape) or not np.allclose(
            mask.grid.affine, like.grid.affine, atol=1e-3):
        raise InputDataError(f"{what} does not share its image's voxel grid (shape/affine differ)")
    inside = mask.data != 0
    if not inside.any():
        raise InputDataError(f"{what} is empty (no non-zero voxel)")
    return inside


def preprocess(volume: Volume, modality: str, mask: Volume | None = None,
               apply_mask: bool = False, what: str = "image") -> Volume:
    """Normalise ``volume`` for the network; multiply in the binarised ``mask`` when
    ``apply_mask`` (input masking)."""
    normalised = normalise_intensities(volume, modality, what)
    if mask is not None and apply_mask:
        inside = binarise_mask(mask, volume, f"mask of {what}")
        return Volume(normalised.grid, normalised.data * inside.astype(np.float32))
    return normalised
