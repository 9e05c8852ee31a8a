"""Test oracle: our composite transform written by ITK's own TransformFileWriter.

Production writes the file with h5py (``ugi_bids.engine.formats.itk.write_composite_h5``); this
writes the same transform through ITK, so that tests can check that ITK, ANTs and our reader see
the two files alike.
"""

from __future__ import annotations

import os

import numpy as np

from ugi_bids.engine.formats.itk import affine_ras_to_lps, grid_to_itk_geometry
from ugi_bids.engine.spatial.transforms import WorldTransform


def write_composite_h5_itk(transform: WorldTransform, path: str | os.PathLike,
                           precision: str = "float", compression: bool = False) -> str:
    """``transform`` as the queue ``[AffineTransform, DisplacementFieldTransform]`` (LPS), written
    by ITK in ``precision`` ("float" or "double"; ITK stores the affine in it too)."""
    import itk

    if precision not in ("float", "double"):
        raise ValueError(f"precision must be 'float' or 'double', not {precision!r}")
    ctype, dtype = (itk.F, np.float32) if precision == "float" else (itk.D, np.float64)
    composite = itk.CompositeTransform[ctype, 3].New()
    affine = itk.AffineTransform[ctype, 3].New()
    lps = affine_ras_to_lps(transform.affine)
    params = affine.GetParameters()
    for i, value in enumerate(np.concatenate([lps[:3, :3].ravel(), lps[:3, 3]])):
        params[i] = float(value)
    affine.SetParameters(params)
    composite.AddTransform(affine)
    if transform.field is not None:
        vectors = np.asarray(transform.field.vectors, dtype=dtype) * \
            np.asarray([-1.0, -1.0, 1.0], dtype=dtype)
        buffer = np.ascontiguousarray(np.transpose(vectors, (2, 1, 0, 3)))  # order k, j, i
        image = itk.Image[itk.Vector[ctype, 3], 3].New()
        image.SetRegions([int(n) for n in transform.field.grid.shape])
        image.Allocate()
        itk.array_view_from_image(image)[...] = buffer
        origin, spacing, direction = grid_to_itk_geometry(transform.field.grid)
        image.SetOrigin([float(v) for v in origin])
        image.SetSpacing([float(v) for v in spacing])
        image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
        field = itk.DisplacementFieldTransform[ctype, 3].New()
        field.SetDisplacementField(image)
        composite.AddTransform(field)  # back of the queue: applied first
    writer = itk.TransformFileWriterTemplate[ctype].New()
    writer.SetFileName(os.fspath(path))
    writer.SetInput(composite)
    writer.SetUseCompression(bool(compression))
    writer.Update()
    return os.fspath(path)
