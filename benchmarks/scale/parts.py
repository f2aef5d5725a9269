"""The scale benchmark's in-process parts: the streamed input alone, the ResNet-18 train step at 224 against
the PyTorch peer, and the error of a half-precision teacher-logits store."""

from __future__ import annotations

import os
import time

import numpy as np

from benchmarks.scale.jobs import jpeg_folder
from benchmarks.steps import get_step
from benchmarks.timing import interleaved, paired_ratio, summary


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
