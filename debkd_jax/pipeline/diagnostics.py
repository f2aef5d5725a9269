"""What the results carry besides the students' metrics: what each method's targets do to the teacher's
logits, and when and with what the results were made."""

from __future__ import annotations

import jax
import numpy as np

from debkd_jax import methods
from debkd_jax import targets as targets_lib
from debkd_jax.data import logits_store
from debkd_jax.pipeline.teacher import infusion_table


def target_diagnostics(method_cfg, store, labels: np.ndarray) -> dict:
    """What a method's targets do to the teacher's training logits (a logits store, read chunk by chunk): the
    share of images they classify wrongly after the method's transforms, the share of images the transforms
    changed, and (for the de-biased loss) the mean width of the interval the true class's target may take
    (`targets.label_interval`)."""
    infusion = None
    if "knowledge_infusion" in tuple(method_cfg.transforms):
        infusion = infusion_table(store, labels, method_cfg.ki_mode)
    labels = logits_store.row_labels(store, labels)
    valid = store.valid
    wrong = changed = width = 0.0
    count = 0
    for rows, z in store.chunks():
        ok = valid[rows]
        z, y = z[ok], labels[rows][ok]
        if not len(y):
            continue
        built = methods.method_targets(method_cfg, z, y, infusion=infusion)
        logits = np.asarray(built.logits)
        wrong += float(np.sum(np.argmax(logits, -1) != y))
        changed += float(np.sum(np.any(logits != np.asarray(z, np.float32), axis=-1)))
        if method_cfg.loss == "debkd":
            lo_y, hi_y = targets_lib.label_interval(built.lo, built.hi, y)
            width += float(np.mean(np.asarray(hi_y) - np.asarray(lo_y))) * len(y)
        count += len(y)
    count = max(count, 1)
    return {
        "targets_wrong": wrong / count,
        "changed": changed / count,
        "region_width": width / count if method_cfg.loss == "debkd" else None,
    }


def run_diagnostics(config, source, teacher, targets=None) -> dict:
    """The teacher's accuracy on every split (None for a split a logits file lacks), and `target_diagnostics`
    of every method except plain CE, on the logits the students' targets come from (`targets.train`: the
    images', or every view's)."""
    labels = {split: source.splits[split].labels for split in ("train", "val", "test")}
    accuracy = {
        split: logits_store.accuracy(teacher.logits[split], labels[split])
        if teacher.logits[split] is not None
        else None
        for split in ("train", "val", "test")
    }
    train = targets.train if targets is not None else teacher.logits["train"]
    per_method = {
        name: target_diagnostics(cfg, train, labels["train"])
        for name, cfg in config.methods.items()
        if cfg.loss != "ce"
    }
    return {"teacher_accuracy": accuracy, "methods": per_method}


def run_meta(command: str | None, runs: list[dict], teacher_meta: dict) -> dict:
    """When and with what the results were made: the command, library versions, the finishing time and the
    students' summed training time (a reused student counts with the time it took when it was trained)."""
    import datetime
    import platform

    import flax
    import optax

    return {
        "command": command,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "numpy": np.__version__,
        },
        "student_seconds": float(sum(r.get("wall_seconds", 0.0) for r in runs)),
        "teacher_seconds": teacher_meta.get("wall_seconds"),
    }
