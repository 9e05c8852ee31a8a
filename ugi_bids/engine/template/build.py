"""Unbiased deformable templates with uniGradICON: :func:`build_template`.

One loop serves the sessions of a subject and the participants of a cohort (after
``antsMultivariateTemplateConstruction2.sh``, with uniGradICON in place of SyN):

1. **Affine average.** Every input is pre-aligned (world space) to a provisional frame, the
   input with the finest voxels (chosen by content, so the input order does not matter). The
   log-Euclidean mean ``M`` of those affines defines the template's world frame, so no input is
   the reference: the maps template -> input are ``A_i M^-1``, which average to the identity.
   The inputs are averaged into an axis-aligned grid that covers the content of every one of
   them (:func:`~.space.content_box`: their empty borders and corners left out).
2. **Iterations.** Every input is registered to the current template (pre-alignment +
   uniGradICON, both directions, one loaded network). The inputs, intensity-normalised and
   resampled into the template, are averaged (mean, or median). Then the shape update: with
   ``A_i (x + d_i(x))`` the map template -> input ``i``, the average is resampled through the
   inverse of the average map ``Abar (x + dbar(x))``: ``y -> u(Abar^-1 y)``, where ``u``
   composes the average displacement scaled by ``-gradient_step`` four times, as ANTs' script
   does (so the default 0.25 moves the template by about the whole inverse of ``dbar``). The
   template is thereby moved to the average shape and pose of its inputs.
3. **Final registrations.** Every input is registered to the final template; those maps are
   returned, so the transforms and the template match exactly.

Each round logs the convergence figure: the mean norm (mm) of the average displacement
``mean_i(T_i(x)) - x`` over the template's foreground (the residual bias of the template).

World coordinates are RAS millimetres; every transform is a pull map
(:mod:`ugi_bids.engine.spatial.transforms`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ..formats.itk import read_composite_h5, write_composite_h5
from ..formats.staging import staged_outputs
from ..options import (
    DEFAULT_MODALITY,
    DEFAULT_PREALIGN,
    DEFAULT_SIMILARITY,
    DEFAULT_TEMPLATE_AVERAGE,
    DEFAULT_TEMPLATE_GRADIENT_STEP,
    DEFAULT_TEMPLATE_ITERATIONS,
    IO_LEARNING_RATE,
    TEMPLATE_AVERAGES,
)
from ..preprocess import preprocess
from ..registrar import Registrar, prealignment
from ..spatial.geometry import Grid
from ..spatial.transforms import (
    DisplacementField,
    TransformChain,
    WorldTransform,
    compose,
)
from ..spatial.volume import Volume, load_volume
from ..spatial.warp import apply_transform, displacement_on_grid
from .affine_mean import affine_mean, affine_summary
from .space import average_into, content_box, covering_grid

LOGGER = logging.getLogger(__name__)

#: How many times the scaled average displacement is composed in a shape update (as in
#: antsMultivariateTemplateConstruction2.sh: four ``-t templatewarp``).
SHAPE_UPDATE_COMPOSITIONS = 4
#: The template's foreground, for the convergence figure: voxels above this fraction of its
#: 99th percentile (the intensities are normalised to about [0, 1]).
FOREGROUND_FRACTION = 0.1
#: Version of the resume cache's layout; a change makes older caches unused.
CACHE_VERSION = 2


@dataclass
class TemplateResult:
    """A template and how every input maps to it.

    ``template``: normalised intensities (about 0..1, float32) on a RAS grid covering every
    input. ``forward[i]`` maps TEMPLATE points to points of input ``i`` (it resamples input
    ``i`` onto the template: ``from-<input>_to-<template>_mode-image``); ``inverse[i]`` maps
    input ``i``'s points to template points. ``initial`` is the affine average the loop
    started from; ``history`` has one entry per registration round (the last is the final
    one): its ``mean_displacement_mm`` is the convergence figure.
    """

    template: Volume
    forward: list[WorldTransform]
    inverse: list[WorldTransform]
    history: list[dict] = field(default_factory=list)
    initial: Volume | None = None
    settings: dict = field(default_factory=dict)


def _as_volume(image: Volume | str | os.PathLike, index: int) -> Volume:
    return image if isinstance(image, Volume) else load_volume(image, f"template input {index}")


def _content_digest(volume: Volume) -> str:
    digest = hashlib.sha256()
    digest.update(np.asarray(volume.grid.shape, dtype=np.int64).tobytes())
    digest.update(np.asarray(volume.grid.affine, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(volume.data, dtype=np.float32).tobytes())
    return digest.hexdigest()


def provisional_frame(volumes: Sequence[Volume], digests: Sequence[str]) -> int:
    """The input whose world frame hosts the first affine average: the finest voxels, then
    the most voxels, then the content digest (so the choice does not depend on input order)."""
    def key(i):
        grid = volumes[i].grid
        return (round(float(abs(np.linalg.det(grid.affine[:3, :3]))), 6),
                -int(np.prod(grid.shape)), digests[i])
    return min(range(len(volumes)), key=key)


def foreground(template: Volume, fraction: float = FOREGROUND_FRACTION) -> np.ndarray:
    """Boolean mask of the template's foreground (above ``fraction`` of its 99th percentile)."""
    data = template.data
    positive = data[data > 0]
    if positive.size == 0:
        return np.zeros(data.shape, dtype=bool)
    return data > fraction * float(np.percentile(positive, 99))


def mean_displacement(forward: Sequence[WorldTransform], grid: Grid, mask: np.ndarray) -> dict:
    """The average map's displacement ``mean_i(T_i(x)) - x`` over ``mask`` on ``grid``: mean
    norm, RMS norm and 95th percentile (mm)."""
    total = np.zeros(tuple(grid.shape) + (3,), dtype=np.float64)
    for transform in forward:
        total += displacement_on_grid(transform, grid)
    norms = np.linalg.norm(total / len(forward), axis=-1)[mask]
    if norms.size == 0:
        return {"mean_displacement_mm": 0.0, "rms_displacement_mm": 0.0, "p95_displacement_mm": 0.0}
    return {"mean_displacement_mm": float(norms.mean()),
            "rms_displacement_mm": float(np.sqrt((norms ** 2).mean())),
            "p95_displacement_mm": float(np.percentile(norms, 95))}


def shape_update_map(forward: Sequence[WorldTransform], gradient_step: float
                     ) -> WorldTransform | TransformChain:
    """The pull map ``P`` of the shape update (see the module notes): ``y -> u(Abar^-1 y)``,
    where ``Abar`` is the mean of the maps' affines and ``u`` composes
    ``x -> x - gradient_step * dbar(x)`` :data:`SHAPE_UPDATE_COMPOSITIONS` times (``dbar``: the
    mean displacement field). It approximates the inverse of the average map
    ``Abar (x + dbar(x))``, so the maps composed with it, ``T_i(P(y))``, average to about ``y``
    (``compose(P, T_i)`` maps the updated template to input ``i``)."""
    steps = [WorldTransform(np.linalg.inv(affine_mean([t.affine for t in forward])))]
    fields = [t.field for t in forward if t.field is not None]
    if fields and gradient_step > 0:
        grid = fields[0].grid
        if any(f.grid.shape != grid.shape or not np.allclose(f.grid.affine, grid.affine)
               for f in fields):
            raise ValueError("the maps to one template must share its field lattice")
        vectors = np.zeros(fields[0].vectors.shape, dtype=np.float64)
        for f in fields:
            vectors += f.vectors
        vectors *= -gradient_step / len(forward)  # maps without a field add zero displacement
        step = WorldTransform(np.eye(4), DisplacementField(grid, vectors.astype(np.float32)))
        steps += [step] * SHAPE_UPDATE_COMPOSITIONS
    return compose(*steps)


def shape_update(average: Volume, forward: Sequence[WorldTransform], gradient_step: float
                 ) -> Volume:
    """The averaged image moved to the mean shape and pose of the inputs (see the module
    notes): resampled at ``P(y)`` for every voxel ``y`` of its grid, ``P`` the pull map of
    :func:`shape_update_map`."""
    return apply_transform(average, shape_update_map(forward, gradient_step), average.grid,
                           "linear", fill=0.0)


class _Cache:
    """Finished rounds on disk (``cache_dir/<digest>/``), so that a rerun with the same
    inputs and settings reuses every finished registration and template. Files are written
    under temporary names and renamed (:mod:`ugi_bids.engine.formats.staging`)."""

    def __init__(self, cache_dir: str | os.PathLike | None, key: dict):
        self.folder = None
        if cache_dir is None:
            return
        text = json.dumps(key, sort_keys=True)
        self.folder = Path(cache_dir) / hashlib.sha256(text.encode()).hexdigest()[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        with staged_outputs(self.folder) as staged:
            Path(staged.stage(self.folder / "settings.json")).write_text(text + "\n")

    def _template_path(self, k: int) -> Path:
        return self.folder / f"iter-{k:02d}_template.nii.gz"

    def _xfm_paths(self, k: int, i: int, io_steps: int) -> tuple[Path, Path]:
        # the instance-optimisation steps are in the name: the final round may use more than
        # the shape-update rounds, and a rerun with more iterations must not mistake one for
        # the other
        stem = f"iter-{k:02d}_io-{io_steps}_input-{i:04d}"
        return self.folder / f"{stem}_forward.h5", self.folder / f"{stem}_inverse.h5"

    def template(self, k: int) -> Volume | None:
        if self.folder is None or not self._template_path(k).exists():
            return None
        return load_volume(self._template_path(k), "cached template")

    def save_template(self, k: int, volume: Volume) -> None:
        if self.folder is not None:
            with staged_outputs(self.folder) as staged:
                nib.save(volume.to_nifti(), staged.stage(self._template_path(k)))

    def transforms(self, k: int, i: int, io_steps: int
                   ) -> tuple[WorldTransform, WorldTransform] | None:
        if self.folder is None:
            return None
        paths = self._xfm_paths(k, i, io_steps)
        if not all(p.exists() for p in paths):
            return None
        return read_composite_h5(paths[0]), read_composite_h5(paths[1])

    def save_transforms(self, k: int, i: int, io_steps: int, forward: WorldTransform,
                        inverse: WorldTransform) -> None:
        if self.folder is not None:
            forward_path, inverse_path = self._xfm_paths(k, i, io_steps)
            with staged_outputs(self.folder) as staged:
                write_composite_h5(forward, staged.stage(forward_path))
                write_composite_h5(inverse, staged.stage(inverse_path))


def build_template(images: Sequence[Volume | str | os.PathLike], registrar: Registrar, *,
                   iterations: int = DEFAULT_TEMPLATE_ITERATIONS,
                   gradient_step: float = DEFAULT_TEMPLATE_GRADIENT_STEP,
                   average: str = DEFAULT_TEMPLATE_AVERAGE, modality: str = DEFAULT_MODALITY,
                   prealign: str = DEFAULT_PREALIGN, io_iterations: int = 0,
                   io_similarity: str = DEFAULT_SIMILARITY,
                   io_learning_rate: float = IO_LEARNING_RATE,
                   final_io_iterations: int | None = None,
                   voxel_size: float | None = None,
                   cache_dir: str | os.PathLike | None = None) -> TemplateResult:
    """Build an unbiased deformable template of ``images`` (module notes have the algorithm).

    Parameters
    ----------
    images : sequence of Volume or NIfTI paths
        Raw images of one modality; any orientation, field of view, voxel size, obliquity.
        Paths are read when needed (a cohort needs the memory of a few images, with
        ``average="mean"``).
    registrar : Registrar
        The loaded network (its device, precision and grid are used as they are).
    iterations : int
        Shape-update iterations (each: one registration per input, average, update); a final
        round of registrations to the last template follows.
    gradient_step : float
        Shape-update step in (0, 1] (0 keeps the averaged shape: affine centring only).
    average : {"mean", "median"}
        How the resampled, intensity-normalised inputs are combined (over the inputs that
        cover each voxel).
    modality : {"mri", "ct"}
        Intensity model of the inputs (the template itself is registered as normalised MRI).
    prealign, io_iterations, io_similarity, io_learning_rate
        Registration settings of every round (see :meth:`Registrar.register`);
        ``io_iterations`` (instance-optimisation steps) applies to the shape-update rounds.
    final_io_iterations : int, optional
        Instance-optimisation steps of the final round, whose maps are returned (default
        ``io_iterations``): the template's shape needs only inference, the returned maps may
        want the refinement.
    voxel_size : float, optional
        Template voxel size (mm, isotropic); default the finest voxel dimension of the inputs.
    cache_dir : path, optional
        Where finished rounds are kept; a rerun with the same inputs and settings reuses them.

    Returns
    -------
    TemplateResult
    """
    if iterations < 0:
        raise ValueError(f"template iterations must be 0 or more, got {iterations}")
    if not 0 <= gradient_step <= 1:
        raise ValueError(f"template gradient step must be in [0, 1], got {gradient_step}")
    if average not in TEMPLATE_AVERAGES:
        raise ValueError(f"template average must be one of {', '.join(TEMPLATE_AVERAGES)}, "
                         f"got {average!r}")
    if not images:
        raise ValueError("a template needs at least one image")
    started = time.perf_counter()
    raw = [_as_volume(image, i) for i, image in enumerate(images)]
    normalised = [preprocess(v, modality, None, False, f"template input {i}")
                  for i, v in enumerate(raw)]
    settings = {"iterations": iterations, "gradient_step": gradient_step, "average": average,
                "modality": modality, "prealign": prealign, "io_iterations": io_iterations,
                "io_similarity": io_similarity, "inputs": len(raw),
                "final_io_iterations": (io_iterations if final_io_iterations is None
                                        else final_io_iterations),
                "shape_update_compositions": SHAPE_UPDATE_COMPOSITIONS}
    if len(raw) == 1:
        LOGGER.info("one input: the template is that image, with identity transforms")
        identity = WorldTransform(np.eye(4))
        return TemplateResult(normalised[0], [identity], [WorldTransform(np.eye(4))], [],
                              normalised[0], settings)

    digests = [_content_digest(v) for v in raw]
    spacing = float(voxel_size) if voxel_size else float(min(v.grid.spacing.min() for v in raw))
    settings["voxel_size_mm"] = spacing
    cache = _Cache(cache_dir, {
        "version": CACHE_VERSION, "input_sha256": digests, "model": registrar.weights.model,
        "weights_sha256": registrar.weights.sha256, "network_size": registrar.network_size,
        "precision": registrar.precision, "io_learning_rate": io_learning_rate,
        **{k: v for k, v in settings.items() if k not in ("iterations", "final_io_iterations")}})

    template = cache.template(0)
    if template is None:
        reference = provisional_frame(raw, digests)
        to_inputs = [np.eye(4) if i == reference else
                     prealignment(normalised[reference], normalised[i], prealign,
                                  network_size=registrar.network_size)
                     for i in range(len(raw))]
        mean = affine_mean(to_inputs)
        to_inputs = [a @ np.linalg.inv(mean) for a in to_inputs]
        grid = covering_grid([content_box(v) for v in normalised], to_inputs, spacing)
        # the header a NIfTI file stores (float32): every template has this grid, so a
        # resumed run registers against exactly the templates the first run used (a 1e-5 mm
        # change of the origin moves the pre-alignment by about 5e-4)
        grid = Grid(grid.shape, grid.affine.astype(np.float32).astype(np.float64))
        template, _ = average_into(grid, ((normalised[i], WorldTransform(to_inputs[i]))
                                          for i in range(len(raw))), average)
        cache.save_template(0, template)
    initial = template
    history: list[dict] = []
    for k in range(iterations + 1):
        round_started = time.perf_counter()
        io_steps = settings["final_io_iterations"] if k == iterations else io_iterations
        maps: list = [cache.transforms(k, i, io_steps) for i in range(len(raw))]
        reused = sum(m is not None for m in maps)
        todo = [i for i, m in enumerate(maps) if m is None]
        results = registrar.register_many(
            template, (raw[i] for i in todo), fixed_modality="mri", moving_modality=modality,
            prealign=prealign, io_similarity=io_similarity, io_learning_rate=io_learning_rate,
            io_iterations=io_steps)
        for i, result in zip(todo, results):
            maps[i] = (result.forward, result.inverse)
            cache.save_transforms(k, i, io_steps, result.forward, result.inverse)
        forward = [m[0] for m in maps]
        entry = {"iteration": k, "final": k == iterations, "reused_registrations": reused,
                 **mean_displacement(forward, template.grid, foreground(template)),
                 **{f"average_affine_{name}": value for name, value in affine_summary(
                     affine_mean([t.affine for t in forward]), template.grid.centre()).items()}}
        if k < iterations:
            next_template = cache.template(k + 1)
            if next_template is None:
                averaged, _ = average_into(template.grid, zip(normalised, forward), average)
                next_template = shape_update(averaged, forward, gradient_step)
                cache.save_template(k + 1, next_template)
        entry["seconds"] = time.perf_counter() - round_started
        history.append(entry)
        LOGGER.info("template round %d/%d%s: mean displacement of the average map %.3f mm "
                    "(RMS %.3f mm), average affine %.3f deg, scale %.4f; %.1f s%s",
                    k, iterations, " (final registrations)" if k == iterations else "",
                    entry["mean_displacement_mm"], entry["rms_displacement_mm"],
                    entry["average_affine_rotation_deg"],
                    entry["average_affine_scale_deviation"], entry["seconds"],
                    f", {reused} registrations reused" if reused else "")
        if k < iterations:
            template = next_template
    settings["seconds"] = time.perf_counter() - started
    return TemplateResult(template, [m[0] for m in maps], [m[1] for m in maps], history,
                          initial, settings)
