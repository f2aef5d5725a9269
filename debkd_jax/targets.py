"""Teacher target transforms: pure functions of (teacher logits, labels).

Every function takes NumPy or jnp arrays, is jittable (string options static) and vmappable, and has no Python
loop over samples. Shapes: teacher logits `Z` (N, k), integer labels `y` (N,).

The composition a method uses is `build_targets`, which returns a `Targets` pytree of per-sample arrays that
the student's train step gathers rows from. See docs/method.md §2-4 and §9.2.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

INFUSION_MODES = ("pooled", "per_class")
RECTIFY_MODES = ("swap", "released")
TRANSFORMS = ("knowledge_infusion", "rectify")


def _is_concrete(*arrays) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def check_logits_and_labels(logits, labels=None, *, name: str = "teacher_logits") -> None:
    """Host-side validation with messages that name the argument; under jit only shapes are checked."""
    if np.ndim(logits) != 2:
        raise ValueError(f"{name} must have shape (N, k), got shape {np.shape(logits)}.")
    n, k = np.shape(logits)
    if k < 2:
        raise ValueError(f"{name} must have at least 2 classes (k >= 2), got k={k}.")
    if not jnp.issubdtype(jnp.result_type(logits), jnp.floating):
        raise ValueError(f"{name} must be floating point, got dtype {jnp.result_type(logits)}.")
    if _is_concrete(logits) and not np.all(np.isfinite(np.asarray(logits))):
        bad = int(np.sum(~np.isfinite(np.asarray(logits))))
        raise ValueError(
            f"{name} contains {bad} NaN/Inf value(s); the teacher's logits must be finite "
            "(check the teacher checkpoint or its training run)."
        )
    if labels is None:
        return
    if np.shape(labels) != (n,):
        raise ValueError(
            f"labels must have shape (N,) = ({n},) to match {name} {np.shape(logits)}, "
            f"got {np.shape(labels)}."
        )
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"labels must be integers in [0, {k}), got dtype {jnp.result_type(labels)}.")
    if _is_concrete(labels) and n:
        lab = np.asarray(labels)
        if lab.min() < 0 or lab.max() >= k:
            raise ValueError(
                f"labels must lie in [0, {k}) for k={k} classes, got values in [{lab.min()}, {lab.max()}]."
            )


def _check_option(value: str, valid: Sequence[str], name: str) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not one of {tuple(valid)}.")


def _check_temperature(temperature) -> None:
    if _is_concrete(temperature) and not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")


def teacher_correct(teacher_logits, labels) -> jax.Array:
    """`argmax_j Z_ij == y_i` on the raw logits. (N, k), (N,) -> bool (N,)."""
    check_logits_and_labels(teacher_logits, labels)
    return jnp.argmax(teacher_logits, axis=-1) == labels


def infusion_table(teacher_logits, labels, mode: str = "pooled") -> jax.Array:
    """The logits a misclassified sample receives under knowledge infusion, one row per label.

    `pooled`: row c is `zF` everywhere and `zC` at c, with `zC = mean_i Z[i, y_i]` and
    `zF = mean_i mean_{j != y_i} Z[i, j]` over the teacher-correct samples (DeBKD's `[z_C, z_F]` for k = 2).
    `per_class`: row c is the mean logit vector of the correct samples of label c; `pooled` where there is
    none.
    (N, k), (N,) -> (k, k).
    """
    _check_option(mode, INFUSION_MODES, "mode")
    check_logits_and_labels(teacher_logits, labels)
    if _is_concrete(teacher_logits, labels):
        z = np.asarray(teacher_logits, np.float32)
        if not np.any(np.argmax(z, axis=-1) == np.asarray(labels)):
            raise ValueError(
                "knowledge infusion needs at least one sample the teacher classifies correctly, found "
                "none: the teacher is not trained (or labels do not match its classes). Train the "
                "teacher longer, or drop 'knowledge_infusion' from the method's transforms."
            )
    return _infusion_table(teacher_logits, labels, mode)


# Jitted: called on concrete arrays it is one compiled program, not one per operation.
@functools.partial(jax.jit, static_argnames="mode")
def _infusion_table(teacher_logits, labels, mode: str) -> jax.Array:
    z = jnp.asarray(teacher_logits, jnp.float32)
    k = z.shape[-1]
    correct = teacher_correct(z, labels)
    onehot = jax.nn.one_hot(labels, k, dtype=z.dtype)
    w = correct.astype(z.dtype)
    n_correct = jnp.maximum(w.sum(), 1.0)
    z_true = jnp.sum(z * onehot, axis=-1)
    z_other = (jnp.sum(z, axis=-1) - z_true) / (k - 1)
    z_c = jnp.sum(w * z_true) / n_correct
    z_f = jnp.sum(w * z_other) / n_correct
    pooled = z_f + (z_c - z_f) * jnp.eye(k, dtype=z.dtype)
    if mode == "pooled":
        return pooled
    per_label = (onehot * w[:, None]).T  # (k, N)
    counts = per_label.sum(axis=-1, keepdims=True)
    means = jnp.matmul(per_label, z, precision=jax.lax.Precision.HIGHEST) / jnp.maximum(counts, 1.0)
    return jnp.where(counts > 0, means, pooled)


def apply_infusion(teacher_logits, labels, table) -> jax.Array:
    """Replaces each misclassified row by `table[label]`. (N, k), (N,), (k, k) -> (N, k)."""
    correct = teacher_correct(teacher_logits, labels)
    return jnp.where(correct[:, None], teacher_logits, table[labels]).astype(jnp.float32)


def knowledge_infusion(teacher_logits, labels, mode: str = "pooled") -> jax.Array:
    """DeBKD's knowledge infusion (docs/method.md §3): misclassified rows get the correct samples' mean
    logits.

    After it every sample is classified correctly. (N, k), (N,) -> (N, k).
    """
    table = infusion_table(teacher_logits, labels, mode)
    return apply_infusion(jnp.asarray(teacher_logits, jnp.float32), labels, table)


def debiased_regions(logits, temperature=4.0, num_regions: int = 12) -> tuple[jax.Array, jax.Array]:
    """Label de-biasing regions (docs/method.md §4): the width-1/n interval holding each soft-label entry.

    `q = softmax(Z / T)`, `idx = clip(floor(q * n), 0, n - 1)`, `lo = idx / n`, `hi = (idx + 1) / n`.
    (N, k) -> ((N, k), (N, k)).
    """
    check_logits_and_labels(logits, name="logits")
    _check_temperature(temperature)
    if _is_concrete(num_regions) and not (float(num_regions) >= 1 and float(num_regions) == int(num_regions)):
        raise ValueError(f"num_regions must be an integer >= 1, got {num_regions}.")
    n = jnp.asarray(num_regions, jnp.float32)
    q = jax.nn.softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)
    idx = jnp.clip(jnp.floor(q * n), 0.0, n - 1.0)
    return idx / n, (idx + 1.0) / n


@jax.jit
def label_interval(lo, hi, labels) -> tuple[jax.Array, jax.Array]:
    """The values the true class's target can take in the box `{t : lo <= t <= hi, sum t = 1}`:
    `[max(lo_y, 1 - sum_{j != y} hi_j), min(hi_y, 1 - sum_{j != y} lo_j)]`. Its width is the freedom the
    de-biased loss leaves the student's `p_y`; for k = 2 it is the true class's region itself (its mirror
    region is the other class's). (N, k), (N, k), (N,) -> ((N,), (N,)).
    """
    lo, hi = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)[:, None]
    lo_y = jnp.take_along_axis(lo, labels, axis=-1)[:, 0]
    hi_y = jnp.take_along_axis(hi, labels, axis=-1)[:, 0]
    others_lo = jnp.sum(lo, axis=-1) - lo_y
    others_hi = jnp.sum(hi, axis=-1) - hi_y
    return jnp.maximum(lo_y, 1.0 - others_hi), jnp.minimum(hi_y, 1.0 - others_lo)


def rectify_logits(teacher_logits, labels, mode: str = "swap") -> jax.Array:
    """BTKD's bias rectification of misclassified rows (docs/method.md §9.2); correct rows are unchanged.

    With `c = argmax z != y`: `swap` exchanges `z[y]` and `z[c]`; `released` (the code's calibrate3) sets
    `z_y' = (z_y + 1) / 2`, `z_c' = z_c / 2`, then scales both by `(z_y + z_c) / (z_y' + z_c')`.
    (N, k), (N,) -> (N, k).
    """
    _check_option(mode, RECTIFY_MODES, "mode")
    check_logits_and_labels(teacher_logits, labels)
    z = jnp.asarray(teacher_logits, jnp.float32)
    k = z.shape[-1]
    pred = jnp.argmax(z, axis=-1)
    wrong = (pred != labels)[:, None]
    at_y = jax.nn.one_hot(labels, k, dtype=bool)
    at_c = jax.nn.one_hot(pred, k, dtype=bool)
    z_y = jnp.take_along_axis(z, labels[:, None], axis=-1)
    z_c = jnp.take_along_axis(z, pred[:, None], axis=-1)
    if mode == "swap":
        new_y, new_c = z_c, z_y
    else:
        half_y, half_c = (z_y + 1.0) / 2.0, z_c / 2.0
        denom = half_y + half_c
        scale = jnp.where(denom == 0, 1.0, (z_y + z_c) / jnp.where(denom == 0, 1.0, denom))
        new_y, new_c = half_y * scale, half_c * scale
    rectified = jnp.where(at_y, new_y, jnp.where(at_c, new_c, z))
    return jnp.where(wrong, rectified, z)


@flax.struct.dataclass
class Targets:
    """Per-sample target arrays a student's train step consumes; take rows with `targets[idx]`.

    logits: (N, k) teacher logits after the method's transforms (soft labels are `softmax(logits / T)`).
    lo, hi: (N, k) de-biasing region bounds of `softmax(logits / T)`.
    correct: (N,) bool, whether the raw teacher logits classify the sample correctly.
    """

    logits: jax.Array
    lo: jax.Array
    hi: jax.Array
    correct: jax.Array

    def __getitem__(self, index) -> Targets:
        return jax.tree.map(lambda a: a[index], self)

    @property
    def num_classes(self) -> int:
        return self.logits.shape[-1]


def transform_logits(
    teacher_logits,
    labels,
    transforms: Sequence[str] = ("knowledge_infusion",),
    *,
    ki_mode: str = "pooled",
    rectify_mode: str = "swap",
    infusion=None,
) -> jax.Array:
    """Applies the named logit transforms in order. `infusion` is an optional precomputed (k, k) table for
    knowledge infusion (online targets take KI's class means from the precompute pass). (N, k) -> (N, k)."""
    z = jnp.asarray(teacher_logits, jnp.float32)
    for name in transforms:
        _check_option(name, TRANSFORMS, "transform")
        if name == "knowledge_infusion":
            table = infusion_table(z, labels, ki_mode) if infusion is None else infusion
            z = apply_infusion(z, labels, table)
        else:
            z = rectify_logits(z, labels, rectify_mode)
    return z


def build_targets(
    teacher_logits,
    labels,
    *,
    transforms: Sequence[str] = ("knowledge_infusion",),
    ki_mode: str = "pooled",
    rectify_mode: str = "swap",
    temperature=4.0,
    num_regions: int = 12,
    infusion=None,
) -> Targets:
    """Composes the transforms a method's config names into its `Targets` (docs/method.md §2).

    The logits pass through `transforms` in order ("knowledge_infusion", "rectify"); the regions are taken
    from the result; `correct` always comes from the raw teacher logits. (N, k), (N,) -> Targets of N rows.
    """
    for name in transforms:
        _check_option(name, TRANSFORMS, "transform")
    check_logits_and_labels(teacher_logits, labels)
    _check_option(ki_mode, INFUSION_MODES, "ki_mode")
    _check_option(rectify_mode, RECTIFY_MODES, "rectify_mode")
    labels = jnp.asarray(labels, jnp.int32)
    z = transform_logits(
        teacher_logits, labels, transforms, ki_mode=ki_mode, rectify_mode=rectify_mode, infusion=infusion
    )
    lo, hi = debiased_regions(z, temperature, num_regions)
    return Targets(logits=z, lo=lo, hi=hi, correct=teacher_correct(teacher_logits, labels))
