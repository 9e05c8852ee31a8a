"""World-axis-aligned image pyramids for the pre-alignment: each level is the image low-pass
filtered for, and resampled onto, an isotropic lattice aligned with the world (RAS) axes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..spatial.geometry import Grid, apply_affine
from ..spatial.volume import Volume


def world_bounding_box(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """World RAS mm (min corner, max corner) of the box enclosing ``grid``'s voxels (each voxel
    counted as its full cell, i.e. indices -0.5 .. n-0.5)."""
    n = np.asarray(grid.shape, dtype=np.float64)
    corners = np.array([[a, b, c] for a in (-0.5, n[0] - 0.5) for b in (-0.5, n[1] - 0.5)
                        for c in (-0.5, n[2] - 0.5)])
    world = apply_affine(grid.affine, corners)
    return world.min(axis=0), world.max(axis=0)


def world_lattice(grid: Grid, spacing: float, margin_mm: float = 0.0) -> Grid:
    """An isotropic lattice aligned with the world RAS axes covering ``grid``'s field of view.

    Voxel (i, j, k) sits at ``origin + spacing * (i, j, k)`` (RAS mm). Depends only on the field of
    view's world bounding box, hence not on the storage order of ``grid``.
    """
    lo, hi = world_bounding_box(grid)
    lo = lo - margin_mm
    hi = hi + margin_mm
    shape = np.maximum(np.ceil((hi - lo) / spacing).astype(int), 1)
    centre = (lo + hi) / 2
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = centre - spacing * (shape - 1) / 2
    return Grid(tuple(shape), affine)


def antialias_sigma(voxel_spacing: np.ndarray, target_spacing: float) -> np.ndarray:
    """Gaussian sigma per axis, in voxels of the source, before resampling to ``target_spacing``.

    ``sigma_mm = 0.5 * sqrt(target^2 - source^2)`` (zero where the source is already as coarse).
    """
    voxel_spacing = np.asarray(voxel_spacing, dtype=np.float64)
    sigma_mm = 0.5 * np.sqrt(np.maximum(target_spacing ** 2 - voxel_spacing ** 2, 0.0))
    return sigma_mm / voxel_spacing


def resample_world(data: np.ndarray, grid: Grid, target: Grid, smooth_to: float | None = None,
                   order: int = 1) -> np.ndarray:
    """``data`` on ``grid`` resampled onto ``target`` in world space (zero outside), float32.

    With ``smooth_to`` (mm), ``data`` is first low-pass filtered for that spacing
    (:func:`antialias_sigma`). Trilinear interpolation and axis-separable Gaussians do not care
    about the order or sign of the voxel axes.
    """
    data = np.asarray(data, dtype=np.float32)
    if smooth_to is not None:
        sigma = antialias_sigma(grid.spacing, smooth_to)
        if np.any(sigma > 0.05):
            data = ndimage.gaussian_filter(data, sigma=np.where(sigma > 0.05, sigma, 0.0),
                                           mode="nearest", truncate=3.0)
    to_source = np.linalg.inv(grid.affine) @ target.affine
    coords = _lattice_index(target.shape, to_source)
    return ndimage.map_coordinates(data, coords, order=order, mode="constant", cval=0.0,
                                   prefilter=False).astype(np.float32)


def _lattice_index(shape: tuple, target_to_source: np.ndarray) -> np.ndarray:
    """Source voxel indices (3, *shape) of every voxel of a lattice of ``shape`` (float64)."""
    idx = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    m = target_to_source
    return np.stack([m[r, 0] * idx[0] + m[r, 1] * idx[1] + m[r, 2] * idx[2] + m[r, 3]
                     for r in range(3)])


def field_of_view(grid: Grid, target: Grid) -> np.ndarray:
    """1.0 at ``target`` voxels inside ``grid``'s field of view (indices -0.5 .. n-0.5), else 0."""
    coords = _lattice_index(target.shape, np.linalg.inv(grid.affine) @ target.affine)
    inside = np.ones(target.shape, dtype=bool)
    for axis, n in enumerate(grid.shape):
        inside &= (coords[axis] >= -0.5) & (coords[axis] <= n - 0.5)
    return inside.astype(np.float32)


@dataclass
class PyramidLevel:
    """One image at one resolution, on a world-axis-aligned lattice.

    ``values`` are intensities in [0, 1]; ``weight`` in [0, 1] is where the image may be used
    (inside its field of view and its mask).
    """

    grid: Grid
    values: np.ndarray
    weight: np.ndarray
    masked: bool = False


def world_pyramid(volume: Volume, unit_data: np.ndarray, mask: np.ndarray | None,
                  spacings: tuple[float, ...]) -> list[PyramidLevel]:
    """World-aligned versions of an image at each spacing (mm), in the order of ``spacings``.

    The finest level is computed from the original voxels, each coarser level from the next finer
    one (cheaper, same low-pass result to good approximation).
    """
    order = sorted(range(len(spacings)), key=lambda i: spacings[i])
    levels: dict[int, PyramidLevel] = {}
    previous: PyramidLevel | None = None
    for i in order:
        s = float(spacings[i])
        target = world_lattice(volume.grid, s, margin_mm=s)
        if previous is None:
            values = resample_world(unit_data, volume.grid, target, smooth_to=s)
        else:
            values = resample_world(previous.values, previous.grid, target, smooth_to=s)
        weight = field_of_view(volume.grid, target)
        if mask is not None:
            weight *= resample_world(mask.astype(np.float32), volume.grid, target, order=1)
        levels[i] = previous = PyramidLevel(target, values, weight, masked=mask is not None)
    return [levels[i] for i in range(len(spacings))]


def sampling_region(level: PyramidLevel, margin_voxels: int = 2) -> np.ndarray:
    """Boolean lattice mask of the fixed points worth sampling at one level.

    The object (values above the median background by 5 % of the range up to the 99th
    percentile) grown by ``margin_voxels`` lattice voxels so that its outline counts, within the
    field of view and mask. Background far from the object carries no information about the
    alignment and would only cost time. When no background can be told apart, every point inside
    is used. A masked image (the user's mask, or a CT's body) is sampled all over its mask: the
    mask says where the object is, dark parts included (lungs are as dark as the air around).
    """
    inside = level.weight > 0.5
    if level.masked:
        return inside
    values = level.values[inside]
    if values.size == 0:
        return inside
    background = float(np.median(values))
    top = float(np.percentile(values, 99))
    if not top > background:
        return inside
    foreground = inside & (level.values > background + 0.05 * (top - background))
    if margin_voxels > 0:
        foreground = ndimage.binary_dilation(foreground, iterations=margin_voxels)
    return foreground & inside
