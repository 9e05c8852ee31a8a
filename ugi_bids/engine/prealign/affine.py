"""World-space pre-alignment (rigid, then 12-dof affine) before the deformable network.

The published uniGradICON tool aligns voxel grids, not anatomy (see the spec): it ignores origins
and direction cosines. This module finds, in world RAS millimetres, the affine that brings the
moving anatomy onto the fixed anatomy, so that the network only has to model residual non-linear
deformation.

Direction
---------
Every affine returned here is a *pull* map ``A``: a 4x4 matrix in world RAS mm that maps points
of the FIXED space to points of the MOVING space. Resampling the moving image at ``A(x)`` for every
fixed point ``x`` lands it on the fixed image (what ITK/ANTs call the moving->fixed "transform").

Method (``mode="affine"``)
--------------------------
1. Centre-of-mass initialisation: a translation taking the fixed image's intensity centre of mass
   to the moving one's. This absorbs arbitrary origin offsets (hundreds of millimetres).
2. Multi-resolution optimisation on a world-axis-aligned pyramid (default 8, 4, 2 mm isotropic).
   Each image is smoothed with a Gaussian matched to the target spacing and resampled onto a
   lattice aligned with the world axes that covers its field of view. Only world coordinates are
   used, so how the voxels are stored (RAS, LPS, PIR, oblique) cannot change the result beyond
   floating-point rounding.
3. At every level, sample points are drawn in the fixed image (on and near the object, at most
   ``max_samples``, jittered off the lattice; a deterministic random draw), mapped through ``A``,
   and the moving level image is sampled there trilinearly (``torch.nn.functional.grid_sample``).
   Rigid (6 dof) at the coarsest level, then full affine (12 dof) at every level; Adam with a
   cosine-decaying step, a fixed number of steps (deterministic, predictable run time).
4. Parametrisation: ``A(x) = M (x - c) + c + t`` about the fixed centre of mass ``c``. Translation
   ``t`` is in mm; rotation vectors and matrix increments are scaled by ``R``, the RMS radius of
   the fixed object about ``c``, so that a unit change of any parameter moves the object by about
   1 mm. This makes one step size right for all parameters.

Similarity
----------
``metric="auto"`` (the default) is Mattes-style mutual information: a joint histogram of 32 bins
with cubic B-spline Parzen windows, differentiable in the moving sample positions. MI needs no
assumption that intensities are linearly related, so it works within and across modalities (T1
vs T2, MR vs CT) and with any intensity scale; the caller need not say which case it is in (on
the 2009c brain against a contrast-inverted copy, MI recovers a known affine to 0.25 mm, NCC is
off by 6.7 mm). ``metric="ncc"`` (global normalised cross-correlation) is available when both
images are known to share contrast. Samples are weighted by the moving field of view (and
masks), so regions the moving image does not cover do not count as "dark" tissue.

Torch runs on one CPU thread here by default (``PrealignSettings.threads``): the tensors are
small, and on a busy 2-core machine two threads were 4-5x slower than one.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ...errors import InputDataError
from ..kernels import mattes_mi
from ..options import DEFAULT_PREALIGN, DEFAULT_PREALIGN_DOF, PREALIGN_DOFS
from ..spatial.geometry import apply_affine
from ..spatial.volume import Volume
from .metrics import bspline_memberships, mutual_information_loss, ncc_loss
from .moments import (
    centre_of_mass,
    check_finite,
    com_weights,
    intensity_window,
    mask_on_grid,
    unit_intensities,
)
from . import search
from .pyramid import PyramidLevel, sampling_region, world_pyramid

logger = logging.getLogger(__name__)

#: Modes implemented here ("none" is handled by the caller).
MODES = ("header", "affine")
#: Similarity names accepted by :func:`prealign`.
METRICS = ("auto", "mi", "ncc")
#: A fit whose scales leave this range, or whose shear exceeds MAX_SHEAR, falls back to a
#: similarity (then rigid) fit: no head or chest is 1.5 times another along one axis only.
PLAUSIBLE_SCALE = (0.67, 1.5)
MAX_SHEAR = 0.2




@dataclass
class PrealignSettings:
    """Tuning of :func:`prealign` ``mode="affine"``.

    ``spacings`` (mm, coarse to fine); ``rigid_iterations`` at the coarsest level before the
    affine stage; ``affine_iterations`` per level; ``step_fraction``: Adam's initial step as a
    fraction of the level spacing (parameters are in ~mm of displacement), decaying (cosine) to
    ``final_step_ratio`` of it; ``max_samples`` fixed points per level (deterministic random
    subset, ``seed``) taken within ``margin_voxels`` of the fixed object; levels coarser than the
    fixed object's RMS radius / ``min_radius_voxels`` are skipped (never the finest); ``bins``
    for mutual information; ``threads``: torch CPU threads during the optimisation (the tensors
    are small, so a second thread gains little, and on a busy 2-core machine two threads were
    4-5x slower than one; the caller's setting is restored afterwards).
    """

    spacings: tuple[float, ...] = (8.0, 4.0, 2.0)
    rigid_iterations: int = 40
    affine_iterations: tuple[int, ...] = (40, 30, 20)
    step_fraction: float = 0.25
    final_step_ratio: float = 0.02
    max_samples: int = 30000
    margin_voxels: int = 2
    min_radius_voxels: float = 4.0
    bins: int = 32
    seed: int = 0
    threads: int = 1
    search: bool = True
    search_samples: int = 3000
    search_limit_deg: float = 60.0
    search_step_deg: float = 30.0
    search_keep: int = 3
    device: str = "cpu"


@dataclass
class PrealignResult:
    """Outcome of :func:`estimate_prealignment`.

    ``affine``: 4x4, world RAS mm, FIXED points -> MOVING points (pull). ``costs``: final loss per
    stage, as ``(label, cost)``.
    """

    affine: np.ndarray
    metric: str
    costs: list = field(default_factory=list)
    start: str = "com"
    starts: list = field(default_factory=list)
    dof: int = DEFAULT_PREALIGN_DOF
    fallback: str | None = None
    rigid: tuple | None = None

    def report(self) -> dict:
        """What the provenance records: the metric and its final value, the degrees of
        freedom asked for, the start that won, and the fallback taken (or None)."""
        scales, shear = affine_shape(self.affine[:3, :3])
        return {"metric": self.metric, "final_cost": round(float(self.costs[-1][1]), 6),
                "dof": self.dof, "start": self.start, "fallback": self.fallback,
                "scales": [round(float(s), 4) for s in scales],
                "max_shear": round(float(shear), 4)}


@dataclass
class _LevelData:
    points: torch.Tensor        # (N, 3) fixed points relative to the centre c, mm (float32)
    fixed_values: torch.Tensor  # (N,) in [0, 1]
    fixed_memberships: tuple | None
    fixed_weights: torch.Tensor  # (N,)
    moving: torch.Tensor        # (1, 2, ni, nj, nk): values, weight
    offset: np.ndarray          # c - moving lattice origin, mm (float64)
    spacing: float              # moving lattice spacing, mm
    shape: tuple                # moving lattice shape
    bins: int                   # mutual-information histogram bins


def _level_data(fixed: PyramidLevel, moving: PyramidLevel, centre: np.ndarray, metric: str,
                settings: PrealignSettings, rng: np.random.Generator) -> _LevelData | None:
    """Sample points and tensors for one level; None when the fixed image has too few points."""
    selected = np.flatnonzero(sampling_region(fixed, settings.margin_voxels).ravel())
    if selected.size < 64:
        return None
    if selected.size > settings.max_samples:
        selected = np.sort(rng.choice(selected, settings.max_samples, replace=False))
    # Jitter the samples off the lattice (uniform within a voxel): the fixed and moving lattices
    # share their spacing and axes, so on-lattice samples would all have the same sub-voxel
    # offset and give mutual information the well-known grid-aligned interpolation artefacts
    # (a rugged cost with spurious optima at whole-voxel shifts).
    index = np.stack(np.unravel_index(selected, fixed.grid.shape), axis=-1).astype(np.float64)
    index += rng.uniform(-0.5, 0.5, size=index.shape)
    points = apply_affine(fixed.grid.affine, index) - centre
    coords = index.T
    values = ndimage.map_coordinates(fixed.values, coords, order=1, mode="nearest")
    weights = ndimage.map_coordinates(fixed.weight, coords, order=1, mode="nearest")
    device = torch.device(settings.device)
    fixed_values = torch.from_numpy(values.astype(np.float32)).to(device)
    moving_tensor = torch.from_numpy(np.stack([moving.values, moving.weight]))[None]
    return _LevelData(
        points=torch.from_numpy(points.astype(np.float32)).to(device),
        fixed_values=fixed_values,
        fixed_memberships=(bspline_memberships(fixed_values, settings.bins) if metric == "mi"
                           else None),
        fixed_weights=torch.from_numpy(weights.astype(np.float32)).to(device),
        moving=moving_tensor.float().to(device),
        offset=centre - moving.grid.affine[:3, 3],
        spacing=float(moving.grid.spacing[0]),
        shape=moving.grid.shape,
        bins=settings.bins,
    )


def _kernel_inputs(level: _LevelData) -> tuple:
    """The level's arrays as :class:`mattes_mi.MattesMI` reads them (numpy views, no copy)."""
    index, weight = level.fixed_memberships
    return (level.points.numpy(), level.moving[0].numpy(), index.numpy(), weight.numpy(),
            level.fixed_weights.numpy(), level.spacing, level.bins)


def _sample_moving(level: _LevelData, matrix: torch.Tensor, translation: torch.Tensor):
    """Moving values and weights at ``A(x)`` for the level's fixed points x."""
    offset = torch.from_numpy(level.offset.astype(np.float32)).to(level.points.device)
    mapped = level.points @ matrix.T + (offset + translation)   # mm from the lattice origin
    index = mapped / level.spacing
    size = torch.tensor([n - 1 for n in level.shape], dtype=index.dtype,
                        device=index.device).clamp_min(1)
    normalised = 2.0 * index / size - 1.0
    grid = normalised[:, [2, 1, 0]].reshape(1, -1, 1, 1, 3)
    sampled = F.grid_sample(level.moving, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=True)
    sampled = sampled.reshape(2, -1)
    return sampled[0], sampled[1]


def _loss(level: _LevelData, metric: str, matrix: torch.Tensor,
          translation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if metric == "mi" and mattes_mi.available() and level.points.device.type == "cpu":
        # The same loss and gradient as below, compiled (see mattes_mi): ~15x faster.
        shift = torch.from_numpy(level.offset.astype(np.float32)) + translation
        loss, total = mattes_mi.MattesMI.apply(matrix, shift, *_kernel_inputs(level))
        return loss, total / level.fixed_weights.sum()
    values, moving_weight = _sample_moving(level, matrix, translation)
    weights = level.fixed_weights * moving_weight
    if metric == "mi":
        loss = mutual_information_loss(level.fixed_memberships, values, weights,
                                       level.bins)
    else:
        loss = ncc_loss(level.fixed_values, values, weights)
    overlap = weights.sum() / level.fixed_weights.sum()
    return loss, overlap


def _skew(v: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    return torch.stack([torch.stack([zero, -v[2], v[1]]),
                        torch.stack([v[2], zero, -v[0]]),
                        torch.stack([-v[1], v[0], zero])])


def cosine_decay(k: int, iterations: int, final_ratio: float) -> float:
    """Step-size factor at iteration ``k``: 1 at the start, ``final_ratio`` at the end (cosine)."""
    phase = math.pi * k / max(iterations, 1)
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(phase))


def adam_update(param: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                count: int, rate: float, beta1: float = 0.9, beta2: float = 0.999,
                eps: float = 1e-8) -> None:
    """One in-place Adam step (Kingma & Ba) of ``param``; ``m``, ``v`` are its moment buffers.

    Written out rather than ``torch.optim.Adam``, whose first use imports torch._dynamo (seconds).
    """
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    m_hat = m / (1.0 - beta1 ** count)
    v_hat = v / (1.0 - beta2 ** count)
    param.sub_(rate * m_hat / (v_hat.sqrt() + eps))


#: The stage that fits each ``--prealign-dof``: 6 rigid, 7 similarity (one scale), 9 rigid and
#: a scale per axis, 12 full affine.
STAGE_OF_DOF = {6: "rigid", 7: "similarity", 9: "scaling", 12: "affine"}
#: Parameters (besides the translation) of each stage.
_STAGE_PARAMETERS = {"rigid": (3,), "similarity": (4,), "scaling": (6,), "affine": (3, 3)}


def _run_stage(level: _LevelData, metric: str, matrix0: np.ndarray, translation0: np.ndarray,
               radius: float, kind: str, iterations: int, step: float,
               final_ratio: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Adam on one level. Parameters are ~mm of displacement at ``radius`` from the centre.

    ``kind`` (``r``: rotation vector, ``s``: log scales, both in mm at ``radius``):
    rigid ``M = expm(skew(r / radius)) M0``; similarity ``M = exp(s / radius) expm(...) M0``;
    scaling ``M = expm(skew(r / radius)) M0 diag(exp(s / radius))`` (a scale along each fixed
    axis); affine ``M = M0 + D / radius``; always ``t = t0 + d``.
    Returns (M, t, initial loss, final loss).
    """
    device = level.points.device
    m0 = torch.from_numpy(matrix0.astype(np.float32)).to(device)
    t0 = torch.from_numpy(translation0.astype(np.float32)).to(device)
    p_matrix = torch.zeros(_STAGE_PARAMETERS[kind], device=device, requires_grad=True)
    p_shift = torch.zeros(3, device=device, requires_grad=True)

    def current():
        if kind == "affine":
            matrix = m0 + p_matrix / radius
        else:
            matrix = torch.linalg.matrix_exp(_skew(p_matrix[:3] / radius)) @ m0
            if kind == "similarity":
                matrix = torch.exp(p_matrix[3] / radius) * matrix
            elif kind == "scaling":
                matrix = matrix @ torch.diag(torch.exp(p_matrix[3:] / radius))
        return matrix, t0 + p_shift

    params = [p_matrix, p_shift]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    first = None
    best = (math.inf, None, None)
    for k in range(iterations + 1):
        loss, overlap = _loss(level, metric, *current())
        value = float(loss.detach())
        if first is None:
            first = value
            if float(overlap.detach()) < 0.01:
                raise InputDataError("fixed and moving images do not overlap after centre-of-mass "
                                     "initialisation; check the images or use pre-alignment "
                                     "'header'")
        if value < best[0]:
            best = (value, p_matrix.detach().clone(), p_shift.detach().clone())
        if k == iterations:
            break
        gradients = torch.autograd.grad(loss, params)
        rate = step * cosine_decay(k, iterations, final_ratio)
        with torch.no_grad():
            for p, g, (m, v) in zip(params, gradients, moments):
                adam_update(p, g, m, v, k + 1, rate)
    # Adam's steps do not shrink near an optimum; keep the best parameters seen (usually the last).
    with torch.no_grad():
        p_matrix.copy_(best[1])
        p_shift.copy_(best[2])
        matrix, translation = current()
    return (matrix.double().cpu().numpy(), translation.double().cpu().numpy(), first, best[0])


def _object_radius(volume: Volume, weights: np.ndarray, centre: np.ndarray) -> float:
    """RMS distance (mm) of the weighted voxels from ``centre`` (world RAS); at least 10 mm.

    Computed exactly from the weighted second moments of the voxel indices (no coordinate array).
    """
    total = weights.sum()
    ranges = [np.arange(n, dtype=np.float64) for n in weights.shape]
    mean = np.empty(3)
    second = np.empty((3, 3))
    for a in range(3):
        marginal = weights.sum(axis=tuple(b for b in range(3) if b != a))
        mean[a] = (marginal * ranges[a]).sum() / total
        second[a, a] = (marginal * ranges[a] ** 2).sum() / total
    for a in range(3):
        for b in range(a + 1, 3):
            other = 3 - a - b
            pair = weights.sum(axis=other)  # axes (a, b) in order since a < b
            second[a, b] = second[b, a] = (ranges[a] @ pair @ ranges[b]) / total
    linear = volume.grid.affine[:3, :3]
    index_centre = np.linalg.solve(linear, centre - volume.grid.affine[:3, 3])
    cov = second - np.outer(mean, index_centre) - np.outer(index_centre, mean) \
        + np.outer(index_centre, index_centre)
    r2 = float(np.trace(linear @ cov @ linear.T))
    return float(max(np.sqrt(max(r2, 0.0)), 10.0))


def affine_shape(matrix: np.ndarray) -> tuple[np.ndarray, float]:
    """Scales and largest shear of a 3x3 matrix: ``M = Q U`` (QR, ``Q`` a rotation), the
    scales are ``U``'s diagonal and the shears its off-diagonal terms over their row's scale
    (ITK's and FSL's decomposition order: rotation, then scale, then shear)."""
    q, u = np.linalg.qr(matrix)
    signs = np.where(np.diag(u) < 0, -1.0, 1.0)
    u = u * signs[:, None]
    scales = np.diag(u).copy()
    shear = u / scales[:, None] - np.eye(3)
    return scales, float(np.abs(shear).max())


def implausible(matrix: np.ndarray) -> str | None:
    """Why an affine is not a plausible anatomical correspondence (a scale outside
    :data:`PLAUSIBLE_SCALE`, a shear above :data:`MAX_SHEAR`), or None when it is."""
    scales, shear = affine_shape(matrix)
    low, high = PLAUSIBLE_SCALE
    if scales.min() < low or scales.max() > high:
        return (f"scales {np.round(scales, 3).tolist()} outside {low}-{high}")
    if shear > MAX_SHEAR:
        return f"shear {shear:.3f} above {MAX_SHEAR}"
    return None


def _check_plausible(matrix: np.ndarray) -> None:
    """Refuse a non-finite, reflecting or wildly scaling 3x3 matrix (a diverged optimisation)."""
    singular = np.linalg.svd(matrix, compute_uv=False)
    if not np.all(np.isfinite(matrix)) or np.linalg.det(matrix) <= 0 or singular.min() < 0.33 \
            or singular.max() > 3.0:
        raise InputDataError("affine pre-alignment failed (implausible scaling/reflection "
                             f"{np.round(singular, 3).tolist()}); check the images or use "
                             "pre-alignment 'header'")


def compose(matrix: np.ndarray, translation: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """The 4x4 affine of ``x -> M (x - c) + c + t`` (world RAS mm)."""
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = centre + translation - matrix @ centre
    return affine


@contextmanager
def _torch_threads(threads: int):
    """Temporarily cap torch's intra-op CPU threads at ``threads`` (restored on exit)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(previous, threads)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class FixedSide:
    """What the pre-alignment needs of the fixed image alone (centre of mass, object radius,
    world pyramid): computed once by :func:`prepare_fixed` and reused for every moving image of
    a cohort registered to the same fixed image."""

    volume: Volume
    mask: np.ndarray | None
    centre: np.ndarray
    radius: float
    levels: list
    spacings: tuple


def prepare_fixed(fixed: Volume, fixed_mask=None,
                  settings: PrealignSettings | None = None) -> FixedSide:
    """The fixed image's share of :func:`estimate_prealignment` (see :class:`FixedSide`)."""
    settings = settings or PrealignSettings()
    check_finite(fixed, "fixed image")
    fmask = mask_on_grid(fixed_mask, fixed, "fixed mask")
    fixed_unit = unit_intensities(fixed.data, intensity_window(fixed.data, fmask, "fixed image"))
    centre = centre_of_mass(fixed, fmask)
    radius = _object_radius(fixed, com_weights(fixed.data, fmask, "fixed image"), centre)
    levels = world_pyramid(fixed, fixed_unit, fmask, settings.spacings)
    return FixedSide(fixed, fmask, centre, radius, levels, tuple(settings.spacings))


def _prepare_moving(moving: Volume, moving_mask, settings: PrealignSettings
                    ) -> tuple[np.ndarray, list]:
    """The moving image's centre of mass (world RAS mm) and world pyramid."""
    check_finite(moving, "moving image")
    mmask = mask_on_grid(moving_mask, moving, "moving mask")
    moving_unit = unit_intensities(moving.data,
                                   intensity_window(moving.data, mmask, "moving image"))
    return (centre_of_mass(moving, mmask),
            world_pyramid(moving, moving_unit, mmask, settings.spacings))


def estimate_prealignment(fixed: Volume, moving: Volume, *, fixed_mask=None, moving_mask=None,
                          metric: str = "auto", settings: PrealignSettings | None = None,
                          prepared: FixedSide | None = None,
                          dof: int = DEFAULT_PREALIGN_DOF) -> PrealignResult:
    """Centre-of-mass initialisation, a multi-start search, then multi-resolution rigid and
    ``dof`` (6, 7, 9 or 12) optimisation; an implausible 9- or 12-dof result (see
    :func:`implausible`) falls back to the similarity fit, then to the rigid one, with a
    warning (recorded in ``result.fallback``).

    Returns a :class:`PrealignResult` whose ``affine`` maps FIXED world RAS mm to MOVING world RAS
    mm (pull direction). See :func:`prealign` for the arguments; ``prepared`` (from
    :func:`prepare_fixed` with the same fixed image, mask and settings) skips the fixed image's
    share of the work.
    """
    settings = settings or PrealignSettings()
    if metric not in METRICS:
        raise ValueError(f"unknown pre-alignment metric {metric!r}; choose one of {METRICS}")
    metric = "mi" if metric == "auto" else metric
    if dof not in PREALIGN_DOFS:
        raise ValueError(f"unknown pre-alignment dof {dof!r}; choose one of {PREALIGN_DOFS}")
    if len(settings.affine_iterations) != len(settings.spacings):
        raise ValueError("settings.affine_iterations needs one entry per spacing")
    if prepared is None:
        # The two images' preparations are independent and spend their time in numpy/scipy,
        # which release the GIL: the fixed side runs beside the moving side (~0.5 s less).
        with ThreadPoolExecutor(max_workers=1) as pool:
            fixed_side = pool.submit(prepare_fixed, fixed, fixed_mask, settings)
            moving_centre, moving_levels = _prepare_moving(moving, moving_mask, settings)
            prepared = fixed_side.result()
    elif prepared.volume is not fixed or prepared.spacings != tuple(settings.spacings):
        raise ValueError("prepared fixed side belongs to another fixed image or settings")
    else:
        moving_centre, moving_levels = _prepare_moving(moving, moving_mask, settings)
    centre, radius = prepared.centre, prepared.radius
    matrix = np.eye(3)
    translation = moving_centre - centre
    logger.info("prealign: centre of mass fixed %s mm, moving %s mm (RAS); initial shift %s mm",
                np.round(centre, 1).tolist(), np.round(moving_centre, 1).tolist(),
                np.round(translation, 1).tolist())

    rng = np.random.default_rng(settings.seed)
    result = PrealignResult(affine=compose(matrix, translation, centre), metric=metric, dof=dof)
    with _torch_threads(settings.threads):
        matrix, translation = _optimise(prepared.levels, moving_levels, centre, radius, matrix,
                                        translation, metric, settings, rng, result,
                                        kind=STAGE_OF_DOF[dof])
        reason = implausible(matrix) if dof != 6 else None
        if reason is not None:
            rigid_matrix, rigid_translation = result.rigid
            fallback = "rigid (6-dof)"
            if dof != 7:
                similar = _optimise(prepared.levels, moving_levels, centre, radius,
                                    rigid_matrix, rigid_translation, metric, settings, rng,
                                    result, kind="similarity", rigid_done=True)
                if implausible(similar[0]) is None:
                    fallback = "similarity (7-dof)"
                    matrix, translation = similar
            if fallback.startswith("rigid"):
                matrix, translation = rigid_matrix, rigid_translation
            result.fallback = f"the {dof}-dof fit was implausible ({reason}): the {fallback} fit " \
                              "is used"
            logger.warning("prealign: %s", result.fallback)
    _check_plausible(matrix)
    result.affine = compose(matrix, translation, centre)
    logger.info("prealign: final %s cost %.5f; affine (fixed -> moving, RAS mm):\n%s", metric,
                result.costs[-1][1],
                np.array2string(result.affine, precision=4, suppress_small=True))
    return result


def _optimise(fixed_levels: list, moving_levels: list, centre: np.ndarray, radius: float,
              matrix: np.ndarray, translation: np.ndarray, metric: str,
              settings: PrealignSettings, rng: np.random.Generator,
              result: PrealignResult, kind: str = "affine", rigid_done: bool = False
              ) -> tuple[np.ndarray, np.ndarray]:
    """Coarse-to-fine: the start search and a rigid stage at the first usable level (unless
    ``rigid_done``: ``matrix``, ``translation`` are already a rigid fit), then a ``kind`` stage
    (see :data:`STAGE_OF_DOF`) at every level. Appends each stage's final cost to
    ``result.costs`` and the rigid fit to ``result.rigid``; returns the final (M, t) about
    ``centre``."""
    did_rigid = rigid_done
    for spacing, n_affine, flevel, mlevel in zip(settings.spacings, settings.affine_iterations,
                                                 fixed_levels, moving_levels):
        if spacing > radius / settings.min_radius_voxels and spacing != min(settings.spacings):
            logger.info("prealign: level %g mm skipped (object radius only %.1f mm)", spacing,
                        radius)
            continue
        level = _level_data(flevel, mlevel, centre, metric, settings, rng)
        if level is None:
            logger.info("prealign: level %g mm skipped (fixed image too small)", spacing)
            continue
        # Steps are ~mm of displacement; for a small object cap them at 5 % of its radius.
        step = min(settings.step_fraction * spacing, 0.05 * radius)
        if not did_rigid:
            if settings.search:
                # the search ends with the rigid stage of every start it keeps
                matrix, translation = _best_start(flevel, mlevel, level, centre, radius, matrix,
                                                  translation, metric, settings, rng, step,
                                                  result)
            else:
                matrix, translation, before, after = _run_stage(
                    level, metric, matrix, translation, radius, "rigid",
                    settings.rigid_iterations, step, settings.final_step_ratio)
                result.costs.append((f"{spacing:g}mm-rigid", after))
                logger.info("prealign: level %g mm rigid (%d samples, %d steps): %s %.5f -> "
                            "%.5f", spacing, level.points.shape[0], settings.rigid_iterations,
                            metric, before, after)
            result.rigid = (matrix.copy(), translation.copy())
            did_rigid = True
        matrix, translation, before, after = _run_stage(
            level, metric, matrix, translation, radius, kind, n_affine, step,
            settings.final_step_ratio)
        result.costs.append((f"{spacing:g}mm-{kind}", after))
        logger.info("prealign: level %g mm %s (%d samples, %d steps): %s %.5f -> %.5f",
                    spacing, kind, level.points.shape[0], n_affine, metric, before, after)
    if not did_rigid:
        raise InputDataError("fixed image is too small for affine pre-alignment; "
                             "use pre-alignment 'header'")
    return matrix, translation


def _level_points(level: PyramidLevel) -> tuple[np.ndarray, np.ndarray]:
    """World points (mm) and weights (intensity x usable weight) of a pyramid level's object."""
    weights = (level.values * level.weight).ravel()
    keep = weights > 0.05 * weights.max()
    index = np.argwhere(keep.reshape(level.values.shape)).astype(np.float64)
    return apply_affine(level.grid.affine, index), weights[keep].astype(np.float64)


def _best_start(flevel: PyramidLevel, mlevel: PyramidLevel, level: _LevelData,
                centre: np.ndarray, radius: float, matrix: np.ndarray, translation: np.ndarray,
                metric: str, settings: PrealignSettings, rng: np.random.Generator, step: float,
                result: PrealignResult) -> tuple[np.ndarray, np.ndarray]:
    """The multi-start search (:mod:`.search`) on the coarsest usable level: candidate poses
    scored with few samples, the best few (and the centre-of-mass start) refined by a rigid
    stage; returns the pose whose refined cost is lowest and records it in ``result``."""
    few = _level_data(flevel, mlevel, centre, metric,
                      replace(settings, max_samples=settings.search_samples), rng)

    def score(candidate: np.ndarray, shift: np.ndarray) -> tuple[float, float]:
        with torch.no_grad():
            loss, overlap = _loss(few, metric, torch.from_numpy((candidate @ matrix).astype(
                np.float32)).to(few.points.device),
                torch.from_numpy(shift.astype(np.float32)).to(few.points.device))
        return float(loss), float(overlap)

    fixed_points, fixed_weights = _level_points(flevel)
    moving_points, moving_weights = _level_points(mlevel)
    moments = search.moment_rotations(search.principal_axes(fixed_points, fixed_weights),
                                      search.principal_axes(moving_points, moving_weights))
    starts = search.search_starts(score, translation, radius=radius, moment_candidates=moments,
                                  limit_deg=settings.search_limit_deg,
                                  step_deg=settings.search_step_deg, keep=settings.search_keep)
    refined = []
    for start in starts:
        fitted = _run_stage(level, metric, start.matrix @ matrix, start.translation, radius,
                            "rigid", settings.rigid_iterations, step, settings.final_step_ratio)
        refined.append((fitted[3], start, fitted[0], fitted[1]))
        logger.info("prealign: start %s: %s %.5f (search) -> %.5f (rigid)", start.label, metric,
                    start.cost, fitted[3])
    cost, start, best_matrix, best_translation = min(refined, key=lambda item: item[0])
    result.costs.append((f"{level.spacing:g}mm-rigid", cost))
    result.start = start.label
    result.starts = [{"label": s.label, "search_cost": round(s.cost, 6),
                      "rigid_cost": round(c, 6)} for c, s, _, _ in refined]
    logger.info("prealign: start %s chosen (%s %.5f)", start.label, metric, cost)
    return best_matrix, best_translation


def prealign(fixed: Volume, moving: Volume, mode: str = DEFAULT_PREALIGN, *, fixed_mask=None,
             moving_mask=None, metric: str = "auto",
             settings: PrealignSettings | None = None,
             prepared: FixedSide | None = None,
             dof: int = DEFAULT_PREALIGN_DOF) -> np.ndarray:
    """World-space pre-alignment of ``moving`` to ``fixed``.

    Parameters
    ----------
    fixed, moving : Volume
        Images in any storage orientation, any intensity range (mapped robustly to [0, 1] here).
    mode : {"header", "affine"}
        "header": trust the headers, return the identity. "affine": centre-of-mass
        initialisation, then rigid and 12-dof affine optimisation (see the module docstring).
    fixed_mask, moving_mask : ndarray on the image's grid, or Volume, optional
        Where each image is meaningful (non-zero = inside). Restrict the samples and the centres
        of mass. An empty mask raises :class:`InputDataError`.
    metric : {"auto", "mi", "ncc"}
        "auto" = "mi" (Parzen mutual information, any modality pair); "ncc" for same-contrast
        images.
    settings : PrealignSettings, optional
        Pyramid and optimiser tuning.
    prepared : FixedSide, optional
        :func:`prepare_fixed` of this fixed image (cohorts: computed once).
    dof : {6, 7, 9, 12}
        Degrees of freedom of the fit (rigid, similarity, rigid + per-axis scale, affine).

    Returns
    -------
    (4, 4) ndarray, float64
        Affine in world RAS mm mapping FIXED-space points to MOVING-space points (pull
        direction): resampling ``moving`` at ``A @ x`` for fixed points ``x`` lands it on ``fixed``.

    Raises
    ------
    InputDataError
        Constant or non-finite image, empty mask, no overlap, or an implausible result.
    """
    if mode == "header":
        return np.eye(4)
    if mode != "affine":
        raise ValueError(f"unknown pre-alignment mode {mode!r}; choose one of {MODES}")
    return estimate_prealignment(fixed, moving, fixed_mask=fixed_mask, moving_mask=moving_mask,
                                 metric=metric, settings=settings, prepared=prepared,
                                 dof=dof).affine
