"""e. Peak resident memory of the main job (a subprocess) and the train step's time vs batch size."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

from benchmarks import workers
from benchmarks.render import fmt, ratio, table
from benchmarks.steps import get_step
from benchmarks.timing import interleaved, paired_ratio, summary

# Starts the job and reports its rusage from wait4 (ru_maxrss, KiB on Linux). Started from the big benchmark
# process directly, the job's high-water mark would start at that process's size (fork inherits it).
LAUNCHER = """
import json, os, subprocess, sys
from debkd_jax.processes import popen
with open(sys.argv[1], "wb") as log:
    proc = popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}))
"""


def main_job(ctx) -> dict:
    config_arg = ctx.mode.memory_config
    workdir = tempfile.mkdtemp(prefix="debkd-bench-main-")
    config = os.path.join(workers.REPO_ROOT, "configs", "debkd.py") + (f":{config_arg}" if config_arg else "")
    cmd = [
        sys.executable,
        "-m",
        "debkd_jax.main",
        f"--config={config}",
        f"--workdir={workdir}",
        "--config.progress=False",
        f"--config.data.cache_dir={os.path.join(workdir, 'cache')}",
    ]
    ctx.log("memory: " + " ".join(cmd[1:]))
    log_path = os.path.join(workdir, "main.log")
    env = workers.child_env(drop_flags=("--xla_force_host_platform_device_count",))
    t0 = time.perf_counter()
    try:
        usage = workers.run_json(
            [sys.executable, "-c", LAUNCHER, log_path, *cmd],
            env=env,
            timeout=ctx.mode.worker_timeout_s,
            section="memory",
            what="the main job",
        )
        with open(log_path, "rb") as f:
            tail = f.read().decode(errors="replace")[-600:] if usage["returncode"] else ""
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "command": "python -m debkd_jax.main",
        "config": config_arg or "default",
        "returncode": usage["returncode"],
        "seconds": time.perf_counter() - t0,
        "peak_rss_mib": usage["maxrss_kib"] / 1024,
        "tail": tail,
    }


def batch_sweep(ctx) -> dict:
    mode = ctx.mode
    ctx.log(f"memory: step time vs batch size {mode.sweep}")
    name = "resnet_tiny" if mode.name == "smoke" else "resnet8"
    fns, calls = {}, {}
    for b in mode.sweep:
        fns[f"jax_{b}"] = get_step(name, "CE", batch=b)
        calls[f"jax_{b}"] = max(1, 512 // b // (4 if mode.name == "quick" else 1))
        if ctx.peer is not None:
            fns[f"torch_{b}"] = ctx.peer.train_step("memory", name, b)
            calls[f"torch_{b}"] = calls[f"jax_{b}"]
    samples = interleaved(fns, rounds=mode.sweep_rounds, calls=calls)
    rows = {}
    for b in mode.sweep:
        rows[b] = {"jax": summary(samples[f"jax_{b}"], b)}
        if f"torch_{b}" in samples:
            rows[b]["torch"] = summary(samples[f"torch_{b}"], b)
            rows[b]["speedup_vs_torch"] = paired_ratio(samples[f"torch_{b}"], samples[f"jax_{b}"])
    return {"model": name, "rows": rows}


def measure(ctx) -> dict:
    skipped = {"skipped": "smoke mode"}
    return {
        "main_job": skipped if ctx.mode.memory_config is None else main_job(ctx),
        "batch_sweep": batch_sweep(ctx),
    }


def render(r: dict) -> list[str]:
    lines = ["## e. Memory and batch size", ""]
    m = r["main_job"]
    if "skipped" in m:
        lines += [f"Main job: skipped ({m['skipped']}).", ""]
    else:
        lines += [
            f"Peak resident memory of `{m['command']}` ({m['config']} config): {m['peak_rss_mib']:.0f} MiB "
            f"(ru_maxrss of the child; it ran {m['seconds']:.0f} s, exit status {m['returncode']}).",
            "",
        ]
    sw = r["batch_sweep"]
    lines += table(
        ["batch", "JAX ms/step", "JAX img/s", "PyTorch img/s", "JAX vs PyTorch"],
        [
            [
                b,
                fmt(1e3 * v["jax"]["median_s"], 1),
                fmt(v["jax"]["images_per_s"]),
                fmt(v["torch"]["images_per_s"]) if "torch" in v else "skipped",
                ratio(v["speedup_vs_torch"]) if "speedup_vs_torch" in v else "n/a",
            ]
            for b, v in sw["rows"].items()
        ],
    )
    return lines + ["", f"Train step ({sw['model']}, CE) at each batch size, interleaved.", ""]
