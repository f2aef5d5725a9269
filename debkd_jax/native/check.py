"""The native conv's self-check: every geometry class, against `lax.conv_general_dilated`, in a child process
with a deadline, and the verdict cached per library, CPU, instruction-set cap and thread count.

    GEOMETRIES                       (x shape, w shape, strides, padding) of the check
    largest_differences(geometries)  in this process: max |native - xla| / max |xla| of y, dx and dw, worst
                                     over `repeats` calls of one compiled program
    verdict(threads, ...)            in a child process under `threads` oneDNN threads, at most `deadline` s:
                                     (ok, one-line reason); cached

A fault in a oneDNN kernel shows as a wrong result, a write past its scratchpad (the child runs with
guarded scratchpads, `native.set_guarded`), a crash or a hang (oneDNN issue #6035: see
`native.needs_unit_stride`); the child turns each into a failed verdict, and `native.status()` then reports
the native conv as unavailable, so `conv_backward="auto"` does not pick it.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import subprocess
import sys
import tempfile

TOLERANCE = 1e-5
REPEATS = 3
DEADLINE_SECONDS = 240.0
DEADLINE_ENV = "DEBKD_NATIVE_CHECK_DEADLINE"  # seconds; default DEADLINE_SECONDS
ISA_ENV = "ONEDNN_MAX_CPU_ISA"
ISA_FLAGS = {  # oneDNN's ISA caps that the tests run under, and the CPU flags each needs
    "SSE41": ("sse4_1",),
    "AVX2": ("avx2",),
    "AVX2_VNNI": ("avx2", "avx_vnni"),
    "AVX512_CORE": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
}

CHANNELS = (1, 3, 4, 6, 8, 12, 16, 17)
KERNELS = (1, 3, 7)
STRIDES = (1, 2)
PADDINGS = ("SAME", "VALID")
OUT_CHANNELS = (8, 17)


def geometry_grid(batch: int = 8, height: int = 17, width: int = 13) -> list[tuple]:
    """Input channels x kernels x strides x paddings on odd, non-square images; the output channels alternate
    between a whole AVX2 block (8) and a ragged count (17)."""
    grid = itertools.product(CHANNELS, KERNELS, STRIDES, PADDINGS)
    return [
        ((batch, height, width, c), (k, k, c, OUT_CHANNELS[i % len(OUT_CHANNELS)]), (s, s), padding)
        for i, (c, k, s, padding) in enumerate(grid)
    ]


# The grid, plus the shapes where the fault was seen (a ResNet shortcut on a 32-image batch of 32x32 maps).
GEOMETRIES = (
    *geometry_grid(),
    ((32, 32, 32, 4), (1, 1, 4, 8), (2, 2), "SAME"),
    ((32, 32, 32, 4), (1, 1, 4, 16), (2, 2), "SAME"),
    ((32, 32, 32, 6), (1, 1, 6, 8), (2, 2), "SAME"),
    ((32, 32, 32, 8), (1, 1, 8, 16), (2, 2), "SAME"),
)


def describe(geometry) -> str:
    x_shape, w_shape, strides, padding = geometry
    return (
        f"{w_shape[2]}->{w_shape[3]} {w_shape[0]}x{w_shape[1]} stride {strides[0]} {padding} "
        f"on {'x'.join(map(str, x_shape))}"
    )


def largest_differences(geometries=GEOMETRIES, repeats: int = REPEATS, seed: int = 0) -> list[dict]:
    """Per geometry: {"geometry", "y", "dx", "dw"}, the largest relative difference of the native conv's
    output and gradients from XLA's, over `repeats` calls of one compiled program holding every geometry."""
    import jax
    import numpy as np

    from debkd_jax import native

    nhwc = ("NHWC", "HWIO", "NHWC")
    rng = np.random.default_rng(seed)
    inputs = []
    for x_shape, w_shape, strides, padding in geometries:
        pads = tuple(jax.lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding))
        y_shape = native.output_shape(x_shape, w_shape, strides, pads)
        shapes = (x_shape, w_shape, y_shape)
        inputs.append(tuple(rng.standard_normal(shape, dtype=np.float32) for shape in shapes))
    statics = [
        (tuple(s), tuple(tuple(p) for p in jax.lax.padtype_to_pads(x[1:3], w[:2], s, padding)))
        for x, w, s, padding in geometries
    ]

    @jax.jit
    def reference(inputs):
        out = []
        for (x, w, g), (strides, pads) in zip(inputs, statics, strict=True):
            conv = functools.partial(
                jax.lax.conv_general_dilated, window_strides=strides, padding=pads, dimension_numbers=nhwc
            )
            y, vjp = jax.vjp(conv, x, w)
            out.append((y, *vjp(g)))
        return out

    @jax.jit
    def natively(inputs):
        return [
            (
                native.conv_forward(x, w, strides, pads),
                native.conv_backward_data(g, w, x.shape, strides, pads),
                native.conv_backward_weights(x, g, w.shape, strides, pads),
            )
            for (x, w, g), (strides, pads) in zip(inputs, statics, strict=True)
        ]

    want = jax.device_get(reference(inputs))
    worst = [dict.fromkeys(("y", "dx", "dw"), 0.0) for _ in geometries]
    for _ in range(repeats):
        got = jax.device_get(natively(inputs))
        for row, g_row, w_row in zip(worst, got, want, strict=True):
            for name, a, b in zip(("y", "dx", "dw"), g_row, w_row, strict=True):
                scale = max(float(np.max(np.abs(b))), 1e-30)
                diff = float(np.max(np.abs(a - b))) / scale
                row[name] = max(row[name], diff if np.isfinite(diff) else float("inf"))
    return [{"geometry": describe(g), **row} for g, row in zip(geometries, worst, strict=True)]


def failures(rows: list[dict], tolerance: float = TOLERANCE) -> list[str]:
    """'dw of 4->8 1x1 stride 2 SAME on 32x32x32x4: 0.43' for each result over the tolerance."""
    return [
        f"{k} of {row['geometry']}: {row[k]:.2g}"
        for row in rows
        for k in ("y", "dx", "dw")
        if not row[k] <= tolerance
    ]


def cpu_signature() -> str:
    """The CPU's model name and flags (what oneDNN dispatches on), from /proc/cpuinfo where it exists."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    wanted = ("model name", "flags")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def machine_isas() -> list[str]:
    """The `ISA_FLAGS` caps whose every flag this CPU has, in order: ["SSE41", "AVX2"] on an AVX2-only CPU."""
    flags = set()
    for line in cpu_signature().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    return [isa for isa, needs in ISA_FLAGS.items() if flags.issuperset(needs)]


def deadline_seconds() -> float:
    return float(os.environ.get(DEADLINE_ENV) or DEADLINE_SECONDS)


def cache_path(library: str, threads: int, deadline: float) -> str:
    h = hashlib.sha256()
    with open(__file__, "rb") as f:
        h.update(f.read())
    for part in (library, threads, os.environ.get(ISA_ENV, ""), cpu_signature(), deadline):
        h.update(repr(part).encode())
    return os.path.join(os.path.dirname(library), f"check-{h.hexdigest()[:20]}.json")


def run_child(threads: int, deadline: float, env: dict | None = None) -> tuple[bool, str]:
    """`python -m debkd_jax.native --json` under `threads` oneDNN threads, killed at `deadline` seconds."""
    from debkd_jax import processes
    from debkd_jax.native import THREADS_ENV

    child_env = {**(os.environ if env is None else env), THREADS_ENV: str(threads), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "debkd_jax.native", "--json"]
    try:
        done = processes.run(cmd, timeout=deadline, env=child_env)
    except subprocess.TimeoutExpired:
        return False, f"its self-check did not finish within {deadline:g} s (a hang in oneDNN?); killed it"
    lines = done.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else None
    except ValueError:
        report = None
    if report is None:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return False, f"its self-check crashed (exit status {done.returncode}: {tail[0][:200]})"
    bad = report.get("failures", [])
    if bad:
        return False, f"its self-check found wrong results ({len(bad)}; first: {bad[0]})"
    if report.get("error"):
        return False, f"its self-check failed: {report['error']}"
    return True, ""


def verdict(
    library: str, threads: int, *, deadline: float | None = None, fresh: bool = False
) -> tuple[bool, str]:
    """(ok, reason) of the self-check for this library, CPU, `$ONEDNN_MAX_CPU_ISA`, thread count and deadline:
    read from the cache beside the library (unless `fresh`), else run in a child process (killed after
    `deadline` seconds, default `$DEBKD_NATIVE_CHECK_DEADLINE` or `DEADLINE_SECONDS`) and written there (by
    `os.replace`)."""
    deadline = deadline_seconds() if deadline is None else deadline
    path = cache_path(library, threads, deadline)
    if not fresh:
        try:
            with open(path, encoding="utf-8") as f:
                cached = json.load(f)
            return bool(cached["ok"]), str(cached["reason"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    ok, reason = run_child(threads, deadline)
    store_verdict(path, ok, reason, threads)
    return ok, reason


def store_verdict(path: str, ok: bool, reason: str, threads: int) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".check.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"ok": ok, "reason": reason, "threads": threads, "isa": os.environ.get(ISA_ENV, "")}, f)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only means the check runs again next time
