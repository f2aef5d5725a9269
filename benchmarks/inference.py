"""f. Inference: exported (BatchNorm-folded) and in-process students and teachers vs the peer."""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.render import fmt, table
from benchmarks.steps import init_variables
from benchmarks.timing import block, interleaved, paired_ratio, summary
from debkd_jax import export, models, training, workdir_lib


def dir_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def measure_model(ctx, name: str, tmp: str) -> dict:
    mode = ctx.mode
    model = models.get_model(name, 2)
    variables = init_variables(model)
    ckpt = os.path.join(tmp, name)
    workdir_lib.save_variables(ckpt, variables)
    exported = export.export_model(model, variables, 32)
    call = jax.jit(exported.call)
    predict = training.make_predict_fn(model, jnp.float32)
    rng = np.random.default_rng(0)
    big = jnp.asarray(rng.integers(0, 256, (mode.inference_batch, 32, 32, 3), dtype=np.uint8))
    one = big[:1]
    thr = {"exported": lambda: block(call(big)), "flax_eval": lambda: block(predict(variables, big)[0])}
    lat = {"exported": lambda: block(call(one))}
    if ctx.peer is not None:
        thr["torch_eval"] = ctx.peer.eval("inference", name, mode.inference_batch)
        lat["torch_eval"] = ctx.peer.eval("inference", name, 1)
    rounds = max(2, mode.rounds - 1)
    thr_s = interleaved(thr, rounds=rounds, calls=1)
    lat_s = interleaved(lat, rounds=rounds, calls=mode.latency_calls)
    row = {
        "parameters": models.count_params(variables["params"]),
        "checkpoint_bytes": dir_size(ckpt),
        "exported_bytes": len(exported.serialize()),
        "throughput": {k: summary(v, mode.inference_batch) for k, v in thr_s.items()},
        "latency_batch1": {k: summary(v) for k, v in lat_s.items()},
        "exported_speedup_vs_flax_eval": paired_ratio(thr_s["flax_eval"], thr_s["exported"]),
    }
    if "torch_eval" in thr_s:
        row["exported_speedup_vs_torch"] = paired_ratio(thr_s["torch_eval"], thr_s["exported"])
        row["exported_latency_speedup_vs_torch"] = paired_ratio(lat_s["torch_eval"], lat_s["exported"])
    return row


def measure(ctx) -> dict:
    out = {"batch": ctx.mode.inference_batch, "models": {}}
    tmp = tempfile.mkdtemp(prefix="debkd-bench-export-")
    try:
        for name in ctx.mode.inference_models:
            ctx.log(f"inference: {name}")
            out["models"][name] = measure_model(ctx, name, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _ms(v: dict, key: str) -> str:
    return f"{1e3 * v['latency_batch1'][key]['median_s']:.2f}" if key in v["latency_batch1"] else "skipped"


def render(r: dict) -> list[str]:
    lines = [f"## f. Inference (eval mode, throughput at batch {r['batch']}, latency at batch 1)", ""]
    rows = []
    for name, v in r["models"].items():
        t = v["throughput"]
        rows.append(
            [
                name,
                f"{v['parameters']:,}",
                f"{v['checkpoint_bytes'] / 1e6:.2f}",
                f"{v['exported_bytes'] / 1e6:.2f}",
                fmt(t["exported"]["images_per_s"]),
                fmt(t["flax_eval"]["images_per_s"]),
                fmt(t["torch_eval"]["images_per_s"]) if "torch_eval" in t else "skipped",
                _ms(v, "exported"),
                _ms(v, "torch_eval"),
            ]
        )
    lines += table(
        [
            "model",
            "params",
            "checkpoint MB",
            "exported MB",
            "exported img/s",
            "Flax eval img/s",
            "PyTorch img/s",
            "exported ms (b=1)",
            "PyTorch ms (b=1)",
        ],
        rows,
    )
    return lines + [
        "",
        "Exported: `debkd_jax.export` (StableHLO via jax.export, BatchNorm folded, uint8 in, normalization "
        "inside). Flax eval: `training.make_predict_fn`.",
        "",
    ]
