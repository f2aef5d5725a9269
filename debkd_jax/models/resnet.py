"""ResNets (NHWC) that return logits and every residual block's output: the CIFAR-style ones (3x3 stride-1
stem, for 32x32 inputs) and the ImageNet ones of torchvision's layout (`imagenet_resnet18/34/50`: 7x7 stride-2
stem, 3x3 stride-2 max-pool, stages 64-512; any input size).

Variable names, stable for checkpoints, FKD taps and the PyTorch peer (third_party/torch_peer):

    stem_conv/kernel                      (3, 3, 3, stem_width), (7, 7, 3, stem_width) for the ImageNet stem
    stem_bn/{scale,bias} + batch_stats/{mean,var}
    block_{i}/conv1, bn1, conv2, bn2      BasicBlock, i = 0..num_blocks-1 over all stages in order
    block_{i}/conv1..conv3, bn1..bn3      Bottleneck
    block_{i}/proj_conv, proj_bn          only where the block changes the shape
    head/{kernel,bias}                    (final_channels, num_classes)

`block_outputs[i]` is the output of `block_{i}`. Every conv is built from the module's `conv` attribute
(`nn.Conv` or a partial of it, see `conv.CONV_BACKWARDS`) and every BatchNorm from its `norm` attribute
(`BatchNorm` or its CPU variant, `norm.NORMS`); they change how values and gradients are computed, never the
values (beyond float rounding) or the variables.
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from debkd_jax.models import external
from debkd_jax.models.conv import ModuleDef, conv_backward_of, conv_for
from debkd_jax.models.norm import BatchNorm, norm_for

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv3x3(features: int, strides: int, dtype: Any, name: str, conv: ModuleDef = nn.Conv) -> nn.Module:
    """3x3 conv padded 1 on each side as PyTorch's `padding=1` ('SAME' pads only high at stride 2)."""
    return conv(features, (3, 3), (strides, strides), padding=((1, 1), (1, 1)), use_bias=False,
                kernel_init=conv_init, dtype=dtype, name=name)


def conv1x1(features: int, strides: int, dtype: Any, name: str, conv: ModuleDef = nn.Conv) -> nn.Module:
    return conv(features, (1, 1), (strides, strides), padding="VALID", use_bias=False,
                kernel_init=conv_init, dtype=dtype, name=name)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""torchvision's per-channel input normalization of images in [0, 1]."""

class BasicBlock(nn.Module):
    """Two 3x3 convs: (B, H, W, C) -> (B, H/strides, W/strides, features)."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = functools.partial(self.norm, use_running_average=not train, dtype=self.dtype)
        y = conv3x3(self.features, self.strides, self.dtype, "conv1", self.conv)(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv3x3(self.features, 1, self.dtype, "conv2", self.conv)(y)
        y = norm(name="bn2", scale_init=nn.initializers.zeros)(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = conv1x1(self.features, self.strides, self.dtype, "proj_conv", self.conv)(x)
            x = norm(name="proj_bn")(x)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 convs: (B, H, W, C) -> (B, H/strides, W/strides, 4 * features)."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = functools.partial(self.norm, use_running_average=not train, dtype=self.dtype)
        out_features = self.features * self.expansion
        y = conv1x1(self.features, 1, self.dtype, "conv1", self.conv)(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv3x3(self.features, self.strides, self.dtype, "conv2", self.conv)(y)
        y = nn.relu(norm(name="bn2")(y))
        y = conv1x1(out_features, 1, self.dtype, "conv3", self.conv)(y)
        y = norm(name="bn3", scale_init=nn.initializers.zeros)(y)
        if self.strides != 1 or x.shape[-1] != out_features:
            x = conv1x1(out_features, self.strides, self.dtype, "proj_conv", self.conv)(x)
            x = norm(name="proj_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """Stem, residual stages, global average pool, dense head.

    `stem`: "cifar" (3x3 stride-1 conv, BN, ReLU) or "imagenet" (torchvision's: 7x7 stride-2 conv padded 3,
    BN, ReLU, 3x3 stride-2 max-pool padded 1), which maps (B, H, W, 3) to (B, ceil(H/4), ceil(W/4),
    stem_width).

    `input_norm`: "project" takes the project's `(x / 255 - 0.5) / 0.5` as it is; "imagenet" first maps it
    to torchvision's `(x / 255 - mean) / std` (ImageNet's mean and std per channel), exactly and before any
    padding, so that a converted pretrained torchvision network sees the inputs it was trained on.

    `dtype` is the compute dtype; parameters and batch statistics stay float32 and logits are returned as
    float32, block outputs in `dtype`. `conv` builds every conv and `norm` every BatchNorm, the blocks'
    included.
    """

    stage_sizes: Sequence[int]
    block_cls: type[nn.Module]
    num_classes: int
    stem_width: int
    widths: Sequence[int]
    strides: Sequence[int]
    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    stem: str = "cifar"
    input_norm: str = "project"

    @property
    def conv_backward(self) -> str:
        """The `CONV_BACKWARDS` name of `conv` ("xla", "materialized" or "onednn")."""
        return conv_backward_of(self.conv)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """(B, H, W, 3) normalized images -> ((B, num_classes) float32 logits, block outputs (B, h, w, c))."""
        if self.input_norm == "imagenet":
            x01 = (x.astype(jnp.float32) + 1.0) / 2.0
            x = ((x01 - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)).astype(x.dtype)
        elif self.input_norm != "project":
            raise ValueError(f"input_norm must be 'project' or 'imagenet', got {self.input_norm!r}")
        if self.stem == "imagenet":
            x = self.conv(self.stem_width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                          kernel_init=conv_init, dtype=self.dtype, name="stem_conv")(x)
        elif self.stem == "cifar":
            x = conv3x3(self.stem_width, 1, self.dtype, "stem_conv", self.conv)(x)
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {self.stem!r}")
        x = self.norm(use_running_average=not train, dtype=self.dtype, name="stem_bn")(x)
        x = nn.relu(x)
        if self.stem == "imagenet":  # padded with -inf, as torch's MaxPool2d(3, 2, padding=1)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block_outputs = []
        for size, width, stride in zip(self.stage_sizes, self.widths, self.strides, strict=True):
            for j in range(size):
                block = self.block_cls(width, stride if j == 0 else 1, dtype=self.dtype, conv=self.conv,
                                       norm=self.norm, name=f"block_{len(block_outputs)}")
                x = block(x, train=train)
                block_outputs.append(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return jnp.asarray(x, jnp.float32), tuple(block_outputs)


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
"""Test-only: compiles in well under a second."""

imagenet_resnet = functools.partial(ResNet, stem="imagenet", stem_width=64, widths=(64, 128, 256, 512),
                                    strides=(1, 2, 2, 2))
imagenet_resnet18 = functools.partial(imagenet_resnet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
imagenet_resnet34 = functools.partial(imagenet_resnet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
imagenet_resnet50 = functools.partial(imagenet_resnet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
imagenet_resnet_tiny = functools.partial(ResNet, stem="imagenet", stage_sizes=(1, 1), block_cls=BasicBlock,
                                         stem_width=8, widths=(8, 16), strides=(1, 2))
"""The ImageNet stem on two small stages: for tests and `configs/imagenet.py:smoke`."""

torchvision_resnet18 = functools.partial(imagenet_resnet18, input_norm="imagenet")
torchvision_resnet34 = functools.partial(imagenet_resnet34, input_norm="imagenet")
torchvision_resnet50 = functools.partial(imagenet_resnet50, input_norm="imagenet")
torchvision_resnet_tiny = functools.partial(imagenet_resnet_tiny, input_norm="imagenet")
"""The same networks on torchvision's input normalization: for pretrained torchvision weights
(third_party/torchvision_to_flax.py)."""

MODELS: dict[str, Callable[..., ResNet]] = {
    "resnet8": resnet8,
    "resnet8x4": resnet8x4,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "resnet_tiny": resnet_tiny,
    "imagenet_resnet18": imagenet_resnet18,
    "imagenet_resnet34": imagenet_resnet34,
    "imagenet_resnet50": imagenet_resnet50,
    "imagenet_resnet_tiny": imagenet_resnet_tiny,
    "torchvision_resnet18": torchvision_resnet18,
    "torchvision_resnet34": torchvision_resnet34,
    "torchvision_resnet50": torchvision_resnet50,
    "torchvision_resnet_tiny": torchvision_resnet_tiny,
}


def get_model(name: str, num_classes: int, dtype: Any = "float32", conv_backward: str = "xla") -> nn.Module:
    """The preset `name` with a `num_classes`-way head computing in `dtype` ('float32', 'bfloat16', ...), its
    convs built from `CONV_BACKWARDS[conv_backward]` ("xla", "materialized" or "onednn"; same values
    either way) and its BatchNorms from `NORMS[conv_backward]`.

    `name` may instead be 'package.module:factory' (`external.build`): the factory's module, adapted to
    return (logits, features) like the presets; `conv_backward` does not reach its convs."""
    if name not in MODELS and not external.is_factory_spec(name):
        raise ValueError(
            f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}, or 'package.module:factory'"
        )
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    try:
        dtype = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"compute dtype must be floating, got {dtype}")
    if external.is_factory_spec(name):
        return external.build(name, num_classes, dtype)
    return MODELS[name](num_classes=num_classes, dtype=dtype, conv=conv_for(conv_backward),
                        norm=norm_for(conv_backward))


def feature_taps(num_blocks: int, which: str) -> tuple[int, ...]:
    """FKD tap indices: teacher (0, 2, n-1), student (0, n//2, n-1), both clamped and de-duplicated."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if which == "teacher":
        taps = (0, min(2, num_blocks - 1), num_blocks - 1)
    elif which == "student":
        taps = (0, num_blocks // 2, num_blocks - 1)
    else:
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    return tuple(dict.fromkeys(taps))


def count_params(params: Any) -> int:
    """Number of scalars in a pytree of arrays (or of `jax.ShapeDtypeStruct`s from `jax.eval_shape`)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
