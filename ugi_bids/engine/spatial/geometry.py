"""Voxel grids in world space, and the network's view of them.

Conventions used throughout the engine:

* World coordinates are RAS+ millimetres (NIfTI/nibabel). ITK and ANTs use LPS+; conversion
  happens only at the file boundary (:mod:`ugi_bids.engine.formats.itk`).
* A :class:`Grid` is a voxel lattice: ``shape`` (i, j, k) and ``affine``, the 4x4 map from voxel
  index (integer at voxel centres) to world RAS.
* The network sees a cube of ``N^3`` samples in *tensor layout* ``(k, j, i)``: the layout the
  reference implementation gets from ``np.array(itk_image)``. Normalised network coordinates
  ``t`` in ``[0, 1]^3`` are given in tensor-axis order; network voxel ``q = t * (N - 1)``.
* A grid's network box maps network voxel ``q`` of tensor axis ``a`` to image index
  ``(q + 0.5) * n / N - 0.5`` along image axis ``2 - a``: the correspondence of
  ``F.interpolate(..., align_corners=False)``, which is how the reference resizes images.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

#: diag(-1, -1, 1, 1): flips between RAS and LPS (its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Grid:
    """A voxel lattice in world space.

    Attributes
    ----------
    shape : tuple of 3 int
        Number of voxels along image axes (i, j, k).
    affine : (4, 4) ndarray
        Voxel index (i, j, k, 1) -> world RAS millimetres.
    """

    shape: tuple
    affine: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "affine", np.asarray(self.affine, dtype=np.float64))

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along each image axis, millimetres."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def direction(self) -> np.ndarray:
        """3x3 direction cosines (columns = image axes) in RAS."""
        return self.affine[:3, :3] / self.spacing

    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """Voxel indices (..., 3) -> world RAS mm (..., 3)."""
        return apply_affine(self.affine, index)

    def world_to_index(self, points: np.ndarray) -> np.ndarray:
        """World RAS mm (..., 3) -> continuous voxel indices (..., 3)."""
        return apply_affine(np.linalg.inv(self.affine), points)

    def world_coordinates(self) -> np.ndarray:
        """World RAS mm of every voxel centre, shape (i, j, k, 3), float64."""
        idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in self.shape],
                                   indexing="ij"), axis=-1)
        return self.index_to_world(idx)

    def centre(self) -> np.ndarray:
        """World RAS mm of the geometric centre of the lattice."""
        return self.index_to_world((np.asarray(self.shape, dtype=np.float64) - 1) / 2)


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to points of shape (..., 3)."""
    points = np.asarray(points, dtype=np.float64)
    return points @ affine[:3, :3].T + affine[:3, 3]


def grid_of(image: nib.spatialimages.SpatialImage) -> Grid:
    """The :class:`Grid` of a nibabel image (first three axes)."""
    return Grid(image.shape[:3], image.affine)


def canonical_orientation(grid: Grid) -> np.ndarray:
    """nibabel orientation array that brings ``grid`` to the closest RAS+ storage.

    Only permutes and flips axes, so no resampling is involved and an oblique grid stays oblique.
    """
    return nib.orientations.io_orientation(grid.affine)


def reorient_grid(grid: Grid, ornt: np.ndarray) -> Grid:
    """The grid obtained by storing the same voxels with axes permuted/flipped by ``ornt``."""
    new_shape = np.empty(3, dtype=int)
    new_shape[ornt[:, 0].astype(int)] = np.asarray(grid.shape)
    # inv_ornt_aff maps new voxel indices -> old voxel indices
    new_to_old = nib.orientations.inv_ornt_aff(ornt, grid.shape)
    return Grid(tuple(new_shape), grid.affine @ new_to_old)


def reorient_array(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Reorder the first three axes of ``data`` as :func:`reorient_grid` does for its grid."""
    return np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt))


def canonical(grid: Grid, data: np.ndarray | None = None):
    """Closest-RAS+ storage of ``grid`` (and of ``data`` when given): exact, no resampling."""
    ornt = canonical_orientation(grid)
    new_grid = reorient_grid(grid, ornt)
    if data is None:
        return new_grid
    return new_grid, reorient_array(data, ornt)


def network_to_index(shape: tuple, network_size: int) -> np.ndarray:
    """4x4 map from normalised network coordinates ``t`` (tensor order k, j, i) to voxel indices
    (i, j, k) of a lattice of ``shape``.

    Network voxel ``q = t (N - 1)`` along tensor axis ``a`` sits at index
    ``(q + 0.5) n / N - 0.5`` along image axis ``2 - a``.
    """
    n_net = float(network_size)
    matrix = np.zeros((4, 4))
    matrix[3, 3] = 1.0
    for a in range(3):
        axis = 2 - a
        n = float(shape[axis])
        matrix[axis, a] = (n_net - 1.0) * n / n_net
        matrix[axis, 3] = 0.5 * n / n_net - 0.5
    return matrix


def network_box(grid: Grid, network_size: int) -> np.ndarray:
    """4x4 map from normalised network coordinates ``t`` (tensor order) to world RAS mm, for the
    network cube laid over ``grid``'s field of view."""
    return grid.affine @ network_to_index(grid.shape, network_size)


def network_box_grid(grid: Grid, network_size: int) -> Grid:
    """The network cube over ``grid`` as a :class:`Grid` in image axis order (i, j, k).

    Its voxel (i, j, k) is network voxel (q0, q1, q2) = (k, j, i); used to store maps computed on
    the network lattice as world-space fields.
    """
    n = network_size
    net_voxel_to_t = np.diag([1.0 / (n - 1)] * 3 + [1.0])
    swap_ijk_kji = np.eye(4)[[2, 1, 0, 3]]
    return Grid((n, n, n), network_box(grid, n) @ net_voxel_to_t @ swap_ijk_kji)


def to_tensor_layout(data: np.ndarray) -> np.ndarray:
    """Array in image order (i, j, k) -> tensor layout (k, j, i)."""
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0)))


def from_tensor_layout(data: np.ndarray) -> np.ndarray:
    """Array in tensor layout (k, j, i, ...) -> image order (i, j, k, ...)."""
    axes = (2, 1, 0) + tuple(range(3, data.ndim))
    return np.ascontiguousarray(np.transpose(data, axes))
