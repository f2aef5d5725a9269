"""CIFAR-style ResNets (NHWC, 32x32 inputs) that return logits and every residual block's output.

Variable names, stable for checkpoints, FKD taps and the PyTorch peer (third_party/torch_peer):

    stem_conv/kernel                      (3, 3, 3, stem_width)
    stem_bn/{scale,bias} + batch_stats/{mean,var}
    block_{i}/conv1, bn1, conv2, bn2      BasicBlock, i = 0..num_blocks-1 over all stages in order
    block_{i}/conv1..conv3, bn1..bn3      Bottleneck
    block_{i}/proj_conv, proj_bn          only where the block changes the shape
    head/{kernel,bias}                    (final_channels, num_classes)

`block_outputs[i]` is the output of `block_{i}`.

`conv_backward` picks how every conv's gradient is computed, never its value or the variables: "xla" (plain
`lax.conv_general_dilated`) or "materialized" (`conv_general_dilated_materialized`, faster on XLA:CPU only:
its backward has an identity `lax.cond`, which costs a device-to-host predicate sync on GPU/TPU).
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5, axis_name=None)


def fusion_barrier(x: jax.Array) -> jax.Array:
    """`x`, materialized: an identity `lax.cond` on a runtime predicate. XLA does not fuse across a
    conditional, so a consumer reads this one buffer instead of recomputing `x` from its producers.
    (`lax.optimization_barrier` does not do this on CPU: XLA's CPU pipeline removes barriers before
    fusion.) On GPU/TPU the predicate costs a device-to-host sync: use it on CPU only."""
    flat = x.reshape(-1)[:1]
    pred = jnp.all(flat == flat)  # False only for NaN; both branches return x exactly
    # Two different branches: JAX would forward an operand that every branch returns unchanged, dropping the
    # cond.
    return jax.lax.cond(pred, lambda v: v, lambda v: v * 1.0, x)


def conv_general_dilated_materialized(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """Drop-in for `lax.conv_general_dilated` (`nn.Conv(..., conv_general_dilated=this)`), same values and
    gradients, faster backward on XLA:CPU.

    XLA computes a convolution's weight gradient as a convolution of the transposed input (batch as the
    contracted feature dimension). Left alone it fuses the producers of the input -- BatchNorm, ReLU, the
    residual add -- into that transpose and recomputes them at a strided access pattern, which made the
    transposes ~40% of the ResNet-8 train step. Here the backward pass reads the input through
    `fusion_barrier`, so the transpose copies one materialized buffer (1.15-1.24x faster train step on
    XLA:CPU, docs/performance.md). CPU only: see `fusion_barrier`.
    """
    conv = functools.partial(
        jax.lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )

    @jax.custom_vjp
    def f(x, w):
        return conv(x, w)

    def fwd(x, w):
        return conv(x, w), (x, w)

    def bwd(residuals, g):
        x, w = residuals
        return jax.vjp(conv, fusion_barrier(x), w)[1](g)

    f.defvjp(fwd, bwd)
    return f(lhs, rhs)


CONV_BACKWARDS: dict[str, Callable[..., jax.Array] | None] = {
    "xla": None,  # nn.Conv's own lax.conv_general_dilated
    "materialized": conv_general_dilated_materialized,
}
"""`conv_backward` values -> the `conv_general_dilated` given to every `nn.Conv` of the models."""

CONV_BACKWARD_SETTINGS = ("auto", *CONV_BACKWARDS)
"""Values of `config.conv_backward`: "auto" (resolved per mesh by `training.resolve_conv_backward`) or one of
`CONV_BACKWARDS`."""


def conv_general_dilated_for(conv_backward: str) -> Callable[..., jax.Array] | None:
    """The `nn.Conv(conv_general_dilated=...)` for a `conv_backward` value; ValueError for an unknown one."""
    if not isinstance(conv_backward, str) or conv_backward not in CONV_BACKWARDS:
        raise ValueError(f"conv_backward must be one of {tuple(CONV_BACKWARDS)}, got {conv_backward!r}")
    return CONV_BACKWARDS[conv_backward]


def conv3x3(features: int, strides: int, dtype: Any, name: str, conv_backward: str = "xla") -> nn.Conv:
    """3x3 conv padded 1 on each side as PyTorch's `padding=1` ('SAME' pads only high at stride 2)."""
    return nn.Conv(features, (3, 3), (strides, strides), padding=((1, 1), (1, 1)), use_bias=False,
                   kernel_init=conv_init, dtype=dtype, name=name,
                   conv_general_dilated=conv_general_dilated_for(conv_backward))


def conv1x1(features: int, strides: int, dtype: Any, name: str, conv_backward: str = "xla") -> nn.Conv:
    return nn.Conv(features, (1, 1), (strides, strides), padding="VALID", use_bias=False,
                   kernel_init=conv_init, dtype=dtype, name=name,
                   conv_general_dilated=conv_general_dilated_for(conv_backward))


class BasicBlock(nn.Module):
    """Two 3x3 convs: (B, H, W, C) -> (B, H/strides, W/strides, features)."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    conv_backward: str = "xla"
    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
        y = conv3x3(self.features, self.strides, self.dtype, "conv1", self.conv_backward)(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv3x3(self.features, 1, self.dtype, "conv2", self.conv_backward)(y)
        y = norm(name="bn2", scale_init=nn.initializers.zeros)(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = conv1x1(self.features, self.strides, self.dtype, "proj_conv", self.conv_backward)(x)
            x = norm(name="proj_bn")(x)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 convs: (B, H, W, C) -> (B, H/strides, W/strides, 4 * features)."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    conv_backward: str = "xla"
    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
        out_features = self.features * self.expansion
        y = conv1x1(self.features, 1, self.dtype, "conv1", self.conv_backward)(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv3x3(self.features, self.strides, self.dtype, "conv2", self.conv_backward)(y)
        y = nn.relu(norm(name="bn2")(y))
        y = conv1x1(out_features, 1, self.dtype, "conv3", self.conv_backward)(y)
        y = norm(name="bn3", scale_init=nn.initializers.zeros)(y)
        if self.strides != 1 or x.shape[-1] != out_features:
            x = conv1x1(out_features, self.strides, self.dtype, "proj_conv", self.conv_backward)(x)
            x = norm(name="proj_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """3x3 stride-1 stem, residual stages, global average pool, dense head.

    `dtype` is the compute dtype; parameters and batch statistics stay float32 and logits are returned as
    float32, block outputs in `dtype`. `conv_backward` ("xla" | "materialized", see the module docstring) is
    passed to every conv, the blocks' included; it changes neither values nor variables.
    """

    stage_sizes: Sequence[int]
    block_cls: type[nn.Module]
    num_classes: int
    stem_width: int
    widths: Sequence[int]
    strides: Sequence[int]
    dtype: Any = jnp.float32
    conv_backward: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """(B, H, W, 3) normalized images -> ((B, num_classes) float32 logits, block outputs (B, h, w, c))."""
        x = conv3x3(self.stem_width, 1, self.dtype, "stem_conv", self.conv_backward)(x)
        x = BatchNorm(use_running_average=not train, dtype=self.dtype, name="stem_bn")(x)
        x = nn.relu(x)
        block_outputs = []
        for size, width, stride in zip(self.stage_sizes, self.widths, self.strides, strict=True):
            for j in range(size):
                block = self.block_cls(width, stride if j == 0 else 1, dtype=self.dtype,
                                       conv_backward=self.conv_backward, name=f"block_{len(block_outputs)}")
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

MODELS: dict[str, Callable[..., ResNet]] = {
    "resnet8": resnet8,
    "resnet8x4": resnet8x4,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "resnet_tiny": resnet_tiny,
}


def get_model(name: str, num_classes: int, dtype: Any = "float32", conv_backward: str = "xla") -> nn.Module:
    """The preset `name` with a `num_classes`-way head computing in `dtype` ('float32', 'bfloat16', ...), its
    convs' gradients computed as `conv_backward` says ("xla" or "materialized"; same values either way)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    try:
        dtype = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"compute dtype must be floating, got {dtype}")
    conv_general_dilated_for(conv_backward)  # ValueError for an unknown value, before any tracing
    return MODELS[name](num_classes=num_classes, dtype=dtype, conv_backward=conv_backward)


class HintRegressor(nn.Module):
    """FitNets regressor: 1x1 conv + BatchNorm to `features` channels, then bilinear resize to `target_hw`.

    (B, h, w, C) -> (B, *target_hw, features). Maps a student block output onto a teacher block's shape.
    """

    features: int
    dtype: Any = jnp.float32
    conv_backward: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, target_hw: tuple[int, int], train: bool) -> jax.Array:
        x = conv1x1(self.features, 1, self.dtype, "conv", self.conv_backward)(x)
        x = BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn")(x)
        if tuple(x.shape[1:3]) != tuple(target_hw):
            x = jax.image.resize(x, (x.shape[0], *target_hw, x.shape[-1]), method="bilinear")
        return x


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
