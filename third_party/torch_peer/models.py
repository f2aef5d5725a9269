"""The four CIFAR-style ResNets of `debkd_jax.models` in PyTorch, module for module (NCHW).

Submodule names equal the Flax variable names (`stem_conv`, `stem_bn`, `block_{i}.conv1`, ...,
`block_{i}.proj_conv`, `block_{i}.proj_bn`, `head`), so `load_flax_params` maps parameters one to one.
Strided 1x1 convolutions with fewer than 16 input channels (`resnet_tiny`'s shortcut) are computed at stride 1
on the subsampled input, around a fault of oneDNN's kernel (`pointwise.py` says which and why).
Initialisation mirrors the Flax side: Kaiming-normal (fan_out) convs, BatchNorm weight 1 / bias 0 and the
last BatchNorm weight of every residual block zero; the head keeps PyTorch's default `nn.Linear` init.
"""

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .pointwise import conv1x1


def conv3x3(in_ch: int, out_ch: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs: (B, in_ch, H, W) -> (B, features, H/stride, W/stride)."""

    expansion = 1

    def __init__(self, in_ch: int, features: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_ch, features, stride)
        self.bn1 = nn.BatchNorm2d(features)
        self.conv2 = conv3x3(features, features, 1)
        self.bn2 = nn.BatchNorm2d(features)
        nn.init.zeros_(self.bn2.weight)
        self.proj = stride != 1 or in_ch != features
        if self.proj:
            self.proj_conv = conv1x1(in_ch, features, stride)
            self.proj_bn = nn.BatchNorm2d(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.proj:
            x = self.proj_bn(self.proj_conv(x))
        return torch.relu(x + y)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 convs: (B, in_ch, H, W) -> (B, 4 * features, H/stride, W/stride)."""

    expansion = 4

    def __init__(self, in_ch: int, features: int, stride: int = 1):
        super().__init__()
        out_ch = features * self.expansion
        self.conv1 = conv1x1(in_ch, features, 1)
        self.bn1 = nn.BatchNorm2d(features)
        self.conv2 = conv3x3(features, features, stride)
        self.bn2 = nn.BatchNorm2d(features)
        self.conv3 = conv1x1(features, out_ch, 1)
        self.bn3 = nn.BatchNorm2d(out_ch)
        nn.init.zeros_(self.bn3.weight)
        self.proj = stride != 1 or in_ch != out_ch
        if self.proj:
            self.proj_conv = conv1x1(in_ch, out_ch, stride)
            self.proj_bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        if self.proj:
            x = self.proj_bn(self.proj_conv(x))
        return torch.relu(x + y)


class ResNet(nn.Module):
    """3x3 stride-1 stem, residual stages, global average pool, linear head.

    forward: (B, 3, H, W) -> ((B, num_classes) logits, tuple of every block's output (B, c, h, w)).
    """

    def __init__(self, stage_sizes: Sequence[int], block_cls: type[nn.Module], num_classes: int,
                 stem_width: int, widths: Sequence[int], strides: Sequence[int]):
        super().__init__()
        self.stem_conv = conv3x3(3, stem_width, 1)
        self.stem_bn = nn.BatchNorm2d(stem_width)
        in_ch, self.num_blocks = stem_width, 0
        for size, width, stride in zip(stage_sizes, widths, strides, strict=True):
            for j in range(size):
                block = block_cls(in_ch, width, stride if j == 0 else 1)
                self.add_module(f"block_{self.num_blocks}", block)
                in_ch, self.num_blocks = width * block_cls.expansion, self.num_blocks + 1
        self.head = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        x = torch.relu(self.stem_bn(self.stem_conv(x)))
        block_outputs = []
        for i in range(self.num_blocks):
            x = getattr(self, f"block_{i}")(x)
            block_outputs.append(x)
        return self.head(x.mean(dim=(2, 3))), tuple(block_outputs)


resnet8 = functools.partial(ResNet, stage_sizes=(1, 1, 1), block_cls=BasicBlock, stem_width=16,
                            widths=(16, 32, 64), strides=(1, 2, 2))
resnet8x4 = functools.partial(ResNet, stage_sizes=(1, 1, 1), block_cls=BasicBlock, stem_width=32,
                              widths=(64, 128, 256), strides=(1, 2, 2))
resnet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock, stem_width=64,
                             widths=(64, 128, 256, 512), strides=(1, 2, 2, 2))
resnet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck, stem_width=64,
                             widths=(64, 128, 256, 512), strides=(1, 2, 2, 2))
resnet_tiny = functools.partial(ResNet, stage_sizes=(1, 1), block_cls=BasicBlock, stem_width=4,
                                widths=(4, 8), strides=(1, 2))

MODELS = {
    "resnet8": resnet8,
    "resnet8x4": resnet8x4,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "resnet_tiny": resnet_tiny,
}


class WithBlockOutputs(nn.Module):
    """A logits-only network (torchvision's ResNet) returning `(logits, ())` as the peer's models do."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        return self.net(x), ()


def get_model(name: str, num_classes: int) -> nn.Module:
    """A CIFAR-style peer by name, or `imagenet_<name>`: torchvision's layout (`torchvision_resnet`),
    wrapped to
    return `(logits, ())`."""
    from .torchvision_resnet import MODELS as IMAGENET

    if name.startswith("imagenet_") and name.removeprefix("imagenet_") in IMAGENET:
        return WithBlockOutputs(IMAGENET[name.removeprefix("imagenet_")](num_classes=num_classes))
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}, "
                         f"imagenet_{{{', '.join(IMAGENET)}}}")
    return MODELS[name](num_classes=num_classes)


def _copy(dst: torch.Tensor, src, name: str) -> None:
    src = torch.from_numpy(np.asarray(src, dtype=np.float32))
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{name}: torch shape {tuple(dst.shape)} != flax shape {tuple(src.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def load_flax_params(torch_model: nn.Module, params, batch_stats) -> nn.Module:
    """Copies a Flax `ResNet` variable tree into `torch_model` in place and returns it.

    Conv kernels HWIO -> OIHW, dense kernels (in, out) -> (out, in), BatchNorm scale/bias -> weight/bias and
    batch_stats mean/var -> running_mean/running_var. Raises if any torch parameter or buffer is left unset.
    """
    loaded = set()

    def visit(module: nn.Module, prefix: str, p: dict, s: dict) -> None:
        for name, sub_p in p.items():
            sub = getattr(module, name)
            path = f"{prefix}{name}"
            if isinstance(sub, nn.Conv2d):
                _copy(sub.weight, np.transpose(np.asarray(sub_p["kernel"]), (3, 2, 0, 1)), path)
                loaded.add(f"{path}.weight")
            elif isinstance(sub, nn.Linear):
                _copy(sub.weight, np.asarray(sub_p["kernel"]).T, path)
                _copy(sub.bias, sub_p["bias"], path)
                loaded.update({f"{path}.weight", f"{path}.bias"})
            elif isinstance(sub, nn.BatchNorm2d):
                _copy(sub.weight, sub_p["scale"], path)
                _copy(sub.bias, sub_p["bias"], path)
                _copy(sub.running_mean, s[name]["mean"], path)
                _copy(sub.running_var, s[name]["var"], path)
                loaded.update(f"{path}.{k}" for k in ("weight", "bias", "running_mean", "running_var"))
            else:
                visit(sub, f"{path}.", sub_p, s.get(name, {}))

    visit(torch_model, "", params, batch_stats)
    expected = {n for n, _ in torch_model.named_parameters()}
    expected |= {n for n, _ in torch_model.named_buffers() if not n.endswith("num_batches_tracked")}
    if missing := sorted(expected - loaded):
        raise ValueError(f"torch tensors not set from the Flax tree: {missing}")
    return torch_model
