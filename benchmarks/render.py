"""BENCHMARKS.md from the results: a header, then each section's own `render`. Only measured figures.

python -m benchmarks.render DIR/benchmarks.json [--out DIR/BENCHMARKS.md]   # again, from the JSON alone
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Sequence
from typing import Any

from benchmarks.modes import SECTIONS


def fmt(x, digits: int = 0) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.{digits}f}"


def ratio(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}x"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


# A load average above this per CPU marks the run as taken on a busy machine (1.5 on the project's 2 cores).
NOISY_LOAD_PER_CPU = 0.75


def busy(meta: dict) -> bool:
    """Whether the load average before or after the run was above `NOISY_LOAD_PER_CPU` per CPU."""
    return max(meta["load_before"], meta["load_after"]) > NOISY_LOAD_PER_CPU * meta["cpus"]


def header(meta: dict) -> list[str]:
    v = meta["versions"]
    noisy = (
        " -- a busy machine: absolute numbers are low and noisy; read the ratios, measured side by side."
        if busy(meta)
        else "."
    )
    peer = meta.get("peer") or {}
    backend = meta.get("jax_backend", "cpu")
    jax_on = (
        "" if backend == "cpu" else f"; JAX on {meta['jax_devices']} x {meta.get('jax_device_kind', backend)}"
    )
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{meta.get('command') or 'python -m benchmarks --' + meta['mode']}` on {meta['date']}. "
        f"Machine: {meta['cpu']}, "
        f"{meta['cpus']} CPU(s){jax_on}; jax {v['jax']}, flax {v['flax']}, "
        f"torch {v.get('torch') or 'not used'}. Load average before/after: "
        f"{meta['load_before']:.2f} / {meta['load_after']:.2f}{noisy}",
        "",
        f"XLA_FLAGS: `{meta['env']['XLA_FLAGS'] or '(none)'}`.",
        "",
        "Every figure below was measured in this run. Images/s are medians over rounds (best round in "
        "brackets); ratios are medians of per-round ratios (> 1: the first is faster).",
        "",
    ]
    if meta.get("peer_skipped"):
        lines += [f"PyTorch peer rows skipped: {meta['peer_skipped']}.", ""]
    elif peer:
        settings = ", ".join(f"{k}={val}" for k, val in peer["env"].items() if val)
        on = (
            f"on {peer['device_name']} (CUDA {peer['cuda']}, cuDNN {peer['cudnn']}, "
            if "device_name" in peer
            else ""
        )
        on += f"cudnn.benchmark={peer['cudnn_benchmark']}, TF32 convs={peer['tf32_conv']}), " if on else ""
        lines += [f"PyTorch peer: its own process, {on}{peer['threads']} thread(s), {settings}.", ""]
    return lines


def render(results: dict) -> str:
    lines = header(results["meta"])
    for name in SECTIONS:
        if name in results:
            lines += importlib.import_module(f"benchmarks.{name}").render(results[name])
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.render", description=__doc__.splitlines()[0])
    parser.add_argument("json", help="a benchmarks.json written by python -m benchmarks")
    parser.add_argument("--out", default="", help="write the Markdown here (default: print it)")
    args = parser.parse_args(argv)
    with open(args.json, encoding="utf-8") as f:
        md = render(json.load(f)) + "\n"
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(md)
    else:
        print(md, end="")


if __name__ == "__main__":
    main()
