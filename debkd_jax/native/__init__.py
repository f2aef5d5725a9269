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
def library() -> Status:
    """Builds the library if the cache lacks it, loads it and registers the handlers, once per process,
    without the self-check (`status()` adds it). Never raises for a machine that cannot build it: `ok=False`
    and `reason` say why."""
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


@functools.cache
def status() -> Status:
    """`library()`, and whether the native conv passed its self-check (`native.check`: every geometry class
    against XLA, in a child process with a deadline, under this process's threads and `$ONEDNN_MAX_CPU_ISA`;
    the verdict is cached beside the library). A conv that fails it is not used: `ok=False`, and `reason`
    says why."""
    built = library()
    if not built.ok:
        return built
    from debkd_jax.native import check

    ok, reason = check.verdict(built.path, built.threads)
    if ok:
        return built
    return dataclasses.replace(built, ok=False, reason=f"the native conv is unsafe on this CPU: {reason}")


def set_threads(threads: int) -> None:
    """The OpenMP threads of every later oneDNN call in this process (the library must be loaded)."""
    s = library()
    if not s.ok:
        raise RuntimeError(f"the native conv is not available: {s.reason}")
    ctypes.CDLL(s.path).DebkdOnednnSetThreads(int(threads))


def set_guarded(guarded: bool) -> None:
    """Guarded scratchpads for every later oneDNN call in this process (the self-check's mode): each call's
    scratchpad sits between canary zones, and a kernel that writes past it fails that call with an error."""
    s = library()
    if not s.ok:
        raise RuntimeError(f"the native conv is not available: {s.reason}")
    ctypes.CDLL(s.path).DebkdOnednnSetGuarded(int(bool(guarded)))


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


def needs_unit_stride(w_shape, strides) -> bool:
    """Whether a convolution reaches oneDNN as its stride-1 equivalent: every 1x1 convolution with a stride.

    oneDNN's 1x1 kernels compute a strided 1x1 convolution by first copying the strided pixels into a
    "reduce to unit stride" (rtus) workspace. Their backward-weights pass (`jit_avx2_1x1_convolution.cpp`,
    and the AVX-512 `jit_avx512_common_1x1_convolution.cpp`) offsets that workspace by `ic_block` floats per
    pixel (8 on AVX2, 16 on AVX-512), while `rtus_prepare_space_info` (`jit_uni_1x1_conv_utils.hpp`) sizes it
    with `IC` floats per pixel for an NHWC source. With fewer input channels than a block it writes past the
    buffer: wrong weight gradients with no error, hangs in oneDNN's OpenMP barrier, heap corruption (oneDNN
    issue #6035, unfixed in 3.2 through 3.12; PyTorch bundles the same kernels). Subsampling the input in XLA
    and convolving at stride 1 is the same convolution, never takes that path, and keeps both gradients
    exact: a strided 1x1 convolution reads only the pixels `x[:, ::sh, ::sw, :]`.
    """
    return tuple(w_shape[:2]) == (1, 1) and tuple(strides) != (1, 1)


def unit_stride_input(x: jax.Array, strides, pads, out_hw) -> jax.Array:
    """The pixels a 1x1 convolution at `strides` with `pads` reads from x (N, H, W, C): (N, OH, OW, C)."""
    (pt, pb), (pl, pr) = pads
    padded = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    oh, ow = out_hw
    n, c = x.shape[0], x.shape[3]
    return jax.lax.slice(
        padded,
        (0, 0, 0, 0),
        (n, (oh - 1) * strides[0] + 1, (ow - 1) * strides[1] + 1, c),
        (1, strides[0], strides[1], 1),
    )


UNIT = ((1, 1), ((0, 0), (0, 0)))


def conv_forward(x: jax.Array, w: jax.Array, strides, pads) -> jax.Array:
    shape = output_shape(x.shape, w.shape, strides, pads)
    if needs_unit_stride(w.shape, strides):
        x, (strides, pads) = unit_stride_input(x, strides, pads, shape[1:3]), UNIT
    out = jax.ShapeDtypeStruct(shape, x.dtype)
    return jax.ffi.ffi_call(TARGETS["forward"], out)(x, _oihw(w), **_attrs(strides, pads))


def conv_backward_data(dy: jax.Array, w: jax.Array, x_shape, strides, pads) -> jax.Array:
    if needs_unit_stride(w.shape, strides):
        subsample = functools.partial(unit_stride_input, strides=strides, pads=pads, out_hw=dy.shape[1:3])
        reads_shape = (*dy.shape[:3], x_shape[3])
        dx_read = conv_backward_data(dy, w, reads_shape, *UNIT)
        # The transpose of the subsampling puts each pixel's gradient back in place, zeros elsewhere.
        (dx,) = jax.linear_transpose(subsample, jax.ShapeDtypeStruct(tuple(x_shape), dy.dtype))(dx_read)
        return dx
    out = jax.ShapeDtypeStruct(tuple(x_shape), dy.dtype)
    return jax.ffi.ffi_call(TARGETS["backward_data"], out)(dy, _oihw(w), **_attrs(strides, pads))


def conv_backward_weights(x: jax.Array, dy: jax.Array, w_shape, strides, pads) -> jax.Array:
    if needs_unit_stride(w_shape, strides):
        x, (strides, pads) = unit_stride_input(x, strides, pads, dy.shape[1:3]), UNIT
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
    "library",
    "needs_unit_stride",
    "output_shape",
    "set_guarded",
    "set_threads",
    "status",
    "toolchain",
    "unit_stride_input",
]
