"""oneDNN 2-D convolutions for XLA:CPU behind XLA FFI calls (the handlers: `onednn_conv.cc`).

    status()                                         built (cached), loaded and registered once per process
    conv_forward(x, w, strides, pads)                x (N, H, W, C), w (KH, KW, C, O) -> y (N, OH, OW, O)
    conv_backward_data(dy, w, x_shape, strides, pads)     -> dx, the VJP of conv_forward in x
    conv_backward_weights(x, dy, w_shape, strides, pads)  -> dw, the VJP of conv_forward in w

float32 only; `strides` (sh, sw), `pads` ((top, bottom), (left, right)), no dilation, one group. The handlers
are CPU custom calls: lower them for the CPU only (`models.conv` does, through `lax.platform_dependent`).

OpenMP: oneDNN runs on `$DEBKD_ONEDNN_THREADS` threads (default: the CPUs this process may use). Before the
library loads, `OMP_WAIT_POLICY` defaults to PASSIVE, so that idle OpenMP threads sleep instead of spinning
against XLA's own thread pool; a value the user set is kept.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from debkd_jax.native.build import BuildError, build, cache_dir, toolchain

TARGETS = {
    "forward": "debkd_onednn_conv_forward",
    "backward_data": "debkd_onednn_conv_backward_data",
    "backward_weights": "debkd_onednn_conv_backward_weights",
}
SYMBOLS = {
    "forward": "DebkdOnednnConvFwd",
    "backward_data": "DebkdOnednnConvBwdData",
    "backward_weights": "DebkdOnednnConvBwdWeights",
}
THREADS_ENV = "DEBKD_ONEDNN_THREADS"
DISABLE_ENV = "DEBKD_NATIVE"  # "0": never build or load the library


@dataclasses.dataclass(frozen=True)
class Status:
    """Whether the handlers are registered (`ok`), else why not (`reason`, one line)."""

    ok: bool
    reason: str = ""
    path: str = ""
    threads: int = 0
    onednn_version: str = ""


def default_threads() -> int:
    if os.environ.get(THREADS_ENV):
        try:
            return max(1, int(os.environ[THREADS_ENV]))
        except ValueError as e:
            raise ValueError(f"{THREADS_ENV} must be a whole number, got {os.environ[THREADS_ENV]!r}") from e
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_library(path: str, threads: int) -> ctypes.CDLL:
    """Loads the library with a passive OpenMP wait policy (unless set) and registers its handlers."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    lib = ctypes.CDLL(path)
    lib.DebkdOnednnSetThreads.argtypes = [ctypes.c_int]
    lib.DebkdOnednnSetThreads(threads)
    for direction, target in TARGETS.items():
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(lib, SYMBOLS[direction])), platform="cpu"
        )
    return lib


@functools.cache
def status() -> Status:
    """Builds the library if the cache lacks it, loads it and registers the handlers, once per process. Never
    raises for a machine that cannot build it: `Status(ok=False, reason=...)` says why."""
    if os.environ.get(DISABLE_ENV) == "0":
        return Status(False, f"{DISABLE_ENV}=0")
    try:
        threads = default_threads()
        path = build(toolchain())
        lib = load_library(path, threads)
    except (BuildError, OSError, AttributeError, ValueError) as e:
        return Status(False, str(e))
    version = lib.DebkdOnednnVersion()
    return Status(True, "", path, threads, f"{version // 10000}.{version // 100 % 100}.{version % 100}")


def set_threads(threads: int) -> None:
    """The OpenMP threads of every later oneDNN call in this process (the library must be loaded)."""
    s = status()
    if not s.ok:
        raise RuntimeError(f"the native conv is not available: {s.reason}")
    ctypes.CDLL(s.path).DebkdOnednnSetThreads(int(threads))


def _attrs(strides, pads) -> dict:
    (pt, pb), (pl, pr) = pads
    sh, sw = strides
    return {k: np.int64(v) for k, v in dict(sh=sh, sw=sw, pt=pt, pb=pb, pl=pl, pr=pr).items()}


def output_shape(x_shape, w_shape, strides, pads) -> tuple[int, int, int, int]:
    """(N, OH, OW, O) of the convolution of x (N, H, W, C) with w (KH, KW, C, O)."""
    n, h, w, _ = x_shape
    kh, kw, _, o = w_shape
    (pt, pb), (pl, pr) = pads
    return n, (h + pt + pb - kh) // strides[0] + 1, (w + pl + pr - kw) // strides[1] + 1, o


# The handlers take and return weights as (O, C, KH, KW): oneDNN reorders that layout into its own fast, HWIO
# slowly. The transposes of these small tensors run in XLA.
def _oihw(w: jax.Array) -> jax.Array:
    return jnp.transpose(w, (3, 2, 0, 1))


def conv_forward(x: jax.Array, w: jax.Array, strides, pads) -> jax.Array:
    out = jax.ShapeDtypeStruct(output_shape(x.shape, w.shape, strides, pads), x.dtype)
    return jax.ffi.ffi_call(TARGETS["forward"], out)(x, _oihw(w), **_attrs(strides, pads))


def conv_backward_data(dy: jax.Array, w: jax.Array, x_shape, strides, pads) -> jax.Array:
    out = jax.ShapeDtypeStruct(tuple(x_shape), dy.dtype)
    return jax.ffi.ffi_call(TARGETS["backward_data"], out)(dy, _oihw(w), **_attrs(strides, pads))


def conv_backward_weights(x: jax.Array, dy: jax.Array, w_shape, strides, pads) -> jax.Array:
    kh, kw, c, o = w_shape
    out = jax.ShapeDtypeStruct((o, c, kh, kw), x.dtype)
    dw = jax.ffi.ffi_call(TARGETS["backward_weights"], out)(x, dy, **_attrs(strides, pads))
    return jnp.transpose(dw, (2, 3, 1, 0))


__all__ = [
    "BuildError",
    "Status",
    "build",
    "cache_dir",
    "conv_backward_data",
    "conv_backward_weights",
    "conv_forward",
    "default_threads",
    "output_shape",
    "set_threads",
    "status",
    "toolchain",
]
