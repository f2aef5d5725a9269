"""Evaluation metrics of a classifier's logits on the host, their mean/std over seeds, and paired differences
between methods trained on the same seeds.

Binary tasks: precision/recall/F1 of the positive class (label 1); k > 2: macro averages over classes
(scikit-learn's `precision_recall_fscore_support`, a class never predicted scoring 0).
"""

from __future__ import annotations

import math
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
    binary = k == 2
    from sklearn.metrics import precision_recall_fscore_support  # scikit-learn and SciPy load on first use

    precision, recall, f1, _ = precision_recall_fscore_support(
        labels,
        pred,
        labels=[1] if binary else list(range(k)),
        average="binary" if binary else "macro",
        zero_division=0.0,
    )
    out = {
        "accuracy": float(np.mean(pred == labels)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }
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


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Differences `d_s = a_s - b_s` of two methods over the same seeds s = 1..S.

    mean `d̄`; sample std `sd` (ddof 1); the Student-t interval `d̄ ± t_{(1+c)/2, S-1} sd / sqrt(S)` (None for
    S < 2); `wins`: the number of seeds with `d_s > 0`. (S,), (S,) -> dict.
    """
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.ndim != 1 or d.size == 0 or np.shape(a) != np.shape(b):
        raise ValueError(
            f"need two equal, non-empty 1-D sequences, got shapes {np.shape(a)} and {np.shape(b)}"
        )
    n = int(d.size)
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    if n > 1:
        from scipy import stats

        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
        interval = [mean - half, mean + half]
    else:
        interval = None
    return {
        "mean": mean,
        "std": sd if n > 1 else None,
        "ci": interval,
        "confidence": confidence,
        "wins": int(np.sum(d > 0)),
        "ties": int(np.sum(d == 0)),
        "n": n,
        "per_seed": d.tolist(),
    }
