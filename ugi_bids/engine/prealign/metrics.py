"""Similarities of the pre-alignment (losses: lower is better): Mattes mutual information with
cubic B-spline Parzen windows, and global normalised cross-correlation."""

from __future__ import annotations

import torch


def bspline_memberships(values: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cubic B-spline Parzen memberships of intensities in [0, 1] (Mattes et al. 2003).

    Intensity ``v`` sits at bin coordinate ``u = v (bins - 1)``; it contributes to the 4 bins
    ``floor(u) - 1 .. floor(u) + 2`` with weights ``beta3(u - bin)`` (summing to one). Returns
    ``(index, weight)``, both (N, 4): histogram index (offset by one, so the histogram has
    ``bins + 3`` entries) and weight, differentiable in ``values``.
    """
    u = values.clamp(0.0, 1.0) * (bins - 1)
    base = torch.floor(u).detach().clamp(0, bins - 2)
    offsets = torch.arange(-1, 3, dtype=u.dtype, device=u.device)
    distance = (u[:, None] - (base[:, None] + offsets[None, :])).abs()
    inner = (4.0 - 6.0 * distance ** 2 + 3.0 * distance ** 3) / 6.0
    outer = (2.0 - distance).clamp_min(0.0) ** 3 / 6.0
    weight = torch.where(distance < 1.0, inner, outer)
    index = (base[:, None] + offsets[None, :] + 1).long()
    return index, weight


def mutual_information_loss(fixed_memberships: tuple[torch.Tensor, torch.Tensor],
                            moving_values: torch.Tensor, weights: torch.Tensor,
                            bins: int) -> torch.Tensor:
    """Negative Parzen-window mutual information (nats) of weighted samples.

    ``fixed_memberships``: :func:`bspline_memberships` of the fixed samples; ``moving_values``
    in [0, 1]; ``weights`` (N,) non-negative sample weights.
    """
    f_index, f_weight = fixed_memberships
    m_index, m_weight = bspline_memberships(moving_values, bins)
    size = bins + 3
    flat_index = (f_index[:, :, None] * size + m_index[:, None, :]).reshape(-1)
    contrib = ((f_weight * weights[:, None])[:, :, None] * m_weight[:, None, :]).reshape(-1)
    joint = torch.zeros(size * size, dtype=contrib.dtype, device=contrib.device).index_add(
        0, flat_index, contrib)
    joint = joint.reshape(size, size) / weights.sum().clamp_min(1e-12)
    pf = joint.sum(dim=1, keepdim=True)
    pm = joint.sum(dim=0, keepdim=True)
    eps = 1e-10
    mi = (joint * (torch.log(joint + eps) - torch.log(pf + eps) - torch.log(pm + eps))).sum()
    return -mi


def ncc_loss(fixed_values: torch.Tensor, moving_values: torch.Tensor,
             weights: torch.Tensor) -> torch.Tensor:
    """One minus the weighted global normalised cross-correlation (0 = perfect)."""
    w = weights / weights.sum().clamp_min(1e-12)
    f = fixed_values - (w * fixed_values).sum()
    m = moving_values - (w * moving_values).sum()
    cov = (w * f * m).sum()
    var = (w * f * f).sum() * (w * m * m).sum()
    return 1.0 - cov / torch.sqrt(var + 1e-12)
