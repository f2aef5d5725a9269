"""b. One distillation epoch: DeBKD with precomputed targets vs KD with the teacher online (JAX, peer)."""

from __future__ import annotations

import numpy as np

from benchmarks.render import fmt, ratio, table
from benchmarks.steps import TeacherPass, get_step
from benchmarks.timing import interleaved, paired_ratio, summary

NAMES = {
    "jax_debkd_precomputed": "DeBKD, targets precomputed (JAX)",
    "jax_kd_online": "KD, teacher online every step (JAX)",
    "torch_kd_online": "KD, teacher online every step (PyTorch peer)",
}
EPOCHS = 15
TRAIN_SHARE = 0.7  # the train split's share of all images: the teacher pass covers every split


def teacher_pass(ctx) -> dict:
    """The one-off pass DeBKD pays instead: eval-mode logits of every image, extrapolated from a batch."""
    mode = ctx.mode
    batch = 16 if mode.name == "smoke" else 256
    fn = TeacherPass(mode.epoch_teacher, batch)
    samples = interleaved({"teacher": fn}, rounds=2, calls=1, warmup=0)["teacher"]
    images = round(mode.epoch_images / TRAIN_SHARE)
    return {
        "batch": batch,
        "images": images,
        "samples_s": samples,
        "seconds": float(np.median(samples)) * images / batch,
    }


def measure(ctx) -> dict:
    mode = ctx.mode
    t, s, b = mode.epoch_teacher, mode.epoch_student, mode.epoch_batch
    steps_per_epoch = mode.epoch_images // b
    ctx.log(f"epoch: teacher {t} -> student {s}, batch {b}, {steps_per_epoch} steps per epoch")
    fns = {
        "jax_debkd_precomputed": get_step(s, "DeBKD", batch=b),
        "jax_kd_online": get_step(s, "KD", batch=b, teacher_name=t, online_targets=True),
    }
    if ctx.peer is not None:
        fns["torch_kd_online"] = ctx.peer.train_step("epoch", s, b, teacher=t)
    samples = interleaved(fns, rounds=mode.epoch_rounds, calls=mode.epoch_steps)
    rows = {k: summary(v, b) for k, v in samples.items()}
    for r in rows.values():
        r["epoch_s"] = r["median_s"] * steps_per_epoch
    pass_ = teacher_pass(ctx)
    out = {
        "teacher": t,
        "student": s,
        "batch": b,
        "train_images": mode.epoch_images,
        "steps_per_epoch": steps_per_epoch,
        "measured_steps": mode.epoch_rounds * mode.epoch_steps,
        "rows": rows,
        "teacher_pass": pass_,
        "speedup_precomputed_vs_jax_online": paired_ratio(
            samples["jax_kd_online"], samples["jax_debkd_precomputed"]
        ),
    }
    if "torch_kd_online" in samples:
        out["speedup_precomputed_vs_torch_online"] = paired_ratio(
            samples["torch_kd_online"], samples["jax_debkd_precomputed"]
        )
        out["speedup_jax_online_vs_torch_online"] = paired_ratio(
            samples["torch_kd_online"], samples["jax_kd_online"]
        )
    out["run_of_15_epochs"] = {
        "epochs": EPOCHS,
        "debkd_precomputed_s": pass_["seconds"] + EPOCHS * rows["jax_debkd_precomputed"]["epoch_s"],
        "kd_online_s": EPOCHS * rows["jax_kd_online"]["epoch_s"],
    }
    return out


def render(r: dict) -> list[str]:
    lines = [
        f"## b. One distillation epoch: {r['teacher']} teacher -> {r['student']} student",
        "",
        f"{r['train_images']:,} training images, batch {r['batch']}, {r['steps_per_epoch']} steps; "
        f"extrapolated from {r['measured_steps']} measured steps per variant.",
        "",
    ]
    lines += table(
        ["variant", "img/s", "epoch (s)"],
        [[NAMES[k], fmt(v["images_per_s"], 1), fmt(v["epoch_s"], 1)] for k, v in r["rows"].items()],
    )
    lines += [
        "",
        f"- precomputed vs JAX online: {ratio(r['speedup_precomputed_vs_jax_online'], 1)} per epoch",
    ]
    if "speedup_precomputed_vs_torch_online" in r:
        lines.append(
            f"- precomputed vs PyTorch online: {ratio(r['speedup_precomputed_vs_torch_online'], 1)}; "
            f"JAX online vs PyTorch online: {ratio(r['speedup_jax_online_vs_torch_online'])}"
        )
    run, p = r["run_of_15_epochs"], r["teacher_pass"]
    lines += [
        f"- the precomputed targets cost one teacher pass over all {p['images']:,} images first: "
        f"{p['seconds']:.1f} s (eval mode, batch {p['batch']}). A {run['epochs']}-epoch run: "
        f"{run['debkd_precomputed_s']:.0f} s with it vs {run['kd_online_s']:.0f} s online.",
        "",
    ]
    return lines
