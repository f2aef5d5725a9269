"""The conv layer the models are built with, and its CPU variants: a materialized backward, oneDNN.

`CONV_BACKWARDS[name]` is the `nn.Conv` (or a `functools.partial` of it) that `get_model(...,
conv_backward=name)` injects as every model's `conv` attribute:

    "xla"           nn.Conv: plain `lax.conv_general_dilated`, autodiff backward
    "materialized"  nn.Conv(conv_general_dilated=conv_general_dilated_materialized): same values and
                    gradients, the backward reads the conv input through `fusion_barrier` (XLA:CPU only)
    "onednn"        nn.Conv(conv_general_dilated=conv_general_dilated_onednn): forward and both gradients in
                    oneDNN on the CPU (`debkd_jax.native`), the plain XLA conv elsewhere and wherever the
                    native conv cannot run (one warning says why)

The entries are module-level constants, so two models built with the same name compare (and hash) equal.
"""

import functools
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from debkd_jax import native

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

NHWC_HWIO = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
"""`lax.ConvDimensionNumbers` (lhs_spec, rhs_spec, out_spec) of NHWC inputs, HWIO kernels, NHWC outputs."""

_warned: set[str] = set()


def warn_fallback(reason: str) -> None:
    """One warning per reason and process: the oneDNN conv falls back to the plain XLA conv."""
    if reason not in _warned:
        _warned.add(reason)
        message = f"conv_backward='onednn' uses the plain XLA conv: {reason}"
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def onednn_unsupported(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                       preferred_element_type) -> str | None:
    """Why the oneDNN conv cannot compute this convolution (None: it can)."""
    if lhs.ndim != 4 or rhs.ndim != 4:
        return f"only 2-D convolutions run natively, not {lhs.ndim - 2}-D"
    if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return f"only float32 runs natively, not {lhs.dtype}/{rhs.dtype}"
    if preferred_element_type not in (None, jnp.float32):
        return f"preferred_element_type={preferred_element_type} does not run natively"
    if feature_group_count != 1:
        return "grouped convolutions do not run natively"
    if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
        return "dilated convolutions do not run natively"
    dims = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if tuple(map(tuple, dims)) != NHWC_HWIO:
        return f"only NHWC/HWIO/NHWC runs natively, not {dims}"
    return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def onednn_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads) -> jax.Array:
    """x (N, H, W, C) float32 conv w (KH, KW, C, O) -> (N, OH, OW, O): oneDNN on the CPU (all three
    directions), `lax.conv_general_dilated` on other platforms. `pads` ((top, bottom), (left, right))."""
    return onednn_conv_fwd(x, w, strides, pads)[0]


def _xla_conv(x, w, strides, pads):
    return jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def onednn_conv_fwd(x, w, strides, pads):
    y = jax.lax.platform_dependent(
        x, w, cpu=lambda x, w: native.conv_forward(x, w, strides, pads),
        default=lambda x, w: _xla_conv(x, w, strides, pads),
    )
    return y, (x, w)


def onednn_conv_bwd(strides, pads, residuals, g):
    x, w = residuals

    def on_cpu(x, w, g):
        dx = native.conv_backward_data(g, w, x.shape, strides, pads)
        dw = native.conv_backward_weights(x, g, w.shape, strides, pads)
        return dx, dw

    def elsewhere(x, w, g):
        return jax.vjp(lambda x, w: _xla_conv(x, w, strides, pads), x, w)[1](g)

    return jax.lax.platform_dependent(x, w, g, cpu=on_cpu, default=elsewhere)


onednn_conv.defvjp(onednn_conv_fwd, onednn_conv_bwd)


def conv_general_dilated_onednn(
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
    """Drop-in for `lax.conv_general_dilated` (`nn.Conv(..., conv_general_dilated=this)`): `onednn_conv` for
    float32 NHWC/HWIO 2-D convolutions without dilation or groups where `native.status()` is ok; otherwise
    `lax.conv_general_dilated` itself, after one warning that says why."""
    plain = functools.partial(
        jax.lax.conv_general_dilated,
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    reason = onednn_unsupported(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                                preferred_element_type)
    if reason is None and isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    if reason is None and any(p < 0 for pair in padding for p in pair):
        reason = "negative padding does not run natively"
    if reason is None:
        status = native.status()
        reason = None if status.ok else status.reason
    if reason is not None:
        warn_fallback(reason)
        return plain()
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return onednn_conv(lhs, rhs, tuple(int(s) for s in window_strides), pads)


OnednnConv: Callable[..., nn.Conv] = functools.partial(
    nn.Conv, conv_general_dilated=conv_general_dilated_onednn
)
"""`nn.Conv` with `conv_general_dilated_onednn`: same values, gradients and variables as `nn.Conv`."""

CONV_BACKWARDS: dict[str, ModuleDef] = {
    "xla": nn.Conv,
    "materialized": MaterializedConv,
    "onednn": OnednnConv,
}
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
