"""Whether an image can be registered at all: checks run on every registration input before
anything is written, so that bad data fail with one line (exit 65) instead of deep inside the
pre-alignment or the network.

:func:`check_registrable` refuses what cannot work (a degenerate axis, no contrast over the
modality's intensity window) and returns warnings for what probably will not (intensities that
do not look like the declared modality). The file-level checks (readable, 3-D, finite, a valid
orientation and voxel sizes, a declared size the file holds) are
:func:`~ugi_bids.engine.spatial.volume.load_volume`'s.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputDataError
from .preprocess import CT_WINDOW_HU, intensity_window
from .spatial.volume import Volume

#: The smallest image the network can see as a volume: voxels along every axis, and the
#: physical extent (millimetres) along every axis. A single slice (N x M x 1) or a thin slab
#: has no 3-D anatomy to register.
MIN_VOXELS = 8
MIN_EXTENT_MM = 16.0

#: CT intensities, Hounsfield units: air is about -1000, and a body's voxels lie between air
#: and dense bone (about 2000; metal and the scanner's padding fall outside).
CT_AIR_HU = -1000.0
CT_BODY_RANGE_HU = (-1100.0, 3100.0)


def modality_warning(data: np.ndarray, modality: str) -> str | None:
    """A sentence when ``data``'s intensities do not look like ``modality`` ("ct" or "mri"),
    else None.

    A CT in Hounsfield units has air near -1000 HU around the body, and most of its voxels
    between -1100 and 3100 HU (padding outside the reconstruction circle, often -2048 or -3024,
    aside). An MRI has no such air: its background is near 0 and it has no large negative
    values. Read as the other modality, an image is clipped to a flat band (CT's [-1000, 1000]
    window on an MRI) or loses its contrast (an MRI's [min, p99] window on a CT).
    """
    values = np.asarray(data, dtype=np.float32).ravel()
    step = max(1, values.size // 2_000_000)  # a regular subsample keeps this fast
    sample = values[::step]
    near_air = float(np.mean(np.abs(sample - CT_AIR_HU) <= 200.0))
    in_body_range = float(np.mean((sample >= CT_BODY_RANGE_HU[0])
                                  & (sample <= CT_BODY_RANGE_HU[1])))
    if modality == "ct":
        if near_air < 0.01 or in_body_range < 0.5:
            return (f"the image does not look like a CT in Hounsfield units ({100 * near_air:.1f}"
                    f" % of voxels near air's -1000 HU, {100 * in_body_range:.0f} % between "
                    f"{CT_BODY_RANGE_HU[0]:g} and {CT_BODY_RANGE_HU[1]:g} HU): is it an MRI? "
                    f"Read as CT it is clipped to [{CT_WINDOW_HU[0]:g}, {CT_WINDOW_HU[1]:g}]")
        return None
    if near_air >= 0.05 and float(np.percentile(sample, 1)) < -500.0:
        return (f"the image looks like a CT, not an MRI ({100 * near_air:.0f} % of voxels near "
                "air's -1000 HU): declare it as CT (--moving-modality ct / the CT suffix), or "
                "its MRI intensity window loses the tissue contrast")
    return None


def check_registrable(volume: Volume, modality: str, what: str = "image") -> list[str]:
    """Refuse an image that cannot be registered; return warnings for one that may go wrong.

    Raises :class:`~ugi_bids.errors.InputDataError` (exit 65, one line naming ``what``) for
    fewer than :data:`MIN_VOXELS` voxels or under :data:`MIN_EXTENT_MM` mm along any axis (a
    2-D image or a thin slab), and for intensities constant over ``modality``'s window (a blank
    image, or a CT window that clips it flat). Returns the :func:`modality_warning`, if any, as
    ``["<what>: <sentence>"]`` (log it, and record it with the result).
    """
    shape = tuple(volume.grid.shape)
    extent = np.asarray(shape) * volume.grid.spacing
    if min(shape) < MIN_VOXELS or float(extent.min()) < MIN_EXTENT_MM:
        raise InputDataError(
            f"{what} is not a 3-D volume that can be registered: shape {shape}, extent "
            f"{' x '.join(f'{e:.1f}' for e in extent)} mm (needs at least {MIN_VOXELS} voxels "
            f"and {MIN_EXTENT_MM:g} mm along every axis; a single slice or a thin slab?)")
    low, high = intensity_window(volume.data, modality)
    if not high > low or float(np.ptp(np.clip(volume.data, low, high))) == 0.0:
        raise InputDataError(
            f"{what} has no contrast to register: its intensities are constant over the "
            f"{modality.upper()} window [{low:g}, {high:g}] (a blank image, or the wrong "
            "modality?)")
    warning = modality_warning(volume.data, modality)
    return [] if warning is None else [f"{what}: {warning}"]
