"""Where the train step's time goes: a `jax.profiler` trace of a few steps, summed by kind of XLA operation.

    python -m benchmarks.profile_step --model=resnet8 --conv-backward=onednn --out=DIR

Writes DIR/profile_<model>_<conv_backward>.json (milliseconds per step for each kind: the three oneDNN
directions, XLA fusions by their kind, dots, ...) and prints the table. Kinds are the trace's op names with
the numeric suffix dropped; the oneDNN custom calls are named by their target. One process, the command-line
XLA defaults; a profile, not a benchmark: read the shares, not the absolute times.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import re
import sys
import tempfile

from debkd_jax import xla_cpu


def kinds_of_custom_calls(hlo: str) -> dict[str, str]:
    """{instruction name: 'oneDNN <direction>'} for the FFI custom calls of a compiled HLO module."""
    out = {}
    for m in re.finditer(r"%(\S+) = \S+ custom-call\([^)]*\).*?custom_call_target=\"(\w+)\"", hlo):
        out[m.group(1)] = "oneDNN " + m.group(2).removeprefix("debkd_onednn_conv_")
    return out


def profile(model: str, conv_backward: str, batch: int, steps: int) -> dict:
    import jax

    from benchmarks.steps import JaxStep

    step = JaxStep(model, "CE", batch=batch, conv_backward=conv_backward)
    custom = kinds_of_custom_calls(step.lowered().compile().as_text())
    for _ in range(2):
        step()
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            for _ in range(steps):
                step()
        trace = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)[0]
        with gzip.open(trace) as f:
            events = json.load(f)["traceEvents"]
    per_kind: collections.Counter = collections.Counter()
    total = 0.0
    for e in events:
        if e.get("ph") != "X":
            continue
        name = e["name"]
        if name == "ThunkExecutor::Execute (wait for completion)":
            total += e["dur"]
        if name.startswith("$") or "::" in name or name.startswith("end: ") or name[:1].isupper():
            continue
        per_kind[custom.get(name, re.sub(r"[._]\d+$", "", name))] += e["dur"]
    ms = {k: v / steps / 1000 for k, v in per_kind.most_common()}
    return {
        "model": model,
        "conv_backward": step.conv_backward,
        "batch": batch,
        "steps": steps,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_before": None,
        "step_ms": total / steps / 1000,
        "ms_per_step": ms,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "native_threads": os.environ.get("DEBKD_ONEDNN_THREADS", ""),
    }


def render(p: dict) -> str:
    covered = sum(p["ms_per_step"].values())
    lines = [
        f"{p['model']}, batch {p['batch']}, conv_backward={p['conv_backward']}: "
        f"{p['step_ms']:.1f} ms per step (load {p['load_before']:.1f} / {p['load_after']:.1f})",
        "",
        "| kind | ms per step | share of the ops' time |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v:.2f} | {v / covered:.1%} |" for k, v in p["ms_per_step"].items() if v >= 0.05]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_step", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", default="resnet8")
    parser.add_argument("--conv-backward", default="auto")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    p = profile(args.model, args.conv_backward, args.batch, args.steps)
    p["load_before"], p["load_after"] = load_before, os.getloadavg()[0]
    p["command"] = " ".join(["python -m benchmarks.profile_step", *(argv or sys.argv[1:])])
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"profile_{args.model}_{p['conv_backward']}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(p, f, indent=1)
    print(render(p))
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    xla_cpu.apply_defaults()
    sys.exit(main())
