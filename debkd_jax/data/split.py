"""The stratified, seeded train/val/test split, the fixed per-class subset taken before it, and the
stratified folds of the training set for out-of-fold teacher logits.

Per class of n examples: n_val = max(1, round_half_up(n * f_val)), n_test likewise, trimmed until train
keeps at least one; the rest is train.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SUBSET_SEED = 0
"""Seed of the `max_per_class` subset, fixed so the subset does not move with the split's seed."""


def check_split(split: Sequence[float]) -> tuple[float, float, float]:
    """(train, val, test) fractions as floats; ValueError unless 3 fractions > 0 summing to 1."""
    fractions = tuple(float(f) for f in split)
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split must be 3 fractions > 0 summing to 1 (train, val, test): {split}")
    return fractions


def subset_per_class(labels: np.ndarray, max_per_class: int | None) -> list[int]:
    """Sorted indices keeping at most `max_per_class` per class, a fixed seeded choice."""
    if max_per_class is None:
        return list(range(len(labels)))
    rng = np.random.default_rng(SUBSET_SEED)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        keep.extend(members[np.sort(rng.permutation(len(members))[:max_per_class])].tolist())
    return sorted(keep)


def check_class_counts(labels: np.ndarray, class_names: Sequence[str], name: str, num_skipped: int,
                       test_mask: np.ndarray | None) -> None:
    """Every class needs one example per split: 3, or 2 outside the dataset's own test split."""
    labels = labels if test_mask is None else labels[~test_mask]
    need = 3 if test_mask is None else 2
    counts = np.bincount(labels, minlength=len(class_names))
    small = [(class_names[c], int(n)) for c, n in enumerate(counts) if n < need]
    if small:
        raise ValueError(
            f"{name}: class(es) {small} have fewer than {need} readable examples ({num_skipped} "
            "file(s) skipped as unreadable), too few for a stratified train/val/test split; add "
            "images to those classes or remove them"
        )


def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_val, n_test) for a class of n examples.

    Rounded half up, at least 1 each (test 0 when its fraction is 0), the larger trimmed first to
    leave at least 1 for train.
    """
    min_test = 1 if test_fraction > 0 else 0
    n_val = max(1, math.floor(n * val_fraction + 0.5))
    n_test = max(min_test, math.floor(n * test_fraction + 0.5))
    while n_val + n_test > n - 1 and (n_val > 1 or n_test > min_test):
        if n_val > 1 and n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def split_indices(labels: np.ndarray, fractions, seed: int, test_mask=None):
    """Stratified, seeded (train, val, test) int64 index arrays, each shuffled by the same rng.

    With `test_mask`, the masked examples are the test set; the rest splits train:val by
    fractions[0]:fractions[1].
    """
    f_train, f_val, f_test = fractions
    rng = np.random.default_rng(seed)
    parts: tuple[list, list, list] = ([], [], [])
    pool = np.arange(len(labels)) if test_mask is None else np.flatnonzero(~test_mask)
    for c in np.unique(labels[pool]):
        members = rng.permutation(pool[labels[pool] == c])
        if test_mask is None:
            n_val, n_test = split_counts(len(members), f_val, f_test)
        else:
            n_val, n_test = split_counts(len(members), f_val / (f_train + f_val), 0.0)
        parts[2].append(members[:n_test])
        parts[1].append(members[n_test : n_test + n_val])
        parts[0].append(members[n_test + n_val :])
    if test_mask is not None:
        parts[2].append(np.flatnonzero(test_mask))
    return tuple(rng.permutation(np.concatenate(p)).astype(np.int64) for p in parts)


def stratified_folds(labels: np.ndarray, num_folds: int, seed: int) -> np.ndarray:
    """Each example's fold, int64 (N,) in [0, num_folds): seeded and stratified (scikit-learn's shuffled
    `StratifiedKFold`), so each fold holds about 1/num_folds of every class. ValueError unless
    2 <= num_folds <= the smallest class's count."""
    labels = np.asarray(labels)
    counts = np.unique(labels, return_counts=True)[1]
    if not 2 <= num_folds <= counts.min():
        raise ValueError(
            f"num_folds={num_folds} must be in [2, {counts.min()}] (the smallest class's count) "
            "for these labels"
        )
    from sklearn.model_selection import StratifiedKFold  # scikit-learn loads on first use

    folds = np.empty(len(labels), np.int64)
    splitter = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    for k, (_, heldout) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        folds[heldout] = k
    return folds
