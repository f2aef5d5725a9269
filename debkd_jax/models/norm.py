"""BatchNorm for the models, and its CPU variant whose channel sums are matrix-vector products.

`NORMS[conv_backward]` is the BatchNorm that `get_model(..., conv_backward=name)` builds every model with:
`nn.BatchNorm` for "xla" and "materialized", `DotSumBatchNorm` for "onednn". Both have the same variables
(params scale, bias; batch_stats mean, var), the same running averages and the same values up to float
rounding.

XLA:CPU turns a BatchNorm's reductions over (N, H, W) into tree reductions (`reduce-window`) that run far
below memory speed on NHWC activations with few channels. `DotSumBatchNorm` computes every channel sum of its
forward and backward pass as `ones(M) @ x.reshape(M, C)`, which XLA:CPU runs as one GEMV.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from debkd_jax.models.conv import ModuleDef

BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5, axis_name=None)
"""The models' BatchNorm: PyTorch's momentum (0.1 there, 0.9 here) and epsilon."""


SUM_WIDTH = 4096
"""`channel_sums` sums rows of up to this many entries (a multiple of C) at once."""


def channel_sums(x: jax.Array) -> jax.Array:
    """x (..., C) -> (C,) the sum over every other axis: `ones(M / K) @ x.reshape(M / K, K * C)`, one
    matrix-vector product, then the K partial sums of each channel. K (a power of two dividing M, K * C <=
    `SUM_WIDTH`) keeps each running sum M / K terms long (float32 error grows with its length)."""
    c = x.shape[-1]
    m = x.size // c
    k = 1
    while m % (2 * k) == 0 and 2 * k * c <= SUM_WIDTH:
        k *= 2
    rows = x.reshape(m // k, k * c)
    return (jnp.ones((m // k,), x.dtype) @ rows).reshape(k, c).sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon):
    """Training-mode BatchNorm over every axis but the last, as `nn.BatchNorm` computes it.

    x (..., C) float32, scale and bias (C,) -> (y, mean, var): mean = sum(x) / M, var = max(sum(x^2) / M -
    mean^2, 0) over the M = x.size / C entries of each channel, y = (x - mean) * (scale / sqrt(var + epsilon))
    + bias. The backward pass computes its two channel sums (of dy and of dy * x_hat) the same way."""
    return batch_norm_train_fwd(x, scale, bias, epsilon)[0]


def batch_norm_train_fwd(x, scale, bias, epsilon):
    m = x.size // x.shape[-1]
    mean = channel_sums(x) / m
    var = jnp.maximum(channel_sums(x * x) / m - mean * mean, 0.0)
    inv = jax.lax.rsqrt(var + epsilon)
    y = (x - mean) * (inv * scale) + bias
    return (y, mean, var), (x, scale, mean, inv)


def batch_norm_train_bwd(epsilon, residuals, cotangents):
    del epsilon
    x, scale, mean, inv = residuals
    dy, dmean, dvar = cotangents
    m = x.size // x.shape[-1]
    x_hat = (x - mean) * inv
    dbias = channel_sums(dy)
    dscale = channel_sums(dy * x_hat)
    # d/dx of y through x_hat, mean and var, plus the (usually zero) cotangents of the returned mean and var.
    dx = (scale * inv) * (dy - (dbias + x_hat * dscale) / m) + (dmean + 2.0 * dvar * (x - mean)) / m
    return dx, dscale, dbias


batch_norm_train.defvjp(batch_norm_train_fwd, batch_norm_train_bwd)


class DotSumBatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` whose training-mode statistics and gradients come from `batch_norm_train`: same fields,
    variables, running averages and values (up to float rounding). Statistics in float32, output in `dtype`.
    Anything `batch_norm_train` does not cover (another axis, a cross-device `axis_name`, no scale or bias)
    runs `nn.BatchNorm` itself."""

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *, mask=None) -> jax.Array:
        running = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        plain = (self.axis not in (-1, x.ndim - 1) or self.axis_name is not None or mask is not None
                 or not (self.use_scale and self.use_bias) or running)
        if plain:
            return super().__call__(x, use_running_average, mask=mask)
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        y, mean, var = batch_norm_train(
            jnp.asarray(x, jnp.float32), jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32),
            self.epsilon,
        )
        if not self.is_initializing():
            mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return jnp.asarray(y, self.dtype or jnp.result_type(x, scale))


CpuBatchNorm = functools.partial(DotSumBatchNorm, momentum=0.9, epsilon=1e-5, axis_name=None)
"""`BatchNorm` (same settings) with `DotSumBatchNorm`'s training-mode statistics."""

NORMS: dict[str, ModuleDef] = {"xla": BatchNorm, "materialized": BatchNorm, "onednn": CpuBatchNorm}
"""`conv_backward` values -> the BatchNorm every model is built with (`onednn`: the CPU variant)."""


def norm_for(conv_backward: str) -> ModuleDef:
    """The BatchNorm for a `conv_backward` value; ValueError for an unknown one."""
    if not isinstance(conv_backward, str) or conv_backward not in NORMS:
        raise ValueError(f"conv_backward must be one of {tuple(NORMS)}, got {conv_backward!r}")
    return NORMS[conv_backward]
