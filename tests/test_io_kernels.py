"""The compiled kernels of instance optimisation (trilinear sampling, the U-Net's upsample-add-
join) give PyTorch's numbers and gradients, alone and inside a whole IO objective."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.checkpoints import random_state_dict
from ugi_bids.engine.kernels import narrow_conv, separable, trilinear, upsample_join
from ugi_bids.engine.model.network import build_cascade, identity_grid
from ugi_bids.engine.optimise import similarity
from ugi_bids.engine.optimise.instance import (
    instance_optimise,
    pair_objective,
    set_checkpointing,
)
from ugi_bids.engine.optimise.similarity import get_similarity

CL = torch.channels_last_3d


def grid_sample_reference(image, coords, padding):
    grid = (coords * 2.0 - 1.0).flip(1).permute(0, 2, 3, 4, 1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode=padding, align_corners=True)


def gradients(function, inputs, upstream):
    out = function(*inputs)
    wanted = [t for t in inputs if t.requires_grad]
    return out, torch.autograd.grad(out, wanted, upstream)


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("channels", [1, 3])
def test_trilinear_sample_equals_grid_sample(padding, channels):
    """Points inside, outside, exactly on lattice nodes and on the last node (where ATen's
    border clamp zeroes the coordinate gradient), on an anisotropic lattice."""
    torch.manual_seed(channels)
    image = torch.randn(1, channels, 9, 11, 13, requires_grad=True)
    coords = torch.rand(1, 3, 6, 7, 8) * 1.4 - 0.2
    coords[0, :, 0] = torch.tensor([0.0, 1.0, 0.5])[:, None, None]
    coords[0, 0, 1, 0] = 1.0
    coords[0, :, 2, 0, 0:4] = identity_grid((9, 11, 13))[0, :, 4, 5, 3:7]
    coords.requires_grad_()
    upstream = torch.randn(1, channels, 6, 7, 8)
    ours, our_grads = gradients(lambda i, c: trilinear.sample(i, c, padding), (image, coords),
                                upstream)
    ref, ref_grads = gradients(lambda i, c: grid_sample_reference(i, c, padding),
                               (image, coords), upstream)
    assert torch.equal(ours, ref)  # the same formula in the same order: bit for bit
    assert torch.allclose(our_grads[0], ref_grads[0], rtol=0, atol=1e-6)  # summation order
    assert torch.equal(our_grads[1], ref_grads[1])
    assert (our_grads[1] != 0).any()


def test_trilinear_sample_strided_points_and_partial_gradients():
    """GradICON samples at every second lattice point of a noisy grid (a strided view); the
    identity lattice needs no coordinate gradient."""
    torch.manual_seed(5)
    field = torch.randn(1, 3, 12, 12, 12, requires_grad=True)
    points = (identity_grid((12, 12, 12)) + 0.01 * torch.randn(1, 3, 12, 12, 12))[:, :, ::2, ::2,
                                                                                   ::2]
    upstream = torch.randn(1, 3, 6, 6, 6)
    ours, (our_grad,) = gradients(lambda f, p: trilinear.sample(f, p), (field, points), upstream)
    ref, (ref_grad,) = gradients(lambda f, p: grid_sample_reference(f, p, "border"),
                                 (field, points), upstream)
    assert torch.equal(ours, ref)
    assert torch.allclose(our_grad, ref_grad, rtol=0, atol=1e-6)
    assert trilinear.supported(field, points)
    assert not trilinear.supported(field.double(), points.double())


def join_reference(y, r, skip):
    up = F.interpolate(r, scale_factor=2, mode="trilinear", align_corners=False)
    x = (y + up)[:, :, :skip.shape[2], :skip.shape[3], :skip.shape[4]]
    return torch.cat([x, skip], 1)


@pytest.mark.parametrize("coarse, fine, channels, extra", [
    ((5, 6, 7), (9, 12, 13), 4, 2),   # odd crops on two axes (175 from 88)
    ((3, 3, 3), (6, 5, 6), 16, 3),
    ((1, 2, 2), (1, 3, 4), 5, 1),     # a single coarse plane: both neighbours are the same
])
def test_upsample_add_join_equals_pytorch(coarse, fine, channels, extra):
    torch.manual_seed(channels)
    y = torch.randn(1, channels, *(2 * m for m in coarse)).contiguous(memory_format=CL)
    r = torch.randn(1, channels, *coarse).contiguous(memory_format=CL)
    skip = torch.randn(1, extra, *fine).contiguous(memory_format=CL)
    inputs = [t.requires_grad_() for t in (y, r, skip)]
    assert upsample_join.supported(*inputs)
    ours = upsample_join.upsample_add_join(*inputs)
    ref = join_reference(*inputs)
    assert ours.is_contiguous(memory_format=CL)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6)
    upstream = torch.randn_like(ref)
    for mine, theirs in zip(torch.autograd.grad(ours, inputs, upstream),
                            torch.autograd.grad(ref, inputs, upstream)):
        assert torch.allclose(mine, theirs, rtol=0, atol=2e-6)


@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
def test_narrow_conv_gradients_equal_oneDNN(layout):
    """The last layer (18 -> 3, 3x3x3, padding 1) on an anisotropic lattice spanning several
    GEMM slabs: output and input gradient are oneDNN's, the weight gradient the same sums."""
    torch.manual_seed(2)
    x = torch.randn(1, 18, 11, 7, 9).contiguous(memory_format=layout).requires_grad_()
    weight = torch.randn(3, 18, 3, 3, 3, requires_grad=True)
    bias = torch.randn(3, requires_grad=True)
    upstream = torch.randn(1, 3, 11, 7, 9)
    assert narrow_conv.supported(x, weight)
    ours = narrow_conv.conv3d(x, weight, bias)
    ref = F.conv3d(x, weight, bias, padding=1)
    assert torch.equal(ours, ref)
    mine = torch.autograd.grad(ours, (x, weight, bias), upstream)
    theirs = torch.autograd.grad(ref, (x, weight, bias), upstream)
    assert torch.equal(mine[0], theirs[0])
    assert torch.allclose(mine[1], theirs[1], rtol=1e-5, atol=1e-4)
    assert torch.allclose(mine[2], theirs[2], rtol=1e-5, atol=1e-4)
    edge = narrow_conv.weight_gradient(x.detach()[:, :, :1], upstream[:, :, :1])  # one plane
    assert torch.allclose(edge, torch.ops.aten.convolution_backward(
        upstream[:, :, :1], x.detach()[:, :, :1], weight.detach(), None, [1] * 3, [1] * 3,
        [1] * 3, False, [0] * 3, 1, [False, True, False])[1], rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_io_objective_and_gradients_unchanged_by_the_kernels(monkeypatch):
    """One IO step's loss and weight gradients, kernels on vs PyTorch's operations, both
    against the same step in float64 (GradICON's finite differences, step 1e-3, magnify float32
    rounding a thousandfold, so the float32 paths are compared by their distance to the truth)."""
    network = build_cascade()
    network.load_state_dict(random_state_dict(seed=4))
    network.eval().to(memory_format=CL)
    set_checkpointing(network, True)
    torch.manual_seed(0)
    a = F.avg_pool3d(torch.rand(1, 1, 65, 65, 65), 5, 1, 2)
    b = F.avg_pool3d(torch.rand(1, 1, 65, 65, 65), 5, 1, 2)

    def step(dtype):
        network.to(dtype)
        torch.manual_seed(1)  # the GradICON sample points
        network.zero_grad(set_to_none=True)
        total, record, _, _ = pair_objective(network, a.to(dtype), b.to(dtype),
                                             get_similarity("lncc"))
        total.backward()
        return record, torch.cat([p.grad.double().flatten() for p in network.parameters()])

    record, grads = step(torch.float32)
    truth_record, truth = step(torch.float64)
    monkeypatch.setattr(trilinear, "supported", lambda *args: False)
    monkeypatch.setattr(upsample_join, "supported", lambda *args: False)
    monkeypatch.setattr(narrow_conv, "supported", lambda *args: False)
    monkeypatch.setattr(separable, "supported", lambda *args: False)
    monkeypatch.setattr(similarity, "gaussian_blur", lambda t, sigma: similarity._separable_blur(
        t, similarity.gaussian_window(sigma).to(t.dtype)))
    plain_record, plain = step(torch.float32)
    assert record.inverse_consistency > 0
    assert abs(record.total - truth_record.total) <= 2 * abs(plain_record.total
                                                             - truth_record.total) + 1e-6
    our_error = float((grads - truth).norm() / truth.norm())
    plain_error = float((plain - truth).norm() / truth.norm())
    print(f"gradient error vs float64: kernels {our_error:.2e}, PyTorch {plain_error:.2e}")
    assert our_error <= 2 * plain_error + 1e-6, (our_error, plain_error)
    assert our_error < 1e-2


@pytest.mark.parametrize("axis", [2, 3, 4])
def test_separable_pass_equals_depthwise_conv(axis):
    """One 21-tap pass along each axis of an anisotropic volume, including an axis shorter
    than the kernel (every output sees the zero padding on both sides)."""
    torch.manual_seed(axis)
    volume = torch.randn(1, 5, 9, 23, 6)
    taps = similarity.gaussian_kernel1d(21, 5.0)
    shape = [1, 1, 1]
    shape[axis - 2] = -1
    weight = taps.view(1, 1, *shape).expand(5, -1, -1, -1, -1)
    ref = F.conv3d(volume, weight, padding="same", groups=5)
    assert separable.supported(volume, taps)
    assert torch.allclose(separable.convolve_axis(volume, taps, axis), ref, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths")
def test_gaussian_blur_backward_is_the_blur_of_the_gradient():
    """The LNCC window's operator is symmetric, so its compiled backward (the same blur) gives
    autograd's gradient of the depthwise convolutions; an even window keeps autograd."""
    torch.manual_seed(7)
    moments = torch.randn(1, 5, 24, 19, 22, requires_grad=True)
    upstream = torch.randn(1, 5, 24, 19, 22)
    ours = similarity.gaussian_blur(moments, 5.0)
    kernel = similarity.gaussian_kernel1d(21, 5.0)
    ref = similarity._separable_blur(moments, kernel)
    assert ours.grad_fn is not None and type(ours.grad_fn).__name__.startswith("_SymmetricBlur")
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6)
    (our_grad,) = torch.autograd.grad(ours, moments, upstream)
    (ref_grad,) = torch.autograd.grad(ref, moments, upstream)
    assert torch.allclose(our_grad, ref_grad, rtol=0, atol=1e-6)
    even = similarity.gaussian_blur(moments, 5.25)  # 22 taps: asymmetric "same" padding
    assert not type(even.grad_fn).__name__.startswith("_SymmetricBlur")


@pytest.mark.slow
def test_io_maps_as_close_to_float64_as_pytorchs(monkeypatch):
    """Maps after an IO step, kernels on vs PyTorch's operations, both against the same step in
    float64. Adam's first step moves every weight by about the learning rate times the sign
    of its gradient, so float32 rounding in tiny gradient entries moves the maps of either
    float32 path by hundredths of a voxel; ours must stay as close to the truth as PyTorch's."""
    network = build_cascade()
    network.load_state_dict(random_state_dict(seed=4))
    network.eval()
    torch.manual_seed(0)
    a = F.avg_pool3d(torch.rand(1, 1, 65, 65, 65), 5, 1, 2)
    b = F.avg_pool3d(torch.rand(1, 1, 65, 65, 65), 5, 1, 2)

    def maps(dtype):
        network.to(dtype)
        torch.manual_seed(1)
        result = instance_optimise(network, a.to(dtype), b.to(dtype), steps=1)
        return torch.cat([result.phi_ab, result.phi_ba]).double()

    ours = maps(torch.float32)
    truth = maps(torch.float64)
    for module in (trilinear, upsample_join, narrow_conv, separable):
        monkeypatch.setattr(module, "supported", lambda *args: False)
    monkeypatch.setattr(similarity, "gaussian_blur", lambda t, sigma: similarity._separable_blur(
        t, similarity.gaussian_window(sigma).to(t.dtype)))
    plain = maps(torch.float32)
    our_error = float((ours - truth).abs().max()) * 64
    plain_error = float((plain - truth).abs().max()) * 64
    print(f"maps after one IO step vs float64: kernels {our_error:.4f} voxel, "
          f"PyTorch {plain_error:.4f} voxel")
    assert our_error <= 2 * plain_error + 1e-3
