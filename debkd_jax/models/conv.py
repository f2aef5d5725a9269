"""The conv layer the models are built with, and its CPU variant with a materialized backward.

`CONV_BACKWARDS[name]` is the `nn.Conv` (or a `functools.partial` of it) that `get_model(...,
conv_backward=name)` injects as every model's `conv` attribute:

    "xla"           nn.Conv: plain `lax.conv_general_dilated`, autodiff backward
    "materialized"  nn.Conv(conv_general_dilated=conv_general_dilated_materialized): same values and
                    gradients, the backward reads the conv input through `fusion_barrier` (XLA:CPU only)

The entries are module-level constants, so two models built with the same name compare (and hash) equal.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any
"""A Flax module class or a `functools.partial` of one (as in the flax imagenet example)."""


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
    gradients, faster backward on XLA:CPU (measured in docs/performance.md).

    XLA computes a convolution's weight gradient as a convolution of the transposed input (batch as the
    contracted feature dimension). Left alone it fuses the producers of the input -- BatchNorm, ReLU, the
    residual add -- into that transpose and recomputes them at a strided access pattern. Here the backward
    pass reads the input through `fusion_barrier`, so the transpose copies one materialized buffer. CPU only:
    see `fusion_barrier`.
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


MaterializedConv: Callable[..., nn.Conv] = functools.partial(
    nn.Conv, conv_general_dilated=conv_general_dilated_materialized
)
"""`nn.Conv` with `conv_general_dilated_materialized`: same values, gradients and variables as `nn.Conv`."""

CONV_BACKWARDS: dict[str, ModuleDef] = {"xla": nn.Conv, "materialized": MaterializedConv}
"""`conv_backward` values -> the conv module every layer of a model is built with."""

CONV_BACKWARD_SETTINGS = ("auto", *CONV_BACKWARDS)
"""Values of `config.conv_backward`: "auto" (chosen from the devices) or a `CONV_BACKWARDS` key."""


def conv_for(conv_backward: str) -> ModuleDef:
    """The conv module for a `conv_backward` value; ValueError for an unknown one."""
    if not isinstance(conv_backward, str) or conv_backward not in CONV_BACKWARDS:
        raise ValueError(f"conv_backward must be one of {tuple(CONV_BACKWARDS)}, got {conv_backward!r}")
    return CONV_BACKWARDS[conv_backward]


def conv_backward_of(conv: ModuleDef) -> str:
    """The `CONV_BACKWARDS` name of a conv module; ValueError for one built elsewhere."""
    for name, known in CONV_BACKWARDS.items():
        if conv is known:
            return name
    raise ValueError(f"conv {conv!r} is none of CONV_BACKWARDS ({', '.join(CONV_BACKWARDS)})")
