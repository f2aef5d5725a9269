"""a2. Train step in fresh processes: the project's default CPU step vs the PyTorch peer, round by round.

Every sample is a new process: the JAX step (this module as a worker, `python -m benchmarks.fresh_pairs SPEC`:
`config.conv_backward="auto"`, one CPU device, the command-line XLA defaults) once with oneDNN on 2 OpenMP
threads and once on 1 (`DEBKD_ONEDNN_THREADS`), and the peer (`benchmarks.peer_worker`, its own fresh
process). The three run one after the other in a rotating order (A B C, B C A, C A B, ...), so that none
always runs first or after the same one; each round gives the peer's time over each JAX arm's (> 1: JAX is
faster) and the load average before and after the round.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from benchmarks import peer as peer_lib
from benchmarks import workers
from benchmarks.render import fmt, ratio, table
from benchmarks.steps import JaxStep
from benchmarks.timing import interleaved, rotation, summary
from debkd_jax import xla_cpu

PEER = "torch"
ARMS = {"jax_omp2": "2", "jax_omp1": "1"}  # JAX arm -> DEBKD_ONEDNN_THREADS
LABELS = {"jax_omp2": "JAX, oneDNN on 2 threads", "jax_omp1": "JAX, oneDNN on 1 thread", PEER: "PyTorch peer"}


def jax_env(threads: str) -> dict:
    """The JAX worker's environment: the command-line default XLA settings on one CPU device (a parent's
    `--xla_force_host_platform_device_count` dropped), oneDNN on `threads` OpenMP threads."""
    env = workers.child_env(
        drop_flags=("--xla_force_host_platform_device_count",), DEBKD_ONEDNN_THREADS=threads
    )
    xla_cpu.apply_defaults(env)
    return env


def sample_step(model: str, batch: int, calls: int) -> dict:
    """In the worker: the CE step of `model` (`conv_backward="auto"`), `calls` samples of one call each after
    the compiling call; their summary, the compile time, the conv backward and the process's XLA_FLAGS."""
    fn = JaxStep(model, "CE", batch=batch)
    samples = interleaved({"fn": fn}, rounds=calls, calls=1, warmup=0, settle=0.0)["fn"]
    return {
        "compile_s": fn.compile_s,
        "conv_backward": fn.conv_backward,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **summary(samples, batch),
    }


def jax_sample(ctx, model: str, threads: str) -> dict:
    spec = {"model": model, "batch": ctx.mode.batch, "calls": ctx.mode.pair_calls[model]}
    return workers.run_json(
        [sys.executable, "-m", "benchmarks.fresh_pairs", json.dumps(spec)],
        env=jax_env(threads),
        timeout=ctx.mode.worker_timeout_s,
        section="fresh_pairs",
        what=f"the JAX worker ({model}, {threads} oneDNN thread(s))",
    )


def peer_sample(ctx, model: str) -> dict:
    """A fresh peer process: its step, one warm-up call, then `pair_calls` samples of one call."""
    threads = ctx.mode.peer_threads or os.cpu_count() or 1
    peer = peer_lib.Peer(threads, timeout=ctx.mode.peer_timeout_s)
    try:
        sampler = peer.train_step("fresh_pairs", model, ctx.mode.batch)
        sampler.sample(1)
        seconds = [sampler.sample(1) for _ in range(ctx.mode.pair_calls[model])]
    finally:
        peer.close()
    return {**summary(seconds, ctx.mode.batch), "threads": threads}


def rounds_of(run, names: list[str], rounds: int) -> list[dict]:
    """`run(name)` -> a sample dict (with "median_s"), for every name in each round's `rotation` order; each
    round's load average before and after, and the peer's median time over each JAX arm's."""
    out = []
    for r in range(rounds):
        order = rotation(names, r)
        load_before = os.getloadavg()[0]
        got = {name: run(name) for name in order}
        out.append(
            {
                "order": order,
                "load_before": load_before,
                "load_after": os.getloadavg()[0],
                "samples": got,
                "speedup_vs_peer": {
                    k: got[PEER]["median_s"] / got[k]["median_s"] for k in names if k != PEER
                },
            }
        )
    return out


def geometric_mean(xs) -> float:
    """Of per-round ratios: exp of the mean of their logs (a 2x round and a 0.5x round cancel)."""
    return float(np.exp(np.mean(np.log(xs))))


def measure_model(ctx, model: str) -> dict:
    def run(name: str) -> dict:
        ctx.log(f"fresh_pairs: {model}, {name}")
        return peer_sample(ctx, model) if name == PEER else jax_sample(ctx, model, ARMS[name])

    rounds = rounds_of(run, [*ARMS, PEER], ctx.mode.pair_rounds)
    arms = [*ARMS]
    return {
        "rounds": rounds,
        "median_speedup_vs_peer": {
            k: float(np.median([r["speedup_vs_peer"][k] for r in rounds])) for k in arms
        },
        "geomean_speedup_vs_peer": {
            k: geometric_mean([r["speedup_vs_peer"][k] for r in rounds]) for k in arms
        },
        "images_per_s": {
            k: float(np.median([r["samples"][k]["images_per_s"] for r in rounds])) for k in [*arms, PEER]
        },
        "omp2_over_omp1": float(
            np.median(
                [r["samples"]["jax_omp1"]["median_s"] / r["samples"]["jax_omp2"]["median_s"] for r in rounds]
            )
        ),
        "conv_backward": rounds[0]["samples"]["jax_omp2"].get("conv_backward", "") if rounds else "",
    }


def measure(ctx) -> dict:
    out = {"batch": ctx.mode.batch, "rounds": ctx.mode.pair_rounds, "models": {}}
    reason = peer_lib.unavailable() or (None if ctx.mode.pair_rounds else "no rounds in this mode")
    if reason:
        out["skipped"] = reason
        return out
    for model in ctx.mode.pair_models:
        out["models"][model] = measure_model(ctx, model)
    return out


def render(r: dict) -> list[str]:
    lines = [f"## a2. Train step in fresh processes vs the PyTorch peer (batch {r['batch']}, CE)", ""]
    if r.get("skipped"):
        return lines + [f"Skipped: {r['skipped']}.", ""]
    lines += [
        f"{r['rounds']} rounds; in each, three fresh processes one after the other in a rotating order: the "
        "JAX step (`conv_backward='auto'` on one CPU device) with oneDNN on 2 and on 1 OpenMP thread "
        "(`DEBKD_ONEDNN_THREADS`), and the PyTorch peer. `x` = the peer's median step time over JAX's, per "
        "round (> 1: JAX is faster).",
        "",
    ]
    for model, m in r["models"].items():
        lines += [f"### {model}", ""]
        rows = []
        for i, rd in enumerate(m["rounds"]):
            s = rd["samples"]
            rows.append(
                [
                    i + 1,
                    " ".join(rd["order"]),
                    f"{rd['load_before']:.1f} / {rd['load_after']:.1f}",
                    *(fmt(s[k]["images_per_s"]) for k in [*ARMS, PEER]),
                    *(ratio(rd["speedup_vs_peer"][k]) for k in ARMS),
                ]
            )
        headers = ["round", "order", "load before / after", *(f"{LABELS[k]} img/s" for k in [*ARMS, PEER])]
        lines += table(headers + [f"{LABELS[k]} vs peer" for k in ARMS], rows) + [""]
        for k in ARMS:
            lines.append(
                f"- {LABELS[k]} vs the peer: median **{ratio(m['median_speedup_vs_peer'][k])}**, "
                f"geometric mean {ratio(m['geomean_speedup_vs_peer'][k])}."
            )
        lines += [
            f"- oneDNN on 2 threads over 1 thread: {ratio(m['omp2_over_omp1'])} (> 1: 2 threads faster).",
            f"- conv backward of the JAX step: `{m['conv_backward']}`.",
            "",
        ]
    return lines


if __name__ == "__main__":
    print(json.dumps(sample_step(**json.loads(sys.argv[1]))))
