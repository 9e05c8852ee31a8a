"""The ugi-bids registration engine: uniGradICON in world coordinates, usable as a library.

Main entry points (imported lazily, so ``import ugi_bids.engine`` stays cheap)::

    from ugi_bids.engine import Registrar, load_volume, write_composite_h5, apply_transform

* :class:`Registrar` (``register.py``): loads a model once, registers pairs; results carry both
  directions as :class:`WorldTransform` pull maps (forward: fixed -> moving points).
* :func:`load_volume` (``volume.py``): NIfTI -> :class:`Volume` with input checks.
* :func:`write_composite_h5` / :func:`read_composite_h5` (``itk_io.py``): ANTs/ITK files.
* :func:`apply_transform` (``warp.py``), :func:`jacobian_determinant` (``jacobian.py``).
"""

from importlib import import_module

_EXPORTS = {
    "Registrar": "register",
    "RegistrationResult": "register",
    "PREALIGN_MODES": "register",
    "Volume": "volume",
    "load_volume": "volume",
    "WorldTransform": "transforms",
    "DisplacementField": "transforms",
    "Grid": "geometry",
    "write_composite_h5": "itk_io",
    "read_composite_h5": "itk_io",
    "write_displacement_nifti": "itk_io",
    "apply_transform": "warp",
    "jacobian_determinant": "jacobian",
    "folding_fraction": "jacobian",
    "load_network": "weights",
    "resolve_weights": "weights",
    "UgiError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
