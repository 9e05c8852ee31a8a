"""Inference-only evaluation of one tallUNet2 with the same answers and less work.

What changes against :class:`ugi_bids.engine.model.network.TallUNet2.forward` (all exact algebra;
only float32 rounding differs):

* activations and weights are channels-last (``channels_last_3d``), the layout in which oneDNN /
  cuDNN run 3-D convolutions fastest;
* each BatchNorm (eval mode, an affine map per channel) is folded into the transposed
  convolution before it, and into the upsampled residual at the coarse resolution;
* the full-resolution end of the U-Net (transposed convolution 48 -> 16, trilinear upsampling of
  the residual, BatchNorm, crop, concatenation with the input images and the final 18 -> 3
  convolution) is linear after the last leaky ReLU, so it is composed into ONE 3x3x3
  convolution on the half-resolution lattice that writes the eight output phases (sub-pixel
  form), 80 -> 24 channels. That halves this stage's multiply-adds and never builds the
  16-channel full-resolution tensors. The composition differs from the original only where the
  final convolution's zero padding meets the crop, the six faces of the lattice; those planes
  are recomputed with the original operations on thin slabs.

Displacements come out channels-last, (n0, n1, n2, 3) in normalised coordinates, ready for
:mod:`ugi_bids.engine.kernels.chain`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .network import TallUNet2, batch_norm_affine

CHANNELS_LAST = torch.channels_last_3d

#: ConvTranspose3d(kernel 4, stride 2, padding 1) along one axis: output 2m + phase reads input
#: m + offset through kernel tap ``_TRANSPOSED_TAPS[phase][offset]``.
_TRANSPOSED_TAPS = ({0: 1, -1: 3}, {0: 2, 1: 0})
#: Trilinear x2 upsampling (align_corners=False) along one axis: output 2m + phase is
#: sum(weight * input[m + offset]).
_UPSAMPLE_WEIGHTS = ({-1: 0.25, 0: 0.75}, {0: 0.75, 1: 0.25})
#: The eight sub-pixel phases (p, q, r) in the composed convolution's (phase-major) order.
_PHASES = tuple((p, q, r) for p in range(2) for q in range(2) for r in range(2))


def _phase_tables(dtype=torch.float64, device=None):
    """Per-axis tables that compose the final 3-tap convolution (offset delta on the full
    lattice) with the stages before it, indexed by output phase r, delta, and input offset e on
    the half lattice (e, delta in -1, 0, 1 -> index 0, 1, 2)."""
    transposed = torch.zeros(2, 3, 3, 4, dtype=dtype)  # [r, delta, e, kernel tap]
    upsample = torch.zeros(2, 3, 3, dtype=dtype)       # [r, delta, e]
    skip = torch.zeros(2, 2, 3, 3, dtype=dtype)        # [r, skip phase r', e, delta]
    for r in range(2):
        for di, delta in enumerate((-1, 0, 1)):
            phase, shift = (r + delta) % 2, (r + delta) // 2
            for ei, e in enumerate((-1, 0, 1)):
                tap = _TRANSPOSED_TAPS[phase].get(e - shift)
                if tap is not None:
                    transposed[r, di, ei, tap] = 1.0
                upsample[r, di, ei] = _UPSAMPLE_WEIGHTS[phase].get(e - shift, 0.0)
        for skip_phase in range(2):
            for ei, e in enumerate((-1, 0, 1)):
                delta = 2 * e + skip_phase - r
                if -1 <= delta <= 1:
                    skip[r, skip_phase, ei, delta + 1] = 1.0
    return transposed.to(device), upsample.to(device), skip.to(device)


def _state_key(module: torch.nn.Module) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in
                 (*module.parameters(), *module.buffers()))


class InferenceUNet:
    """A snapshot of a :class:`TallUNet2`'s weights, folded for inference (see module doc).

    Call with two (1, 1, *S) images; returns the displacement (S0, S1, S2, 3), channels-last,
    equal to ``unet(a, b)[0].permute(1, 2, 3, 0)`` up to float32 rounding.
    """

    def __init__(self, unet: TallUNet2):
        self.num_layers = unet.num_layers
        self.key = _state_key(unet)
        dtype = unet.lastConv.weight.dtype
        device = unet.lastConv.weight.device

        def cl(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, dtype).contiguous(memory_format=CHANNELS_LAST)

        with torch.no_grad():
            self.down = [(cl(c.weight), c.bias.to(dtype)) for c in unet.downConvs]
            self.up = []
            for conv, bn in zip(unet.upConvs, unet.batchNorms):
                scale, shift = batch_norm_affine(bn, torch.float64)
                weight = conv.weight.double() * scale[None, :, None, None, None]
                bias = conv.bias.double() * scale + shift
                self.up.append((cl(weight), bias.to(device, dtype),
                                scale.to(device, dtype)[None, :, None, None, None]))
            self.last = (cl(unet.lastConv.weight), unet.lastConv.bias.to(dtype))
            self.top_weight, self.top_bias = self._compose_top(unet)
            self.top_weight, self.top_bias = cl(self.top_weight), self.top_bias.to(device, dtype)
        self.top_channels = unet.upConvs[0].out_channels

    @staticmethod
    def _compose_top(unet: TallUNet2) -> tuple[torch.Tensor, torch.Tensor]:
        """The 3x3x3 half-lattice convolution (24 outputs = 8 phases x 3, phase-major) that
        equals lastConv(cat(BN(upConv0(L) + up(R)), skip)) / 10 away from the faces.
        Inputs: L = leaky_relu(x) (48), R = x[:, :16] (16), skip phases (8 x 2)."""
        transposed, upsample, skip = _phase_tables(device=unet.lastConv.weight.device)
        scale, shift = batch_norm_affine(unet.batchNorms[0], torch.float64)
        up_channels = scale.shape[0]
        last = unet.lastConv.weight.double()
        last_z = last[:, :up_channels] * scale[None, :, None, None, None]
        last_skip = last[:, up_channels:]
        conv = unet.upConvs[0].weight.double()  # (in, out, 4, 4, 4)
        paired = torch.einsum("ocxyz,icuvw->oixyzuvw", last_z, conv)
        from_l = torch.einsum("oixyzuvw,pxau,qybv,rzcw->pqroiabc", paired, transposed,
                              transposed, transposed)
        from_r = torch.einsum("ohxyz,pxa,qyb,rzc->pqrohabc", last_z, upsample, upsample,
                              upsample)
        from_skip = torch.einsum("ojxyz,pPax,qQby,rRcz->pqroPQRjabc", last_skip, skip, skip,
                                 skip)
        outputs = 8 * last.shape[0]
        weight = torch.cat([from_l.reshape(outputs, -1, 3, 3, 3),
                            from_r.reshape(outputs, -1, 3, 3, 3),
                            from_skip.reshape(outputs, -1, 3, 3, 3)], dim=1) / 10
        constant = unet.upConvs[0].bias.double() * scale + shift
        bias = (unet.lastConv.bias.double() + torch.einsum("ocxyz,c->o", last[:, :up_channels],
                                                           constant)) / 10
        return weight, bias.repeat(8)

    # -- forward ----------------------------------------------------------------------------
    def __call__(self, image_a: torch.Tensor, image_b: torch.Tensor) -> torch.Tensor:
        x = torch.empty((1, 2, *image_a.shape[2:]), dtype=image_a.dtype, device=image_a.device,
                        memory_format=CHANNELS_LAST)
        x[:, :1] = image_a
        x[:, 1:] = image_b
        skips = []
        for weight, bias in self.down:
            skips.append(x)
            y = F.conv3d(F.leaky_relu(x), weight, bias, stride=2, padding=1)
            pooled = F.avg_pool3d(x, 2, ceil_mode=True)
            y[:, y.shape[1] - pooled.shape[1]:] += pooled
            x = y
        for depth in range(self.num_layers - 1, 0, -1):
            weight, bias, scale = self.up[depth]
            y = F.conv_transpose3d(F.leaky_relu(x), weight, bias, stride=2, padding=1)
            y += F.interpolate(x[:, :y.shape[1]] * scale, scale_factor=2, mode="trilinear",
                               align_corners=False)
            skip = skips[depth]
            y = y[:, :, :skip.shape[2], :skip.shape[3], :skip.shape[4]]
            x = torch.cat([y, skip], 1).contiguous(memory_format=CHANNELS_LAST)
        skip = skips[0]
        skips.clear()
        full = skip.shape[2:]
        # The faces need x; take them first so that x is freed before the largest tensors
        # (the stacked input and the composed convolution's output) exist.
        faces = [(axis, high, self._face(x, skip, axis, high)) for axis in range(3)
                 for high in (False, True)]
        stacked = self._stacked_input(x, skip)
        del x
        out = F.conv3d(stacked, self.top_weight, self.top_bias)  # (1, 24, *half)
        del stacked
        table = self._interleave_phases(out, full)
        for axis, high, plane in faces:
            table.select(axis, full[axis] - 1 if high else 0).copy_(plane)
        return table

    def _stacked_input(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """The composed convolution's input on the half lattice with a one-voxel rim:
        [leaky_relu(x) zero-padded, x[:, :16] edge-padded (the upsampling's clamp), the input
        images as 8 phases of the half lattice, zero beyond the crop], assembled in place in one
        channels-last buffer."""
        half = x.shape[2:]
        up_channels, skip_channels = self.top_channels, skip.shape[1]
        stacked = torch.empty((1, x.shape[1] + up_channels + 8 * skip_channels,
                               *(h + 2 for h in half)), dtype=x.dtype, device=x.device,
                              memory_format=CHANNELS_LAST)
        for dim in (2, 3, 4):
            stacked.select(dim, 0).zero_()
            stacked.select(dim, stacked.shape[dim] - 1).zero_()
        inner = stacked[:, :, 1:-1, 1:-1, 1:-1]
        torch.ops.aten.leaky_relu.out(x, 0.01, out=inner[:, :x.shape[1]])
        residual = stacked[:, x.shape[1]:x.shape[1] + up_channels]
        residual[:, :, 1:-1, 1:-1, 1:-1] = x[:, :up_channels]
        for dim in (2, 3, 4):
            n = residual.shape[dim]
            residual.select(dim, 0).copy_(residual.select(dim, 1))
            residual.select(dim, n - 1).copy_(residual.select(dim, n - 2))
        # Phase (p, q, r) of the images: skip[2m + p, 2n + q, 2o + r] at half index (m, n, o),
        # channels phase-major; zero where the full lattice has no such point (odd sizes).
        phases = inner[:, x.shape[1] + up_channels:]
        for index, (p, q, r) in enumerate(_PHASES):
            block = phases[:, index * skip_channels:(index + 1) * skip_channels]
            source = skip[:, :, p::2, q::2, r::2]
            counts = source.shape[2:]
            block[:, :, :counts[0], :counts[1], :counts[2]] = source
            for dim, count in zip((2, 3, 4), counts):
                block.narrow(dim, count, block.shape[dim] - count).zero_()
        return stacked

    @staticmethod
    def _interleave_phases(out: torch.Tensor, full) -> torch.Tensor:
        """(1, 8 x 3, *half) phase-major outputs -> the (*full, 3) displacement table."""
        outputs = out.shape[1] // 8
        by_voxel = out[0].permute(1, 2, 3, 0)  # (*half, 24), a view of the channels-last out
        table = torch.empty((*full, outputs), dtype=out.dtype, device=out.device)
        for index, (p, q, r) in enumerate(_PHASES):
            target = table[p::2, q::2, r::2]
            n0, n1, n2 = target.shape[:3]
            target.copy_(by_voxel[:n0, :n1, :n2, index * outputs:(index + 1) * outputs])
        return table

    def _face(self, x: torch.Tensor, skip: torch.Tensor, axis: int, high: bool) -> torch.Tensor:
        """The output plane at index 0 (or the last) along ``axis``, computed with the original
        operations on a two-plane slab of the half lattice: (plane dims..., 3)."""
        # oneDNN runs the thin slab fastest as the first spatial axis.
        x = x.movedim(2 + axis, 2)
        skip = skip.movedim(2 + axis, 2)
        half, full = x.shape[2], skip.shape[2]
        start = max(half - 2, 0) if high else 0
        slab = x[:, :, start:start + 2].contiguous(memory_format=CHANNELS_LAST)
        weight, bias, scale = self.up[0]
        weight = weight.movedim(2 + axis, 2)
        z = F.conv_transpose3d(F.leaky_relu(slab), weight, bias, stride=2, padding=1)
        z += F.interpolate(slab[:, :z.shape[1]] * scale, scale_factor=2, mode="trilinear",
                           align_corners=False)
        first = 2 * start
        count = min(z.shape[2], full - first)
        z = z[:, :, :count, :skip.shape[3], :skip.shape[4]]
        z = torch.cat([z, skip[:, :, first:first + count]], 1)
        target = (full - 1 - first) if high else 0
        # Zero planes around the slab: the final convolution's padding (and, at the high side,
        # the crop) as in the original.
        window = F.pad(z, (1,) * 6)[:, :, target:target + 3]
        # The final convolution on a 3-plane window is a 2-D convolution with the three planes
        # as extra input channels (oneDNN runs that several times faster).
        window = window.reshape(1, -1, *window.shape[3:]).contiguous(
            memory_format=torch.channels_last)
        weight, bias = self.last
        weight = weight.movedim(2 + axis, 2).reshape(weight.shape[0], -1, 3, 3)
        plane = F.conv2d(window, weight.contiguous(memory_format=torch.channels_last), bias) / 10
        return plane[0].permute(1, 2, 0)


def drop_inference_unet(unet: TallUNet2) -> None:
    """Forget ``unet``'s cached folded form (the next :func:`inference_unet` rebuilds it)."""
    unet._ugi_inference = None


def inference_unet(unet: TallUNet2) -> InferenceUNet:
    """The folded form of ``unet``, cached on the module and rebuilt whenever a parameter or
    buffer changed (instance optimisation, ``load_state_dict``)."""
    cached = getattr(unet, "_ugi_inference", None)
    if cached is None or cached.key != _state_key(unet):
        cached = InferenceUNet(unet)
        unet._ugi_inference = cached
    return cached
