"""c. The DeBKD (and KD) step over the cross-entropy step of the same student."""

from __future__ import annotations

from benchmarks.render import fmt, table
from benchmarks.steps import get_step
from benchmarks.timing import interleaved, paired_ratio, summary


def measure(ctx) -> dict:
    mode = ctx.mode
    name = mode.train_models[0]
    ctx.log(f"overhead: DeBKD vs CE step, {name}, batch {mode.batch}")
    fns = {"ce": get_step(name, "CE", batch=mode.batch), "debkd": get_step(name, "DeBKD", batch=mode.batch)}
    if mode.name != "smoke":
        fns["kd"] = get_step(name, "KD", batch=mode.batch)
    samples = interleaved(fns, rounds=mode.overhead_rounds, calls=mode.overhead_steps)
    out = {
        "model": name,
        "batch": mode.batch,
        "rows": {k: summary(v, mode.batch) for k, v in samples.items()},
    }
    for k in fns:
        if k != "ce":
            out[f"{k}_over_ce"] = paired_ratio(samples[k], samples["ce"]) - 1.0
    return out


def render(r: dict) -> list[str]:
    lines = [f"## c. DeBKD vs cross-entropy step ({r['model']}, batch {r['batch']})", ""]
    lines += table(
        ["objective", "img/s", "time vs CE"],
        [
            [k, fmt(v["images_per_s"]), "" if k == "ce" else f"{100 * r[k + '_over_ce']:+.1f}%"]
            for k, v in r["rows"].items()
        ],
    )
    return lines + ["", "Time over CE: the median of per-round time ratios, minus 1.", ""]
