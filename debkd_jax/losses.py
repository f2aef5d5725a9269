"""Distillation losses: pure, jittable, vmappable and differentiable functions of arrays.

Shapes: student logits `s` (B, k), teacher logits `z` (B, k), integer labels `y` (B,), region bounds `lo`, `hi`
(B, k). Scalar losses are batch means; `KL(t || p) = sum_j t_j (log t_j - log p_j)` with `0 log 0 = 0`;
`CE(s, y) = -log softmax(s)[y]`. Hyperparameters are keyword-only; the string options are static under jit,
the numeric ones may be traced (a per-epoch schedule does not recompile). See SPEC sections 1.3, 2 and 3.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp, xlogy

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
            raise ValueError(f"labels must be integers in [0, {shape[1]}), got dtype {jnp.result_type(labels)}.")
    for name, other in others.items():
        if jnp.shape(other) != shape:
            raise ValueError(f"{name} must have the shape of student_logits {shape}, got {jnp.shape(other)}.")


def cross_entropy(logits, labels) -> jax.Array:
    """`CE(s, y) = logsumexp(s) - s_y` per sample. (B, k), (B,) -> (B,).

    Written as optax writes it: the label's logit is gathered from the input, so no (B, k) log-softmax is
    materialized.
    """
    if jnp.shape(labels) != jnp.shape(logits)[:-1]:
        raise ValueError(f"labels must have shape {jnp.shape(logits)[:-1]} to match logits {jnp.shape(logits)}, "
                         f"got {jnp.shape(labels)}.")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {jnp.result_type(labels)}.")
    s = jnp.asarray(logits, jnp.float32)
    return logsumexp(s, axis=-1) - jnp.take_along_axis(s, jnp.asarray(labels)[..., None], axis=-1)[..., 0]


def soft_kl(teacher_logits, student_logits, *, temperature=4.0) -> jax.Array:
    """`KL(softmax(z / T) || softmax(s / T))` per sample, without the T^2 factor. (B, k), (B, k) -> (B,)."""
    log_q = jax.nn.log_softmax(jnp.asarray(teacher_logits, jnp.float32) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)


def _count(mask) -> jax.Array:
    """`sum(mask, -1)` as float32: XLA:CPU reduces floats with its fast library kernels, booleans and integers
    with a slow generic loop. Exact up to 2^24 entries per row."""
    return jnp.sum(jnp.where(mask, 1.0, 0.0), axis=-1)


def _projection_shift(p, lo, hi, *, max_iter: int = 100) -> tuple[jax.Array, jax.Array]:
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
    (exact Newton steps, see `_projection_shift`). Not differentiated (the loss stops its gradient).
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
    tau, _ = _projection_shift(p, lo, hi, max_iter=max_iter)
    return jnp.clip(p - tau[..., None], lo, hi)


def _debiased_parts(student_logits, lo, hi, temperature):
    """Shared forward of the de-biased term: `(kl, p, t, outside, z, e)` with `z = s / T - max(s / T)`,
    `e = exp(z)`, `p = e / sum(e)` and `kl` already clamped at 0 (rounding can leave a hair below 0 just
    outside the region); `outside` marks the rows that get the gradient `(p - t) / T`."""
    s = jnp.asarray(student_logits, jnp.float32)
    lo, hi = (jax.lax.stop_gradient(jnp.asarray(a, jnp.float32)) for a in (lo, hi))
    x = s / temperature
    z = x - jnp.max(x, axis=-1, keepdims=True)
    e = jnp.exp(z)
    norm = jnp.sum(e, axis=-1, keepdims=True)
    p = e / norm
    log_p = z - jnp.log(norm)
    outside = jnp.max(jnp.maximum(lo - p, p - hi), axis=-1) > 0
    t = box_projection(p, lo, hi)
    t = jnp.where(outside[..., None], t, p)
    kl = jnp.sum(jnp.where(t > 0, t * (jnp.log(t) - log_p), 0.0), axis=-1)
    kl = jnp.where(outside, jnp.maximum(kl, 0.0), 0.0)
    return kl, p, t, outside, z, e


def debiased_kl(student_logits, lo, hi, *, temperature=4.0) -> jax.Array:
    """DeBKD's de-biased term per sample, without T^2: `KL(t || p)`, `p = softmax(s / T)`,
    `t = stop_gradient(box_projection(p, lo, hi))`. Exactly 0, with zero gradient, when `lo <= p <= hi`.

    Its gradient w.r.t. `s` is `(p - t) / T`: it pulls `p` to the nearest point of the region.
    (B, k) x3 -> (B,).
    """
    _check_batch(student_logits, lo=lo, hi=hi)
    s, lo, hi = (jnp.asarray(a, jnp.float32) for a in (student_logits, lo, hi))
    if s.shape[-1] == 2:
        return _debiased_kl_autodiff(s, lo, hi, temperature)
    return _debiased_kl(s, lo, hi, jnp.asarray(temperature, jnp.float32))


def _debiased_kl_autodiff(s, lo, hi, temperature):
    """`debiased_kl` through autodiff, with fewer and smaller kernels: faster than the custom VJP for k = 2,
    where every (B, 2) pass costs little more than its launch."""
    log_p = jax.nn.log_softmax(s / temperature, axis=-1)
    p = jax.lax.stop_gradient(jnp.exp(log_p))
    inside = jnp.all((p >= lo) & (p <= hi), axis=-1)
    t = jnp.where(inside[..., None], p, box_projection(p, lo, hi))
    kl = jnp.sum(xlogy(t, t) - t * log_p, axis=-1)
    # Rounding can leave a hair below 0 just outside the region: clamp the value, keep the gradient.
    kl = kl + jax.lax.stop_gradient(jnp.maximum(kl, 0.0) - kl)
    return jnp.where(inside, 0.0, kl)


@jax.custom_vjp
def _debiased_kl(s, lo, hi, temperature):
    return _debiased_parts(s, lo, hi, temperature)[0]


def _debiased_kl_cotangents(g, s, p, t, outside, temperature):
    """The de-biased term's cotangents for per-sample cotangents `g` (B,), t held fixed (it is stopped):
    `d KL / d s = (p - t) / T` and `d KL / d T = sum_j (t_j - p_j) s_j / T^2`, both 0 inside the region.
    -> ((B, k), scalar)."""
    g = jnp.where(outside, g, 0.0)
    d_s = g[..., None] * (p - t) / temperature
    d_temperature = jnp.sum(g * jnp.sum((t - p) * s, axis=-1)) / temperature**2
    return d_s, d_temperature


def _debiased_kl_fwd(s, lo, hi, temperature):
    kl, p, t, outside, _, _ = _debiased_parts(s, lo, hi, temperature)
    return kl, (s, p, t, outside, temperature)


def _debiased_kl_bwd(residuals, g):
    s, p, t, outside, temperature = residuals
    d_s, d_temperature = _debiased_kl_cotangents(g, s, p, t, outside, temperature)
    no_bounds_gradient = jnp.zeros_like(p)  # lo and hi have p's shape and dtype; the projection is stopped
    return d_s, no_bounds_gradient, no_bounds_gradient, d_temperature


_debiased_kl.defvjp(_debiased_kl_fwd, _debiased_kl_bwd)


def _static_integer(value) -> int | None:
    """`value` as an int when it is a Python number equal to a small positive integer, else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
        if 1 <= value <= 16:
            return int(value)
    return None


def debkd_loss(
    student_logits, labels, lo, hi, *, beta=0.2, temperature=4.0, scale_by_t2: bool = True
) -> jax.Array:
    """DeBKD loss (paper eq. 6 with SPEC 1.3's surrogate for eq. 5):
    `mean_i [beta * T^2 * KL(t_i || p_i) + CE(s_i, y_i)]`. (B, k), (B,), (B, k), (B, k) -> scalar.

    For k > 2, one fused forward and a written-out gradient,
    `(beta * T^2 * (p - t) / T + softmax(s) - onehot(y)) / B`: the de-biased term and the cross entropy share
    one `exp` pass (for an integer `T`, `exp(s - max s)` is `exp(s / T - max s / T) ** T`). For k = 2, plain
    autodiff (fewer kernels, faster there).
    """
    _check_batch(student_logits, labels, lo=lo, hi=hi)
    s, lo, hi = (jnp.asarray(a, jnp.float32) for a in (student_logits, lo, hi))
    if s.shape[-1] == 2:  # tiny rows: autodiff's fewer kernels beat the fused form
        return debkd_loss_autodiff(
            s, labels, lo, hi, beta=beta, temperature=temperature, scale_by_t2=scale_by_t2
        )
    power = _static_integer(temperature)
    return _debkd_loss(
        s, jnp.asarray(labels), lo, hi, jnp.asarray(beta, jnp.float32), jnp.asarray(temperature, jnp.float32),
        power, bool(scale_by_t2),
    )


def debkd_loss_autodiff(
    student_logits, labels, lo, hi, *, beta=0.2, temperature=4.0, scale_by_t2: bool = True
) -> jax.Array:
    """`debkd_loss` written plainly and differentiated by autodiff: what `debkd_loss` runs for k = 2, and the
    reference its fused form (k > 2) is tested and benchmarked against. Same arguments, same value."""
    s, lo, hi = (jnp.asarray(a, jnp.float32) for a in (student_logits, lo, hi))
    scale = temperature**2 if scale_by_t2 else 1.0
    per_sample = beta * scale * _debiased_kl_autodiff(s, lo, hi, temperature)
    return jnp.mean(per_sample + cross_entropy(s, labels))


def _debkd_forward(s, labels, lo, hi, beta, temperature, power, scale_by_t2):
    kl, p, t, outside, z, e = _debiased_parts(s, lo, hi, temperature)
    if power is not None:  # the cross entropy from the same exponentials: exp(s - max s) = exp(z) ** T
        e_ce, z_ce = e**power, z * temperature
    else:
        z_ce = s - jnp.max(s, axis=-1, keepdims=True)
        e_ce = jnp.exp(z_ce)
    norm_ce = jnp.sum(e_ce, axis=-1, keepdims=True)
    ce = jnp.log(norm_ce[..., 0]) - jnp.take_along_axis(z_ce, labels[..., None], axis=-1)[..., 0]
    weight = beta * temperature**2 if scale_by_t2 else beta
    loss = jnp.mean(weight * kl + ce)
    return loss, (s, p, t, outside, kl, e_ce / norm_ce, labels, beta, temperature)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _debkd_loss(s, labels, lo, hi, beta, temperature, power, scale_by_t2):
    return _debkd_forward(s, labels, lo, hi, beta, temperature, power, scale_by_t2)[0]


def _debkd_loss_bwd(power, scale_by_t2, residuals, g):
    s, p, t, outside, kl, softmax_ce, labels, beta, temperature = residuals
    batch, k = s.shape
    scale = g / batch
    weight = beta * temperature**2 if scale_by_t2 else beta
    per_sample = jnp.full(kl.shape, weight * scale)
    d_s_kl, d_t_kl = _debiased_kl_cotangents(per_sample, s, p, t, outside, temperature)
    onehot = jnp.arange(k) == labels[..., None]
    d_s = d_s_kl + scale * (softmax_ce - jnp.where(onehot, 1.0, 0.0))
    d_beta = scale * jnp.sum(kl) * (temperature**2 if scale_by_t2 else 1.0)
    d_weight_d_t = 2.0 * beta * temperature if scale_by_t2 else 0.0  # the T^2 factor
    d_temperature = d_t_kl + scale * d_weight_d_t * jnp.sum(kl)
    labels_cotangent = np.zeros(labels.shape, jax.dtypes.float0)
    no_bounds_gradient = jnp.zeros_like(p)
    return d_s, labels_cotangent, no_bounds_gradient, no_bounds_gradient, d_beta, d_temperature


_debkd_loss.defvjp(_debkd_forward, _debkd_loss_bwd)


def region_hit_rate(student_logits, labels, lo, hi, *, temperature=4.0) -> jax.Array:
    """Share of samples whose `p_y = softmax(s / T)[y]` lies in `[lo_y, hi_y)` (paper eq. 5 as a metric).

    The top region is closed (`p_y = 1` counts when `hi_y = 1`), matching the region index
    `clip(floor(p * n), 0, n - 1)`. (B, k), (B,), (B, k), (B, k) -> scalar in [0, 1].
    """
    _check_batch(student_logits, labels, lo=lo, hi=hi)
    return jnp.mean(region_hits(student_logits, labels, lo, hi, temperature=temperature))


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
    for layer, (s, t) in enumerate(zip(student_features, teacher_features)):
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
    tckd = jnp.sum(jnp.exp(t_bin) * (t_bin - s_bin), axis=-1)
    nckd = jnp.sum(jnp.where(gt, 0.0, jnp.exp(t_nt) * (t_nt - s_nt)), axis=-1)
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
    """BTKD (SPEC 3): `lam * CE + (1 - lam) * (b * L_easy + (1 - b) * L_hard)` with `b = easy_weight`.

    `L_easy`: mean over teacher-correct samples of `T^2 KL(softmax(z/T) || p)`; `L_hard`: mean over the wrong ones
    against rectified logits (`rectify_logits(z, y, rectify)`, or `z` as given when `rectify is None`, i.e. the
    caller rectified already and passes the raw-logit `teacher_correct` mask). An empty subset contributes 0.
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
    """BTKD's dynamic weight `b(e) = cos^2(pi/2 * e / E)`: 1 at the first epoch, 0 at `E` (easy first)."""
    return jnp.cos(jnp.pi / 2 * jnp.asarray(epoch, jnp.float32) / num_epochs) ** 2
