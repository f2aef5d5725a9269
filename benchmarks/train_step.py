"""a. Student train step, images/s: the project's step (CE, DeBKD; each conv backward) vs the peer, in one
process, interleaved."""

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


def measure_model(ctx, name: str) -> dict:
    mode = ctx.mode
    fns = {
        "jax_ce": get_step(name, "CE", batch=mode.batch),
        "jax_debkd": get_step(name, "DeBKD", batch=mode.batch),
        "jax_ce_xla_conv": get_step(name, "CE", batch=mode.batch, conv_backward="xla"),
    }
    if fns["jax_ce"].conv_backward != "materialized":
        fns["jax_ce_materialized"] = get_step(name, "CE", batch=mode.batch, conv_backward="materialized")
    if name in mode.all_variants:
        fns["jax_debkd_xla_conv"] = get_step(name, "DeBKD", batch=mode.batch, conv_backward="xla")
    compile_s = {k: f.compile_s for k, f in fns.items()}
    if ctx.peer is not None:
        fns["torch_ce"] = ctx.peer.train_step("train_step", name, mode.batch)
    samples = interleaved(fns, rounds=mode.rounds, calls=mode.steps.get(name, 1))
    row = {k: summary(v, mode.batch) for k, v in samples.items()}
    for k, s in compile_s.items():
        row[k]["compile_s"] = s
    if "torch_ce" in samples:
        row["speedup_vs_torch"] = {
            k: paired_ratio(samples["torch_ce"], samples[k]) for k in samples if k.startswith("jax_")
        }
    # The default step (config.conv_backward="auto", resolved here) over the plain XLA conv backward.
    row["conv_backward"] = fns["jax_ce"].conv_backward
    row["speedup_over_xla_conv"] = {"ce": paired_ratio(samples["jax_ce_xla_conv"], samples["jax_ce"])}
    if "jax_debkd_xla_conv" in samples:
        row["speedup_over_xla_conv"]["debkd"] = paired_ratio(
            samples["jax_debkd_xla_conv"], samples["jax_debkd"]
        )
    return row


def measure(ctx) -> dict:
    out = {"batch": ctx.mode.batch, "image_size": 32, "models": {}}
    for name in ctx.mode.train_models:
        ctx.log(f"train_step: {name}, batch {ctx.mode.batch}")
        out["models"][name] = measure_model(ctx, name)
    return out


def render(r: dict) -> list[str]:
    lines = [f"## a. Student train step (batch {r['batch']}, 32x32, float32)", ""]
    rows = []
    for name, row in r["models"].items():
        sp = row.get("speedup_vs_torch", {})
        for key, label in LABELS.items():
            if key in row:
                vs = "1.00x" if key == "torch_ce" else (ratio(sp[key]) if key in sp else "n/a (no peer)")
                rows.append(
                    [
                        name,
                        label,
                        f"{fmt(row[key]['images_per_s'])} ({fmt(row[key]['best_images_per_s'])})",
                        vs,
                    ]
                )
    lines += table(["model", "step", "img/s (best)", "vs PyTorch"], rows) + [""]
    for name, row in r["models"].items():
        m = row["speedup_over_xla_conv"]
        debkd = f" and {ratio(m['debkd'])} (DeBKD)" if "debkd" in m else ""
        lines.append(
            f"- {name}: the default conv backward (here `{row['conv_backward']}`) over the plain XLA "
            f"conv backward: {ratio(m['ce'])} (CE){debkd}."
        )
    lines += ["", "PyTorch: `third_party/torch_peer`, eager, SGD momentum, channels_last.", ""]
    return lines
