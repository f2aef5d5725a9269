"""Distillation losses: pure, jittable, vmappable and differentiable functions of arrays.

Shapes: student logits `s` (B, k), teacher logits `z` (B, k), integer labels `y` (B,), region bounds `lo`,
`hi` (B, k). Scalar losses are batch means; `KL(t || p) = sum_j t_j (log t_j - log p_j)` with `0 log 0 = 0`;
`CE(s, y) = -log softmax(s)[y]`. Hyperparameters are keyword-only; the string options are static under jit,
the numeric ones may be traced (a per-epoch schedule does not recompile). See docs/method.md §5-9.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from jax.scipy.special import logsumexp

from debkd_jax import targets as targets_lib

_EPS32 = float(jnp.finfo(jnp.float32).eps)


def _check_batch(student_logits, labels=None, **others) -> None:
    """Shape and dtype checks that name the argument; shapes are static, so they also run under jit."""
    shape = jnp.shape(student_logits)
    if len(shape) != 2:
        raise ValueError(f"student_logits must have shape (B, k), got {shape}.")
    if labels is not None:
        if jnp.shape(labels) != shape[:1]:
            raise ValueError(f"labels must have shape (B,) = ({shape[0]},), got {jnp.shape(labels)}.")
        if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
            raise ValueError(
                f"labels must be integers in [0, {shape[1]}), got dtype {jnp.result_type(labels)}."
            )
    for name, other in others.items():
        if jnp.shape(other) != shape:
            raise ValueError(f"{name} must have the shape of student_logits {shape}, got {jnp.shape(other)}.")


def cross_entropy(logits, labels) -> jax.Array:
    """`CE(s, y) = logsumexp(s) - s_y` per sample, in float32. (B, k), (B,) -> (B,).

    `optax.losses.softmax_cross_entropy_with_integer_labels`: the label's logit is gathered from the input,
    so no (B, k) log-softmax is materialized. The checks here name the argument.
    """
    if jnp.shape(labels) != jnp.shape(logits)[:-1]:
        raise ValueError(
            f"labels must have shape {jnp.shape(logits)[:-1]} to match logits {jnp.shape(logits)}, "
            f"got {jnp.shape(labels)}."
        )
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {jnp.result_type(labels)}.")
    s = jnp.asarray(logits, jnp.float32)
    return optax.losses.softmax_cross_entropy_with_integer_labels(s, jnp.asarray(labels))


def soft_kl(teacher_logits, student_logits, *, temperature=4.0) -> jax.Array:
    """`KL(q || p) = sum_j q_j (log q_j - log p_j)` per sample, `q = softmax(z / T)`, `p = softmax(s / T)`,
    without the T^2 factor (`optax.losses.kl_divergence_with_log_targets`). (B, k), (B, k) -> (B,)."""
    log_q = jax.nn.log_softmax(jnp.asarray(teacher_logits, jnp.float32) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32) / temperature, axis=-1)
    return optax.losses.kl_divergence_with_log_targets(log_p, log_q)


def _count(mask) -> jax.Array:
    """`sum(mask, -1)` as float32: XLA:CPU reduces floats with its fast library kernels, booleans and integers
    with a slow generic loop. Exact up to 2^24 entries per row."""
    return jnp.sum(jnp.where(mask, 1.0, 0.0), axis=-1)


def projection_shift(p, lo, hi, *, max_iter: int = 100) -> tuple[jax.Array, jax.Array]:
    """The `tau` of `box_projection` for k > 2: the root of the decreasing, piecewise-linear
    `f(tau) = sum_j clip(p_j - tau, lo_j, hi_j) - 1`, and the number of steps taken (0 when every row starts
    in its box). (..., k) x3 -> ((...), scalar).

    Newton steps from `tau = 0` safeguarded by bisection. A Newton step lands exactly on the root once it
    starts on the root's linear piece, and "same piece" is exact to detect: the counts (#at lo, #at hi) are
    monotone in tau, so two points with equal counts lie on one piece. A point already in the box costs one
    evaluation, a typical one two. The first step is straight-line code; the loop runs only if some row needs
    more (on training data, rarely).
    """

    def evaluate(tau):
        x = p - tau[..., None]
        excess = jnp.sum(jnp.clip(x, lo, hi), axis=-1) - 1.0
        # The slope on the side the root lies: entries sitting on a bound become free when tau moves off it.
        moving_up = (excess < 0)[..., None]
        free = _count(jnp.where(moving_up, (x >= lo) & (x < hi), (x > lo) & (x <= hi)))
        return excess, free, (_count(x <= lo), _count(x >= hi))

    def step(state):
        tau, left, right, excess, free, piece, done, iteration = state
        left = jnp.where(excess > 0, tau, left)
        right = jnp.where(excess < 0, tau, right)
        newton = tau + excess / jnp.maximum(free, 1.0)
        use_newton = (free > 0) & (newton > left) & (newton < right)
        new_tau = jnp.where(done, tau, jnp.where(use_newton, newton, 0.5 * (left + right)))
        new_excess, new_free, new_piece = evaluate(new_tau)
        same_piece = (new_piece[0] == piece[0]) & (new_piece[1] == piece[1])
        new_done = (
            done
            | (use_newton & same_piece)
            | (jnp.abs(new_excess) <= _EPS32)
            | (right - left <= 4 * _EPS32 * (1.0 + jnp.abs(new_tau)))
        )
        return new_tau, left, right, new_excess, new_free, new_piece, new_done, iteration + 1

    tau = jnp.zeros(p.shape[:-1], p.dtype)
    left = jnp.min(p - hi, axis=-1)  # f(left) = sum(hi) - 1 >= 0
    right = jnp.max(p - lo, axis=-1)  # f(right) = sum(lo) - 1 <= 0
    excess, free, piece = evaluate(tau)
    done = jnp.abs(excess) <= _EPS32
    state = step((tau, left, right, excess, free, piece, done, jnp.int32(0)))
    state = jax.lax.while_loop(lambda s: (s[-1] < max_iter) & ~jnp.all(s[-2]), step, state)
    # The first step always runs; it did nothing when every row was done before it.
    return state[0], state[-1] - jnp.all(done).astype(jnp.int32)


def box_projection(p, lo, hi, *, max_iter: int = 100) -> jax.Array:
    """Euclidean projection of `p` onto the box-simplex `{t : lo <= t <= hi, sum_j t_j = 1}`.

    For k = 2 a clip of `t_0` into `[max(lo_0, 1 - hi_1), min(hi_0, 1 - lo_1)]`. For k > 2,
    `t_j = clip(p_j - tau, lo_j, hi_j)` with `tau` the root of `sum_j clip(p_j - tau, lo_j, hi_j) = 1`
    (exact Newton steps, see `projection_shift`). Not differentiated (the loss stops its gradient).
    (..., k) x3 -> (..., k). Requires `sum lo <= 1 <= sum hi` per row, which `debiased_regions` guarantees.
    """
    p, lo, hi = (jax.lax.stop_gradient(jnp.asarray(a, jnp.float32)) for a in (p, lo, hi))
    if not p.shape == lo.shape == hi.shape or p.ndim < 1:
        raise ValueError(f"p, lo and hi must have one shape (..., k), got {p.shape}, {lo.shape}, {hi.shape}.")
    if p.shape[-1] == 2:
        lower = jnp.maximum(lo[..., 0], 1.0 - hi[..., 1])
        upper = jnp.minimum(hi[..., 0], 1.0 - lo[..., 1])
        t0 = jnp.clip(p[..., 0], lower, upper)
        return jnp.stack([t0, 1.0 - t0], axis=-1)
    tau, _ = projection_shift(p, lo, hi, max_iter=max_iter)
    return jnp.clip(p - tau[..., None], lo, hi)


def debiased_kl(student_logits, lo, hi, *, temperature=4.0) -> jax.Array:
    """DeBKD's de-biased term per sample, without T^2: `KL(t || p)`, `p = softmax(s / T)`,
    `t = stop_gradient(box_projection(p, lo, hi))`. Exactly 0, with zero gradient, when `lo <= p <= hi`.

    Its gradient w.r.t. `s` is `(p - t) / T`: it pulls `p` to the nearest point of the region.
    (B, k) x3 -> (B,).
    """
    _check_batch(student_logits, lo=lo, hi=hi)
    log_p = jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32) / temperature, axis=-1)
    p = jax.lax.stop_gradient(jnp.exp(log_p))
    inside = jnp.all((p >= lo) & (p <= hi), axis=-1)
    t = jnp.where(inside[..., None], p, box_projection(p, lo, hi))
    # `sum_j t_j (log t_j - log p_j)` with `0 log 0 = 0`; t has no gradient, so log 0 is never differentiated.
    kl = optax.losses.kl_divergence(log_p, t)
    # Rounding can leave a hair below 0 just outside the region: clamp the value, keep the gradient
    # (p - t) / T.
    kl = kl + jax.lax.stop_gradient(jnp.maximum(kl, 0.0) - kl)
    return jnp.where(inside, 0.0, kl)


def debkd_loss(
    student_logits, labels, lo, hi, *, beta=0.2, temperature=4.0, scale_by_t2: bool = True
) -> jax.Array:
    """DeBKD loss (paper eq. 6 with docs/method.md §5.1's surrogate for eq. 5):
    `mean_i [beta * T^2 * KL(t_i || p_i) + CE(s_i, y_i)]`. (B, k), (B,), (B, k), (B, k) -> scalar.
    """
    _check_batch(student_logits, labels, lo=lo, hi=hi)
    scale = temperature**2 if scale_by_t2 else 1.0
    per_sample = beta * scale * debiased_kl(student_logits, lo, hi, temperature=temperature)
    return jnp.mean(per_sample + cross_entropy(student_logits, labels))


def region_hit_rate(student_logits, labels, lo, hi, *, temperature=4.0) -> jax.Array:
    """Share of samples whose `p_y = softmax(s / T)[y]` lies in `[lo_y, hi_y)` (paper eq. 5 as a metric).

    The top region is closed (`p_y = 1` counts when `hi_y = 1`), matching the region index
    `clip(floor(p * n), 0, n - 1)`. (B, k), (B,), (B, k), (B, k) -> scalar in [0, 1].
    """
    _check_batch(student_logits, labels, lo=lo, hi=hi)
    return jnp.mean(region_hits(student_logits, labels, lo, hi, temperature=temperature))


@jax.jit
def region_hits(student_logits, labels, lo, hi, *, temperature=4.0) -> jax.Array:
    """Per-sample indicator behind `region_hit_rate`. -> bool (B,)."""
    p = jax.nn.softmax(jnp.asarray(student_logits, jnp.float32) / temperature, axis=-1)
    pick = lambda a: jnp.take_along_axis(jnp.asarray(a), jnp.asarray(labels)[..., None], axis=-1)[..., 0]
    p_y, lo_y, hi_y = pick(p), pick(lo), pick(hi)
    return (p_y >= lo_y) & ((p_y < hi_y) | (hi_y >= 1.0))


def kd_loss(student_logits, teacher_logits, labels, *, alpha=0.9, temperature=4.0) -> jax.Array:
    """Hinton et al. (2015): `mean_i [alpha * T^2 * KL(softmax(z/T) || softmax(s/T)) + (1 - alpha) * CE]`.
    (B, k), (B, k), (B,) -> scalar.
    """
    _check_batch(student_logits, labels, teacher_logits=teacher_logits)
    kl = soft_kl(teacher_logits, student_logits, temperature=temperature)
    return jnp.mean(alpha * temperature**2 * kl + (1.0 - alpha) * cross_entropy(student_logits, labels))


def hint_loss(student_features: Sequence[jax.Array], teacher_features: Sequence[jax.Array]) -> jax.Array:
    """FitNets hints: `sum_l mean((s_l - t_l)^2)` over paired feature maps of equal shapes (the student's
    taps already passed through their regressors). Teacher features get no gradient. -> scalar.
    """
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(
            f"hint_loss needs the same non-zero number of student and teacher features, got "
            f"{len(student_features)} and {len(teacher_features)}."
        )
    total = jnp.float32(0.0)
    for layer, (s, t) in enumerate(zip(student_features, teacher_features, strict=True)):
        if s.shape != t.shape:
            raise ValueError(
                f"hint_loss layer {layer}: student feature {s.shape} != teacher feature {t.shape}; "
                "map the student tap with a HintRegressor first."
            )
        diff = s.astype(jnp.float32) - jax.lax.stop_gradient(t).astype(jnp.float32)
        total = total + jnp.mean(diff**2)
    return total


def dkd_loss(
    student_logits, teacher_logits, labels, *, alpha=1.0, beta=8.0, temperature=4.0, warmup=1.0
) -> jax.Array:
    """Decoupled KD (Zhao et al. 2022): `mean CE + warmup * (alpha * TCKD + beta * NCKD)`.

    TCKD: `T^2 KL([q_y, 1 - q_y] || [p_y, 1 - p_y])`; NCKD: `T^2 KL` between the teacher's and student's
    distributions over the non-target classes, each renormalized. `warmup` (e.g. `min(epoch / 20, 1)`) may be
    traced. (B, k), (B, k), (B,) -> scalar.
    """
    _check_batch(student_logits, labels, teacher_logits=teacher_logits)
    k = student_logits.shape[-1]
    gt = jax.nn.one_hot(labels, k, dtype=bool)
    not_gt = (~gt).astype(jnp.float32)

    def binary_and_nontarget(logits):
        x = jnp.asarray(logits, jnp.float32) / temperature
        log_all = logsumexp(x, axis=-1, keepdims=True)
        log_rest = logsumexp(x, axis=-1, b=not_gt, keepdims=True)
        log_y = jnp.sum(jnp.where(gt, x, 0.0), axis=-1, keepdims=True)
        log_binary = jnp.concatenate([log_y - log_all, log_rest - log_all], axis=-1)
        log_nontarget = jnp.where(gt, 0.0, x - log_rest)
        return log_binary, log_nontarget

    s_bin, s_nt = binary_and_nontarget(student_logits)
    t_bin, t_nt = binary_and_nontarget(teacher_logits)
    tckd = optax.losses.kl_divergence_with_log_targets(s_bin, t_bin)
    nckd = optax.losses.kl_divergence_with_log_targets(s_nt, t_nt, where=~gt)
    distill = temperature**2 * (alpha * tckd + beta * nckd)
    return jnp.mean(cross_entropy(student_logits, labels) + warmup * distill)


def btkd_loss(
    student_logits,
    teacher_logits,
    labels,
    *,
    easy_weight=1.0,
    lam=0.5,
    temperature=4.0,
    rectify: str | None = "swap",
    teacher_correct=None,
) -> jax.Array:
    """BTKD (docs/method.md §9): `lam * CE + (1 - lam) * (b * L_easy + (1 - b) * L_hard)`, `b = easy_weight`.

    `L_easy`: mean over teacher-correct samples of `T^2 KL(softmax(z/T) || p)`; `L_hard`: mean over the wrong
    ones against rectified logits (`rectify_logits(z, y, rectify)`, or `z` as given when `rectify is None`,
    i.e. the caller rectified already and passes the raw-logit `teacher_correct` mask). An empty subset
    contributes 0.
    (B, k), (B, k), (B,) -> scalar.
    """
    _check_batch(student_logits, labels, teacher_logits=teacher_logits)
    correct = (
        targets_lib.teacher_correct(teacher_logits, labels)
        if teacher_correct is None
        else jnp.asarray(teacher_correct, bool)
    )
    if rectify is not None and rectify not in targets_lib.RECTIFY_MODES:
        raise ValueError(f"rectify={rectify!r} is not one of {targets_lib.RECTIFY_MODES} or None.")
    hard_logits = (
        teacher_logits if rectify is None else targets_lib.rectify_logits(teacher_logits, labels, rectify)
    )
    t2 = temperature**2
    kl_easy = t2 * soft_kl(teacher_logits, student_logits, temperature=temperature)
    kl_hard = t2 * soft_kl(hard_logits, student_logits, temperature=temperature)
    n_correct = jnp.sum(correct)
    n_wrong = correct.shape[0] - n_correct
    easy = jnp.sum(jnp.where(correct, kl_easy, 0.0)) / jnp.maximum(n_correct, 1)
    hard = jnp.sum(jnp.where(correct, 0.0, kl_hard)) / jnp.maximum(n_wrong, 1)
    distill = easy_weight * easy + (1.0 - easy_weight) * hard
    return lam * jnp.mean(cross_entropy(student_logits, labels)) + (1.0 - lam) * distill


def dynamic_weight(epoch, num_epochs):
    """BTKD's dynamic weight `b(e) = cos^2(pi/2 * e / E)`: 1 at the first epoch, 0 at `E` (easy first).

    Computed as optax's cosine decay over the progress `e / E`: `cos^2(x / 2) = (1 + cos x) / 2`, held at 0
    past `E`. Both arguments may be traced.
    """
    progress = jnp.asarray(epoch, jnp.float32) / num_epochs
    return optax.cosine_decay_schedule(1.0, decay_steps=1)(progress)
