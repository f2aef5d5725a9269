"""h. Levers: XLA settings vs the command-line default in alternating subprocess pairs; bfloat16 in process.

Each lever is compared with the default on every workload in `pairs` pairs, each run a fresh subprocess
(`benchmarks.lever_worker`), in the order default, lever, lever, default, default, lever, ... so that neither
side always runs first. A pair's ratio is the lever's seconds per call over the default's (> 1: the default is
faster); the report gives every pair's ratio and their median.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from benchmarks import workers
from benchmarks.modes import Lever
from benchmarks.render import fmt, ratio, table
from benchmarks.steps import get_step
from benchmarks.timing import alternating, interleaved, paired_ratio, summary
from debkd_jax import xla_cpu

DEFAULT = "default"


def lever_env(lever: Lever | None) -> dict:
    """The child's environment: the command-line default XLA settings, changed by `lever` (None: default)."""
    env = workers.child_env(drop_flags=("--xla_force_host_platform_device_count",))
    xla_cpu.apply_defaults(env)
    if lever is not None:
        flags = [f for f in env["XLA_FLAGS"].split() if not f.startswith(lever.drop_flags)]
        env["XLA_FLAGS"] = " ".join(flags + lever.add_flags.split())
        env.update(dict(lever.env))
    return env


def alternating_pairs(run, lever_name: str, pairs: int) -> list[dict]:
    """`run(name)` (name: DEFAULT or `lever_name`) -> a worker's result, called in alternating pair order."""
    out = []
    for order in alternating(DEFAULT, lever_name, pairs):
        got = {name: run(name) for name in order}
        out.append(
            {
                "order": list(order),
                "default": got[DEFAULT],
                "lever": got[lever_name],
                "lever_over_default": got[lever_name]["median_s"] / got[DEFAULT]["median_s"],
            }
        )
    return out


def measure_lever(ctx, workload: tuple[str, str, int], lever: Lever) -> dict:
    kind, model, batch = workload
    envs = {DEFAULT: lever_env(None), lever.name: lever_env(lever)}
    spec = json.dumps({"kind": kind, "model": model, "batch": batch, "calls": ctx.mode.lever_calls})

    def run(name: str) -> dict:
        ctx.log(f"levers: {kind} {model}, {name}")
        return workers.run_json(
            [sys.executable, "-m", "benchmarks.lever_worker", spec],
            env=envs[name],
            timeout=ctx.mode.worker_timeout_s,
            section="levers",
            what=f"the {name} worker ({kind} {model}, batch {batch})",
        )

    pairs = alternating_pairs(run, lever.name, ctx.mode.lever_pairs)
    return {
        "name": lever.name,
        "label": lever.label,
        "xla_flags": {DEFAULT: envs[DEFAULT]["XLA_FLAGS"], "lever": envs[lever.name]["XLA_FLAGS"]},
        "env": dict(lever.env),
        "pairs": pairs,
        "median_lever_over_default": float(np.median([p["lever_over_default"] for p in pairs])),
        "default_images_per_s": float(np.median([p["default"]["images_per_s"] for p in pairs])),
        "lever_images_per_s": float(np.median([p["lever"]["images_per_s"] for p in pairs])),
    }


def in_process(ctx) -> dict:
    mode, name = ctx.mode, ctx.mode.train_models[0]
    ctx.log("levers: bfloat16 compute dtype and the plain XLA conv backward (in process, interleaved)")
    fns = {
        "float32": get_step(name, "CE", batch=mode.batch),
        "bfloat16": get_step(name, "CE", batch=mode.batch, dtype="bfloat16"),
        "float32, plain XLA conv": get_step(name, "CE", batch=mode.batch, conv_backward="xla"),
        "bfloat16, plain XLA conv": get_step(
            name, "CE", batch=mode.batch, dtype="bfloat16", conv_backward="xla"
        ),
    }
    samples = interleaved(fns, rounds=mode.rounds, calls=mode.steps.get(name, 1))
    return {
        "model": name,
        "batch": mode.batch,
        "conv_backward": fns["float32"].conv_backward,
        "rows": {k: summary(v, mode.batch) for k, v in samples.items()},
        "speedup": {k: paired_ratio(samples["float32"], v) for k, v in samples.items()},
    }


def measure(ctx) -> dict:
    out = {"pairs": ctx.mode.lever_pairs, "workloads": []}
    for workload in ctx.mode.lever_workloads:
        kind, model, batch = workload
        levers = [measure_lever(ctx, workload, lever) for lever in ctx.mode.levers]
        out["workloads"].append({"kind": kind, "model": model, "batch": batch, "levers": levers})
    out["in_process"] = {"skipped": "smoke mode"} if ctx.mode.name == "smoke" else in_process(ctx)
    return out


def geometric_mean(xs) -> float:
    """Of an even number of alternating pairs: cancels a constant advantage of whichever side runs first."""
    return float(np.exp(np.mean(np.log(xs))))


def render_workload(w: dict) -> list[str]:
    lines = [f"### {w['kind'].replace('_', ' ')}: {w['model']}, batch {w['batch']}", ""]
    rows = [
        [
            v["label"],
            fmt(v["default_images_per_s"]),
            fmt(v["lever_images_per_s"]),
            ", ".join(ratio(p["lever_over_default"]) for p in v["pairs"]),
            ratio(v["median_lever_over_default"]),
            ratio(geometric_mean([p["lever_over_default"] for p in v["pairs"]])),
        ]
        for v in w["levers"]
    ]
    headers = ["setting", "default img/s", "setting img/s", "setting time / default time, per pair"]
    lines += table(headers + ["median", "geometric mean"], rows)
    return lines + [""]


def render(r: dict) -> list[str]:
    lines = ["## h. Levers", ""]
    if not r["workloads"]:
        lines += ["No lever pairs in this mode.", ""]
    else:
        lines += [
            f"Each setting against the command-line default in {r['pairs']} alternating pairs of fresh "
            "subprocesses (default, setting, setting, default, ...); img/s are medians over the pairs; "
            "a time ratio > 1 means the default is faster. Over an even number of pairs the geometric mean "
            "cancels a constant advantage of whichever side runs first.",
            "",
        ]
    for w in r["workloads"]:
        lines += render_workload(w)
    ip = r["in_process"]
    if "rows" in ip:
        lines += [f"### In process, interleaved ({ip['model']}, batch {ip['batch']}, CE)", ""]
        lines += table(
            ["setting", "img/s (best)", "speed-up over float32"],
            [
                [k, f"{fmt(v['images_per_s'])} ({fmt(v['best_images_per_s'])})", ratio(ip["speedup"][k])]
                for k, v in ip["rows"].items()
            ],
        )
        lines += [
            "",
            f"float32 and bfloat16 use the default conv backward (here `{ip['conv_backward']}`); "
            "'plain XLA conv': `config.conv_backward='xla'`.",
            "",
        ]
    return lines
