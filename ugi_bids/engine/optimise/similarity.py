"""Similarity measures for instance optimisation, as losses (lower is better).

All take ``warped`` and ``target`` tensors (B, 1, *S) on the network grid and an optional
``mask`` (same shape, non-zero = counted) that restricts the average to the target's mask
("loss masking").

* ``lncc``: 1 - mean local normalised cross-correlation, Gaussian window sigma 5 voxels
  (separable kernel of 21 taps).
* ``lncc2``: 1 - mean squared LNCC.
* ``mind``: mean squared difference of MIND-SSC descriptors (radius 2, dilation 2).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..kernels import separable

SimilarityFn = Callable[..., torch.Tensor]


def gaussian_kernel1d(kernel_size: int, sigma: float) -> torch.Tensor:
    """Normalised 1D Gaussian taps centred on the middle tap."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


def gaussian_window(sigma: float) -> torch.Tensor:
    """The LNCC window along one axis: ``int(4 sigma + 1)`` Gaussian taps (sigma in voxels)."""
    return gaussian_kernel1d(int(sigma * 4 + 1), sigma)


def _separable_blur(tensor: torch.Tensor, kernel: torch.Tensor, axes=(0, 1, 2),
                    compiled: bool = False) -> torch.Tensor:
    """Depthwise 1-D convolutions with ``kernel`` along the spatial ``axes`` in turn, zero
    padding ("same" size); ``compiled`` uses :mod:`ugi_bids.engine.kernels.separable` where it can
    (no autograd graph)."""
    if compiled and separable.supported(tensor, kernel):
        out = tensor
        for axis in axes:
            out = separable.convolve_axis(out, kernel, 2 + axis)
        return out
    channels = tensor.shape[1]
    out = tensor
    for axis in axes:
        shape = [1, 1, 1]
        shape[axis] = -1
        weight = kernel.view(1, 1, *shape).expand(channels, -1, -1, -1, -1)
        out = F.conv3d(out, weight, padding="same", groups=channels)
    return out


class _SymmetricBlur(torch.autograd.Function):
    """A blur whose operator is a symmetric matrix (odd length, mirror-symmetric taps, zero
    padding centred on the voxel), so its backward is the same blur of the gradient, along the
    axes in reverse order. Autograd's own backward of the depthwise convolutions runs at under
    1 GFLOP/s on the CPU, several times slower than the forward."""

    @staticmethod
    def forward(ctx, tensor, kernel):  # noqa: D102
        ctx.save_for_backward(kernel)
        return _separable_blur(tensor, kernel, compiled=True)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (kernel,) = ctx.saved_tensors
        return _separable_blur(grad, kernel, axes=(2, 1, 0), compiled=True), None


def gaussian_blur(tensor: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over the three spatial axes, zero padding ("same" size)."""
    kernel = gaussian_window(sigma).to(tensor.device, tensor.dtype)
    if kernel.numel() % 2 == 1 and torch.equal(kernel, kernel.flip(0)):
        return _SymmetricBlur.apply(tensor, kernel)
    return _separable_blur(tensor, kernel)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over non-zero mask entries of each sample, then over samples; plain mean if no mask."""
    if mask is None:
        return values.mean()
    included = (mask != 0).expand_as(values)
    dims = tuple(range(1, values.dim()))
    counts = included.sum(dims).clamp_min(1)
    totals = (values * included).sum(dims, dtype=torch.float32)
    return (totals / counts).mean().to(values.dtype)


def local_ncc(image_i: torch.Tensor, image_j: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """Voxelwise local NCC with a Gaussian window of ``sigma`` voxels."""
    # The five local moments are blurred together as channels of one depthwise convolution
    # (PyTorch runs single-channel 3-D convolutions on a slow generic path).
    channels = image_i.shape[1]
    moments = torch.cat([image_i, image_j, image_i * image_j, image_i * image_i,
                         image_j * image_j], 1)
    mean_i, mean_j, mean_ij, mean_ii, mean_jj = gaussian_blur(moments, sigma).split(channels, 1)
    cov = mean_ij - mean_i * mean_j
    var_i = torch.relu(mean_ii - mean_i ** 2) + 1e-5
    var_j = torch.relu(mean_jj - mean_j ** 2) + 1e-5
    return cov / torch.sqrt(var_i * var_j)


def lncc_loss(warped, target, mask=None, sigma: float = 5.0) -> torch.Tensor:
    """1 - mean LNCC between ``warped`` and ``target`` (over ``mask`` if given)."""
    return 1 - masked_mean(local_ncc(warped, target, sigma), mask)


def lncc2_loss(warped, target, mask=None, sigma: float = 5.0) -> torch.Tensor:
    """1 - mean squared LNCC (insensitive to contrast inversion)."""
    return 1 - masked_mean(local_ncc(warped, target, sigma) ** 2, mask)


def _pairwise_squared_distances(points: torch.Tensor) -> torch.Tensor:
    """(1, 3, P) integer offsets -> (P, P) squared distances."""
    sq = (points ** 2).sum(dim=1).unsqueeze(2)
    dist = sq + sq.permute(0, 2, 1) - 2.0 * torch.bmm(points.permute(0, 2, 1), points)
    return torch.clamp(dist, 0.0)[0]


def mind_ssc(image: torch.Tensor, radius: int = 2, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptor (Heinrich et al., MICCAI 2013): 12 channels per voxel."""
    kernel_size = radius * 2 + 1
    six_neighbourhood = torch.tensor([[0, 1, 1], [1, 1, 0], [1, 0, 1],
                                      [1, 1, 2], [2, 1, 1], [1, 2, 1]], dtype=torch.long)
    dist = _pairwise_squared_distances(six_neighbourhood.t().unsqueeze(0).float())
    x, y = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    pairs = (x > y).reshape(-1) & (dist == 2).reshape(-1)
    shift1 = six_neighbourhood.unsqueeze(1).repeat(1, 6, 1).view(-1, 3)[pairs, :]
    shift2 = six_neighbourhood.unsqueeze(0).repeat(6, 1, 1).view(-1, 3)[pairs, :]

    def selector(shift):
        weight = torch.zeros(12, 1, 3, 3, 3, device=image.device, dtype=image.dtype)
        flat = torch.arange(12) * 27 + shift[:, 0] * 9 + shift[:, 1] * 3 + shift[:, 2]
        weight.view(-1)[flat.to(image.device)] = 1
        return weight

    padded = F.pad(image, (dilation,) * 6, mode="replicate")
    diff = (F.conv3d(padded, selector(shift1), dilation=dilation)
            - F.conv3d(padded, selector(shift2), dilation=dilation)) ** 2
    ssd = F.avg_pool3d(F.pad(diff, (radius,) * 6, mode="replicate"), kernel_size, stride=1)
    mind = ssd - torch.min(ssd, 1, keepdim=True)[0]
    variance = torch.mean(mind, 1, keepdim=True)
    variance = torch.clamp(variance, (variance.mean() * 0.001).item(), (variance.mean() * 1000).item())
    mind = torch.exp(-mind / variance)
    order = torch.tensor([6, 8, 1, 11, 2, 10, 0, 7, 9, 4, 5, 3], dtype=torch.long, device=image.device)
    return mind[:, order]


def mind_loss(warped, target, mask=None, radius: int = 2, dilation: int = 2) -> torch.Tensor:
    """Mean squared difference of MIND-SSC descriptors (modality-independent)."""
    difference = mind_ssc(warped, radius, dilation) - mind_ssc(target, radius, dilation)
    return masked_mean(difference ** 2, mask)


_FUNCTIONS: dict[str, SimilarityFn] = {"lncc": lncc_loss, "lncc2": lncc2_loss, "mind": mind_loss}


def get_similarity(name: str) -> SimilarityFn:
    """Look up a similarity by name (``lncc``, ``lncc2`` or ``mind``)."""
    try:
        return _FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown similarity {name!r}; choose from {', '.join(_FUNCTIONS)}") from None
