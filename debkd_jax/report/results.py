"""The results JSON of a job, for `main` and sweeps alike: per method (or sweep point) mean/std over seeds,
paired differences between methods, two runs compared, and reading a results.json back."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from debkd_jax import metrics, workdir_lib
from debkd_jax.errors import UserError


def seed_summary(group: Sequence[dict]) -> dict:
    """The runs of one method (or sweep point), one per seed: seeds, mean/std of each test metric, the
    per-seed metrics and the epochs chosen on validation."""
    return {
        "seeds": [r["seed"] for r in group],
        "test": metrics.mean_std([r["test"] for r in group]),
        "per_seed": [r["test"] for r in group],
        "best_epochs": [r["best_epoch"] for r in group],
    }


def dataset_summary(source) -> dict:
    """Source (as the user named it), class names, split sizes and per-class counts of a data source
    (`data.source.DataSource`, either kind), and how many files could not be read."""
    splits = ("train", "val", "test")
    return {
        "source": source.name,
        "class_names": list(source.class_names),
        "sizes": {s: int(len(source.splits[s].labels)) for s in splits},
        "class_counts": {
            s: np.bincount(source.splits[s].labels, minlength=source.num_classes).tolist() for s in splits
        },
        "skipped_files": len(source.skipped),
    }


def summarize(
    *,
    config,
    source,
    teacher_meta: dict,
    teacher_test: dict | None,
    runs: Sequence[dict],
    diagnostics: dict | None = None,
) -> dict:
    """Results of the whole job: the teacher row and, per method, mean/std over seeds of each test metric."""
    by_method: dict[str, list[dict]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    rows = {
        name: {
            "model": group[0]["model"],
            **seed_summary(group),
            "val_accuracy": [[e["val_accuracy"] for e in r["history"]] for r in group],
            "wall_seconds": [r["wall_seconds"] for r in group if "wall_seconds" in r],
            "config": group[0]["config"],
        }
        for name, group in by_method.items()
    }
    diagnostics = diagnostics or {}
    for name, row in rows.items():
        if name in diagnostics.get("methods", {}):
            row["targets"] = diagnostics["methods"][name]
    return {
        "dataset": dataset_summary(source),
        "teacher": {
            "model": teacher_meta["model"],
            "test": teacher_test,
            "val_accuracy": [e["val_accuracy"] for e in teacher_meta.get("history", [])],
            "accuracy": diagnostics.get("teacher_accuracy"),
            "wall_seconds": teacher_meta.get("wall_seconds"),
            "out_of_fold": teacher_meta.get("out_of_fold"),
        },
        "student_model": config.student.model,
        "student_epochs": config.student.num_epochs,
        "methods": rows,
        "paired": paired_differences(rows),
        "selection": "checkpoint with the best validation accuracy; metrics on the test split",
    }


def sweep_summary(
    *,
    config,
    points: Sequence,
    runs: dict[str, list[dict]],
    source,
    teacher_meta: dict,
    teacher_test: dict | None,
) -> dict:
    """A sweep's results (`config.sweep`). Per point (`.label`, `.values`): mean/std over seeds of the test
    metrics and of the best validation accuracy; the point chosen on validation."""
    rows = []
    for p in points:
        group = runs[p.label]
        best_val = [max((e["val_accuracy"] for e in r["history"]), default=float("nan")) for r in group]
        rows.append(
            {
                "label": p.label,
                "values": p.values,
                **seed_summary(group),
                "val_accuracy": metrics.mean_std([{"best": v} for v in best_val])["best"],
                "run_dirs": [r["run_dir"] for r in group],
            }
        )
    chosen = max(range(len(rows)), key=lambda i: rows[i]["val_accuracy"]["mean"]) if rows else None
    sweep = config.sweep
    return {
        "sweep": {
            "name": sweep.name,
            "method": sweep.method,
            "fields": list(points[0].values) if points else [],
            "x_label": sweep.x_label,
            "base_method": config.methods[sweep.method].to_dict(),
        },
        "dataset": dataset_summary(source),
        "teacher": {"model": teacher_meta["model"], "test": teacher_test},
        "student_model": config.student.model,
        "student_epochs": config.student.num_epochs,
        "points": rows,
        "chosen": rows[chosen]["label"] if rows else None,
        "selection": "each run: checkpoint with the best validation accuracy; the chosen point: the best "
        "mean validation accuracy over seeds; all metrics on the test split",
    }


REFERENCES = ("KD", "CE")
"""Methods the others are compared against, seed by seed, when the run has them."""


def paired_differences(methods_rows: dict, metric: str = "accuracy") -> dict:
    """`{reference: {method: metrics.paired_difference(method, reference)}}` of one test metric, for each
    reference of `REFERENCES` in the run and each other method trained on the same seeds."""
    out = {}
    for ref in REFERENCES:
        if ref not in methods_rows:
            continue
        base = methods_rows[ref]
        out[ref] = {
            name: metrics.paired_difference(
                [s[metric] for s in row["per_seed"]], [s[metric] for s in base["per_seed"]]
            )
            for name, row in methods_rows.items()
            if name != ref and row["seeds"] == base["seeds"]
        }
    return out


def compare_results(base: dict, other: dict, labels: tuple[str, str]) -> dict:
    """Two runs of the same data and seeds, side by side per method they share (e.g. teacher.folds = 1 and
    K): each one's test accuracy, the paired difference `other - base` over the seeds, and each one's
    target diagnostics. `UserError` when the two are not paired (other data or other seeds)."""
    if base["dataset"] != other["dataset"]:
        raise UserError(
            f"{labels[0]} and {labels[1]} were run on other data ({base['dataset']['source']}, sizes "
            f"{base['dataset']['sizes']} vs {other['dataset']['source']}, {other['dataset']['sizes']}); "
            "compare runs of one dataset and split."
        )
    rows = {}
    for name, a in base["methods"].items():
        b = other["methods"].get(name)
        if b is None:
            continue
        if a["seeds"] != b["seeds"]:
            raise UserError(
                f"{name}: {labels[0]} has seeds {a['seeds']} and {labels[1]} {b['seeds']}; paired "
                "differences need the same seeds."
            )
        rows[name] = {
            "seeds": a["seeds"],
            "accuracy": [a["test"]["accuracy"], b["test"]["accuracy"]],
            "per_seed": [[s["accuracy"] for s in a["per_seed"]], [s["accuracy"] for s in b["per_seed"]]],
            "paired": metrics.paired_difference(
                [s["accuracy"] for s in b["per_seed"]], [s["accuracy"] for s in a["per_seed"]]
            ),
            "targets": [a.get("targets"), b.get("targets")],
        }
    if not rows:
        raise UserError(f"{labels[0]} and {labels[1]} have no method in common.")
    return {
        "labels": list(labels),
        "dataset": base["dataset"],
        "teacher": [base["teacher"], other["teacher"]],
        "methods": rows,
    }


def read_results(json_path: str) -> dict:
    """A main job's results.json; `UserError` for a file that is not one."""
    results = workdir_lib.read_json(json_path)
    if not isinstance(results, dict) or "methods" not in results:
        raise UserError(f"{json_path} is not a results.json written by `python -m debkd_jax.main`.")
    return results


def without_meta(results: dict) -> dict:
    """Results less `meta` (when and with what they were made), which a re-run changes."""
    return {k: v for k, v in results.items() if k != "meta"}
