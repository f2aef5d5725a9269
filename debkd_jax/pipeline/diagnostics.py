"""What the results carry besides the students' metrics: what each method's targets do to the teacher's
logits, and when and with what the results were made."""

from __future__ import annotations

import jax
import numpy as np

from debkd_jax import methods
from debkd_jax import targets as targets_lib


def target_diagnostics(method_cfg, teacher_logits: np.ndarray, labels: np.ndarray) -> dict:
    """What a method's targets do to the teacher's training logits: the share of images they classify wrongly
    after the method's transforms, the share of images the transforms changed, and (for the de-biased loss)
    the mean width of the interval the true class's target may take (`targets.label_interval`)."""
    built = methods.method_targets(method_cfg, teacher_logits, labels)
    logits = np.asarray(built.logits)
    lo_y, hi_y = targets_lib.label_interval(built.lo, built.hi, labels)
    return {
        "targets_wrong": float(np.mean(np.argmax(logits, -1) != labels)),
        "changed": float(np.mean(np.any(logits != np.asarray(teacher_logits, np.float32), axis=-1))),
        "region_width": float(np.mean(np.asarray(hi_y) - np.asarray(lo_y)))
        if method_cfg.loss == "debkd"
        else None,
    }


def run_diagnostics(config, dataset, t_logits: dict) -> dict:
    """The teacher's accuracy on every split (None for a split a logits file lacks), and `target_diagnostics`
    of every method except plain CE."""
    teacher = {
        split: float(np.mean(np.argmax(t_logits[split], -1) == getattr(dataset, f"{split}_labels")))
        if t_logits[split] is not None
        else None
        for split in ("train", "val", "test")
    }
    per_method = {
        name: target_diagnostics(cfg, t_logits["train"], dataset.train_labels)
        for name, cfg in config.methods.items()
        if cfg.loss != "ce"
    }
    return {"teacher_accuracy": teacher, "methods": per_method}


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
