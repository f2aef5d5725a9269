"""Evaluation metrics of a classifier's logits, on the host (NumPy), and their mean/std over seeds.

Binary tasks: precision/recall/F1 of the positive class (label 1); k > 2: macro averages over classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def classification_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int | None = None,
    teacher_logits: np.ndarray | None = None,
    region_hits: np.ndarray | None = None,
) -> dict[str, float]:
    """accuracy, precision, recall, f1 (binary: positive class 1; else macro), and, when given,
    teacher-student agreement (share of equal argmax) and region hit rate. (N, k), (N,) -> dict."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    k = num_classes or logits.shape[-1]
    pred = np.argmax(logits, axis=-1)
    out = {"accuracy": float(np.mean(pred == labels))}
    classes = [1] if k == 2 else list(range(k))
    precision, recall, f1 = [], [], []
    for c in classes:
        tp = np.sum((pred == c) & (labels == c))
        fp = np.sum((pred == c) & (labels != c))
        fn = np.sum((pred != c) & (labels == c))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        precision.append(p)
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    out.update(precision=float(np.mean(precision)), recall=float(np.mean(recall)), f1=float(np.mean(f1)))
    if teacher_logits is not None:
        out["agreement"] = float(np.mean(pred == np.argmax(teacher_logits, axis=-1)))
    if region_hits is not None:
        out["region_hit_rate"] = float(np.mean(region_hits))
    return out


def mean_std(runs: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and (population) standard deviation of each metric over runs (seeds)."""
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    return {
        k: {
            "mean": float(np.mean([r[k] for r in runs])),
            "std": float(np.std([r[k] for r in runs])),
            "n": len(runs),
        }
        for k in keys
    }
