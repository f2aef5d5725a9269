"""Timing shared by every section: interleaved samples, rotating orders, summaries and paired ratios.

A sampler is anything `interleaved` can time: a plain callable that waits for its own result (timed here,
`calls` calls per sample), or an object with `.sample(calls) -> seconds per call` that times itself elsewhere
(the PyTorch peer in its worker process).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

# Pause before each sample: worker threads of the runtime that ran last may still be winding down.
SETTLE_S = 0.2


def block(x):
    return jax.block_until_ready(x)


def seconds_per_call(fn: Callable[[], Any], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def sample(fn, calls: int) -> float:
    """Seconds per call of one sample of `fn`, wherever it runs."""
    if hasattr(fn, "sample"):
        return fn.sample(calls)
    return seconds_per_call(fn, calls)


def rotation(names: Sequence[str], round_index: int) -> list[str]:
    """The order of round `round_index`: A, B, C, then B, C, A, ... so no one always runs after another."""
    shift = round_index % len(names)
    return list(names[shift:]) + list(names[:shift])


def interleaved(
    fns: dict[str, Any], *, rounds: int, calls, warmup: int = 1, settle: float | None = None
) -> dict[str, list[float]]:
    """Seconds per call of each sampler, one sample per round, in `rotation` order.

    `calls` is an int or {name: int}: calls per sample. Before each sample the process sleeps `settle` seconds
    (default `SETTLE_S`).
    """
    settle = SETTLE_S if settle is None else settle
    names = list(fns)
    for name in names:
        if warmup:
            sample(fns[name], warmup)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in rotation(names, r):
            if settle:
                time.sleep(settle)
            samples[name].append(sample(fns[name], calls[name] if isinstance(calls, dict) else calls))
    return samples


def summary(seconds: Sequence[float], images: int | None = None) -> dict:
    """Median and best of per-call seconds, every sample, and images/s when `images` per call is given."""
    s = np.asarray(seconds, np.float64)
    out = {"median_s": float(np.median(s)), "best_s": float(np.min(s)), "samples_s": [float(v) for v in s]}
    if images:
        out["images_per_s"] = images / out["median_s"]
        out["best_images_per_s"] = images / out["best_s"]
    return out


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a_r / b_r: with times, the speed-up of b over a."""
    return float(np.median(np.asarray(a, np.float64) / np.asarray(b, np.float64)))
