"""Trilinear sampling on the CPU for inference: map composition and image warping.

PyTorch's 3-D ``grid_sample`` runs on one thread on the CPU and costs about 0.5 s per 175^3
lattice, and a cascade pass needs nine of them per direction. These kernels compute the same
quantities (``align_corners=True``, border clamping) with all threads and float64 arithmetic
inside, so they are closer to the exact value than ``grid_sample`` itself (about 1e-5 voxel vs
1e-4 on white-noise fields).

Coordinates are normalised lattice coordinates as in :mod:`ugi_bids.engine.network`: a point is
an (a0, a1, a2) triple, ``a_k`` in [0, 1] along tensor axis k (grid spacing 1 / (n_k - 1)), held
channels-last: (..., 3) float32. Tables are channels-last too: (n0, n1, n2, C).

On other devices (CUDA) the same functions fall back to ``grid_sample``, which is fast there.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

try:  # numba is a runtime dependency; the fallback keeps the engine importable without it
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

if numba is not None:
    @njit(nogil=True, inline="always")
    def _corner(position, size):  # pragma: no cover - compiled
        """Clamped position -> (lower index, upper index, weight of the upper one)."""
        position = min(max(position, 0.0), size - 1.0)
        lower = min(int(position), max(size - 2, 0))
        return lower, min(lower + 1, size - 1), position - lower

    @njit(nogil=True, inline="always")
    def _read(volume, x, y, z, c):  # pragma: no cover - compiled
        i0, i1, fx = _corner(x, volume.shape[0])
        j0, j1, fy = _corner(y, volume.shape[1])
        k0, k1, fz = _corner(z, volume.shape[2])
        v00 = volume[i0, j0, k0, c] * (1.0 - fz) + volume[i0, j0, k1, c] * fz
        v01 = volume[i0, j1, k0, c] * (1.0 - fz) + volume[i0, j1, k1, c] * fz
        v10 = volume[i1, j0, k0, c] * (1.0 - fz) + volume[i1, j0, k1, c] * fz
        v11 = volume[i1, j1, k0, c] * (1.0 - fz) + volume[i1, j1, k1, c] * fz
        return (v00 * (1.0 - fy) + v01 * fy) * (1.0 - fx) + (v10 * (1.0 - fy) + v11 * fy) * fx

    @njit(nogil=True, inline="always")
    def _outside(volume, x, y, z):  # pragma: no cover - compiled
        return (x < -0.5 or y < -0.5 or z < -0.5 or x > volume.shape[0] - 0.5
                or y > volume.shape[1] - 0.5 or z > volume.shape[2] - 0.5)

    @njit(parallel=True, cache=True, nogil=True)
    def _index_kernel(index, volume, out, zero_outside):  # pragma: no cover - compiled
        for p in prange(index.shape[0]):
            x, y, z = index[p, 0], index[p, 1], index[p, 2]
            blank = zero_outside and _outside(volume, x, y, z)
            for c in range(volume.shape[3]):
                out[p, c] = 0.0 if blank else _read(volume, x, y, z, c)

    @njit(parallel=True, cache=True, nogil=True)
    def _grid_kernel(to_index, volume, linear, out, zero_outside):  # pragma: no cover
        n0, n1, n2 = out.shape[0], out.shape[1], out.shape[2]
        channels = volume.shape[3]
        for i in prange(n0):
            value = np.empty(channels)
            for j in range(n1):
                for k in range(n2):
                    x = to_index[0, 0] * i + to_index[0, 1] * j + to_index[0, 2] * k + to_index[0, 3]
                    y = to_index[1, 0] * i + to_index[1, 1] * j + to_index[1, 2] * k + to_index[1, 3]
                    z = to_index[2, 0] * i + to_index[2, 1] * j + to_index[2, 2] * k + to_index[2, 3]
                    if zero_outside and _outside(volume, x, y, z):
                        for c in range(out.shape[3]):
                            out[i, j, k, c] = 0.0
                        continue
                    for c in range(channels):
                        value[c] = _read(volume, x, y, z, c)
                    for c in range(out.shape[3]):
                        total = 0.0
                        for d in range(channels):
                            total += linear[c, d] * value[d]
                        out[i, j, k, c] = total

    @njit(parallel=True, cache=True, nogil=True)
    def _chain_kernel(start, use_start, t1, t2, t3, count, image, use_image, out
                      ):  # pragma: no cover - compiled
        n0, n1, n2 = out.shape[0], out.shape[1], out.shape[2]
        tables = (t1, t2, t3)
        for i in prange(n0):
            for j in range(n1):
                for k in range(n2):
                    x = i / (n0 - 1.0)
                    y = j / (n1 - 1.0)
                    z = k / (n2 - 1.0)
                    if use_start:
                        x += start[i, j, k, 0]
                        y += start[i, j, k, 1]
                        z += start[i, j, k, 2]
                    for t in range(count):
                        table = tables[t]
                        sx = x * (table.shape[0] - 1.0)
                        sy = y * (table.shape[1] - 1.0)
                        sz = z * (table.shape[2] - 1.0)
                        dx = _read(table, sx, sy, sz, 0)
                        dy = _read(table, sx, sy, sz, 1)
                        dz = _read(table, sx, sy, sz, 2)
                        x += dx
                        y += dy
                        z += dz
                    if use_image:
                        out[i, j, k, 0] = _read(image, x * (image.shape[0] - 1.0),
                                                y * (image.shape[1] - 1.0),
                                                z * (image.shape[2] - 1.0), 0)
                    else:
                        out[i, j, k, 0] = x
                        out[i, j, k, 1] = y
                        out[i, j, k, 2] = z


def kernels_apply(*tensors: torch.Tensor) -> bool:
    """Whether the engine's compiled (numba) kernels can take these tensors: numba is
    installed and every tensor is float32 on the CPU. Elsewhere (CUDA, float64) the callers
    use PyTorch's own operations."""
    return numba is not None and all(t.device.type == "cpu" and t.dtype == torch.float32
                                     for t in tensors)


def match_torch_threads() -> int:
    """Give the compiled kernels as many threads as torch uses (``--omp-nthreads``), within
    numba's pool; returns that count."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads


def _grid_sample(table: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Reference path: (n0, n1, n2, C) table at (..., 3) points -> (..., C)."""
    grid = (points * 2.0 - 1.0).flip(-1).reshape(1, -1, 1, 1, 3)
    image = table.permute(3, 0, 1, 2)[None]
    sampled = F.grid_sample(image, grid.to(table.dtype), mode="bilinear", padding_mode="border",
                            align_corners=True)
    return sampled.reshape(table.shape[3], -1).T.reshape(*points.shape[:-1], table.shape[3])


def _compose(points: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """``points + u(points)`` through ``grid_sample`` (the fallback of :func:`chain`)."""
    return points + _grid_sample(displacement, points)


def identity_points(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """The identity lattice of ``shape`` channels-last: (n0, n1, n2, 3), values i / (n - 1)
    (the same numbers as :func:`ugi_bids.engine.network.identity_grid`)."""
    axes = [torch.arange(n, device=device, dtype=dtype) / (n - 1) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def sample_at_indices(volume: np.ndarray, index: np.ndarray, zero_outside: bool = True
                      ) -> np.ndarray | None:
    """Trilinear samples of ``volume`` (i, j, k, C) float32 at voxel indices (n, 3) float64,
    clamped to the lattice and, with ``zero_outside``, 0 beyond half a voxel outside it (ITK's
    rule). Returns (n, C) float32, or None where the compiled kernels are unavailable."""
    if numba is None:
        return None
    out = np.empty((index.shape[0], volume.shape[3]), dtype=np.float32)
    match_torch_threads()
    _index_kernel(np.ascontiguousarray(index, dtype=np.float64),
                  np.ascontiguousarray(volume, dtype=np.float32), out, bool(zero_outside))
    return out


def sample_on_grid(volume: np.ndarray, shape, to_index: np.ndarray,
                   linear: np.ndarray | None = None, zero_outside: bool = True
                   ) -> np.ndarray | None:
    """Resample ``volume`` (i, j, k, C) float32 on a regular lattice of ``shape``: lattice
    index ``p`` reads ``volume`` trilinearly at voxel index ``to_index @ [p, 1]`` (4x4 or 3x4),
    clamped, and 0 beyond half a voxel outside with ``zero_outside``. ``linear`` (C', C), if
    given, multiplies every sampled vector (e.g. lattice -> world displacement).
    Returns (*shape, C') float32, or None where the compiled kernels are unavailable."""
    if numba is None:
        return None
    channels = volume.shape[3]
    linear = np.eye(channels) if linear is None else np.asarray(linear, dtype=np.float64)
    out = np.empty((*shape, linear.shape[0]), dtype=np.float32)
    match_torch_threads()
    _grid_kernel(np.ascontiguousarray(np.asarray(to_index, dtype=np.float64)[:3]),
                 np.ascontiguousarray(volume, dtype=np.float32),
                 np.ascontiguousarray(linear), out, bool(zero_outside))
    return out


def chain(shape, start: torch.Tensor | None, displacements: list[torch.Tensor],
          image: torch.Tensor | None = None) -> torch.Tensor:
    """Maps applied in turn to the identity lattice of ``shape``, optionally ending in an image
    read.

    Starting from the lattice point ``x`` (normalised), ``x += start[x]`` when ``start`` is given
    (a displacement on this very lattice, added without interpolation), then
    ``x += u(x)`` for each ``u`` in ``displacements`` (channels-last (n0, n1, n2, 3), read
    trilinearly, border-clamped), in order. Returns the points (*shape, 3), or ``image``
    ((m0, m1, m2), border-clamped) read at them, (*shape): one pass without intermediate
    arrays on the CPU, successive ``grid_sample`` calls elsewhere.
    """
    tensors = [t for t in (start, image, *displacements) if t is not None]
    if len(displacements) > 3 or not kernels_apply(*tensors):
        points = identity_points(shape, tensors[0].device, tensors[0].dtype)
        if start is not None:
            points = points + start
        for displacement in displacements:
            points = _compose(points, displacement)
        return points if image is None else _grid_sample(image[..., None], points)[..., 0]
    dummy = np.zeros((1, 1, 1, 3), dtype=np.float32)
    tables = [d.contiguous().numpy() for d in displacements] + [dummy] * (3 - len(displacements))
    out = torch.empty((*shape, 1 if image is not None else 3), dtype=torch.float32)
    match_torch_threads()
    _chain_kernel(dummy if start is None else start.contiguous().numpy(), start is not None,
                  *tables, len(displacements),
                  dummy[..., :1] if image is None else image.contiguous()[..., None].numpy(),
                  image is not None, out.numpy())
    return out if image is None else out[..., 0]
