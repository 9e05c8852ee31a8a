"""Reading images into :class:`Volume` objects, with the checks that turn bad input into one-line
errors instead of stack traces."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ...errors import InputDataError, MissingInputError
from .geometry import Grid, canonical, grid_of


@dataclass
class Volume:
    """A 3D scalar image: ``data`` (i, j, k) float32 on ``grid`` (world RAS)."""

    grid: Grid
    data: np.ndarray

    def __post_init__(self):
        if tuple(self.data.shape) != tuple(self.grid.shape):
            raise ValueError(f"data {self.data.shape} do not match grid {self.grid.shape}")

    def canonical(self) -> "Volume":
        """The same voxels stored in the closest RAS+ orientation (exact, no resampling)."""
        grid, data = canonical(self.grid, self.data)
        return Volume(grid, data)

    def to_nifti(self, dtype=np.float32, codes: tuple[int, int] = (1, 1)) -> nib.Nifti1Image:
        """A NIfTI image with this data and geometry: qform and sform both set, with ``codes``
        (qform, sform; 1 = scanner, 4 = MNI, 2 = aligned to another image), units mm."""
        img = nib.Nifti1Image(np.asarray(self.data, dtype=dtype), self.grid.affine)
        img.set_qform(self.grid.affine, code=int(codes[0]))
        img.set_sform(self.grid.affine, code=int(codes[1]))
        img.header.set_xyzt_units("mm")
        return img


#: gzip (DEFLATE) cannot compress better than about 1032:1: a header that declares more data
#: than this many times the compressed file's size is corrupt, whatever the content.
_MAX_GZIP_RATIO = 1100


def _cgroup_memory() -> tuple[int | None, int]:
    """The cgroup v2 memory limit (None: none) and what the group uses, bytes."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        return (None if limit == "max" else int(limit)), used
    except (OSError, ValueError):
        return None, 0


def memory_total_bytes() -> int:
    """The machine's physical memory, bounded by the cgroup's limit (a container, a Slurm job)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit, _ = _cgroup_memory()
    return total if limit is None else min(total, limit)


def memory_available_bytes() -> int:
    """Memory this process may still use, bytes: the kernel's ``MemAvailable``, bounded by
    what the cgroup's limit leaves."""
    available = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        available = memory_total_bytes()
    limit, used = _cgroup_memory()
    return available if limit is None else min(available, max(limit - used, 0))


def _gib(size: float) -> str:
    return f"{size / 2**30:.3g} GiB" if size >= 2**30 else f"{size / 2**20:.3g} MiB"


def _stored_bytes(path: str, needed: int) -> int:
    """How many bytes ``path`` holds uncompressed, counted up to ``needed`` (gzip: streamed,
    without keeping the data)."""
    if not path.endswith(".gz"):
        return os.path.getsize(path)
    import gzip
    import zlib

    with open(path, "rb") as handle:  # single-member gzip: the size is in the trailer
        handle.seek(-4, os.SEEK_END)
        if int.from_bytes(handle.read(4), "little") == needed % 2**32:
            return needed
    total = 0
    try:
        with gzip.open(path, "rb") as handle:
            while total < needed:
                chunk = handle.read(min(2**24, needed - total))
                if not chunk:
                    break
                total += len(chunk)
    except (OSError, EOFError, zlib.error):
        pass  # a truncated stream: what was read is what it holds
    return total


def raw_nifti_header(path: str) -> nib.Nifti1Header | None:
    """The NIfTI-1 or NIfTI-2 header of ``path`` as stored, or None (another format, or an
    unreadable file: :func:`load_nifti` reports those). nibabel's loader "fixes" some invalid
    fields (negative or zero voxel sizes) with a log message; this reads them unchanged."""
    from nibabel.openers import ImageOpener

    if not path.endswith((".nii", ".nii.gz")):
        return None
    for header_class in (nib.Nifti1Header, nib.Nifti2Header):
        try:
            with ImageOpener(path) as handle:
                return header_class.from_fileobj(handle, check=False)
        except Exception:  # the wrong NIfTI version, or a corrupt file
            continue
    return None


def check_nifti_header(header: nib.Nifti1Header, path: str, what: str = "image") -> None:
    """Refuse a NIfTI header (as stored: :func:`raw_nifti_header`) that gives no usable
    geometry: ``sform_code`` and ``qform_code`` both 0 (no orientation: nibabel would invent
    one from the voxel sizes, so no world-space result could be trusted), or voxel sizes
    (``pixdim[1:4]``) that are zero, negative or not finite. One-line
    :class:`~ugi_bids.errors.InputDataError` (exit 65) naming ``what``."""
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        raise InputDataError(
            f"{what} {path} has no orientation in its header (sform_code and qform_code are "
            "both 0): set the correct one first (e.g. fslorient -setsformcode 1 after checking "
            "the image's orientation)")
    sizes = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        raise InputDataError(f"{what} {path} has zero, negative or invalid voxel sizes in its "
                             f"header (pixdim[1:4] = {sizes.tolist()})")


def check_declared_size(img: nib.spatialimages.SpatialImage, path: str, what: str = "image",
                        memory_limit_bytes: int | None = None) -> None:
    """Refuse, before any voxel is read, a declared data size (shape x data type) that the file
    does not hold (a truncated file, or a corrupt header: gzip's uncompressed size is counted,
    streaming), or data that would not fit in memory once read as float32:
    ``memory_limit_bytes`` (``--mem``, or :func:`memory_available_bytes` where a command line
    checks its inputs), else the machine's memory (:func:`memory_total_bytes`: a header no
    machine here could read; a step inside a run does not fail because others use memory now).
    One-line :class:`~ugi_bids.errors.InputDataError`."""
    proxy = getattr(img, "dataobj", None)
    shape, dtype, offset = (getattr(proxy, name, None) for name in ("shape", "dtype", "offset"))
    if shape is None or dtype is None:
        return
    voxels = int(np.prod([int(n) for n in shape], dtype=object))
    declared = voxels * np.dtype(dtype).itemsize
    size = os.path.getsize(path)
    if path.endswith(".gz") and declared > size * _MAX_GZIP_RATIO:
        raise InputDataError(
            f"{what} {path}: its header declares shape {tuple(shape)} ({_gib(declared)} of "
            f"{np.dtype(dtype).name}), which a {_gib(size)} compressed file cannot hold "
            "(a corrupt header?)")
    limit = memory_total_bytes() if memory_limit_bytes is None else memory_limit_bytes
    needed = voxels * (4 + np.dtype(dtype).itemsize)  # the stored data and their float32 copy
    if needed > limit:
        raise InputDataError(
            f"{what} {path}: its header declares shape {tuple(shape)}, which needs about "
            f"{_gib(needed)} of memory to read, more than the {_gib(limit)} this run may use "
            "(--mem, or the memory available); check the header's shape, or give the run "
            "more memory")
    if isinstance(offset, (int, np.integer)) and \
            _stored_bytes(path, int(offset) + declared) < int(offset) + declared:
        raise InputDataError(
            f"{what} {path} is truncated: its header declares shape {tuple(shape)} "
            f"({_gib(declared)} of {np.dtype(dtype).name}), more than the file holds")


def load_nifti(path: str | os.PathLike, what: str = "image",
               memory_limit_bytes: int | None = None) -> nib.Nifti1Image:
    """Open a NIfTI file, with one-line errors for a missing or unreadable file and for a
    header that cannot describe a usable image (:func:`check_nifti_header`,
    :func:`check_declared_size`: before any data are read; ``memory_limit_bytes`` as there)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingInputError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise InputDataError(f"{what} {path} is a folder, not an image file")
    header = raw_nifti_header(path)
    if header is not None:
        check_nifti_header(header, path, what)
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputDataError(f"cannot read {what} {path}: {exc.__class__.__name__}: {exc}") from None
    check_declared_size(img, path, what, memory_limit_bytes)
    try:
        # Touch the data now so that a truncated file fails here, with a clear message.
        img.dataobj[(0,) * len(img.shape)]
    except Exception as exc:
        raise InputDataError(f"cannot read {what} {path}: {exc.__class__.__name__}: {exc}") from None
    return img


def volume_from_image(img: nib.spatialimages.SpatialImage, what: str = "image") -> Volume:
    """A :class:`Volume` from a nibabel image: refuses non-3D, non-finite and empty data."""
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputDataError(
            f"{what} must be a 3D volume, got shape {tuple(img.shape)}; "
            "extract one volume first (e.g. a single frame or the mean)")
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except Exception as exc:
        raise InputDataError(f"cannot read the data of {what}: {exc}") from None
    if not np.all(np.isfinite(data)):
        raise InputDataError(f"{what} contains NaN or infinite values; fix or mask them first")
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        raise InputDataError(f"{what} has an invalid (singular or non-finite) affine in its header")
    return Volume(grid_of(img), data)


def load_volume(path: str | os.PathLike, what: str = "image",
                memory_limit_bytes: int | None = None) -> Volume:
    """Read a 3D NIfTI file as a :class:`Volume` in its stored orientation (every check of
    :func:`load_nifti` and :func:`volume_from_image`)."""
    return volume_from_image(load_nifti(path, what, memory_limit_bytes),
                             f"{what} {os.fspath(path)}")
