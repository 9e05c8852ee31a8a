"""Transform files: what we write is what ITK/ANTs read, in hard geometries.

Independent readers: ITK's own ``itk.transformread`` (points) and antspyx (images, in
``test_warp.py``). Geometries: moving stored LPS, an oblique anisotropic 1 x 1 x 3 mm reference,
and images whose world origins are ~400 mm apart, each in both directions.

This module also holds the scenario builders that ``test_warp.py`` reuses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pytest

from tests.itk_oracle import write_composite_h5_itk
from tests.realdata import (
    dk_atlas_path,
    downsampled,
    mni2009c_brain_path,
    oblique_anisotropic_grid,
    reheader,
    resample_to,
    rotation_matrix,
    store_as,
)
from ugi_bids.engine.formats.itk import (
    grid_to_itk_geometry,
    read_composite_h5,
    write_composite_h5,
    write_displacement_nifti,
)
from ugi_bids.engine.spatial.geometry import RAS_TO_LPS, Grid
from ugi_bids.engine.spatial.transforms import DisplacementField, WorldTransform
from ugi_bids.engine.spatial.volume import Volume, load_volume
from ugi_bids.engine.spatial.warp import apply_transform
from ugi_bids.errors import InputDataError, MissingInputError, OutputError

FLIP = np.array([-1.0, -1.0, 1.0])


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def label_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of equal labels over the voxels labelled in either image."""
    labelled = (a != 0) | (b != 0)
    return float(np.mean(a[labelled] == b[labelled]))


# --------------------------------------------------------------------------- scenario builders

def padded_field_grid(reference: Grid, nodes: int = 32) -> Grid:
    """A field lattice over ``reference``'s field of view, like a network grid: ``nodes`` points
    spanning the FOV (voxel edges), plus one node of padding on every side; same direction."""
    n = np.asarray(reference.shape, dtype=np.float64)
    step = n / (nodes - 1)
    to_reference_index = np.eye(4)
    to_reference_index[:3, :3] = np.diag(step)
    to_reference_index[:3, 3] = -0.5 - step
    return Grid((nodes + 2,) * 3, reference.affine @ to_reference_index)


def smooth_field(grid: Grid, amplitude: float = 4.0, wavelength: float = 80.0,
                 seed: int = 0) -> DisplacementField:
    """A smooth random displacement (RAS mm): one plane wave per component."""
    rng = np.random.default_rng(seed)
    points = grid.world_coordinates() - grid.centre()
    vectors = np.zeros(points.shape, dtype=np.float32)
    for component in range(3):
        wave = rng.normal(size=3)
        wave *= 2 * np.pi / wavelength / np.linalg.norm(wave)
        vectors[..., component] = amplitude * np.sin(points @ wave + rng.uniform(0, 2 * np.pi))
    return DisplacementField(grid, vectors)


def about(matrix: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """4x4 ``matrix`` re-centred so that it acts about ``centre`` (world mm)."""
    shift, back = np.eye(4), np.eye(4)
    shift[:3, 3] = centre
    back[:3, 3] = -np.asarray(centre)
    return shift @ matrix @ back


def translation(vector) -> np.ndarray:
    out = np.eye(4)
    out[:3, 3] = vector
    return out


def deformation_affine(centre: np.ndarray) -> np.ndarray:
    """Rotation ~10 degrees, anisotropic scale, a shift; acting about ``centre``."""
    matrix = np.eye(4)
    matrix[:3, :3] = rotation_matrix((10.0, -6.0, 8.0)) @ np.diag([1.05, 0.95, 1.02])
    matrix[:3, 3] = (4.0, -3.0, 2.0)
    return about(matrix, centre)


@dataclass
class Case:
    """Two views of one anatomy: the reference world and the moving world (``moving = W ref``).

    ``forward`` maps reference points to moving points (resamples moving onto the reference
    grid); ``backward`` has the inverse affine and a field on the moving grid.
    """

    name: str
    ref: Volume
    mov: Volume
    ref_labels: Volume
    mov_labels: Volume
    forward: WorldTransform
    backward: WorldTransform

    def direction(self, which: str):
        """``(source intensity, source labels, reference grid, transform)`` of a direction."""
        if which == "forward":
            return self.mov, self.mov_labels, self.ref.grid, self.forward
        return self.ref, self.ref_labels, self.mov.grid, self.backward


def load_real_images() -> dict:
    """2009c brain at 1 and 3 mm, DK labels at 2 mm (nearest)."""
    brain1 = load_volume(mni2009c_brain_path())
    labels1 = load_volume(dk_atlas_path())
    return {"brain1": brain1, "brain3": downsampled(brain1, 3),
            "labels2": downsampled(labels1, 2, order=0)}


def cropped(volume: Volume, fraction: float) -> Volume:
    """The central ``fraction`` of a volume's FOV (same voxels, no resampling)."""
    shape = np.asarray(volume.grid.shape)
    size = np.maximum(2, np.round(shape * fraction)).astype(int)
    lo = (shape - size) // 2
    shift = np.eye(4)
    shift[:3, 3] = lo
    data = volume.data[lo[0]:lo[0] + size[0], lo[1]:lo[1] + size[1], lo[2]:lo[2] + size[2]]
    return Volume(Grid(tuple(size), volume.grid.affine @ shift), np.ascontiguousarray(data))


def build_case(name: str, images: dict) -> Case:
    brain3, labels2 = images["brain3"], images["labels2"]
    world = np.eye(4)
    if name == "lps_moving":
        ref, ref_labels = brain3, labels2
        mov, mov_labels = store_as(brain3, "LPS"), store_as(labels2, "LPS")
    elif name == "oblique_reference":
        grid = oblique_anisotropic_grid(cropped(images["brain1"], 0.5), spacing=(1.0, 1.0, 3.0))
        ref = resample_to(images["brain1"], grid)
        ref_labels = resample_to(labels2, grid, order=0)
        mov, mov_labels = brain3, labels2
    elif name == "far_origins":
        world = translation((240.0, -300.0, 120.0))  # |t| = 403 mm
        ref, ref_labels = brain3, labels2
        mov, mov_labels = reheader(brain3, world), reheader(labels2, world)
    else:
        raise ValueError(name)
    affine = world @ deformation_affine(ref.grid.centre())
    forward = WorldTransform(affine, smooth_field(padded_field_grid(ref.grid), seed=1))
    backward = WorldTransform(np.linalg.inv(affine),
                              smooth_field(padded_field_grid(mov.grid), amplitude=3.0, seed=2))
    return Case(name, ref, mov, ref_labels, mov_labels, forward, backward)


CASE_NAMES = ("lps_moving", "oblique_reference", "far_origins")
DIRECTIONS = ("forward", "backward")


def random_points(transform: WorldTransform, count: int = 300, seed: int = 0) -> np.ndarray:
    """World RAS points spread over the field's box enlarged by 15 % (some outside the field)."""
    rng = np.random.default_rng(seed)
    grid = transform.field.grid
    index = rng.uniform(-0.15, 1.15, size=(count, 3)) * (np.asarray(grid.shape) - 1)
    return grid.index_to_world(index)


# --------------------------------------------------------------------------- ITK / ANTs adapters

def itk_image(volume: Volume):
    """An itk.Image (float) with the volume's data and LPS geometry."""
    import itk

    origin, spacing, direction = grid_to_itk_geometry(volume.grid)
    image = itk.image_from_array(np.ascontiguousarray(
        np.asarray(volume.data, dtype=np.float32).transpose(2, 1, 0)))
    image.SetOrigin(origin.tolist())
    image.SetSpacing(spacing.tolist())
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
    return image


def ants_image(volume: Volume):
    """An ANTsImage (float) with the volume's data and LPS geometry."""
    import ants

    origin, spacing, direction = grid_to_itk_geometry(volume.grid)
    return ants.from_numpy(np.asarray(volume.data, dtype=np.float32), origin=tuple(origin),
                           spacing=tuple(spacing), direction=direction)


def itk_map_points(itk_transform, points_ras: np.ndarray) -> np.ndarray:
    """Map RAS points with an ITK (LPS) transform."""
    out = [itk_transform.TransformPoint((p * FLIP).tolist()) for p in points_ras]
    return np.asarray([list(p) for p in out], dtype=np.float64) * FLIP


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def itk():
    return pytest.importorskip("itk")


@pytest.fixture(scope="module")
def cases() -> dict:
    images = load_real_images()
    return {name: build_case(name, images) for name in CASE_NAMES}


def _small_transform(seed: int = 0, field: bool = True) -> WorldTransform:
    """A small oblique field grid with a flipped axis, a non-trivial affine and field."""
    lattice = np.eye(4)
    lattice[:3, :3] = rotation_matrix((5.0, -10.0, 20.0)) @ np.diag([3.0, -2.5, 3.5])
    lattice[:3, 3] = (-20.0, 30.0, -15.0)
    grid = Grid((9, 10, 11), lattice)
    affine = deformation_affine(np.array([5.0, -10.0, 20.0]))
    return WorldTransform(affine, smooth_field(grid, amplitude=2.0, wavelength=30.0, seed=seed)
                          if field else None)


# --------------------------------------------------------------------------- ITK semantics

@pytest.mark.slow
def test_itk_composite_applies_back_of_queue_first(itk):
    """Empirical check of the convention the writer relies on: queue [affine, field] maps p to
    affine(field(p)), for float and double transforms."""
    for ctype in (itk.F, itk.D):
        affine = itk.AffineTransform[ctype, 3].New()
        params = affine.GetParameters()
        for i, value in enumerate([1.1, 0.1, 0, 0, 0.9, 0.05, 0.02, 0, 1.0, 5.0, -3.0, 2.0]):
            params[i] = value
        affine.SetParameters(params)
        image = itk.Image[itk.Vector[ctype, 3], 3].New()
        image.SetRegions([8, 8, 8])
        image.Allocate()
        view = itk.array_view_from_image(image)
        view[..., 0], view[..., 1], view[..., 2] = 2.0, -1.0, 0.5
        image.SetOrigin([-10.0, -10.0, -10.0])
        image.SetSpacing([3.0, 3.0, 3.0])
        field = itk.DisplacementFieldTransform[ctype, 3].New()
        field.SetDisplacementField(image)
        composite = itk.CompositeTransform[ctype, 3].New()
        composite.AddTransform(affine)
        composite.AddTransform(field)
        p = [1.0, 2.0, 3.0]
        got = np.asarray(composite.TransformPoint(p))
        expected = np.asarray(affine.TransformPoint(field.TransformPoint(p)))
        assert np.allclose(got, expected, atol=1e-5)
        assert not np.allclose(got, np.asarray(field.TransformPoint(affine.TransformPoint(p))),
                               atol=1e-3)


WRITERS = {"ours": write_composite_h5, "itk": write_composite_h5_itk}


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_points_match_itk(cases, itk, tmp_path, case_name, direction, writer):
    """ITK's reader (double precision, converting our float file) maps points as we do; the file
    written by ITK's own writer (the oracle) too."""
    transform = cases[case_name].direction(direction)[3]
    path = tmp_path / "xfm.h5"
    WRITERS[writer](transform, path)
    composite = itk.transformread(str(path))[0]
    assert composite.GetNameOfClass() == "CompositeTransform"
    assert composite.GetNumberOfTransforms() == 2
    points = random_points(transform)
    ours = transform.map_points(points)
    theirs = itk_map_points(composite, points)
    assert np.abs(ours - theirs).max() < 1e-3
    if case_name == "far_origins":  # the 400 mm shift lives in the file's affine
        assert np.linalg.norm(ours - points, axis=1).min() > 350


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_itk_resamples_like_us(cases, itk, tmp_path, case_name, direction):
    """ITK's reader + ResampleImageFilter on our file give our apply_transform's images."""
    source, labels, reference, transform = cases[case_name].direction(direction)
    path = str(tmp_path / "xfm.h5")
    write_composite_h5(transform, path)
    composite = itk.transformread(path)[0]
    reference_image = itk_image(Volume(reference, np.zeros(reference.shape, np.float32)))

    def resample(volume: Volume, interpolator) -> np.ndarray:
        image = itk_image(volume)
        out = itk.resample_image_filter(image, transform=composite,
                                        interpolator=interpolator.New(image),
                                        reference_image=reference_image,
                                        use_reference_image=True, default_pixel_value=0.0)
        return itk.array_from_image(out).transpose(2, 1, 0)

    ours = apply_transform(source, transform, reference, "linear")
    theirs = resample(source, itk.LinearInterpolateImageFunction)
    assert correlation(ours.data, theirs) >= 0.999
    assert np.abs(ours.data - theirs).max() <= 1e-3 * source.data.max()
    ours = apply_transform(labels, transform, reference, "nearest")
    theirs = resample(labels, itk.NearestNeighborInterpolateImageFunction)
    assert label_agreement(ours.data, theirs) >= 0.999


def test_float_file_layout(tmp_path):
    """Float field (float32; gzip on request), float64 affine, both ITK spellings of the
    parameter names."""
    h5py = pytest.importorskip("h5py")
    transform = _small_transform()
    path = tmp_path / "xfm.h5"
    write_composite_h5(transform, path, compression=True)
    with h5py.File(tmp_path / write_composite_h5(transform, tmp_path / "plain.h5"), "r") as plain:
        assert plain["TransformGroup"]["2"]["TransformParameters"].compression is None
    with h5py.File(path, "r") as handle:
        group = handle["TransformGroup"]
        types = [group[k]["TransformType"][0].decode() for k in sorted(group, key=int)]
        assert types == ["CompositeTransform_float_3_3", "AffineTransform_float_3_3",
                         "DisplacementFieldTransform_float_3_3"]
        field = group["2"]["TransformParameters"]
        assert field.dtype == np.float32 and field.compression == "gzip"
        assert field.size == 3 * np.prod(transform.field.grid.shape)
        assert group["1"]["TransformParameters"].dtype == np.float64
        for key in ("1", "2"):
            for label in ("Parameters", "FixedParameters"):
                assert np.array_equal(group[key][f"Transform{label}"][()],
                                      group[key][f"Tranform{label}"][()])
    assert sorted(os.listdir(tmp_path)) == ["plain.h5", "xfm.h5"]


@pytest.mark.parametrize("precision", ["float", "double"])
@pytest.mark.parametrize("writer", WRITERS)
def test_round_trip(tmp_path, itk, precision, writer):
    transform = _small_transform()
    path = tmp_path / "xfm.h5"
    WRITERS[writer](transform, path, precision=precision)
    points = random_points(transform, 500, seed=3)
    expected = transform.map_points(points)
    for read_backend in ("auto", "itk"):
        back = read_composite_h5(path, backend=read_backend)
        assert np.array_equal(back.field.vectors, transform.field.vectors)
        assert np.allclose(back.field.grid.affine, transform.field.grid.affine, atol=1e-9)
        tolerance = 1e-4 if (writer == "itk" and precision == "float") else 1e-9
        assert np.abs(back.map_points(points) - expected).max() < tolerance


def _same_arrays(a: WorldTransform, b: WorldTransform) -> None:
    """``a`` and ``b`` hold exactly the same numbers (affine, field grid, field vectors)."""
    assert a.affine.dtype == b.affine.dtype == np.float64
    assert np.array_equal(a.affine, b.affine)
    assert (a.field is None) == (b.field is None)
    if a.field is not None:
        assert a.field.grid.shape == b.field.grid.shape
        assert np.array_equal(a.field.grid.affine, b.field.grid.affine)
        assert a.field.vectors.dtype == b.field.vectors.dtype == np.float32
        assert np.array_equal(a.field.vectors, b.field.vectors)


@pytest.mark.parametrize("kind", ["ours float", "ours double", "ours gzip", "ours affine",
                                  "itk float", "itk double", "itk gzip"])
def test_reader_gives_itks_numbers_exactly(tmp_path, itk, kind):
    """The default (h5py) decoding gives exactly the arrays that ITK's own reader gives: the
    resampling and Jacobians of the files we write depend on them."""
    who, option = kind.split()
    transform = _small_transform(field=option != "affine")
    options = {"double": {"precision": "double"}, "gzip": {"compression": True}}.get(option, {})
    path = WRITERS[who](transform, tmp_path / "xfm.h5", **options)
    _same_arrays(read_composite_h5(path), read_composite_h5(path, backend="itk"))


def _itk_affine(itk, ctype, matrix_ras: np.ndarray, centre=None):
    """An ITK AffineTransform of a RAS matrix; ``centre`` (LPS) keeps the map, changes the
    parameters (as ANTs writes its affines)."""
    lps = RAS_TO_LPS @ matrix_ras @ RAS_TO_LPS
    affine = itk.AffineTransform[ctype, 3].New()
    params = affine.GetParameters()
    for i, value in enumerate(list(lps[:3, :3].ravel()) + list(lps[:3, 3])):
        params[i] = float(value)
    affine.SetParameters(params)
    if centre is not None:
        affine.SetCenter([float(c) for c in centre])  # keeps the translation parameters,
        affine.SetOffset([float(v) for v in lps[:3, 3]])  # so put the map back
    return affine


def _itk_field(itk, ctype, transform: WorldTransform, tmp_path):
    """The DisplacementFieldTransform of ``transform``, as ITK reads it from our file."""
    precision = "float" if ctype == itk.F else "double"
    path = write_composite_h5(WorldTransform(np.eye(4), transform.field),
                              tmp_path / f"field_{precision}.h5", precision=precision)
    reader = itk.TransformFileReaderTemplate[ctype].New()
    reader.SetFileName(path)
    reader.Update()
    return itk.down_cast(itk.down_cast(reader.GetTransformList()[0]).GetNthTransform(1))


@pytest.mark.parametrize("precision", ["float", "double"])
def test_reads_centred_affine_composites(tmp_path, itk, precision):
    """ANTs' layout: [affine with a non-zero centre, field], written by ITK. The field is ITK's
    exactly; the affine maps points as ITK's does."""
    ctype = itk.F if precision == "float" else itk.D
    transform = _small_transform()
    composite = itk.CompositeTransform[ctype, 3].New()
    composite.AddTransform(_itk_affine(itk, ctype, transform.affine,
                                       centre=(1.234567891234, -20.987654321, 33.3333333333)))
    composite.AddTransform(_itk_field(itk, ctype, transform, tmp_path))
    path = str(tmp_path / "ants.h5")
    writer = itk.TransformFileWriterTemplate[ctype].New()
    writer.SetFileName(path)
    writer.SetInput(composite)
    writer.Update()
    ours, theirs = read_composite_h5(path), read_composite_h5(path, backend="itk")
    assert np.array_equal(ours.field.vectors, theirs.field.vectors)
    assert np.array_equal(ours.field.grid.affine, theirs.field.grid.affine)
    assert np.abs(ours.affine - theirs.affine).max() < 1e-12
    points = random_points(transform, 200, seed=6)
    expected = itk_map_points(itk.transformread(path)[0], points)
    assert np.abs(ours.map_points(points) - expected).max() < 1e-3  # float field: ITK's float
    assert np.abs(ours.map_points(points) - transform.map_points(points)).max() < \
        (1e-4 if precision == "float" else 1e-9)


def test_reads_matrix_offset_entries_and_plain_lists(tmp_path, itk):
    """Files nitransforms does not parse (one reason the reader is ours): a
    MatrixOffsetTransformBase entry (ITK's Python reader cannot load it either) and a plain
    transform list without a CompositeTransform."""
    h5py = pytest.importorskip("h5py")
    transform = _small_transform()
    centred = _itk_affine(itk, itk.D, transform.affine, centre=(10.5, -20.25, 30.125))
    field = _itk_field(itk, itk.D, transform, tmp_path)
    composite = itk.CompositeTransform[itk.D, 3].New()
    composite.AddTransform(centred)
    composite.AddTransform(field)
    affine_file, relabelled, plain = (str(tmp_path / name) for name in
                                      ("affine.h5", "matrix_offset.h5", "list.h5"))
    itk.transformwrite([composite], affine_file)
    shutil.copy(affine_file, relabelled)
    with h5py.File(relabelled, "r+") as handle:
        group = handle["TransformGroup"]["1"]
        del group["TransformType"]
        group.create_dataset("TransformType", data=np.array(
            [b"MatrixOffsetTransformBase_double_3_3"], dtype=object),
            dtype=h5py.string_dtype("ascii"))
    itk.transformwrite([centred, field], plain)
    reference = read_composite_h5(affine_file)
    _same_arrays(read_composite_h5(relabelled), reference)
    _same_arrays(read_composite_h5(plain), reference)
    points = random_points(transform, 200, seed=7)
    assert np.abs(reference.map_points(points) - transform.map_points(points)).max() < 1e-9


def test_module_imports_nothing_heavy():
    """The file-format module loads neither torch nor ITK nor the workflow stack (layering), and
    nitransforms only when a displacement-field NIfTI is written."""
    code = ("import sys, ugi_bids.engine.formats.itk; "
            "print(sorted(m for m in ('torch', 'itk', 'nipype', 'niworkflows', 'bids', "
            "'templateflow', 'nitransforms') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_affine_only_round_trip(tmp_path, itk):
    transform = _small_transform(field=False)
    path = tmp_path / "affine.h5"
    write_composite_h5(transform, path)
    composite = itk.transformread(str(path))[0]
    assert composite.GetNumberOfTransforms() == 1
    points = np.random.default_rng(1).uniform(-100, 100, size=(50, 3))
    assert np.abs(itk_map_points(composite, points) - transform.map_points(points)).max() < 1e-6
    back = read_composite_h5(path)
    assert back.field is None and np.allclose(back.affine, transform.affine, atol=1e-12)


@pytest.mark.parametrize("suffix", [".mat", ".txt"])
def test_reads_plain_itk_affines(tmp_path, itk, suffix):
    """ANTs-style .mat / ITK .txt linear transforms (with a non-zero centre)."""
    euler = itk.Euler3DTransform[itk.D].New()
    euler.SetRotation(0.1, -0.2, 0.15)
    euler.SetCenter([10.0, -20.0, 30.0])
    euler.SetTranslation([5.0, 6.0, -7.0])
    path = str(tmp_path / f"affine{suffix}")
    itk.transformwrite([euler], path)
    transform = read_composite_h5(path)
    points = np.random.default_rng(2).uniform(-80, 80, size=(40, 3))
    assert np.abs(transform.map_points(points) - itk_map_points(euler, points)).max() < 1e-9


@pytest.mark.parametrize("suffix", [".mat", ".txt"])
@pytest.mark.parametrize("pixel", ["D", "F"])
def test_reads_ants_affines_without_itk(tmp_path, itk, monkeypatch, suffix, pixel):
    """AffineTransform .mat/.txt files (ANTs' ``*GenericAffine.mat``; a centre, a general matrix)
    are decoded without ITK, to ITK's own points, and read where ITK is not installed; a type we
    do not decode (Euler3D) then fails with one line that says what to install."""
    affine = itk.AffineTransform[getattr(itk, pixel), 3].New()
    params = affine.GetParameters()
    for i, value in enumerate([1.05, 0.1, -0.05, -0.08, 0.97, 0.12, 0.03, -0.1, 1.1,
                               5.0, -6.5, 7.25]):
        params[i] = value
    affine.SetParameters(params)
    affine.SetCenter([12.5, -20.0, 31.0])
    path = str(tmp_path / f"ants_0GenericAffine{suffix}")
    itk.transformwrite([affine], path)
    points = np.random.default_rng(3).uniform(-90, 90, size=(60, 3))
    expected = itk_map_points(itk.transformread(path)[0], points)
    tolerance = 1e-9 if pixel == "D" else 1e-4  # ITK's float affine rounds its own parameters
    assert np.abs(read_composite_h5(path).map_points(points) - expected).max() < tolerance

    euler = itk.Euler3DTransform[itk.D].New()
    euler.SetRotation(0.1, -0.2, 0.15)
    euler_path = str(tmp_path / f"rigid{suffix}")
    itk.transformwrite([euler], euler_path)
    monkeypatch.setitem(sys.modules, "itk", None)  # as if ITK were not installed
    assert np.abs(read_composite_h5(path).map_points(points) - expected).max() < tolerance
    with pytest.raises(InputDataError) as caught:
        read_composite_h5(euler_path)
    message = str(caught.value)
    assert "\n" not in message and euler_path in message and "ugi-bids[itk]" in message


def test_reads_general_itk_queue(tmp_path, itk):
    """[affine, affine, field, affine] written by ITK: the inner affine is folded exactly."""
    transform = _small_transform()
    composite = itk.CompositeTransform[itk.D, 3].New()
    matrices = [deformation_affine(np.array([1.0, 2.0, 3.0])), translation((3.0, -4.0, 5.0)),
                None, about(np.diag([1.1, 0.9, 1.05, 1.0]) @ np.eye(4), np.array([0, 10.0, 0]))]
    for matrix in matrices:
        if matrix is None:
            written = tmp_path / "field.h5"
            write_composite_h5(WorldTransform(np.eye(4), transform.field), written,
                               precision="double")
            field = itk.down_cast(itk.transformread(str(written))[0].GetNthTransform(1))
            composite.AddTransform(field)
            continue
        lps = RAS_TO_LPS @ matrix @ RAS_TO_LPS
        affine = itk.AffineTransform[itk.D, 3].New()
        params = affine.GetParameters()
        for i, value in enumerate(list(lps[:3, :3].ravel()) + list(lps[:3, 3])):
            params[i] = value
        affine.SetParameters(params)
        composite.AddTransform(affine)
    path = str(tmp_path / "queue.h5")
    itk.transformwrite([composite], path)
    points = random_points(transform, 300, seed=4)
    expected = itk_map_points(itk.transformread(path)[0], points)
    for backend in ("auto", "itk"):
        got = read_composite_h5(path, backend=backend).map_points(points)
        assert np.abs(got - expected).max() < 1e-4


def test_reads_files_with_the_old_itk_spelling(tmp_path, itk):
    """Files from ITK versions that wrote ``TranformParameters`` read the same."""
    h5py = pytest.importorskip("h5py")
    transform = _small_transform()
    path = tmp_path / "old.h5"
    write_composite_h5(transform, path)
    with h5py.File(path, "r+") as handle:
        for key in ("1", "2"):
            del handle["TransformGroup"][key]["TransformParameters"]
            del handle["TransformGroup"][key]["TransformFixedParameters"]
    points = random_points(transform, 100)
    expected = transform.map_points(points)
    assert np.abs(read_composite_h5(path).map_points(points) - expected).max() < 1e-9
    theirs = itk_map_points(itk.transformread(str(path))[0], points)
    assert np.abs(theirs - expected).max() < 1e-3


def test_nitransforms_reads_our_file(tmp_path):
    """nitransforms (what fMRIPrep uses to apply these files) parses the same queue."""
    nitk = pytest.importorskip("nitransforms.io.itk")
    transform = _small_transform()
    path = tmp_path / "xfm.h5"
    write_composite_h5(transform, path)
    parts = nitk.ITKCompositeH5.from_filename(str(path))
    assert len(parts) == 2
    field_image = parts[1]
    assert np.allclose(field_image.affine, transform.field.grid.affine, atol=1e-5)
    assert np.allclose(np.asarray(field_image.dataobj), transform.field.vectors, atol=1e-6)


def test_displacement_nifti_layout(tmp_path):
    transform = _small_transform()
    path = tmp_path / "warp.nii.gz"
    write_displacement_nifti(transform, path)
    image = nib.load(path)
    grid = transform.field.grid
    assert image.shape == tuple(grid.shape) + (1, 3)
    assert image.get_data_dtype() == np.float32
    assert image.header.get_intent()[0] == "vector"
    assert image.header.get_xyzt_units() == ("mm", "sec")
    assert (int(image.header["sform_code"]), int(image.header["qform_code"])) == (1, 1)
    assert np.allclose(image.affine, grid.affine, atol=1e-4)
    points = grid.world_coordinates()
    expected = (transform.map_points(points) - points) * FLIP  # LPS components
    assert np.allclose(np.asarray(image.dataobj)[:, :, :, 0, :], expected, atol=1e-4)
    with pytest.raises(ValueError):
        write_displacement_nifti(WorldTransform(np.eye(4)), tmp_path / "affine.nii.gz")


# --------------------------------------------------------------------------- errors

def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(MissingInputError, match="not found"):
        read_composite_h5(tmp_path / "absent.h5")
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(InputDataError) as info:
        read_composite_h5(garbage)
    assert "\n" not in str(info.value)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(InputDataError, match="empty"):
        read_composite_h5(empty)
    good = tmp_path / "good.h5"
    write_composite_h5(_small_transform(), good)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(InputDataError) as info:
        read_composite_h5(truncated)
    assert "\n" not in str(info.value)
    wrong = tmp_path / "xfm.nii.gz"
    wrong.write_bytes(b"x")
    with pytest.raises(InputDataError, match="unsupported transform file type"):
        read_composite_h5(wrong)


def test_write_errors_are_one_line_and_leave_nothing(tmp_path):
    with pytest.raises(OutputError) as info:
        write_composite_h5(_small_transform(), tmp_path / "no" / "such" / "dir" / "x.h5")
    assert "\n" not in str(info.value)
    target = tmp_path / "x.h5"
    write_composite_h5(_small_transform(seed=0), target)
    write_composite_h5(_small_transform(seed=5), target)  # replaces atomically
    assert np.array_equal(read_composite_h5(target).field.vectors,
                          _small_transform(seed=5).field.vectors)
    assert sorted(os.listdir(tmp_path)) == ["x.h5"]
