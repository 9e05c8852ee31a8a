"""Mattes mutual information of the pre-alignment, with its exact gradient, in one compiled pass.

The pre-alignment evaluates the same function ~130 times per pair: sample the moving level
image (two channels: intensity and field-of-view weight) trilinearly at ``A(x)`` for ~30,000
fixed points x, build the cubic-B-spline Parzen joint histogram, and take the negative mutual
information; then its gradient with respect to ``A``. Through autograd that costs ~18 ms per
evaluation on one thread; this kernel computes the loss and the analytic gradient in two passes
over the samples (~1 ms), in float64.

It is the same function as
:func:`ugi_bids.engine.prealign.metrics.mutual_information_loss` applied to the output of ``_sample_moving`` (``grid_sample``, trilinear, zeros outside,
``align_corners=True``); the tests compare value and gradient against that autograd path.

Geometry: the moving point of fixed sample ``p`` (mm, relative to the fixed centre) is
``q = M p + offset + t`` (mm from the moving lattice origin); its lattice index is
``q / spacing``. Gradients are returned for ``M`` (3x3) and ``t`` (3,), in loss units per unit of
``M`` and per mm.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import njit

#: Added inside the logarithms, as in the autograd version.
_EPS = 1e-10

if njit is not None:
    @njit(cache=True, nogil=True, inline="always")
    def _bspline(distance):  # pragma: no cover - compiled
        """Cubic B-spline at |distance| and its derivative with respect to |distance|."""
        if distance < 1.0:
            return ((4.0 - 6.0 * distance ** 2 + 3.0 * distance ** 3) / 6.0,
                    (-12.0 * distance + 9.0 * distance ** 2) / 6.0)
        if distance < 2.0:
            rest = 2.0 - distance
            return rest ** 3 / 6.0, -0.5 * rest ** 2
        return 0.0, 0.0

    @njit(cache=True, nogil=True, inline="always")
    def _lattice_position(matrix, points, shift, p, r, spacing, n):  # pragma: no cover
        """Lattice index along axis r of fixed sample p's moving point; grid_sample maps a
        one-voxel axis to index 0 whatever the coordinate."""
        if n == 1:
            return 0.0
        return (matrix[r, 0] * points[p, 0] + matrix[r, 1] * points[p, 1]
                + matrix[r, 2] * points[p, 2] + shift[r]) / spacing

    @njit(cache=True, nogil=True)
    def _mi_kernel(points, matrix, shift, spacing, moving, fixed_index, fixed_weight,
                   fixed_sample_weight, bins, gradient_matrix, gradient_shift):  # pragma: no cover
        """Returns (loss, overlap weight sum); writes dLoss/dM and dLoss/dt into the outputs."""
        count = points.shape[0]
        n0, n1, n2 = moving.shape[1], moving.shape[2], moving.shape[3]
        size = bins + 3
        values = np.empty(count)
        weights = np.empty(count)
        value_gradient = np.zeros((count, 3))    # d value / d index
        weight_gradient = np.zeros((count, 3))   # d sample weight / d index
        moving_index = np.empty((count, 4), dtype=np.int64)
        moving_weight = np.empty((count, 4))
        moving_slope = np.empty((count, 4))      # d membership / d value
        joint = np.zeros((size, size))
        total = 0.0
        for p in range(count):
            x0 = _lattice_position(matrix, points, shift, p, 0, spacing, n0)
            x1 = _lattice_position(matrix, points, shift, p, 1, spacing, n1)
            x2 = _lattice_position(matrix, points, shift, p, 2, spacing, n2)
            b0, b1, b2 = math.floor(x0), math.floor(x1), math.floor(x2)
            f0, f1, f2 = x0 - b0, x1 - b1, x2 - b2
            value = 0.0
            inside = 0.0
            for corner in range(8):
                a, b, c = corner >> 2, (corner >> 1) & 1, corner & 1
                i, j, k = int(b0) + a, int(b1) + b, int(b2) + c
                if i < 0 or j < 0 or k < 0 or i >= n0 or j >= n1 or k >= n2:
                    continue
                w0 = f0 if a else 1.0 - f0
                w1 = f1 if b else 1.0 - f1
                w2 = f2 if c else 1.0 - f2
                s0 = 1.0 if a else -1.0
                s1 = 1.0 if b else -1.0
                s2 = 1.0 if c else -1.0
                v = moving[0, i, j, k]
                m = moving[1, i, j, k]
                value += v * w0 * w1 * w2
                inside += m * w0 * w1 * w2
                value_gradient[p, 0] += v * s0 * w1 * w2
                value_gradient[p, 1] += v * w0 * s1 * w2
                value_gradient[p, 2] += v * w0 * w1 * s2
                weight_gradient[p, 0] += m * s0 * w1 * w2
                weight_gradient[p, 1] += m * w0 * s1 * w2
                weight_gradient[p, 2] += m * w0 * w1 * s2
            for r in range(3):
                if moving.shape[1 + r] == 1:
                    value_gradient[p, r] = 0.0
                    weight_gradient[p, r] = 0.0
                value_gradient[p, r] /= spacing
                weight_gradient[p, r] = weight_gradient[p, r] * fixed_sample_weight[p] / spacing
            sample_weight = fixed_sample_weight[p] * inside
            values[p] = value
            weights[p] = sample_weight
            total += sample_weight
            # Moving memberships: u = clamp(v, 0, 1) (bins - 1); clamp passes the gradient on
            # [0, 1] (inclusive), as torch.clamp does.
            slope_u = (bins - 1.0) if 0.0 <= value <= 1.0 else 0.0
            u = min(max(value, 0.0), 1.0) * (bins - 1)
            lower = min(max(math.floor(u), 0.0), bins - 2.0)
            for o in range(4):
                centre = lower + o - 1
                offset = u - centre
                distance = abs(offset)
                membership, derivative = _bspline(distance)
                sign = 1.0 if offset > 0 else (-1.0 if offset < 0 else 0.0)
                moving_index[p, o] = int(lower) + o
                moving_weight[p, o] = membership
                moving_slope[p, o] = derivative * sign * slope_u
            for f in range(4):
                row = fixed_index[p, f]
                contribution = sample_weight * fixed_weight[p, f]
                for o in range(4):
                    joint[row, moving_index[p, o]] += contribution * moving_weight[p, o]
        norm = max(total, 1e-12)
        fixed_marginal = np.zeros(size)
        moving_marginal = np.zeros(size)
        for a in range(size):
            for b in range(size):
                joint[a, b] /= norm
                fixed_marginal[a] += joint[a, b]
                moving_marginal[b] += joint[a, b]
        information = 0.0
        for a in range(size):
            for b in range(size):
                information += joint[a, b] * (math.log(joint[a, b] + _EPS)
                                              - math.log(fixed_marginal[a] + _EPS)
                                              - math.log(moving_marginal[b] + _EPS))
        # dLoss/dJoint (through the marginals too); loss = -information.
        slope = np.empty((size, size))
        mean_slope = 0.0
        for a in range(size):
            for b in range(size):
                j = joint[a, b]
                slope[a, b] = -(math.log(j + _EPS) + j / (j + _EPS)
                                - math.log(fixed_marginal[a] + _EPS)
                                - fixed_marginal[a] / (fixed_marginal[a] + _EPS)
                                - math.log(moving_marginal[b] + _EPS)
                                - moving_marginal[b] / (moving_marginal[b] + _EPS))
                mean_slope += slope[a, b] * j
        gradient_matrix[:, :] = 0.0
        gradient_shift[:] = 0.0
        clamped = total <= 1e-12
        for p in range(count):
            through_weight = 0.0   # sum_ab slope F_a M_b
            through_value = 0.0    # sum_ab slope F_a dM_b/dv
            for f in range(4):
                row = fixed_index[p, f]
                for o in range(4):
                    s = slope[row, moving_index[p, o]] * fixed_weight[p, f]
                    through_weight += s * moving_weight[p, o]
                    through_value += s * moving_slope[p, o]
            d_weight = (through_weight - (0.0 if clamped else mean_slope)) / norm
            d_value = through_value * weights[p] / norm
            for r in range(3):
                g = d_value * value_gradient[p, r] + d_weight * weight_gradient[p, r]
                gradient_shift[r] += g
                for c in range(3):
                    gradient_matrix[r, c] += g * points[p, c]
        return -information, total


class MattesMI(torch.autograd.Function):
    """``loss, overlap_weight = MattesMI.apply(matrix, shift, points, moving, fixed_index,
    fixed_weight, fixed_sample_weight, spacing, bins)``, differentiable in ``matrix`` (3x3) and
    ``shift`` (3,: the translation plus the fixed centre's offset from the moving lattice
    origin, mm); the other arguments are the level's arrays (``prealign._kernel_inputs``)."""

    @staticmethod
    def forward(ctx, matrix, shift, points, moving, fixed_index, fixed_weight,
                fixed_sample_weight, spacing, bins):
        gradient_matrix = np.zeros((3, 3))
        gradient_shift = np.zeros(3)
        loss, total = _mi_kernel(points, matrix.detach().double().numpy(),
                                 shift.detach().double().numpy(), float(spacing), moving,
                                 fixed_index, fixed_weight, fixed_sample_weight, int(bins),
                                 gradient_matrix, gradient_shift)
        ctx.save_for_backward(torch.from_numpy(gradient_matrix).to(matrix.dtype),
                              torch.from_numpy(gradient_shift).to(shift.dtype))
        return (torch.tensor(loss, dtype=matrix.dtype), torch.tensor(total, dtype=matrix.dtype))

    @staticmethod
    def backward(ctx, loss_grad, total_grad):
        gradient_matrix, gradient_shift = ctx.saved_tensors
        return (loss_grad * gradient_matrix, loss_grad * gradient_shift,
                None, None, None, None, None, None, None)


def available() -> bool:
    """Whether the compiled kernel can be used (numba installed)."""
    return njit is not None
