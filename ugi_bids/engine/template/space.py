"""The template's grid, and the average of the inputs resampled into it.

Both work in world RAS millimetres with pull maps (``template point -> input point``), the
direction every registration result of the engine has (``RegistrationResult.forward`` with the
template as the fixed image).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ..options import TEMPLATE_AVERAGES
from ..spatial.geometry import Grid, apply_affine
from ..spatial.transforms import WorldTransform
from ..spatial.volume import Volume
from ..spatial.warp import apply_transform


def field_of_view_corners(grid: Grid) -> np.ndarray:
    """World RAS mm (8, 3) of the corners of a grid's field of view: the voxel boxes' outer
    faces, half a voxel beyond the first and last voxel centres."""
    n = np.asarray(grid.shape, dtype=np.float64)
    corners = np.array([[i, j, k] for i in (-0.5, n[0] - 0.5) for j in (-0.5, n[1] - 0.5)
                        for k in (-0.5, n[2] - 0.5)])
    return grid.index_to_world(corners)


#: Normalised intensity (about 0..1) above which a voxel is content, not background.
CONTENT_THRESHOLD = 0.05


def content_box(volume: Volume, threshold: float = CONTENT_THRESHOLD, margin: int = 2) -> Grid:
    """The part of ``volume``'s grid that holds its content: the bounding box (voxel indices)
    of the voxels above ``threshold``, grown by ``margin`` voxels and clipped to the grid; the
    whole grid when no voxel is above it. An oblique scan's empty corners are left out, so the
    template does not grow around them."""
    inside = np.argwhere(np.asarray(volume.data) > threshold)
    if inside.size == 0:
        return volume.grid
    low = np.maximum(inside.min(axis=0) - margin, 0)
    high = np.minimum(inside.max(axis=0) + margin, np.asarray(volume.grid.shape) - 1)
    shift = np.eye(4)
    shift[:3, 3] = low
    return Grid(tuple(int(n) for n in high - low + 1), volume.grid.affine @ shift)


def covering_grid(grids: Sequence[Grid], template_to_input: Sequence[np.ndarray],
                  spacing: float) -> Grid:
    """An axis-aligned RAS grid of isotropic ``spacing`` (mm) in template world space that
    covers every input's field of view.

    ``template_to_input[i]`` maps template world points to input ``i``'s world points (RAS mm),
    so each input's corners land in the template through its inverse. The grid is centred on
    the union of those boxes.
    """
    if spacing <= 0:
        raise ValueError(f"template voxel size must be positive, got {spacing}")
    corners = np.concatenate([
        apply_affine(np.linalg.inv(np.asarray(a, dtype=np.float64)), field_of_view_corners(g))
        for g, a in zip(grids, template_to_input)])
    low, high = corners.min(axis=0), corners.max(axis=0)
    shape = np.maximum(1, np.ceil((high - low) / spacing - 1e-6)).astype(int)
    centre = (low + high) / 2.0
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = centre - spacing * (shape - 1) / 2.0
    return Grid(tuple(shape), affine)


def average_into(grid: Grid, inputs: Iterable[tuple[Volume, WorldTransform]],
                 method: str = "mean") -> tuple[Volume, np.ndarray]:
    """The average of the inputs resampled onto ``grid`` (linear, ITK rules), voxel by voxel
    over the inputs that cover the voxel; zero where none does.

    ``inputs`` yields ``(image, transform)`` with ``transform`` the pull map template ->
    input (RAS mm). ``"mean"`` keeps two running sums (the memory of two grids, however many
    inputs); ``"median"`` keeps every resampled input. Returns the average (float32) and the
    number of inputs covering each voxel (int16).
    """
    if method not in TEMPLATE_AVERAGES:
        raise ValueError(f"template average must be one of {', '.join(TEMPLATE_AVERAGES)}, "
                         f"got {method!r}")
    total = np.zeros(grid.shape, dtype=np.float64)
    count = np.zeros(grid.shape, dtype=np.int16)
    stack = []
    for image, transform in inputs:
        values = apply_transform(image, transform, grid, "linear", fill=np.nan).data
        covered = np.isfinite(values)
        count += covered
        if method == "mean":
            total[covered] += values[covered]
        else:
            stack.append(values)
    if method == "mean":
        average = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    else:
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():  # all-NaN voxels: nobody covers them (zero below)
                warnings.simplefilter("ignore", RuntimeWarning)
                average = np.nanmedian(np.stack(stack), axis=0)
        average = np.where(count > 0, average, 0.0)
    return Volume(grid, average.astype(np.float32)), count
