"""Running the cascade on a pair of network-grid images: plain inference and instance
optimisation (IO).

Images are (1, 1, N, N, N) tensors in tensor layout on the same network lattice; ``image_a`` is
the moving image A and ``image_b`` the fixed image B. Maps are returned on the identity lattice
in normalised coordinates:

* ``phi_ab`` maps B-lattice points to A-lattice points: ``warp(A, phi_ab) ~ B`` (resamples the
  moving image onto the fixed one);
* ``phi_ba`` is the same network with the inputs swapped: ``warp(B, phi_ba) ~ A``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model.fast_inference import cascade_map, cascade_transform, drop_folded_unets
from ..model.network import CoordinateMap, FunctionFromVectorField, identity_grid, warp
from ..model.precision import check_precision, network_precision
from ..options import (DEFAULT_PRECISION, DEFAULT_SIMILARITY, IO_CHECKPOINTING, IO_LEARNING_RATE,
                       IO_STEPS)
from .similarity import SimilarityFn, get_similarity
from .snapshot import WeightSnapshot

LOGGER = logging.getLogger(__name__)

#: Instance-optimisation defaults of the published tool.
GRADICON_LAMBDA = 1.5
GRADICON_DELTA = 1e-3
#: Extra memory (bytes) that one IO step at 175^3 holds when the U-Nets keep their activations
#: instead of recomputing them (activation checkpointing off), and the step's peak with
#: checkpointing on; both measured (benchmarks/README.md) and scaled with the voxel count.
IO_ACTIVATIONS_BYTES_175 = 4.0e9
IO_CHECKPOINTED_PEAK_BYTES_175 = 5.0e9


@dataclass
class PairLoss:
    """Components of the uniGradICON training/IO objective for one pair (floats)."""

    total: float
    inverse_consistency: float
    similarity: float


@dataclass
class PairMaps:
    """Output of the cascade for one pair, on the identity lattice (1, 3, N, N, N)."""

    phi_ab: torch.Tensor
    phi_ba: torch.Tensor
    losses: list = field(default_factory=list)  # PairLoss per IO step, then the final one
    seconds: float = 0.0
    checkpointing: bool | None = None  # IO only: whether the U-Nets recomputed activations


def _map_pair(cascade: nn.Module, image_a, image_b) -> tuple[CoordinateMap, CoordinateMap]:
    if not torch.is_grad_enabled():  # evaluation only: the folded U-Nets, same maps
        return (cascade_transform(cascade, image_a, image_b),
                cascade_transform(cascade, image_b, image_a))
    return cascade(image_a, image_b), cascade(image_b, image_a)


def gradicon_penalty(phi_ab: CoordinateMap, phi_ba: CoordinateMap, identity: torch.Tensor,
                     delta: float = GRADICON_DELTA) -> torch.Tensor:
    """GradICON: mean squared finite-difference Jacobian of the inverse-consistency error
    ``x - phi_ab(phi_ba(x))``, summed over the three axes.

    Sample points are ``identity + 2 randn / N`` on every second lattice point; the normal draws
    come from torch's global generator with the full lattice shape (as in the reference, so that
    a seed reproduces its numbers). On CUDA they come from the device's generator instead:
    drawing 3 N^3 numbers on the host and copying them over would be a CPU step inside every
    GPU iteration (``torch.manual_seed`` seeds both generators).
    """
    if identity.device.type == "cuda":
        noise = torch.randn(*identity.shape, device=identity.device).to(identity.dtype)
    else:
        noise = torch.randn(*identity.shape).to(identity.device, identity.dtype)
    points = (identity + 2 * noise / identity.shape[-1])[:, :, ::2, ::2, ::2]
    error = points - phi_ab(phi_ba(points))
    penalty = 0.0
    for axis in range(3):
        step = torch.zeros(1, 3, 1, 1, 1, device=identity.device, dtype=identity.dtype)
        step[0, axis] = delta
        error_shifted = points + step - phi_ab(phi_ba(points + step))
        penalty = penalty + torch.mean(((error - error_shifted) / delta) ** 2)
    return penalty


def pair_objective(cascade: nn.Module, image_a, image_b, similarity: SimilarityFn,
                   lmbda: float = GRADICON_LAMBDA, mask_a=None, mask_b=None):
    """The uniGradICON objective: sim(A o phi_ab, B) + sim(B o phi_ba, A) + lambda GradICON.

    Returns (total loss tensor, PairLoss, phi_ab on the lattice, phi_ba on the lattice).
    """
    phi_ab, phi_ba = _map_pair(cascade, image_a, image_b)
    identity = identity_grid(image_a.shape[2:], image_a.device, image_a.dtype)
    field_ab = phi_ab(identity, is_identity=True)
    field_ba = phi_ba(identity, is_identity=True)
    warped_a = warp(image_a, field_ab, padding="zeros")
    warped_b = warp(image_b, field_ba, padding="zeros")
    sim = similarity(warped_a, image_b, mask_b) + similarity(warped_b, image_a, mask_a)
    icon = gradicon_penalty(phi_ab, phi_ba, identity)
    total = lmbda * icon + sim
    record = PairLoss(float(total.detach()), float(icon.detach()), float(sim.detach()))
    return total, record, field_ab, field_ba


@torch.no_grad()
def infer_maps(cascade: nn.Module, image_a: torch.Tensor, image_b: torch.Tensor, *,
               fast: bool = True, precision: str = DEFAULT_PRECISION) -> PairMaps:
    """Both directions without instance optimisation, one after the other (half the memory of
    a batch of two).

    ``fast`` evaluates the cascade with folded U-Nets and threaded sampling
    (:func:`ugi_bids.engine.model.fast_inference.cascade_map`); ``False`` calls the module tree
    as the reference does. Both give the same maps up to float32 rounding. ``precision``: see
    :mod:`ugi_bids.engine.model.precision` (matters on CUDA only).
    """
    start = time.perf_counter()
    with network_precision(image_a.device, precision):
        if fast:
            phi_ab = cascade_map(cascade, image_a, image_b)
            phi_ba = cascade_map(cascade, image_b, image_a)
        else:
            identity = identity_grid(image_a.shape[2:], image_a.device, image_a.dtype)
            phi_ab = cascade(image_a, image_b)(identity, is_identity=True)
            phi_ba = cascade(image_b, image_a)(identity, is_identity=True)
    return PairMaps(phi_ab, phi_ba, seconds=time.perf_counter() - start)


def set_checkpointing(cascade: nn.Module, enabled: bool) -> None:
    """Activation checkpointing of every U-Net (see ``FunctionFromVectorField.checkpoint``)."""
    for module in cascade.modules():
        if isinstance(module, FunctionFromVectorField):
            module.checkpoint = enabled


def io_checkpointing(device: torch.device, shape) -> bool:
    """Whether instance optimisation on a ``shape`` (3 ints) network lattice should recompute the
    U-Nets' activations (slower, less memory) on ``device``.

    On a GPU it keeps them (no second forward pass) when the memory this process can still get,
    free device memory plus its own cached blocks, holds the step's whole peak with them kept,
    with 25 % to spare. On the CPU it always recomputes them: keeping them would lift the step's
    peak from about 5.8 to 9.5 GB at 175^3 for a step about 15 % shorter.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return True
    voxels = float(shape[0]) * shape[1] * shape[2] / 175.0 ** 3
    need = (IO_CHECKPOINTED_PEAK_BYTES_175 + IO_ACTIVATIONS_BYTES_175) * voxels * 1.25
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + cached < need


def checkpointing_setting(name: str) -> bool | None:
    """``"auto"``, ``"on"`` or ``"off"`` (:data:`IO_CHECKPOINTING`) as the ``checkpointing``
    argument of :func:`instance_optimise`; anything else is a ValueError."""
    if name not in IO_CHECKPOINTING:
        raise ValueError(f"IO checkpointing must be one of {tuple(IO_CHECKPOINTING)}, "
                         f"not {name!r}")
    return IO_CHECKPOINTING[name]


def instance_optimise(cascade: nn.Module, image_a: torch.Tensor, image_b: torch.Tensor, *,
                      steps: int = IO_STEPS, similarity: str = DEFAULT_SIMILARITY,
                      learning_rate: float = IO_LEARNING_RATE, lmbda: float = GRADICON_LAMBDA,
                      mask_a: torch.Tensor | None = None,
                      mask_b: torch.Tensor | None = None,
                      checkpointing: bool | None = None,
                      precision: str = DEFAULT_PRECISION) -> PairMaps:
    """Fine-tune all network weights on this pair (Adam), return the maps of the tuned network,
    and restore the original weights (pairs never leak into each other).

    ``steps == 0`` is plain inference. BatchNorm stays in eval mode throughout. Losses of every
    step (before its update) and of the final evaluation are logged and returned.

    The weights are kept channels-last (the fast layout for 3-D convolutions and their
    gradients); ``checkpointing`` recomputes each U-Net's activations during the backward pass
    instead of storing them (same gradients, much less memory, one more forward pass); None
    (the default) lets :func:`io_checkpointing` decide from the device and its free memory.
    ``precision``: see :mod:`ugi_bids.engine.model.precision` (matters on CUDA only).
    """
    if steps < 0:
        raise ValueError("IO steps must be >= 0")
    check_precision(precision)
    if steps == 0:
        return infer_maps(cascade, image_a, image_b, precision=precision)
    if learning_rate <= 0:
        raise ValueError("IO learning rate must be positive")
    sim_fn = get_similarity(similarity)
    start = time.perf_counter()
    saved = WeightSnapshot(cascade)
    drop_folded_unets(cascade)
    cascade.eval()
    cascade.to(memory_format=torch.channels_last_3d)
    chosen = checkpointing is None
    if chosen:
        checkpointing = io_checkpointing(image_a.device, image_a.shape[2:])
    LOGGER.info("IO: activation checkpointing %s", "on" if checkpointing else "off")
    set_checkpointing(cascade, checkpointing)
    optimiser = torch.optim.Adam(cascade.parameters(), lr=learning_rate)
    losses = []

    def gradients(optimiser: torch.optim.Optimizer) -> PairLoss:
        optimiser.zero_grad()
        total, record, _, _ = pair_objective(cascade, image_a, image_b, sim_fn, lmbda,
                                             mask_a, mask_b)
        total.backward()
        return record

    try:
        with network_precision(image_a.device, precision):
            for step in range(steps):
                try:
                    record = gradients(optimiser)
                except torch.OutOfMemoryError:
                    if not chosen or checkpointing:
                        raise
                    record = None  # retried below, once the failed graph is freed
                if record is None:
                    # Another process (``--gpu-procs``) may have taken the memory the choice
                    # counted on: recompute the activations from here on and redo the step.
                    LOGGER.warning("IO ran out of GPU memory keeping the U-Nets' activations; "
                                   "recomputing them from now on (slower, less memory)")
                    checkpointing = True
                    set_checkpointing(cascade, True)
                    optimiser.zero_grad(set_to_none=True)
                    if image_a.device.type == "cuda":
                        torch.cuda.empty_cache()
                    record = gradients(optimiser)
                optimiser.step()
                losses.append(record)
                LOGGER.info("IO step %d/%d: loss %.6f (similarity %.6f, GradICON %.6f)",
                            step + 1, steps, record.total, record.similarity,
                            record.inverse_consistency)
            # The optimiser's moments and the gradients (3x the weights) are not needed any more.
            optimiser.zero_grad(set_to_none=True)
            del optimiser
            with torch.no_grad():
                _, record, phi_ab, phi_ba = pair_objective(cascade, image_a, image_b, sim_fn,
                                                           lmbda, mask_a, mask_b)
            losses.append(record)
            LOGGER.info("IO done: final loss %.6f", record.total)
    finally:
        set_checkpointing(cascade, False)
        saved.restore()
        saved.close()
        for parameter in cascade.parameters():
            parameter.grad = None
    return PairMaps(phi_ab, phi_ba, losses, time.perf_counter() - start, checkpointing)
