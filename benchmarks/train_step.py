"""a. Student train step, images/s: the project's step (CE, DeBKD; each conv backward) vs the peer.

One run per (batch, dtype) of the mode (`train_batches` x `train_dtypes`), on whatever device JAX runs on; the
peer runs on its own device (`run.py --peer-device`), in float32 or under bfloat16 autocast.
"""

from __future__ import annotations

from benchmarks.render import fmt, ratio, table
from benchmarks.steps import get_step
from benchmarks.timing import interleaved, paired_ratio, summary

LABELS = {
    "jax_ce": "JAX CE",
    "jax_debkd": "JAX DeBKD, targets precomputed",
    "jax_ce_materialized": "JAX CE, conv VJP through a fusion barrier (materialized)",
    "jax_ce_xla_conv": "JAX CE, plain XLA conv backward",
    "jax_debkd_xla_conv": "JAX DeBKD, plain XLA conv backward",
    "torch_ce": "PyTorch peer CE",
}


def calls_per_sample(mode, name: str, batch: int) -> int:
    """`mode.steps[name]` calls at `mode.batch`, scaled so every batch times about as many images."""
    return max(1, round(mode.steps.get(name, 1) * mode.batch / batch))


def measure_model(ctx, name: str, batch: int, dtype: str = "float32") -> dict:
    mode = ctx.mode
    fns = {"jax_ce": get_step(name, "CE", batch=batch, dtype=dtype)}
    if "DeBKD" in mode.train_methods:
        fns["jax_debkd"] = get_step(name, "DeBKD", batch=batch, dtype=dtype)
    # The plain XLA conv backward is a separate step only where "auto" resolves to another one (CPU).
    other_backward = fns["jax_ce"].conv_backward != "xla"
    if other_backward:
        fns["jax_ce_xla_conv"] = get_step(name, "CE", batch=batch, dtype=dtype, conv_backward="xla")
        if fns["jax_ce"].conv_backward != "materialized":
            fns["jax_ce_materialized"] = get_step(
                name, "CE", batch=batch, dtype=dtype, conv_backward="materialized"
            )
        if name in mode.all_variants and "jax_debkd" in fns:
            fns["jax_debkd_xla_conv"] = get_step(name, "DeBKD", batch=batch, dtype=dtype, conv_backward="xla")
    compile_s = {k: f.compile_s for k, f in fns.items()}
    if ctx.peer is not None:
        fns["torch_ce"] = ctx.peer.train_step("train_step", name, batch, dtype=dtype)
    samples = interleaved(fns, rounds=mode.rounds, calls=calls_per_sample(mode, name, batch))
    row = {k: summary(v, batch) for k, v in samples.items()}
    for k, s in compile_s.items():
        row[k]["compile_s"] = s
    if "torch_ce" in samples:
        row["speedup_vs_torch"] = {
            k: paired_ratio(samples["torch_ce"], samples[k]) for k in samples if k.startswith("jax_")
        }
    # The default step (config.conv_backward="auto", resolved here) over the plain XLA conv backward.
    row["conv_backward"] = fns["jax_ce"].conv_backward
    if other_backward:
        row["speedup_over_xla_conv"] = {"ce": paired_ratio(samples["jax_ce_xla_conv"], samples["jax_ce"])}
        if "jax_debkd_xla_conv" in samples:
            row["speedup_over_xla_conv"]["debkd"] = paired_ratio(
                samples["jax_debkd_xla_conv"], samples["jax_debkd"]
            )
    return row


def measure(ctx) -> dict:
    mode = ctx.mode
    out = {"image_size": 32, "runs": []}
    for batch in mode.train_batches or (mode.batch,):
        for dtype in mode.train_dtypes:
            run = {"batch": batch, "dtype": dtype, "models": {}}
            for name in mode.train_models:
                ctx.log(f"train_step: {name}, batch {batch}, {dtype}")
                row = run["models"][name] = measure_model(ctx, name, batch, dtype)
                vs = row.get("speedup_vs_torch", {}).get("jax_ce")
                ips = fmt(row["jax_ce"]["images_per_s"])
                versus = "" if vs is None else f", {ratio(vs)} the peer's speed"
                ctx.log(f"train_step: {name}, batch {batch}, {dtype}: JAX CE {ips} img/s{versus}")
            out["runs"].append(run)
    return out


def runs_of(r: dict) -> list[dict]:
    """The section's runs; results written before it had several (one float32 batch) read as one run."""
    return r.get("runs") or [{"batch": r["batch"], "dtype": "float32", "models": r["models"]}]


def render(r: dict) -> list[str]:
    runs = runs_of(r)
    lines = [f"## a. Student train step ({r.get('image_size', 32)}x{r.get('image_size', 32)})", ""]
    rows = []
    for run in runs:
        for name, row in run["models"].items():
            sp = row.get("speedup_vs_torch", {})
            for key, label in LABELS.items():
                if key in row:
                    vs = "1.00x" if key == "torch_ce" else (ratio(sp[key]) if key in sp else "n/a (no peer)")
                    ips = f"{fmt(row[key]['images_per_s'])} ({fmt(row[key]['best_images_per_s'])})"
                    rows.append([name, run["batch"], run["dtype"], label, ips, vs])
    lines += table(["model", "batch", "dtype", "step", "img/s (best)", "vs PyTorch"], rows) + [""]
    for run in runs:
        for name, row in run["models"].items():
            m = row.get("speedup_over_xla_conv")
            if m:
                debkd = f" and {ratio(m['debkd'])} (DeBKD)" if "debkd" in m else ""
                lines.append(
                    f"- {name}, batch {run['batch']}, {run['dtype']}: the default conv backward (here "
                    f"`{row['conv_backward']}`) over the plain XLA conv backward: "
                    f"{ratio(m['ce'])} (CE){debkd}."
                )
    lines += [
        "",
        "dtype: the compute dtype (`config.dtype`; parameters and optimizer stay float32); the peer runs "
        "float32 or the same under `torch.autocast(bfloat16)`. PyTorch: `third_party/torch_peer`, eager, "
        "SGD momentum, channels_last. Both sides wait for every step's result.",
        "",
    ]
    return lines
