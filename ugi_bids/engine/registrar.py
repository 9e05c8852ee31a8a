"""Pairwise registration in world coordinates: preprocessing, pre-alignment, the network on a
shared lattice, and the resulting maps as world-space transforms.

Direction vocabulary (fixed = B, moving = A, as in the published tool):

* ``forward`` = phi_AB as a :class:`WorldTransform`: maps FIXED-space world points to
  MOVING-space world points. It resamples the moving image onto the fixed grid
  (``from-moving_to-fixed_mode-image``).
* ``inverse`` = phi_BA: maps MOVING-space points to FIXED-space points; resamples the fixed image
  onto the moving grid (``from-fixed_to-moving_mode-image``). The network computes it with the
  inputs swapped; it is phi_AB's inverse-consistent partner.

How the pair reaches the network:

1. Both images are intensity-normalised in their stored orientation.
2. Pre-alignment gives ``A``, a world affine fixed -> moving (``none``: the reference tool's voxel
   correspondence; ``header``: identity, trusting the headers; ``affine``: centre-of-mass
   initialisation plus a multi-resolution affine fit).
3. The network lattice is laid over the fixed image's field of view (stored RAS-closest, so the
   storage order of the fixed image does not matter; ``none`` keeps the stored order, as the
   reference does). The fixed image is resized onto it as the reference does; the moving image
   is sampled at ``A(x)`` for every lattice point ``x``.
4. The network's maps (normalised lattice coordinates) become displacement fields in world mm
   on a lattice of the same resolution covering each direction's reference field of view.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from .model.allocator import release_freed_memory, retain_freed_memory
from .model.device import resolve_device
from .model.fast_inference import fold_unets
from .model.network import identity_grid
from .model.precision import effective_precision
from .optimise.instance import PairMaps, checkpointing_setting, instance_optimise
from .options import (
    DEFAULT_DEVICE,
    DEFAULT_IO_CHECKPOINTING,
    DEFAULT_MASKING,
    DEFAULT_MODALITY,
    DEFAULT_MODEL,
    DEFAULT_PREALIGN,
    DEFAULT_PREALIGN_DOF,
    DEFAULT_PRECISION,
    DEFAULT_SIMILARITY,
    DEFAULT_NETWORK_SIZE,
    IO_LEARNING_RATE,
    IO_STEPS,
    MASKING_MODES,
    MIN_NETWORK_SIZE,
    MODALITIES,
    PREALIGN_DOFS,
    PREALIGN_MODES,
    SIMILARITIES,
)
from .prealign import affine as prealign_module
from .checks import check_registrable
from .prealign.foreground import BODY_HU, body_mask
from .preprocess import CT_WINDOW_HU, binarise_mask, preprocess
from .spatial.geometry import Grid, network_box, network_box_grid, to_tensor_layout
from .spatial.sampling import sample_on_grid, sample_trilinear
from .spatial.transforms import DisplacementField, WorldTransform
from .spatial.volume import Volume, load_volume

LOGGER = logging.getLogger(__name__)



@dataclass
class RegistrationResult:
    """Both directions as world transforms, plus what produced them.

    ``forward`` maps fixed -> moving points (resamples moving onto fixed); ``inverse`` maps
    moving -> fixed points. ``prealign`` is the 4x4 world affine fixed -> moving (RAS mm).
    """

    forward: WorldTransform
    inverse: WorldTransform
    prealign: np.ndarray
    maps: PairMaps
    timings: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)


@dataclass
class NetworkPair:
    """The pair on the network lattice: tensors (1, 1, N, N, N) in tensor layout, the lattice's
    map ``fixed_box`` (normalised coordinates -> fixed world RAS), the moving image's own grid
    (for the inverse field) and the world affine ``prealign`` (fixed -> moving)."""

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_box: np.ndarray
    fixed_grid: Grid
    moving_grid: Grid
    prealign: np.ndarray
    fixed_mask: torch.Tensor | None = None
    moving_mask: torch.Tensor | None = None


def resize_to_lattice(data: np.ndarray, size: int, mode: str = "trilinear") -> torch.Tensor:
    """Resize an (i, j, k) array onto the N^3 lattice in tensor layout, exactly as the reference
    does (``F.interpolate``, ``align_corners=False``; ``nearest`` for masks)."""
    tensor = torch.from_numpy(to_tensor_layout(np.asarray(data, dtype=np.float32)))[None, None]
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(tensor, size=(size,) * 3, mode=mode, **kwargs)


def lattice_indices_in(grid: Grid, lattice_to_world: np.ndarray, size: int) -> np.ndarray:
    """Continuous voxel indices of ``grid`` at every N^3 lattice point, in tensor layout
    (N, N, N, 3); ``lattice_to_world`` maps normalised lattice coordinates to world RAS."""
    to_index = np.linalg.inv(grid.affine) @ lattice_to_world
    t = identity_grid((size,) * 3, dtype=torch.float64)[0].permute(1, 2, 3, 0).numpy()
    return t @ to_index[:3, :3].T + to_index[:3, 3]


def sample_on_lattice(volume: Volume, lattice_to_world: np.ndarray, size: int,
                      nearest: bool = False) -> torch.Tensor:
    """Sample ``volume`` at the world positions of the N^3 lattice: (1, 1, N, N, N), tensor
    layout; zero beyond half a voxel outside the volume."""
    if nearest:
        index = np.round(lattice_indices_in(volume.grid, lattice_to_world, size).reshape(-1, 3))
        values = sample_trilinear(volume.data, index, outside_half_voxel="zero")
    else:
        # lattice index -> normalised lattice coordinates -> world RAS mm -> volume voxel index
        lattice_index_to_world = lattice_to_world @ np.diag([1.0 / (size - 1)] * 3 + [1.0])
        lattice_index_to_voxel = np.linalg.inv(volume.grid.affine) @ lattice_index_to_world
        values = sample_on_grid(np.asarray(volume.data, dtype=np.float32)[..., None],
                                (size,) * 3, lattice_index_to_voxel)
    return torch.from_numpy(np.ascontiguousarray(values).reshape((size,) * 3))[None, None]


def world_field(displacement: torch.Tensor, fixed_box: np.ndarray, field_grid: Grid,
                field_to_fixed: np.ndarray, fixed_to_output: np.ndarray) -> DisplacementField:
    """A network map as a world displacement field on ``field_grid``.

    ``displacement`` is phi - identity on the lattice (1, 3, N, N, N). For a field-grid point
    ``p`` (world of the field), the lattice point is ``t = fixed_box^-1 field_to_fixed p`` and the
    field stores ``L (phi(t) - t)`` with L the linear part of ``fixed_to_output fixed_box``:
    the transform built from it maps ``p`` to ``fixed_to_output^-1`` of
    ``fixed_to_output fixed_box phi(t)``. Because ``fixed_to_output field_to_fixed = I`` in both
    uses, the lattice terms cancel exactly and only the (small) displacement is carried.
    Displacements outside the lattice are border-clamped, as inside the network.
    """
    index_to_t = np.linalg.inv(fixed_box) @ field_to_fixed @ field_grid.affine
    linear = (fixed_to_output @ fixed_box)[:3, :3]
    table = displacement[0].permute(1, 2, 3, 0).to("cpu", torch.float32).contiguous().numpy()
    # field voxel index -> normalised lattice coordinates t -> network lattice index
    to_lattice_index = np.diag([n - 1.0 for n in table.shape[:3]] + [1.0]) @ index_to_t
    vectors = sample_on_grid(table, field_grid.shape, to_lattice_index, linear,
                             zero_outside=False)
    return DisplacementField(field_grid, vectors)


def padded(grid: Grid, voxels: int = 1) -> Grid:
    """``grid`` grown by ``voxels`` on every side (same spacing and direction)."""
    shift = np.eye(4)
    shift[:3, 3] = -voxels
    return Grid(tuple(n + 2 * voxels for n in grid.shape), grid.affine @ shift)


def transforms_from_maps(pair: NetworkPair, maps: PairMaps, size: int
                         ) -> tuple[WorldTransform, WorldTransform]:
    """World transforms (forward: fixed -> moving points, inverse: moving -> fixed points) from
    the lattice maps. Each field covers its direction's reference field of view at lattice
    resolution, one voxel wider on each side so that every voxel of the reference image is
    inside it."""
    identity = identity_grid((size,) * 3, maps.phi_ab.device, maps.phi_ab.dtype)
    a = pair.prealign
    a_inv = np.linalg.inv(a)
    forward_grid = padded(network_box_grid(pair.fixed_grid, size))
    inverse_grid = padded(network_box_grid(pair.moving_grid, size))
    forward_field = world_field(maps.phi_ab - identity, pair.fixed_box, forward_grid,
                                np.eye(4), np.eye(4))
    inverse_field = world_field(maps.phi_ba - identity, pair.fixed_box, inverse_grid,
                                a_inv, a)
    return WorldTransform(a, forward_field), WorldTransform(a_inv, inverse_field)


def prealignment(fixed: Volume, moving: Volume, mode: str = DEFAULT_PREALIGN, *,
                 network_size: int = DEFAULT_NETWORK_SIZE,
                 fixed_mask: np.ndarray | None = None,
                 moving_mask: np.ndarray | None = None,
                 prepared: prealign_module.FixedSide | None = None,
                 dof: int = DEFAULT_PREALIGN_DOF, fixed_modality: str = DEFAULT_MODALITY,
                 moving_modality: str = DEFAULT_MODALITY) -> np.ndarray:
    """The world affine that maps FIXED-space points to MOVING-space points (RAS mm, 4x4): the
    affine of :func:`prealignment_report`."""
    return prealignment_report(fixed, moving, mode, network_size=network_size,
                               fixed_mask=fixed_mask, moving_mask=moving_mask,
                               prepared=prepared, dof=dof, fixed_modality=fixed_modality,
                               moving_modality=moving_modality)[0]


def prealignment_report(fixed: Volume, moving: Volume, mode: str = DEFAULT_PREALIGN, *,
                        network_size: int = DEFAULT_NETWORK_SIZE,
                        fixed_mask: np.ndarray | None = None,
                        moving_mask: np.ndarray | None = None,
                        prepared: prealign_module.FixedSide | None = None,
                        dof: int = DEFAULT_PREALIGN_DOF, fixed_modality: str = DEFAULT_MODALITY,
                        moving_modality: str = DEFAULT_MODALITY,
                        device: str | torch.device = "cpu",
                        settings: prealign_module.PrealignSettings | None = None
                        ) -> tuple[np.ndarray, dict | None]:
    """The world affine that maps FIXED-space points to MOVING-space points (RAS mm, 4x4), and
    what the provenance records of it (None unless ``affine``).

    ``none``: the voxel-grid correspondence of the published tool (the moving network box
    composed with the inverse of the fixed one; depends on ``network_size``), ``header``: the
    identity, ``affine``: :func:`ugi_bids.engine.prealign.affine.estimate_prealignment` with
    ``dof`` (multi-start search, then rigid and affine fit; restricted to the boolean masks on
    each image's grid when given, else to a CT's body: :func:`prealign_mask`), run by torch on
    ``device`` (the registration's; it replaces the device of ``settings``, the fit's tuning).
    """
    check_options(prealign=mode, prealign_dof=dof, fixed_modality=fixed_modality,
                  moving_modality=moving_modality)
    if mode == "none":
        return network_box(moving.grid, network_size) @ np.linalg.inv(
            network_box(fixed.grid, network_size)), None
    if mode == "header":
        return np.eye(4), None
    if fixed_mask is None and prepared is None:
        fixed_mask = prealign_mask(fixed, fixed_modality)
    if moving_mask is None:
        moving_mask = prealign_mask(moving, moving_modality)
    result = prealign_module.estimate_prealignment(
        fixed, moving, fixed_mask=fixed_mask, moving_mask=moving_mask, prepared=prepared,
        dof=dof, settings=replace(settings or prealign_module.PrealignSettings(),
                                  device=str(torch.device(device))))
    return result.affine, result.report()


def prealign_mask(normalised: Volume, modality: str) -> np.ndarray | None:
    """Where the pre-alignment looks in a NORMALISED image without a mask of its own: a CT's
    body (:func:`ugi_bids.engine.prealign.foreground.body_mask`, at ``BODY_HU`` on the CT
    window), nothing for MRI (its intensity object is the head)."""
    if modality != "ct":
        return None
    low, high = CT_WINDOW_HU
    return body_mask(normalised, (BODY_HU - low) / (high - low))


def network_pair(fixed: Volume, moving: Volume, prealign_affine: np.ndarray, *, size: int,
                 keep_storage: bool = False, fixed_mask: np.ndarray | None = None,
                 moving_mask: np.ndarray | None = None) -> NetworkPair:
    """Put two normalised volumes on the shared network lattice (see module docstring).

    ``prealign_affine`` maps fixed world points to moving world points. ``keep_storage`` (the
    ``none`` mode) lays the lattice over the images as stored and resizes both exactly as the
    reference does; otherwise the lattice covers the fixed image in its RAS-closest storage and
    the moving image is sampled through the affine. ``fixed_mask``/``moving_mask`` (boolean, on
    each volume's grid) are carried to the lattice by nearest neighbour for loss masking.
    """
    def as_volume(mask, like):
        return None if mask is None else Volume(like.grid, np.asarray(mask, dtype=np.float32))

    fixed_mask_v, moving_mask_v = as_volume(fixed_mask, fixed), as_volume(moving_mask, moving)
    if not keep_storage:
        fixed, moving = fixed.canonical(), moving.canonical()
        fixed_mask_v = None if fixed_mask_v is None else fixed_mask_v.canonical()
        moving_mask_v = None if moving_mask_v is None else moving_mask_v.canonical()
    fixed_box = network_box(fixed.grid, size)
    if keep_storage:
        moving_tensor = resize_to_lattice(moving.data, size)
        moving_lattice_mask = (None if moving_mask_v is None
                               else resize_to_lattice(moving_mask_v.data, size, "nearest"))
    else:
        moving_tensor = sample_on_lattice(moving, prealign_affine @ fixed_box, size)
        moving_lattice_mask = (None if moving_mask_v is None else sample_on_lattice(
            moving_mask_v, prealign_affine @ fixed_box, size, nearest=True))
    return NetworkPair(
        fixed=resize_to_lattice(fixed.data, size),
        moving=moving_tensor,
        fixed_box=fixed_box,
        fixed_grid=fixed.grid,
        moving_grid=moving.grid,
        prealign=np.asarray(prealign_affine, dtype=np.float64),
        fixed_mask=(None if fixed_mask_v is None
                    else resize_to_lattice(fixed_mask_v.data, size, "nearest")),
        moving_mask=moving_lattice_mask,
    )


def check_options(**options) -> None:
    """Refuse (ValueError, before any work) a registration option outside its choices in
    :mod:`ugi_bids.engine.options`; keywords: ``fixed_modality``, ``moving_modality``,
    ``masking``, ``prealign``, ``prealign_dof``, ``io_similarity``."""
    choices = {"fixed_modality": MODALITIES, "moving_modality": MODALITIES,
               "masking": MASKING_MODES, "prealign": PREALIGN_MODES,
               "prealign_dof": PREALIGN_DOFS, "io_similarity": SIMILARITIES}
    for name, value in options.items():
        if value not in choices[name]:
            raise ValueError(f"{name.replace('_', ' ')} must be one of "
                             f"{', '.join(map(str, choices[name]))}, got {value!r}")


class Registrar:
    """A loaded network that registers pairs, one after another, in world coordinates.

    Load it once and call :meth:`register` for every pair (cohorts): the weights are read and
    checked once, and instance optimisation restores them after each pair.

    ``precision`` (:mod:`ugi_bids.engine.model.precision`): ``"float32"`` (default) runs the network
    in full float32 on every device; ``"tf32"`` lets a CUDA GPU use TF32 for convolutions
    (faster, maps differ by the amount measured in ``benchmarks/README.md``). On other devices
    it has no effect, and :attr:`precision` (recorded in the results' settings) says float32.

    ``io_checkpointing``: whether instance optimisation recomputes the U-Nets' activations in
    the backward pass (``"on"``: about 5.8 GB at 175^3 on a CPU), keeps them (``"off"``: about
    9.5 GB, each step about 15 % shorter on a CPU, 7 % on a GPU) or lets the engine choose
    (``"auto"``, default: on for the CPU, off on a GPU with room; see
    :func:`ugi_bids.engine.optimise.instance.io_checkpointing`). The maps are the same either way.
    """

    def __init__(self, model: str = DEFAULT_MODEL, weights=None, *, device=DEFAULT_DEVICE,
                 network_size: int = DEFAULT_NETWORK_SIZE, download: bool = False,
                 precision: str = DEFAULT_PRECISION,
                 io_checkpointing: str = DEFAULT_IO_CHECKPOINTING):
        from .model.weights import (
            load_network,  # here: keeps `import ugi_bids.engine` light
        )

        if int(network_size) < MIN_NETWORK_SIZE:
            raise ValueError(f"network grid must be at least {MIN_NETWORK_SIZE}^3 "
                             f"(got {network_size}); the released model uses 175")
        self.device = resolve_device(device)
        self.precision = effective_precision(precision, self.device)
        self.io_checkpointing = io_checkpointing
        self._checkpointing = checkpointing_setting(io_checkpointing)  # instance_optimise's form
        self.network_size = int(network_size)
        start = time.perf_counter()
        self.network, self.weights = load_network(model, weights, device=self.device,
                                                  download=download)
        fold_unets(self.network)  # the inference form of the weights, built once per load
        self.load_seconds = time.perf_counter() - start

    def register(self, fixed: Volume, moving: Volume, *, fixed_modality: str = DEFAULT_MODALITY,
                 moving_modality: str = DEFAULT_MODALITY, fixed_mask: Volume | None = None,
                 moving_mask: Volume | None = None, masking: str = DEFAULT_MASKING,
                 prealign: str = DEFAULT_PREALIGN, io_iterations: int = IO_STEPS,
                 io_similarity: str = DEFAULT_SIMILARITY, io_learning_rate: float = IO_LEARNING_RATE,
                 prealign_dof: int = DEFAULT_PREALIGN_DOF) -> RegistrationResult:
        """Register ``moving`` onto ``fixed``; returns both directions as world transforms.

        Parameters
        ----------
        fixed, moving : Volume
            Raw intensities; any orientation, field of view and voxel size.
        fixed_modality, moving_modality : {"mri", "ct"}
            Chooses the intensity window (see :mod:`ugi_bids.engine.preprocess`).
        fixed_mask, moving_mask : Volume, optional
            Masks on each image's grid (non-zero = inside). With ``masking="input"`` they are
            multiplied into the normalised images; with ``"loss"`` they restrict the IO
            similarity. Both feed the affine pre-alignment.
        prealign : {"none", "header", "affine"}
        prealign_dof : {6, 7, 9, 12}
            Degrees of freedom of the ``affine`` pre-alignment.
        io_iterations : int
            Instance-optimisation steps (0 = plain inference).
        io_similarity : {"lncc", "lncc2", "mind"}
        """
        check_options(fixed_modality=fixed_modality, moving_modality=moving_modality,
                      masking=masking, prealign=prealign, io_similarity=io_similarity)
        start = time.perf_counter()
        warnings = (check_registrable(fixed, fixed_modality, "fixed image")
                    + check_registrable(moving, moving_modality, "moving image"))
        fixed_inside = None if fixed_mask is None else binarise_mask(fixed_mask, fixed, "fixed mask")
        moving_inside = None if moving_mask is None else binarise_mask(moving_mask, moving,
                                                                        "moving mask")
        fixed_n = preprocess(fixed, fixed_modality, fixed_mask, masking == "input", "fixed image")
        moving_n = preprocess(moving, moving_modality, moving_mask, masking == "input",
                              "moving image")
        preprocess_s = time.perf_counter() - start
        return self._align_and_register(
            fixed_n, moving_n, prealign=prealign, fixed_mask=fixed_inside,
            moving_mask=moving_inside,
            loss_masks=(fixed_inside, moving_inside) if masking == "loss" else None,
            io_iterations=io_iterations, io_similarity=io_similarity,
            io_learning_rate=io_learning_rate, timings={"preprocess_s": preprocess_s},
            prealign_dof=prealign_dof,
            settings={"fixed_modality": fixed_modality, "moving_modality": moving_modality,
                      "masking": masking if (fixed_mask is not None or moving_mask is not None)
                      else None, "input_warnings": warnings})

    def register_many(self, fixed: Volume, movings: Iterable[Volume | str | os.PathLike], *,
                      fixed_modality: str = DEFAULT_MODALITY,
                      moving_modality: str = DEFAULT_MODALITY,
                      fixed_mask: Volume | None = None, prealign: str = DEFAULT_PREALIGN,
                      io_iterations: int = IO_STEPS, io_similarity: str = DEFAULT_SIMILARITY,
                      io_learning_rate: float = IO_LEARNING_RATE,
                      prealign_dof: int = DEFAULT_PREALIGN_DOF) -> Iterator[RegistrationResult]:
        """Register every moving image onto one fixed image (a cohort onto a template), in
        this process, with the network loaded once.

        ``movings`` may hold volumes or NIfTI paths; paths are read one at a time, so a cohort
        of any length needs the memory of one pair. The fixed image is normalised (and its
        mask binarised) once. Yields one :class:`RegistrationResult` per moving image, in
        order, as :meth:`register` would return it (``timings["read_s"]`` adds the reading).
        """
        check_options(fixed_modality=fixed_modality, moving_modality=moving_modality,
                      prealign=prealign, io_similarity=io_similarity)
        fixed_inside = None if fixed_mask is None else binarise_mask(fixed_mask, fixed,
                                                                      "fixed mask")
        fixed_warnings = check_registrable(fixed, fixed_modality, "fixed image")
        fixed_n = preprocess(fixed, fixed_modality, fixed_mask, True, "fixed image")
        prealign_inside = (fixed_inside if fixed_inside is not None or prealign != "affine"
                           else prealign_mask(fixed_n, fixed_modality))
        prepared = (prealign_module.prepare_fixed(fixed_n, prealign_inside)
                    if prealign == "affine" else None)
        for moving in movings:
            start = time.perf_counter()
            if not isinstance(moving, Volume):
                moving = load_volume(moving)
            read_s = time.perf_counter() - start
            start = time.perf_counter()
            warnings = fixed_warnings + check_registrable(moving, moving_modality, "moving image")
            moving_n = preprocess(moving, moving_modality, None, False, "moving image")
            preprocess_s = time.perf_counter() - start
            yield self._align_and_register(
                fixed_n, moving_n, prealign=prealign, fixed_mask=fixed_inside, prepared=prepared,
                io_iterations=io_iterations, io_similarity=io_similarity,
                io_learning_rate=io_learning_rate, prealign_dof=prealign_dof,
                timings={"read_s": read_s, "preprocess_s": preprocess_s},
                settings={"fixed_modality": fixed_modality, "moving_modality": moving_modality,
                          "masking": "input" if fixed_mask is not None else None,
                          "input_warnings": warnings})

    def _align_and_register(self, fixed: Volume, moving: Volume, *, prealign: str,
                            fixed_mask: np.ndarray | None = None,
                            moving_mask: np.ndarray | None = None,
                            prepared: prealign_module.FixedSide | None = None,
                            loss_masks: tuple | None = None, io_iterations: int,
                            io_similarity: str, io_learning_rate: float, timings: dict,
                            settings: dict,
                            prealign_dof: int = DEFAULT_PREALIGN_DOF) -> RegistrationResult:
        """Pre-align two NORMALISED volumes, then :meth:`register_prealigned`; ``timings``
        (the caller's steps so far) and ``settings`` go onto the result ahead of its own."""
        start = time.perf_counter()
        affine, report = prealignment_report(
            fixed, moving, prealign, network_size=self.network_size, fixed_mask=fixed_mask,
            moving_mask=moving_mask, prepared=prepared, dof=prealign_dof,
            fixed_modality=settings["fixed_modality"], moving_modality=settings["moving_modality"],
            device=self.device)
        timings = {**timings, "prealign_s": time.perf_counter() - start}
        result = self.register_prealigned(
            fixed, moving, affine, keep_storage=prealign == "none", loss_masks=loss_masks,
            io_iterations=io_iterations, io_similarity=io_similarity,
            io_learning_rate=io_learning_rate)
        result.timings = {**timings, **result.timings}
        result.settings.update({"prealign": prealign, **settings})
        if report is not None:
            result.settings["prealign_report"] = report
        return result

    def register_prealigned(self, fixed: Volume, moving: Volume, prealign_affine: np.ndarray, *,
                            keep_storage: bool = False, loss_masks: tuple | None = None,
                            io_iterations: int = IO_STEPS, io_similarity: str = DEFAULT_SIMILARITY,
                            io_learning_rate: float = IO_LEARNING_RATE) -> RegistrationResult:
        """The network step on two NORMALISED volumes already related by ``prealign_affine``
        (fixed world -> moving world, RAS mm; see :func:`prealignment`).

        ``keep_storage`` must be True for the ``none`` pre-alignment (lattice over the stored
        grids, as the reference). ``loss_masks`` = (fixed mask, moving mask) boolean arrays on
        the volumes' grids (either may be None) restrict the IO similarity.
        """
        check_options(io_similarity=io_similarity)
        # Inference reuses freed pages (about 30 % faster); instance optimisation would
        # fragment the retained heap into a much higher peak, so it gets glibc's defaults.
        if io_iterations == 0:
            retain_freed_memory()
        else:
            release_freed_memory()
        timings = {}
        start = time.perf_counter()
        fixed_mask, moving_mask = loss_masks if loss_masks is not None else (None, None)
        pair = network_pair(fixed, moving, prealign_affine, size=self.network_size,
                            keep_storage=keep_storage, fixed_mask=fixed_mask,
                            moving_mask=moving_mask)
        timings["lattice_s"] = time.perf_counter() - start

        start = time.perf_counter()
        masks = {}
        if loss_masks is not None:
            masks = {"mask_a": _to(pair.moving_mask, self.device),
                     "mask_b": _to(pair.fixed_mask, self.device)}
        maps = instance_optimise(self.network, _to(pair.moving, self.device),
                                 _to(pair.fixed, self.device), steps=io_iterations,
                                 similarity=io_similarity, learning_rate=io_learning_rate,
                                 precision=self.precision,
                                 checkpointing=self._checkpointing,
                                 **masks)
        if self.device.type == "cuda":  # kernels run asynchronously: time them, not their launch
            torch.cuda.synchronize(self.device)
        timings["network_s"] = time.perf_counter() - start

        start = time.perf_counter()
        forward, inverse = transforms_from_maps(pair, maps, self.network_size)
        timings["transforms_s"] = time.perf_counter() - start
        settings = {
            "model": self.weights.model, "network_size": self.network_size,
            "io_iterations": io_iterations, "io_similarity": io_similarity,
            "io_learning_rate": io_learning_rate, "device": str(self.device),
            "precision": self.precision,
            "io_checkpointing": (None if maps.checkpointing is None
                                 else "on" if maps.checkpointing else "off"),
        }
        return RegistrationResult(forward, inverse, pair.prealign, maps, timings, settings)


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Host -> device copy; through page-locked memory (an asynchronous DMA) for CUDA."""
    if tensor is None or device.type != "cuda":
        return None if tensor is None else tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
