"""BENCHMARKS_SCALE.md and benchmarks_scale.json from the scale benchmark's results."""

from __future__ import annotations

import json
import os

from benchmarks.render import fmt, ratio, table


def render(r: dict) -> list[str]:
    lines = [
        "## j. ImageNet scale: streamed input",
        "",
        f"Load average of the (shared) machine before/after this section: {r['load_before']:.2f} / "
        f"{r['load_after']:.2f}.",
        "",
    ]
    m = r["memory"]
    base = m["rows"][str(m["sizes"][0])]
    rows = []
    for n in m["sizes"]:
        s, mem = m["rows"][str(n)]["stream"], m["rows"][str(n)]["memory"]
        rows.append(
            [
                f"{n:,}",
                fmt(s["peak_tree_mib"]),
                ratio(s["peak_tree_mib"] / base["stream"]["peak_tree_mib"]),
                fmt(mem["peak_tree_mib"]),
                ratio(mem["peak_tree_mib"] / base["memory"]["peak_tree_mib"]),
                f"{s['returncode']} / {mem['returncode']}",
            ]
        )
    lines += [
        f"Peak resident memory (MiB, the job's whole process tree: grain's workers included) of "
        f"`configs/imagenet.py:smoke:KD` with a given teacher: the teacher pass over every image, then one "
        f"student epoch; {m['image']} files at image_size {m['image_size']}.",
        "",
    ]
    lines += table(["images", "streamed", "vs first", "in memory", "vs first", "exit status"], rows)
    t = r["throughput"]
    lines += [
        "",
        f"Streamed input alone ({t['image']} decoded, random-resized crop to {t['crop']}, flip, batches of "
        f"{t['batch']}) on this {t['cpus']}-CPU machine:",
        "",
    ]
    lines += table(
        ["grain workers", "images/s", "CPU seconds used", "images per CPU-second (per core)"],
        [
            [w, fmt(v["images_per_s"]), fmt(v["cpu_seconds"], 1), fmt(v.get("images_per_cpu_second"))]
            for w, v in t["rows"].items()
        ],
    )
    lines += [
        "",
        "Images per CPU-second counts the CPU time of this process and all grain's workers (each a process "
        "reading one image at a time), so it is the rate one fully used host core sustains.",
        "",
    ]
    if "storage" in r:
        st = r["storage"]
        methods_ = [m for m in next(iter(st["rows"].values())) if m != "logits"]
        lines += [
            "",
            f"Teacher-logits store in half precision: max abs error against float32 on {st['n']:,} "
            f"ImageNet-like rows x {st['k']:,} classes, of the logits and of each method's targets (what its "
            "loss reads: DeBKD its region lo/hi, the others the target logits), with the share of rows whose "
            "targets moved by more than 0.01.",
            "",
        ]
        lines += table(
            ["store dtype", "logits", *methods_],
            [
                [
                    d,
                    f"{v['logits']:.1e}",
                    *(f"{v[m]['max_abs']:.1e} ({100 * v[m]['rows_over_1e-2']:.1f}%)" for m in methods_),
                ]
                for d, v in st["rows"].items()
            ],
        )
    rn = r["resnet18"]
    lines += [
        "",
        f"Train step of {rn['model']} at 224x224, batch {rn['batch']}, CE, interleaved (JAX with the "
        f"default conv backward on CPU, {rn.get('conv_backward', 'auto')}, and with XLA's plain one):",
        "",
    ]
    rows = []
    for key, label, speed in (
        ("jax", "JAX", "speedup_vs_torch"),
        ("jax_xla_conv", "JAX, plain XLA conv backward", "speedup_vs_torch_xla_conv"),
    ):
        if key in rn:
            rows.append(
                [
                    label,
                    fmt(rn[key]["images_per_s"], 1),
                    fmt(rn["torch"]["images_per_s"], 1) if "torch" in rn else "skipped",
                    ratio(rn[speed]) if speed in rn else "n/a",
                ]
            )
    lines += table(["step", "img/s", "PyTorch img/s", "vs PyTorch"], rows)
    return lines + [""]


def write(results: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "benchmarks_scale.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    commands = sorted(set(results.get("commands", {}).values())) or [results["command"]]
    text = (
        "\n".join(
            [
                "# Benchmarks: ImageNet scale",
                "",
                "Written by "
                + " and ".join(f"`{c}`" for c in commands)
                + f", last on {results['date']} ({results['cpus']} CPUs).",
                "",
                *render(results),
            ]
        )
        + "\n"
    )
    with open(os.path.join(out_dir, "BENCHMARKS_SCALE.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text
