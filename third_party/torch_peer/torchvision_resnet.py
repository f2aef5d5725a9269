"""torchvision's ResNet (`torchvision.models.resnet`), written out: same modules, same `state_dict` keys.

torchvision is not installed on the project's machines (the registry's wheel is built against a CUDA torch and
will not load beside the local CPU build, torch 2.13.0+cpu), so this file restates torchvision 0.28's
architecture module for module. Its `state_dict` has torchvision's keys and shapes:

    conv1.weight (64, 3, 7, 7); bn1.{weight,bias,running_mean,running_var,num_batches_tracked}
    layer{1..4}.{j}.conv1/bn1/conv2/bn2[/conv3/bn3]   BasicBlock (18, 34) or Bottleneck (50, 101, 152)
    layer{s}.0.downsample.0 (1x1 conv), layer{s}.0.downsample.1 (BatchNorm)   where the shape changes
    fc.weight (num_classes, 512 * expansion), fc.bias

A strided 1x1 downsample with fewer than 16 input channels (`resnet_tiny` only) runs at stride 1 on the
subsampled input, around a fault of oneDNN's kernel (`pointwise.py`); its weights and keys are torchvision's.
Stride on the 3x3 conv of a Bottleneck (ResNet v1.5), as torchvision. forward returns the logits only, as
torchvision's does. `third_party/torchvision_to_flax.py` converts any such `state_dict` (this module's, or
a real
torchvision/timm `resnet*` checkpoint) to Flax variables of `debkd_jax.models`' `imagenet_resnet*`.
"""

from __future__ import annotations

import torch
from torch import nn

from .pointwise import conv1x1


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """(B, 3, H, W) -> (B, num_classes) logits."""

    def __init__(
        self,
        block: type[nn.Module],
        layers: list[int],
        num_classes: int = 1000,
        widths: tuple[int, ...] = (64, 128, 256, 512),
    ):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for s, (width, blocks) in enumerate(zip(widths, layers, strict=True)):
            self.add_module(
                f"layer{s + 1}", self._make_layer(block, width, blocks, stride=1 if s == 0 else 2)
            )
        self.num_layers = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for s in range(self.num_layers):
            x = getattr(self, f"layer{s + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet34(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


def resnet_tiny(num_classes: int = 1000) -> ResNet:
    """The layout of `debkd_jax.models.imagenet_resnet_tiny`: two BasicBlock stages of widths 8 and 16."""
    return ResNet(BasicBlock, [1, 1], num_classes, widths=(8, 16))


MODELS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet_tiny": resnet_tiny}
