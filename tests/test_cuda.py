"""The engine on a CUDA GPU: the CPU's answers, full float32 unless TF32 is asked for, and no
host work inside the network's hot path. Tests marked ``needs_cuda`` skip where no GPU is
present (CI); the audit helper itself is tested on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.checkpoints import random_state_dict
from tests.test_fast_inference import VOXEL_TOLERANCE, brain_pair, voxel_error
from ugi_bids.engine.model.network import build_cascade, identity_grid
from ugi_bids.engine.model.precision import _new_api, network_precision
from ugi_bids.engine.optimise import instance as inference
from ugi_bids.engine.optimise.instance import infer_maps, instance_optimise

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")

#: Tensors up to this many elements may live on the host (window taps, loss scalars, the
#: folding's constant phase tables); a volume-sized tensor there (65^3 here) is host work.
HOST_ELEMENTS_ALLOWED = 4096


class HostTensorAudit(TorchDispatchMode):
    """Records every ATen call (forward and backward) that touches a tensor of more than
    ``HOST_ELEMENTS_ALLOWED`` elements outside ``device_type``."""

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type = device_type
        self.offending: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)):
            if (isinstance(leaf, torch.Tensor) and leaf.device.type != self.device_type
                    and leaf.numel() > HOST_ELEMENTS_ALLOWED):
                self.offending.append((str(func), tuple(leaf.shape)))
        return func(*args, **kwargs)


def _network(device: str) -> torch.nn.Module:
    net = build_cascade()
    net.load_state_dict(random_state_dict(seed=3))
    return net.to(device).eval()


@pytest.fixture(scope="module")
def cpu_network():
    return _network("cpu")


@pytest.fixture(scope="module")
def cuda_network():
    return _network("cuda")


def test_audit_sees_forward_and_backward_ops():
    """The audit catches large tensors off the audited device, in the backward pass too."""
    weight = torch.randn(8, 1, 3, 3, 3, requires_grad=True)
    image = torch.randn(1, 1, 12, 12, 12)
    with HostTensorAudit("cpu") as clean:
        torch.nn.functional.conv3d(image, weight).sum().backward()
    assert clean.offending == []
    with HostTensorAudit("meta") as audit:
        torch.nn.functional.conv3d(image, weight).sum().backward()
    names = " ".join(name for name, _ in audit.offending)
    assert "convolution" in names and "backward" in names


@pytest.mark.skipif(not _new_api(), reason="torch < 2.9: legacy allow_tf32 flags only")
def test_precision_settings_are_scoped():
    """float32 switches cuDNN's TF32 off for the network only; tf32 allows it; both restore."""
    conv = torch.backends.cudnn.conv
    before = (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    with network_precision("cuda", "float32"):
        assert conv.fp32_precision == torch.backends.cuda.matmul.fp32_precision == "ieee"
    with network_precision("cuda", "tf32"):
        assert conv.fp32_precision == "tf32"
    with network_precision("cpu", "float32"):  # nothing to change on the CPU
        assert (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before
    assert (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before
    with pytest.raises(ValueError, match="precision"):
        with network_precision("cuda", "bf16"):
            pass


@needs_cuda
@pytest.mark.parametrize("size", [65, 80])
def test_cuda_maps_equal_cpu_maps(cpu_network, cuda_network, size):
    """Fast path on the GPU (float32) against the plain module path on the CPU."""
    moving, fixed = brain_pair(size)
    plain = infer_maps(cpu_network, moving, fixed, fast=False)
    gpu = infer_maps(cuda_network, moving.cuda(), fixed.cuda())
    for a, b in ((gpu.phi_ab, plain.phi_ab), (gpu.phi_ba, plain.phi_ba)):
        assert a.device.type == "cuda"
        assert (b - identity_grid(b.shape[2:])).abs().max() * (size - 1) > 1.0
        assert voxel_error(a.cpu(), b).max() < VOXEL_TOLERANCE


@needs_cuda
@pytest.mark.slow
def test_cuda_maps_equal_cpu_maps_at_true_grid(cpu_network, cuda_network):
    """175^3: the same statistics the CPU's fast path meets against the plain path
    (``test_fast_maps_equal_plain_maps_at_true_grid``)."""
    moving, fixed = brain_pair(175)
    plain = infer_maps(cpu_network, moving, fixed, fast=False).phi_ab
    gpu = infer_maps(cuda_network, moving.cuda(), fixed.cuda()).phi_ab.cpu()
    error = voxel_error(gpu, plain).flatten()
    print(f"CUDA float32 vs CPU plain at 175^3: median {error.median():.2e}, 99.9th "
          f"{torch.quantile(error[::5].float(), 0.999):.2e}, max {error.max():.2e} voxel")
    assert torch.quantile(error[::5].float(), 0.5) < 0.2 * VOXEL_TOLERANCE
    assert torch.quantile(error[::5].float(), 0.999) < VOXEL_TOLERANCE
    assert error.max() < 5 * VOXEL_TOLERANCE


@needs_cuda
@pytest.mark.skipif(not _new_api(), reason="torch < 2.9: legacy allow_tf32 flags only")
def test_network_runs_in_float32_unless_tf32_is_asked(cuda_network, monkeypatch):
    seen = []
    real = inference.cascade_map

    def spy(*args):
        seen.append(torch.backends.cudnn.conv.fp32_precision)
        return real(*args)

    monkeypatch.setattr(inference, "cascade_map", spy)
    moving, fixed = brain_pair(65)
    infer_maps(cuda_network, moving.cuda(), fixed.cuda())
    infer_maps(cuda_network, moving.cuda(), fixed.cuda(), precision="tf32")
    assert seen == ["ieee", "ieee", "tf32", "tf32"]


@needs_cuda
def test_inference_does_no_host_work(cuda_network):
    moving, fixed = brain_pair(65)
    moving, fixed = moving.cuda(), fixed.cuda()
    infer_maps(cuda_network, moving, fixed)  # first call: kernels load outside the audit
    with HostTensorAudit("cuda") as audit:
        infer_maps(cuda_network, moving, fixed)
    assert audit.offending == []


@needs_cuda
def test_io_step_on_cuda(cpu_network, cuda_network):
    """One IO step: no host work (forward, GradICON, backward, Adam), the noise-free
    similarity of the first objective equals the CPU's, and the weights come back."""
    moving, fixed = brain_pair(65)
    moving_gpu, fixed_gpu = moving.cuda(), fixed.cuda()
    before = {k: v.clone() for k, v in cuda_network.state_dict().items()}
    torch.manual_seed(0)
    with HostTensorAudit("cuda") as audit:
        gpu = instance_optimise(cuda_network, moving_gpu, fixed_gpu, steps=1)
    assert audit.offending == []
    torch.manual_seed(0)
    cpu = instance_optimise(cpu_network, moving, fixed, steps=1)
    assert gpu.losses[0].similarity == pytest.approx(cpu.losses[0].similarity, rel=1e-5)
    assert all(torch.isfinite(torch.tensor(vars(loss)["total"])) for loss in gpu.losses)
    assert gpu.phi_ab.device.type == "cuda"
    for key, value in cuda_network.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_tf32_is_recorded_only_where_it_runs(random_checkpoint, caplog):
    """On the CPU the request changes nothing, so results and provenance say float32."""
    from ugi_bids.engine.model.precision import effective_precision
    from ugi_bids.engine.registrar import Registrar

    registrar = Registrar(weights=random_checkpoint, device="cpu", network_size=65,
                          precision="tf32")
    assert registrar.precision == "float32"
    assert "has no effect on cpu" in caplog.text
    with pytest.raises(ValueError, match="precision"):
        Registrar(weights=random_checkpoint, device="cpu", network_size=65, precision="fp16")
    assert effective_precision("tf32", "cuda") == "tf32"
    assert effective_precision("float32", "cpu") == "float32"
    assert effective_precision("tf32", "cpu") == "float32"
    assert "tf32 has no effect on cpu" in caplog.text
