"""Compiled (numba) kernels: the engine's hot loops, each tested against PyTorch or numpy.

This package's ``__init__`` is the one import guard for numba: ``numba``, ``njit`` and
``prange`` are ``None`` where numba is missing (it is a runtime dependency; the guard keeps the
engine importable and every caller has a numpy or PyTorch path). Kernel modules import them from
here and define their kernels only ``if numba is not None``.

Modules: ``lattice`` (trilinear reads of numpy volumes at voxel indices, on regular lattices and
along chains of maps; no torch, so :mod:`ugi_bids.engine.spatial` can use it), ``layout``
(ITK's field buffer order; no torch), ``dispatch`` (whether the kernels take given tensors;
their thread count is ``lattice.match_threads``), ``chain`` (map composition for the cascade), ``trilinear``,
``upsample_join``, ``narrow_conv``, ``separable`` and ``mattes_mi`` (autograd-aware kernels of
the network, instance optimisation and pre-alignment).
"""

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = njit = prange = None

__all__ = ["numba", "njit", "prange"]
