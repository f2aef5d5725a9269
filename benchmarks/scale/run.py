"""`python -m benchmarks.scale`: measures the chosen parts and writes the report; a subset of the parts is
merged into the benchmarks_scale.json already in `--out`."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from benchmarks import peer as peer_lib
from benchmarks import scale
from benchmarks.modes import MODES, Context
from benchmarks.scale.jobs import SIZES, memory_growth
from benchmarks.scale.parts import input_throughput, resnet18_224, storage_error
from benchmarks.scale.report import write

PARTS = {"throughput": input_throughput, "resnet18": resnet18_224, "storage": storage_error}


def measure(ctx, sizes=SIZES, parts=("throughput", "resnet18", "storage", "memory")) -> dict:
    out = {"load_before": os.getloadavg()[0]}
    for part in parts:
        out[part] = memory_growth(ctx, sizes) if part == "memory" else PARTS[part](ctx)
    out["load_after"] = os.getloadavg()[0]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale", description=scale.__doc__.splitlines()[0]
    )
    parser.add_argument("--out", default=".")
    parser.add_argument("--sizes", default=",".join(str(n) for n in SIZES))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and models: the plumbing")
    parser.add_argument(
        "--parts",
        default="throughput,resnet18,storage,memory",
        help="a subset re-measures those parts into an existing benchmarks_scale.json in --out",
    )
    args = parser.parse_args(argv)
    mode = MODES["smoke" if args.smoke else "quick"]
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    peer = None
    if peer_lib.unavailable() is None:
        peer = peer_lib.Peer(mode.peer_threads or os.cpu_count() or 1, timeout=mode.peer_timeout_s)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    try:
        measured = measure(Context(mode, peer, log), tuple(int(n) for n in args.sizes.split(",")), parts)
    finally:
        if peer is not None:
            peer.close()
    command = " ".join(["python -m benchmarks.scale", *(argv or sys.argv[1:])])
    measured.update(commands={p: command for p in parts})
    results = measured
    previous = os.path.join(args.out, "benchmarks_scale.json")
    if set(parts) != set(PARTS) | {"memory"} and os.path.exists(previous):
        with open(previous, encoding="utf-8") as f:
            results = json.load(f)
        results.update({p: measured[p] for p in parts})
        results.setdefault("commands", {p: results["command"] for p in (*PARTS, "memory") if p in results})
        results["commands"].update(measured["commands"])
        results["load_before"] = max(results["load_before"], measured["load_before"])
        results["load_after"] = max(results["load_after"], measured["load_after"])
    results.update(
        command=command,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        cpus=os.cpu_count(),
        seconds=time.perf_counter() - t0,
    )
    print(write(results, args.out))
    return 0
