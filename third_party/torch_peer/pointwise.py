"""The 1x1 convolution both peers build, routed around a fault of oneDNN's strided 1x1 kernels.

PyTorch runs CPU convolutions in its bundled oneDNN. There, the backward-weights pass of a 1x1 convolution
with a stride and fewer input channels than a register block (8 floats on AVX2, 16 on AVX-512) writes past
its "reduce to unit stride" workspace (oneDNN issue #6035; `debkd_jax.native.needs_unit_stride` has the
lines): on an AVX2-only CPU, training `resnet_tiny` (a 4 -> 8 shortcut at stride 2) gave wrong weight
gradients with 2 threads and a segmentation fault with 1 (torch 2.13.0+cpu, AMD EPYC).

So a strided 1x1 convolution with fewer than `SAFE_INPUT_CHANNELS` input channels is built as
`SubsampledConv1x1`: the same weights and `state_dict` keys, and the same values and gradients, computed as a
stride-1 1x1 convolution of `x[:, :, ::s, ::s]` (a strided 1x1 convolution reads exactly those pixels). oneDNN
stays on for every layer, so the benchmark models (ResNet-8 and up: 16 input channels or more at every
strided 1x1) run exactly as PyTorch users run them; only the test models (`resnet_tiny`) take the subsample.
"""

from __future__ import annotations

import torch
from torch import nn

SAFE_INPUT_CHANNELS = 16
"""oneDNN's widest float32 channel block (AVX-512): strided 1x1 convs with at least this many inputs are
safe."""


class SubsampledConv1x1(nn.Conv2d):
    """A 1x1 convolution at stride `step`, computed at stride 1 on `x[:, :, ::step, ::step]`."""

    def __init__(self, in_channels: int, out_channels: int, step: int):
        super().__init__(in_channels, out_channels, kernel_size=1, stride=1, bias=False)
        self.step = step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x[:, :, :: self.step, :: self.step])


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """`nn.Conv2d(in, out, 1, stride, bias=False)`, or its `SubsampledConv1x1` where oneDNN's kernel is
    faulty."""
    if stride != 1 and in_channels < SAFE_INPUT_CHANNELS:
        return SubsampledConv1x1(in_channels, out_channels, stride)
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
