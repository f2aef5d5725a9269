"""Runs the chosen sections of one mode and writes BENCHMARKS.md and benchmarks.json."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax

import benchmarks
from benchmarks import peer as peer_lib
from benchmarks import steps, timing, workers
from benchmarks.modes import MODES, SECTIONS, Context, Mode
from benchmarks.render import busy, render


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(peer) -> dict:
    import flax
    import jaxlib

    v = {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
    }
    if peer is not None:
        v["torch"] = peer.info["torch"]
    return v


def peer_device(setting: str) -> str:
    """The peer's torch device: "auto" follows JAX (a GPU backend: "cuda"; else "cpu")."""
    if setting != "auto":
        return setting
    return "cuda" if jax.default_backend() == "gpu" else "cpu"


def start_peer(mode: Mode, log, device: str = "auto"):
    """(the peer worker or None, why it is skipped or None)."""
    reason = peer_lib.unavailable()
    if reason:
        return None, reason
    threads = mode.peer_threads or os.cpu_count() or 1
    device = peer_device(device)
    log(f"peer: starting its worker process ({threads} thread(s), {device})")
    return peer_lib.Peer(threads, timeout=mode.peer_timeout_s, device=device), None


def meta_of(mode: Mode, only: Sequence[str], peer, skipped) -> dict:
    return {
        "mode": mode.name,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "jax_backend": jax.default_backend(),
        "jax_devices": jax.device_count(),
        "jax_device_kind": jax.devices()[0].device_kind,
        "versions": versions(peer),
        "peer_skipped": skipped,
        "peer": None if peer is None else peer.info,
        "env": {
            k: os.environ.get(k, "")
            for k in ("XLA_FLAGS", "OMP_NUM_THREADS", "JAX_PLATFORMS", "XLA_PYTHON_CLIENT_MEM_FRACTION")
        },
        "load_before": os.getloadavg()[0],
        "sections": list(only),
    }


def measure_sections(ctx: Context, only: Sequence[str], results: dict) -> None:
    for name in SECTIONS:
        if name in only:
            results[name] = importlib.import_module(f"benchmarks.{name}").measure(ctx)


def run(
    mode: Mode,
    out_dir: str,
    only: Sequence[str] = SECTIONS,
    log=print,
    command: str = "",
    peer_device: str = "auto",
) -> dict:
    # fresh_pairs starts a fresh peer process for each of its samples; train_step shares this one.
    needs_peer = "train_step" in only
    peer, skipped = start_peer(mode, log, peer_device) if needs_peer else (None, "no section that uses it")
    results: dict[str, Any] = {"meta": meta_of(mode, only, peer, skipped)}
    results["meta"]["command"] = command or f"python -m benchmarks --{mode.name}"
    t0 = time.perf_counter()
    previous_opt, previous_settle = jax.config.values["jax_disable_most_optimizations"], timing.SETTLE_S
    if mode.name == "smoke":  # seconds, not minutes: the smoke run checks the plumbing, not the speed
        jax.config.update("jax_disable_most_optimizations", True)
        timing.SETTLE_S = 0.0
    try:
        measure_sections(Context(mode, peer, log), only, results)
    finally:
        steps.clear_steps()
        jax.config.update("jax_disable_most_optimizations", previous_opt)
        timing.SETTLE_S = previous_settle
        if peer is not None:
            peer.close()
    meta = results["meta"]
    meta["load_after"] = os.getloadavg()[0]
    meta["noisy"] = busy(meta)
    meta["seconds"] = time.perf_counter() - t0
    write(results, out_dir)
    return results


def write(results: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "benchmarks.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    with open(os.path.join(out_dir, "BENCHMARKS.md"), "w", encoding="utf-8") as f:
        f.write(render(results) + "\n")


def csv(text: str, kind=str) -> tuple:
    return tuple(kind(x.strip()) for x in text.split(",") if x.strip())


def with_train_options(mode: Mode, models: str, batches: str, dtypes: str) -> Mode:
    """The mode with train_step's models, batches and dtypes replaced where given (comma-separated)."""
    changes = {}
    if models:
        changes["train_models"] = csv(models)
    if batches:
        changes["train_batches"] = csv(batches, int)
    if dtypes:
        changes["train_dtypes"] = csv(dtypes)
    return dataclasses.replace(mode, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=benchmarks.__doc__.split("\n\n")[0]
    )
    group = parser.add_mutually_exclusive_group()
    for name in MODES:
        group.add_argument(f"--{name}", dest="mode", action="store_const", const=name)
    parser.add_argument("--out", default=".", help="folder for BENCHMARKS.md and benchmarks.json")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--train-models", default="", help="train_step: these models (comma-separated)")
    parser.add_argument("--train-batches", default="", help="train_step: these batch sizes (comma-separated)")
    parser.add_argument(
        "--train-dtypes", default="", help="train_step: these compute dtypes, of float32,bfloat16"
    )
    parser.add_argument(
        "--peer-device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="the PyTorch peer's device; auto: cuda when JAX runs on a GPU, else cpu",
    )
    args = parser.parse_args(argv)
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; valid: {', '.join(SECTIONS)}")
    try:
        mode = with_train_options(
            MODES[args.mode or "quick"], args.train_models, args.train_batches, args.train_dtypes
        )
    except ValueError as e:
        parser.error(f"--train-batches takes comma-separated integers ({e})")
    bad = sorted(set(mode.train_dtypes) - {"float32", "bfloat16"})
    if bad:
        parser.error(f"--train-dtypes: {bad} not supported; use float32 and/or bfloat16")
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)
    try:
        results = run(
            mode,
            args.out,
            only,
            log,
            command=" ".join(["python -m benchmarks", *(argv or sys.argv[1:])]),
            peer_device=args.peer_device,
        )
    except (workers.WorkerTimeout, workers.WorkerFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(render(results))
    print(
        f"\nwrote {os.path.join(args.out, 'BENCHMARKS.md')} and benchmarks.json "
        f"({results['meta']['seconds']:.0f} s)",
        file=sys.stderr,
    )
    return 0
