"""The ugi-bids registration engine: uniGradICON in world coordinates, usable as a library.

Main entry points (imported lazily, so ``import ugi_bids.engine`` stays cheap)::

    from ugi_bids.engine import Registrar, load_volume, write_composite_h5, apply_transform

* :class:`Registrar` (``registrar.py``): loads a model once, registers pairs; results carry both
  directions as :class:`WorldTransform` pull maps (forward: fixed -> moving points).
* :func:`load_volume` (``spatial/volume.py``): NIfTI -> :class:`Volume` with input checks.
* :func:`write_composite_h5` / :func:`read_composite_h5` (``formats/itk.py``): ANTs/ITK files.
* :func:`apply_transform` (``spatial/warp.py``), :func:`jacobian_determinant`
  (``spatial/jacobian.py``).

Subpackages, each with one job (``ARCHITECTURE.md`` has the import rules): ``spatial`` (grids,
volumes, world transforms, resampling, Jacobians) and ``formats`` (ITK/ANTs files, atomic
output sets) never import torch; ``kernels`` (compiled numba code), ``model`` (the cascade, its
folded inference form, weights), ``optimise`` (instance optimisation), ``prealign`` (the
world-space affine), then ``registrar`` on top.
"""

from importlib import import_module

_EXPORTS = {
    "Registrar": "registrar",
    "RegistrationResult": "registrar",
    "PREALIGN_MODES": "options",
    "Volume": "spatial.volume",
    "load_volume": "spatial.volume",
    "WorldTransform": "spatial.transforms",
    "DisplacementField": "spatial.transforms",
    "Grid": "spatial.geometry",
    "write_composite_h5": "formats.itk",
    "read_composite_h5": "formats.itk",
    "write_displacement_nifti": "formats.itk",
    "apply_transform": "spatial.warp",
    "jacobian_determinant": "spatial.jacobian",
    "folding_fraction": "spatial.jacobian",
    "load_network": "model.weights",
    "resolve_weights": "model.weights",
    "UgiError": "ugi_bids.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = _EXPORTS[name]
        if not module.startswith("ugi_bids."):
            module = f"{__name__}.{module}"
        return getattr(import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
