"""j. ImageNet scale: peak memory of the streamed job (teacher pass included) against the in-memory job as the
folder grows, images/s of the streamed input alone (decode, random-resized crop to 224, flip, batch) with 1
and 2 grain workers, and the ResNet-18 train step at 224 against the PyTorch peer.

    python -m benchmarks.scale --out=benchmarks/results/scale-<date> [--sizes=5000,20000,80000] [--smoke]

Standalone (not a section of `python -m benchmarks`: its jobs take minutes), it writes BENCHMARKS_SCALE.md and
benchmarks_scale.json into `--out`.

The folders are generated JPEGs (two classes; each file one of 256 distinct seeded noise images, so that
writing 80,000 files takes seconds); they live in the system's temporary folder, reused between runs.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from benchmarks import workers
from benchmarks.render import fmt, ratio, table
from benchmarks.steps import get_step, init_variables
from benchmarks.timing import interleaved, paired_ratio, summary

# Runs the job and samples the summed resident memory of its process tree (the job and grain's worker
# processes) every 0.2 s from /proc; prints the peak.
TREE_RSS = """
import json, os, subprocess, sys, time
from debkd_jax.processes import popen

def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0

def tree(root):
    children = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(p))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out

with open(sys.argv[1], "wb") as log:
    proc = popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
    peak = main_peak = 0
    while proc.poll() is None:
        pids = tree(proc.pid)
        peak = max(peak, sum(rss_kib(p) for p in pids))
        main_peak = max(main_peak, rss_kib(proc.pid))
        time.sleep(0.2)
print(json.dumps({"returncode": proc.returncode, "peak_tree_kib": peak, "peak_main_kib": main_peak}))
"""

POOL = 256


def jpeg_pool(width: int, height: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(POOL):
        base = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        pool.append(buf.getvalue())
    return pool


def jpeg_folder(n: int, width: int, height: int) -> str:
    """`n` JPEGs (width x height) in two class folders under the temporary folder, made once."""
    root = os.path.join(tempfile.gettempdir(), f"debkd-bench-jpegs-{n}-{width}x{height}")
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    pool = jpeg_pool(width, height)
    for c in ("a", "b"):
        os.makedirs(os.path.join(root, c), exist_ok=True)
    for i in range(n):
        with open(os.path.join(root, "ab"[i % 2], f"{i:06d}.jpg"), "wb") as f:
            f.write(pool[i % POOL])
    open(done, "w").close()
    return root


def teacher_file(path: str, image_size: int) -> str:
    from flax import serialization

    from debkd_jax import models

    variables = init_variables(models.get_model("imagenet_resnet_tiny", 2), 1, image_size)
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(jax_to_numpy(variables)))
    return path


def jax_to_numpy(tree):
    import jax

    return jax.tree.map(np.asarray, tree)


def job_memory(ctx, folder: str, pipeline: str, teacher: str) -> dict:
    """Peak RSS of `configs/imagenet.py:smoke:KD` (teacher given, so: the teacher pass over every image, then
    one student epoch) on `folder` with `data.pipeline=pipeline`."""
    workdir = tempfile.mkdtemp(prefix="debkd-bench-scale-")
    cmd = [
        sys.executable,
        "-m",
        "debkd_jax.main",
        "--config=configs/imagenet.py:smoke:KD",
        f"--workdir={workdir}",
        f"--config.data.source=folder:{folder}",
        f"--config.data.pipeline={pipeline}",
        f"--config.teacher.variables={teacher}",
        "--config.student.num_epochs=1",
        "--config.data.max_per_class=0",
    ]
    ctx.log("scale: " + " ".join(cmd[2:]))
    log_path = os.path.join(workdir, "main.log")
    t0 = time.perf_counter()
    try:
        usage = workers.run_json(
            [sys.executable, "-c", TREE_RSS, log_path, *cmd],
            env=workers.child_env(drop_flags=("--xla_force_host_platform_device_count",)),
            timeout=ctx.mode.worker_timeout_s,
            section="scale",
            what="the job",
        )
        with open(log_path, "rb") as f:
            tail = f.read().decode(errors="replace")[-600:] if usage["returncode"] else ""
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "pipeline": pipeline,
        "returncode": usage["returncode"],
        "seconds": time.perf_counter() - t0,
        "peak_tree_mib": usage["peak_tree_kib"] / 1024,
        "peak_main_mib": usage["peak_main_kib"] / 1024,
        "tail": tail,
    }


def memory_growth(ctx, sizes) -> dict:
    teacher = teacher_file(os.path.join(tempfile.gettempdir(), "debkd-bench-scale-teacher.msgpack"), 32)
    rows = {}
    for n in sizes:
        folder = jpeg_folder(n, 64, 48)
        rows[str(n)] = {p: job_memory(ctx, folder, p, teacher) for p in ("stream", "memory")}
    return {"sizes": list(sizes), "rows": rows, "image": "64x48 JPEG", "image_size": 32}


SIZES = (5_000, 20_000, 80_000)


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds so far of process `root` and all its descendants (from /proc)."""
    children, times = {}, {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(p))
                times[int(p)] = int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        total += times.get(p, 0)
        todo += children.get(p, [])
    return total / os.sysconf("SC_CLK_TCK")


def input_throughput(ctx) -> dict:
    from debkd_jax.data import stream

    n, batch = (256, 16) if ctx.mode.name == "smoke" else (2048, 32)
    batches = 3 if ctx.mode.name == "smoke" else 40  # >> the 2 prefetched batches per worker
    folder = jpeg_folder(n, 500, 375)  # ImageNet's typical size
    source = stream.plan_stream(f"folder:{folder}", seed=0, split=(0.98, 0.01, 0.01))
    records = source.splits["train"]
    out = {"image": "500x375 JPEG", "crop": 224, "batch": batch, "cpus": os.cpu_count(), "rows": {}}
    for w in (1, 2):
        order = stream.TrainOrder(len(records), batch, seed=0, num_epochs=4)
        it = iter(stream.loader(order, stream.ReadExample(records, 224, train=True), batch, workers=w))
        for _ in range(2 * w):  # the workers started and their first batches made
            next(it)
        t0, cpu0 = time.perf_counter(), tree_cpu_seconds(os.getpid())
        for _ in range(batches):
            next(it)
        seconds, cpu = time.perf_counter() - t0, tree_cpu_seconds(os.getpid()) - cpu0
        if hasattr(it, "close"):
            it.close()
        ips = batches * batch / seconds
        out["rows"][str(w)] = {
            "images_per_s": ips,
            "cpu_seconds": cpu,
            "seconds": seconds,
            "images_per_cpu_second": batches * batch / cpu,
        }
        ctx.log(
            f"scale: streamed input, {w} worker(s): {ips:.0f} images/s, {batches * batch / cpu:.0f} per CPU-s"
        )
    return out


def resnet18_224(ctx) -> dict:
    # (Not the tiny model in smoke mode: torch 2.13's channels_last backward of its 8-channel convs aborts.)
    batch, model = (2 if ctx.mode.name == "smoke" else 16), "imagenet_resnet18"
    fns = {
        "jax": get_step(model, "CE", batch=batch, image_size=224),
        "jax_xla_conv": get_step(model, "CE", batch=batch, image_size=224, conv_backward="xla"),
    }
    if ctx.peer is not None:
        fns["torch"] = ctx.peer.train_step("scale", model, batch, image_size=224)
    samples = interleaved(fns, rounds=ctx.mode.rounds, calls=1)
    out = {"model": model, "batch": batch, "conv_backward": fns["jax"].conv_backward}
    out.update({name: summary(samples[name], batch) for name in samples})
    if "torch" in samples:
        out["speedup_vs_torch"] = paired_ratio(samples["torch"], samples["jax"])
        out["speedup_vs_torch_xla_conv"] = paired_ratio(samples["torch"], samples["jax_xla_conv"])
    return out


def storage_error(ctx) -> dict:
    """Max abs error of the teacher logits, and of each method's targets built from them, when the logits
    store
    keeps float16 or bfloat16 instead of float32: 4,096 ImageNet-like rows (1,000 classes, N(0, 2) logits, the
    label's raised by 8), T = 1 as in configs/imagenet.py."""
    from debkd_jax import methods
    from debkd_jax.data import stream

    rng = np.random.default_rng(0)
    n, k = 4096, 1000
    labels = rng.integers(0, k, n).astype(np.int32)
    logits = (rng.normal(size=(n, k)) * 2).astype(np.float32)
    logits[np.arange(n), labels] += 8.0
    logits[: n // 10] = np.roll(logits[: n // 10], 1, axis=1)  # a tenth the teacher gets wrong
    rows = {}
    for dtype in ("float16", "bfloat16"):
        stored = stream.decode_logits(stream.encode_logits(logits, dtype), dtype)
        row = {"logits": float(np.max(np.abs(stored - logits)))}
        for name in ("KD", "DKD", "DeBKD", "BTKD-swap"):
            cfg = methods.preset(name, temperature=1.0)
            a, b = methods.method_targets(cfg, logits, labels), methods.method_targets(cfg, stored, labels)
            # What each loss reads: the de-biased loss the region (lo, hi); the others the target logits.
            fields = ("lo", "hi") if cfg.loss == "debkd" else ("logits",)
            diff = np.max(
                [
                    np.abs(np.asarray(getattr(a, f), np.float64) - np.asarray(getattr(b, f), np.float64))
                    for f in fields
                ],
                axis=0,
            )
            row[name] = {"max_abs": float(diff.max()), "rows_over_1e-2": float(np.mean(diff.max(-1) > 1e-2))}
        rows[dtype] = row
        ctx.log(f"scale: {dtype} logits store: {row}")
    return {"rows": rows, "n": n, "k": k}


PARTS = {"throughput": input_throughput, "resnet18": resnet18_224, "storage": storage_error}


def measure(ctx, sizes=SIZES, parts=("throughput", "resnet18", "storage", "memory")) -> dict:
    out = {"load_before": os.getloadavg()[0]}
    for part in parts:
        out[part] = memory_growth(ctx, sizes) if part == "memory" else PARTS[part](ctx)
    out["load_after"] = os.getloadavg()[0]
    return out


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
    import json

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


def main(argv=None) -> int:
    import argparse
    import datetime

    from benchmarks import peer as peer_lib
    from benchmarks.modes import MODES, Context

    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.splitlines()[0])
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
        measured = measure(Context(mode, peer, log, {}), tuple(int(n) for n in args.sizes.split(",")), parts)
    finally:
        if peer is not None:
            peer.close()
    command = " ".join(["python -m benchmarks.scale", *(argv or sys.argv[1:])])
    measured.update(commands={p: command for p in parts})
    results = measured
    previous = os.path.join(args.out, "benchmarks_scale.json")
    if set(parts) != set(PARTS) | {"memory"} and os.path.exists(previous):
        import json

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


if __name__ == "__main__":
    from debkd_jax import xla_cpu

    xla_cpu.apply_defaults()
    sys.exit(main())
