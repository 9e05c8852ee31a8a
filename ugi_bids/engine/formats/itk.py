"""Transform files that ITK and ANTs read: composite HDF5 and displacement-field NIfTI.

Our :class:`~ugi_bids.engine.spatial.transforms.WorldTransform` is a pull map from reference-space
points to source-space points in world RAS millimetres, ``T(x) = A (x + d(x))``. ITK and ANTs
work in LPS millimetres, so at this file boundary every map is conjugated by
``F = diag(-1, -1, 1)``: ``T_lps(p) = F T(F p)``.

* An affine ``A`` (4x4, RAS) becomes ``F A F`` (``F`` as a 4x4 ``diag(-1, -1, 1, 1)``).
* A displacement field on a grid with index->RAS affine ``G`` becomes a field on the grid with
  index->LPS affine ``F G``; its vectors have their x and y components negated.

Composite HDF5 (:func:`write_composite_h5`) stores the transform queue ``[A, d]``. ITK's
``CompositeTransform`` applies the *back* of its queue first (verified: the queue
``[affine, field]`` maps ``p`` to ``affine(field(p))``), which is exactly ``A (x + d(x))``. This is
the layout of fMRIPrep's ``*_mode-image_xfm.h5`` files; ``antsApplyTransforms -t file.h5``,
``itk.transformread`` and nitransforms read it directly.

By default the displacement field is stored in single precision (``*_float_3_3`` transform
types, float32 parameters): ITK's double-precision readers (``itk.transformread``, ANTs,
antspyx) convert float transforms on read, which halves the size of the dense field. The 12
affine parameters stay float64 in either precision (ITK reads the dataset's own type), so the
affine loses nothing. ``precision="double"`` stores the field as float64 too.

Reading (:func:`read_composite_h5`) decodes HDF5 files of affines and displacement fields
itself (:func:`_read_items_h5` says why not with nitransforms), and ITK's ``.mat``/``.txt`` files
of affines (ANTs' ``*GenericAffine.mat``) too, and hands every other transform file (rigid or
similarity parameterisations, HDF5 files with other transform types) to ITK. ITK's Python
wrapping is 1.5 GB, two thirds of a container image, so it is an optional dependency
(``pip install ugi-bids[itk]``): without it, only those other files cannot be read. The displacement-field
NIfTI is encoded by nitransforms (``ITKDisplacementsField.to_image``).
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from ...errors import InputDataError, MissingInputError, one_line
from ..kernels.layout import itk_buffer
from ..spatial.geometry import RAS_TO_LPS, Grid
from ..spatial.transforms import DisplacementField, WorldTransform
from ..spatial.warp import displacement_on_grid
from .staging import atomic_file

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".hdf", ".mat", ".txt", ".tfm")


# --------------------------------------------------------------------------- RAS <-> LPS

def affine_ras_to_lps(affine: np.ndarray) -> np.ndarray:
    """4x4 world affine in RAS (points -> points) -> the same map in LPS coordinates."""
    return RAS_TO_LPS @ np.asarray(affine, dtype=np.float64) @ RAS_TO_LPS


def affine_lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """4x4 world affine in LPS (points -> points) -> the same map in RAS coordinates."""
    return affine_ras_to_lps(affine)  # the conjugation by F is its own inverse


def grid_to_itk_geometry(grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ITK (LPS) geometry of a grid: ``(origin (3,), spacing (3,), direction (3, 3))``.

    ITK's index -> physical map is ``origin + direction @ diag(spacing) @ index`` in LPS mm.
    """
    affine_lps = RAS_TO_LPS @ grid.affine
    spacing = np.sqrt((affine_lps[:3, :3] ** 2).sum(axis=0))
    return affine_lps[:3, 3].copy(), spacing, affine_lps[:3, :3] / spacing


def grid_from_itk_geometry(shape, origin, spacing, direction) -> Grid:
    """A :class:`Grid` (RAS) from ITK geometry (LPS origin, spacing, direction; shape i, j, k)."""
    affine_lps = np.eye(4)
    spacing = np.asarray(spacing, dtype=np.float64)
    affine_lps[:3, :3] = np.asarray(direction, dtype=np.float64) @ np.diag(spacing)
    affine_lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return Grid(tuple(int(s) for s in shape), RAS_TO_LPS @ affine_lps)


# --------------------------------------------------------------------------- small helpers


def _itk(path: str):
    """Import ITK lazily (slow to load, needed only for transform types we do not decode, and an
    optional dependency); a one-line InputDataError naming ``path`` where it is not installed."""
    try:
        import itk
    except ImportError:
        raise InputDataError(
            f"reading transform file {path} needs ITK's Python package, which is not installed "
            "(pip install 'ugi-bids[itk]', or convert it to an affine .mat or a composite "
            ".h5)") from None
    return itk


# --------------------------------------------------------------------------- writing

def _precision_names(precision: str):
    if precision == "float":
        return "float", np.float32
    if precision == "double":
        return "double", np.float64
    raise ValueError(f"precision must be 'float' or 'double', not {precision!r}")


def _field_parameters_lps(field: DisplacementField, dtype) -> tuple[np.ndarray, np.ndarray]:
    """ITK's ``(FixedParameters, Parameters)`` of a DisplacementFieldTransform, LPS.

    Fixed parameters (float64): size (i, j, k), origin, spacing, direction (row-major).
    Parameters: the vectors in ITK buffer order (i fastest, components interleaved), ``dtype``.
    """
    origin, spacing, direction = grid_to_itk_geometry(field.grid)
    fixed = np.concatenate([np.asarray(field.grid.shape, dtype=np.float64), origin, spacing,
                            direction.ravel()])
    return fixed, itk_buffer(np.asarray(field.vectors), dtype).reshape(-1)


def _affine_parameters_lps(affine_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ITK's ``(FixedParameters, Parameters)`` of an AffineTransform (centre 0), LPS, float64."""
    lps = affine_ras_to_lps(affine_ras)
    return np.zeros(3), np.concatenate([lps[:3, :3].ravel(), lps[:3, 3]])


def _write_h5py(transform: WorldTransform, path: str, precision: str, compression: bool) -> None:
    """ITK's HDF5 transform layout, written with h5py (importing ITK's transform modules to write
    it takes 10-20 s on a small machine; nitransforms has no composite writer).

    Affine parameters are float64 whatever the precision (ITK converts on read). Parameter
    datasets carry both the current ITK name (``TransformParameters``) and, as a hard
    link to the same data, the misspelled name (``TranformParameters``) that ITK versions before
    the spelling fix read, so old ANTs builds read the file too.
    """
    import h5py

    name, dtype = _precision_names(precision)
    string = h5py.string_dtype("ascii")
    options = {"compression": "gzip", "compression_opts": 1, "shuffle": True} if compression \
        else {}

    def put(group, kind: str, fixed: np.ndarray | None = None, params: np.ndarray | None = None,
            params_dtype=np.float64) -> None:
        group.create_dataset("TransformType", data=np.array([kind.encode()], dtype=object),
                             dtype=string)
        if fixed is None:
            return
        for label, values, value_type in (("FixedParameters", fixed, np.float64),
                                          ("Parameters", params, params_dtype)):
            values = np.asarray(values, dtype=value_type)
            extra = options if values.size > 1024 else {}
            dataset = group.create_dataset(f"Transform{label}", data=values, **extra)
            group[f"Tranform{label}"] = dataset  # hard link: the pre-fix ITK spelling

    with h5py.File(path, "w") as handle:
        handle.create_dataset("HDFVersion", data=np.array(
            [f"HDF5 library version: {h5py.version.hdf5_version}".encode()], dtype=object),
            dtype=string)
        root = handle.create_group("TransformGroup")
        put(root.create_group("0"), f"CompositeTransform_{name}_3_3")
        put(root.create_group("1"), f"AffineTransform_{name}_3_3",
            *_affine_parameters_lps(transform.affine))
        if transform.field is not None:
            put(root.create_group("2"), f"DisplacementFieldTransform_{name}_3_3",
                *_field_parameters_lps(transform.field, dtype), params_dtype=dtype)


def write_composite_h5(transform: WorldTransform, path: str | os.PathLike,
                       precision: str = "float", compression: bool = False) -> str:
    """Write ``transform`` as an ITK composite HDF5 file (what fMRIPrep writes, ANTs reads).

    Parameters
    ----------
    transform : WorldTransform
        Pull map reference RAS mm -> source RAS mm, ``T(x) = A (x + d(x))``.
    path : path
        Destination (``.h5``). Written to a temporary sibling, then moved into place.
    precision : {"float", "double"}
        Storage type of the transform parameters (see the module notes).
    compression : bool
        gzip-compress the parameter datasets (level 1 + shuffle). Off by default: on a 177^3
        field it saves ~17 % of the file (55 vs 67 MB) and costs ~1.3 s per file.

    Returns
    -------
    str
        ``path``. The file holds the queue ``[AffineTransform, DisplacementFieldTransform]``
        (or ``[AffineTransform]`` when ``transform.field`` is None) in LPS mm, so that
        ``antsApplyTransforms -r REFERENCE -i SOURCE -t path`` resamples the source onto the
        reference grid.
    """
    _precision_names(precision)
    if not np.all(np.isfinite(transform.affine)) or (
            transform.field is not None and not np.all(np.isfinite(transform.field.vectors))):
        raise ValueError("transform contains non-finite values")
    with atomic_file(path, "transform file") as temporary:
        _write_h5py(transform, temporary, precision, compression)
    return os.fspath(path)


def write_displacement_nifti(transform: WorldTransform, path: str | os.PathLike,
                             reference: Grid | None = None) -> str:
    """Write the full map as an ANTs-style displacement-field NIfTI (affine folded in).

    The file holds ``u(p) = T_lps(p) - p`` in LPS mm (ITK/ANTs convention), sampled at the voxel
    centres of ``reference`` (default: the transform's field grid), as a 5D float32 image of shape
    ``(i, j, k, 1, 3)`` with intent ``vector``; the header affine is the grid's RAS affine. ANTs
    (``antsApplyTransforms -t file.nii.gz``) then resamples the source onto its reference grid as
    the composite file does. Between samples the field is trilinear: exact for the affine part
    and for a displacement field sampled on the same grid.
    """
    if reference is None:
        if transform.field is None:
            raise ValueError("an affine-only transform needs a reference grid to be sampled on")
        reference = transform.field.grid
    from nitransforms.io.itk import ITKDisplacementsField

    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)  # the file's type: float32 whatever the array's
    header.set_xyzt_units("mm", "sec")
    image = nib.Nifti1Image(displacement_on_grid(transform, reference),  # (i, j, k, 3) RAS mm
                            reference.affine, header)
    image.set_qform(reference.affine, code=1)
    image.set_sform(reference.affine, code=1)
    # nitransforms' encoding: (i, j, k, 1, 3), x and y negated (LPS), intent vector. It works in
    # float64; the values are float32 ones, so the saved float32 file is the same to the byte.
    with atomic_file(path, "displacement field") as temporary:
        nib.save(ITKDisplacementsField.to_image(image), temporary)
    return os.fspath(path)


# --------------------------------------------------------------------------- reading
#
# A file is read into a queue of items, in ITK queue order (the last item is applied first):
# ("linear", 4x4 RAS matrix) or ("field", DisplacementField in RAS).

def _check_readable(path: str) -> None:
    """One-line errors for a missing, empty or obviously corrupt transform file."""
    if not os.path.exists(path):
        raise MissingInputError(f"transform file not found: {path}")
    if not os.path.isfile(path):
        raise InputDataError(f"transform path is not a file: {path}")
    if not path.lower().endswith(_TRANSFORM_SUFFIXES):
        raise InputDataError(f"unsupported transform file type (want .h5, .mat or .txt): {path}")
    if os.path.getsize(path) == 0:
        raise InputDataError(f"transform file is empty: {path}")
    if _is_hdf5_name(path):
        with open(path, "rb") as handle:
            if handle.read(8) != _HDF5_SIGNATURE:
                raise InputDataError(f"transform file is not an HDF5 file (corrupt?): {path}")


def _is_hdf5_name(path: str) -> bool:
    return path.lower().endswith((".h5", ".hdf5", ".hdf"))


def _field_from_lps(fixed: np.ndarray, vectors_kji: np.ndarray) -> DisplacementField:
    """RAS :class:`DisplacementField` from ITK fixed parameters and a (k, j, i, 3) LPS array."""
    shape = tuple(int(round(v)) for v in fixed[:3])
    grid = grid_from_itk_geometry(shape, fixed[3:6], fixed[6:9], np.reshape(fixed[9:18], (3, 3)))
    vectors = np.transpose(vectors_kji, (2, 1, 0, 3)).astype(np.float32)
    vectors[..., :2] *= -1.0
    return DisplacementField(grid, vectors)


def _matrix_offset_ras(params: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """RAS 4x4 of ITK MatrixOffsetTransformBase parameters ``[M (row-major), t]``, centre ``c``:
    ``p -> M (p - c) + t + c`` in LPS."""
    matrix = np.asarray(params[:9], dtype=np.float64).reshape(3, 3)
    translation = np.asarray(params[9:12], dtype=np.float64)
    centre = np.asarray(fixed[:3], dtype=np.float64) if len(fixed) >= 3 else np.zeros(3)
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + centre - matrix @ centre
    return affine_lps_to_ras(lps)


_H5_LINEAR = ("AffineTransform", "MatrixOffsetTransformBase")


def _h5_parameters(group, label: str):
    """``Transform{label}`` of an HDF5 transform group, or its pre-fix ITK spelling
    ``Tranform{label}``."""
    for name in (f"Transform{label}", f"Tranform{label}"):
        if name in group:
            return group[name]
    raise KeyError(f"transform without {label}")


def _read_items_h5(path: str) -> list | None:
    """Queue items of an ITK HDF5 transform file, or None when it holds types only ITK knows.

    Decoded here, not by nitransforms' ``ITKCompositeH5``: that reads only files with a
    CompositeTransform in front (not plain lists, nor MatrixOffsetTransformBase entries, which
    ITK's Python reader cannot load either), keeps an affine's centre in float32 (the last bits
    of ANTs' centred affines would change), and decodes fields in float64 (190 instead of
    127 MiB for a 177^3 field). A second decoder for the files it does read would give the same
    numbers through another path, so there is one: ITK's buffer order (k, j, i), LPS -> RAS.
    """
    import h5py

    items = {}
    with h5py.File(path, "r") as handle:
        root = handle["TransformGroup"]
        names = sorted(root, key=int)
        for position, name in enumerate(names):
            group = root[name]
            kind = group["TransformType"][0]
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            base = kind.split("_")[0]
            if base == "CompositeTransform":
                if position:
                    return None
                continue
            if not kind.endswith("_3_3"):
                raise InputDataError(f"transform file {path} holds a non-3D transform ({kind})")
            if base in _H5_LINEAR:
                items[name] = ("linear", _matrix_offset_ras(
                    _h5_parameters(group, "Parameters")[()],
                    _h5_parameters(group, "FixedParameters")[()]))
            elif base == "DisplacementFieldTransform":
                fixed = _h5_parameters(group, "FixedParameters")[()]
                params = _h5_parameters(group, "Parameters")
                shape = tuple(int(round(v)) for v in fixed[:3])
                if len(fixed) != 18 or params.size != 3 * int(np.prod(shape)):
                    raise InputDataError(f"transform file {path}: displacement field parameters "
                                         "do not match its size")
                items[name] = ("field", _field_from_lps(
                    fixed, params[()].reshape(shape[::-1] + (3,))))
            else:
                return None
    return [items[name] for name in names if name in items]


def _linear_entries(path: str) -> list[tuple[str, np.ndarray, np.ndarray]] | None:
    """``(type, parameters, fixed parameters)`` of each transform in an ITK ``.mat`` (MATLAB v4,
    one transform: ``<type>`` and ``fixed``) or ``.txt``/``.tfm`` (``#Insight Transform File``)
    file; None for other names."""
    name = path.lower()
    if name.endswith(".mat"):
        from scipy.io import loadmat

        variables = {key: np.asarray(value, dtype=np.float64).ravel()
                     for key, value in loadmat(path).items() if not key.startswith("__")}
        kinds = [key for key in variables if key != "fixed"]
        if len(kinds) != 1:
            return None
        return [(kinds[0], variables[kinds[0]], variables.get("fixed", np.zeros(3)))]
    if not name.endswith((".txt", ".tfm")):
        return None
    entries: list[list] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "Transform":
                entries.append([value.strip(), np.zeros(0), np.zeros(0)])
            elif key in ("Parameters", "FixedParameters") and entries:
                entries[-1][1 if key == "Parameters" else 2] = np.array(value.split(), dtype=float)
    return [tuple(entry) for entry in entries]


def _read_items_linear(path: str) -> list | None:
    """Queue items of an ITK ``.mat``/``.txt`` file of affines (AffineTransform,
    MatrixOffsetTransformBase: what ANTs writes), or None when it holds other types or is not
    such a file (ITK reads it then). Decoded here so that ANTs' affines need no ITK install.

    The file's parameters map reference LPS mm to source LPS mm; the items are those maps in
    RAS mm (reference RAS -> source RAS), as :func:`_read_items_h5` gives them."""
    entries = _linear_entries(path)
    if not entries:
        return None
    items = []
    for kind, params, fixed in entries:
        base = kind.split("_")[0]
        if base == "CompositeTransform":
            continue
        if not kind.endswith("_3_3"):
            raise InputDataError(f"transform file {path} holds a non-3D transform ({kind})")
        if base not in _H5_LINEAR or params.size != 12:
            return None
        items.append(("linear", _matrix_offset_ras(params, fixed)))
    return items


def _flatten_itk(itk, transforms) -> list:
    """ITK transforms in queue order, composites expanded (down-cast to concrete types)."""
    queue = []
    for transform in transforms:
        transform = itk.down_cast(transform)
        if transform.GetNameOfClass() == "CompositeTransform":
            queue.extend(_flatten_itk(itk, [transform.GetNthTransform(i)
                                            for i in range(transform.GetNumberOfTransforms())]))
        else:
            queue.append(transform)
    return queue


def _linear_lps_matrix(itk, transform) -> np.ndarray:
    """4x4 LPS matrix of a linear ITK transform."""
    if hasattr(transform, "GetMatrix") and hasattr(transform, "GetOffset"):
        matrix = np.eye(4)
        matrix[:3, :3] = np.asarray(itk.array_from_matrix(transform.GetMatrix()), dtype=np.float64)
        matrix[:3, 3] = np.asarray(list(transform.GetOffset()), dtype=np.float64)
        return matrix
    # any other linear transform (translation, scale, ...): read it off four points
    origin = np.asarray(transform.TransformPoint([0.0, 0.0, 0.0]), dtype=np.float64)
    matrix = np.eye(4)
    matrix[:3, 3] = origin
    for axis in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[axis] = 1.0
        matrix[:3, axis] = np.asarray(transform.TransformPoint(unit), dtype=np.float64) - origin
    return matrix


def _read_items_itk(path: str) -> list:
    """Queue items of any transform file ITK reads (.h5, .mat, .txt)."""
    itk = _itk(path)
    queue = _flatten_itk(itk, itk.transformread(path))
    items = []
    for transform in queue:
        if transform.GetInputSpaceDimension() != 3 or transform.GetOutputSpaceDimension() != 3:
            raise InputDataError(f"transform file {path} is not a 3D transform")
        if transform.IsLinear():
            items.append(("linear", affine_lps_to_ras(_linear_lps_matrix(itk, transform))))
        elif hasattr(transform, "GetDisplacementField"):
            image = transform.GetDisplacementField()
            origin = np.asarray(list(image.GetOrigin()), dtype=np.float64)
            spacing = np.asarray(list(image.GetSpacing()), dtype=np.float64)
            direction = np.asarray(itk.array_from_matrix(image.GetDirection()), dtype=np.float64)
            array = itk.array_from_image(image)  # (k, j, i, 3)
            fixed = np.concatenate([np.asarray(array.shape[:3][::-1], dtype=np.float64), origin,
                                    spacing, direction.ravel()])
            items.append(("field", _field_from_lps(fixed, array)))
        else:
            raise InputDataError(
                f"unsupported transform type {transform.GetNameOfClass()} in {path}")
    return items


def _fold_queue(items: list, path: str) -> WorldTransform:
    """Fold a queue (applied back to front; RAS) into ``A (x + d(x))``.

    Any number of linear transforms and at most one displacement field are supported. Linear
    transforms applied *before* the field (behind it in the queue), ``L``, are moved out exactly:
    ``L x + d(L x) = L (x + M^-1 d(L x))`` with ``M`` the linear part of ``L``, which is a field on
    the grid ``L^-1 G``.
    """
    outer = np.eye(4)  # linear maps in front of the field in the queue: applied after it
    inner = np.eye(4)  # linear maps behind the field in the queue: applied before it
    field = None
    for kind, value in items:
        if kind == "linear":
            if field is None:
                outer = outer @ value
            else:
                inner = inner @ value
        else:
            if field is not None:
                raise InputDataError(
                    f"transform file {path} holds more than one displacement field; "
                    "only [affine..., field, affine...] queues are supported")
            field = value
    if field is None:
        return WorldTransform(outer @ inner)
    if not np.array_equal(inner, np.eye(4)):
        linear_inv = np.linalg.inv(inner[:3, :3])
        vectors = (field.vectors.astype(np.float64) @ linear_inv.T).astype(np.float32)
        field = DisplacementField(Grid(field.grid.shape, np.linalg.inv(inner) @ field.grid.affine),
                                  vectors)
    return WorldTransform(outer @ inner, field)


def read_composite_h5(path: str | os.PathLike, backend: str = "auto") -> WorldTransform:
    """Read an ITK transform file as a :class:`WorldTransform` (pull map, RAS mm).

    Accepts composite HDF5 files (ours, fMRIPrep's, ANTs'), float or double, and plain linear ITK
    transforms in ``.mat`` / ``.txt`` / ``.h5``. The file's map (reference LPS -> source LPS, as
    ``antsApplyTransforms`` uses it) is returned in RAS: reference RAS mm -> source RAS mm.

    ``backend="auto"`` decodes HDF5 files of affine/displacement-field transforms (h5py) and
    ITK ``.mat``/``.txt`` affines itself, and hands everything else to ITK (an optional
    dependency); ``"itk"`` always uses ITK's reader.

    Raises
    ------
    MissingInputError
        The file does not exist.
    InputDataError
        The file is unreadable, corrupt, or holds transforms we cannot represent.
    """
    if backend not in ("auto", "itk"):
        raise ValueError(f"backend must be 'auto' or 'itk', not {backend!r}")
    path = os.fspath(path)
    _check_readable(path)
    try:
        items = None
        if backend == "auto":
            items = _read_items_h5(path) if _is_hdf5_name(path) else _read_items_linear(path)
        if items is None:
            items = _read_items_itk(path)
    except InputDataError:
        raise
    except Exception as exc:
        raise InputDataError(f"cannot read transform file {path}: {one_line(exc, 300)}") from None
    if not items:
        raise InputDataError(f"transform file {path} holds no transform")
    result = _fold_queue(items, path)
    if not np.all(np.isfinite(result.affine)) or (
            result.field is not None and not np.all(np.isfinite(result.field.vectors))):
        raise InputDataError(f"transform file {path} contains non-finite values")
    return result
