"""World-space pre-alignment before the deformable network, one job per module.

* ``moments``: intensity windows, masks on an image's grid, intensity centres of mass;
* ``pyramid``: world-axis-aligned, low-pass filtered resolution levels;
* ``metrics``: Mattes mutual information and normalised cross-correlation (losses);
* ``affine``: the rigid-then-affine optimisation and :func:`~.affine.prealign`, which returns the
  pull map from FIXED to MOVING world points (RAS mm).
"""

from .affine import (
           MODES,
           FixedSide,
           PrealignResult,
           PrealignSettings,
           prealign,
           prepare_fixed,
)

__all__ = ["MODES", "FixedSide", "PrealignResult", "PrealignSettings", "prealign",
           "prepare_fixed"]
