"""ITK's displacement-field buffer order, written in one threaded pass; no torch here."""

from __future__ import annotations

import numpy as np

from . import njit, prange

if njit is not None:
    @njit(parallel=True, cache=True, nogil=True)
    def _itk_buffer_kernel(vectors, out):  # pragma: no cover - compiled
        for k in prange(vectors.shape[2]):
            for j in range(vectors.shape[1]):
                for i in range(vectors.shape[0]):
                    out[k, j, i, 0] = -vectors[i, j, k, 0]
                    out[k, j, i, 1] = -vectors[i, j, k, 1]
                    out[k, j, i, 2] = vectors[i, j, k, 2]


def itk_buffer(vectors: np.ndarray, dtype) -> np.ndarray:
    """(i, j, k, 3) RAS vectors -> (k, j, i, 3) LPS vectors of ``dtype`` (ITK's buffer order,
    i fastest): one threaded pass (numpy's transposing copy took 0.2 s per 177^3 field)."""
    out = np.empty((vectors.shape[2], vectors.shape[1], vectors.shape[0], 3), dtype=dtype)
    if njit is not None and vectors.dtype == dtype:
        _itk_buffer_kernel(vectors, out)
    else:
        np.multiply(np.transpose(vectors, (2, 1, 0, 3)), np.asarray([-1, -1, 1], dtype=dtype),
                    out=out, casting="same_kind")
    return out
