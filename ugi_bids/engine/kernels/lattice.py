"""Trilinear reads of numpy volumes, compiled with numba and threaded; no torch here.

Three kernels share one read (:func:`_read`: clamped to the lattice, float64 arithmetic):

* :func:`_index_kernel`: a volume (i, j, k, C) at voxel indices (n, 3);
* :func:`_grid_kernel`: a volume on a regular lattice whose voxel ``p`` reads index
  ``to_index @ [p, 1]``, optionally times a linear map of the vectors;
* :func:`_chain_kernel`: displacement tables applied in turn to an identity lattice in
  normalised coordinates (the cascade's compositions), optionally ending in an image read.

``zero_outside`` follows ITK: a point more than half a voxel outside the lattice reads 0.
:mod:`ugi_bids.engine.spatial.sampling` (numpy) and :mod:`ugi_bids.engine.kernels.chain`
(torch) are the callers.
"""

from __future__ import annotations

import sys

import numpy as np

from . import njit, numba, prange

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


def match_threads() -> int:
    """Give the kernels as many threads as torch uses (``--omp-nthreads``) where torch is
    loaded, within numba's pool; returns that count. Without torch numba keeps its own pool."""
    torch = sys.modules.get("torch")
    wanted = torch.get_num_threads() if torch is not None else numba.get_num_threads()
    threads = max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads
