"""`python -m debkd_jax.native`: builds the oneDNN conv library ahead of time (into the cache) and checks it.

Prints where the library is, oneDNN's version and threads, and the largest relative differences of one conv
and its two gradients from `lax.conv_general_dilated`; exits 1 when the native conv cannot run here.
"""

import sys

import jax
import jax.numpy as jnp

from debkd_jax import native

TOLERANCE = 1e-5


def largest_relative_differences() -> dict[str, float]:
    """One stride-2 3x3 conv, natively and by XLA: max |native - xla| / max |xla| of y, dx and dw."""
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 9, 9, 5))
    w = jax.random.normal(kw, (3, 3, 5, 7))
    strides, pads = (2, 2), ((1, 1), (1, 1))
    y = jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    dy = jax.random.normal(kg, y.shape)
    dx, dw = jax.vjp(
        lambda x, w: jax.lax.conv_general_dilated(
            x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
        ),
        x,
        w,
    )[1](dy)
    got = {
        "y": native.conv_forward(x, w, strides, pads),
        "dx": native.conv_backward_data(dy, w, x.shape, strides, pads),
        "dw": native.conv_backward_weights(x, dy, w.shape, strides, pads),
    }
    want = {"y": y, "dx": dx, "dw": dw}
    return {k: float(jnp.max(jnp.abs(got[k] - want[k])) / jnp.max(jnp.abs(want[k]))) for k in got}


def main() -> int:
    status = native.status()
    if not status.ok:
        print(f"the native conv cannot run here: {status.reason}", file=sys.stderr)
        return 1
    print(f"library: {status.path}")
    print(f"oneDNN {status.onednn_version}, {status.threads} OpenMP thread(s) (${native.THREADS_ENV})")
    with jax.default_device(jax.devices("cpu")[0]):
        differences = largest_relative_differences()
    print(
        "relative difference from lax.conv_general_dilated: "
        + ", ".join(f"{k} {v:.1e}" for k, v in differences.items())
    )
    if max(differences.values()) > TOLERANCE:
        print(f"error: the native conv differs from XLA's by more than {TOLERANCE}", file=sys.stderr)
        return 1
    print("ok: conv_backward='onednn' runs natively")
    return 0


if __name__ == "__main__":
    sys.exit(main())
