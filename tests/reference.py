"""Float64 NumPy references for ``debkd_jax.targets`` and ``debkd_jax.losses``.

Written from docs/method.md §2-9 alone, independently of the JAX code: clarity first, loop-free where
natural. Every function takes array-likes, computes in float64 and returns float64 (or bool / int) NumPy
arrays.

Conventions (docs/method.md §1): ``k`` classes; teacher logits ``Z`` (N, k); integer labels ``y`` (N,);
student logits ``s`` (B, k); ``softmax(x / T)`` over the last axis;
``KL(t || p) = sum_j t_j (log t_j - log p_j)`` with ``0 log 0 = 0``; ``CE(s, y) = -log softmax(s)[y]`` at
temperature 1.

The box projection (docs/method.md §5.2) is computed two ways, both independent of the JAX code's iterative
solve: for k = 2 by the closed-form clip, and for any k by sorting the 2k breakpoints of the piecewise-linear,
non-increasing ``f(tau) = sum_j clip(p_j - tau, lo_j, hi_j)`` and interpolating exactly on the segment where
``f`` crosses 1.
"""

from __future__ import annotations

import numpy as np


def _f64(x):
    return np.asarray(x, dtype=np.float64)


def _labels(y):
    return np.asarray(y).astype(np.int64)


def _take(a, idx):
    """a[i, idx[i]] for each row i."""
    return np.take_along_axis(a, np.asarray(idx)[:, None], axis=-1)[:, 0]


def _onehot(y, k):
    return np.arange(k)[None, :] == _labels(y)[:, None]


def log_softmax(x):
    x = _f64(x)
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(x):
    return np.exp(log_softmax(x))


def kl(t, log_p):
    """KL(t || p) per row from t and log p, with 0 log 0 = 0."""
    t, log_p = _f64(t), _f64(log_p)
    pos = t > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(pos, t * (np.log(np.where(pos, t, 1.0)) - log_p), 0.0)
    return terms.sum(axis=-1)


def cross_entropy(s, y):
    """Per-sample CE(s, y) = -log softmax(s)[y]."""
    return -_take(log_softmax(s), _labels(y))


# ----------------------------------------------------------------------------------------------------------
# Section 1: teacher targets
# ----------------------------------------------------------------------------------------------------------


def teacher_correct(Z, y):
    """correct_i = (argmax_j Z_ij == y_i) on the raw logits (first index wins ties, as np.argmax)."""
    return np.argmax(_f64(Z), axis=-1) == _labels(y)


def infusion_table(Z, y, mode="pooled"):
    """(k, k): row c is the logit vector that a misclassified sample of label c receives (method.md §3)."""
    Z, y = _f64(Z), _labels(y)
    k = Z.shape[-1]
    correct = teacher_correct(Z, y)
    if not correct.any():
        raise ValueError("no teacher-correct sample")
    Zc, yc = Z[correct], y[correct]
    onehot = _onehot(yc, k)
    zC = Zc[onehot].mean()  # mean_i Z[i, y_i]
    zF = (np.where(onehot, 0.0, Zc).sum(-1) / (k - 1)).mean()  # mean_i mean_{j != y_i} Z[i, j]
    pooled = np.where(np.eye(k, dtype=bool), zC, zF)
    if mode == "pooled":
        return pooled
    if mode == "per_class":
        counts = onehot.sum(0)  # correct samples per class
        sums = onehot.T.astype(np.float64) @ Zc  # (k, k): row c = sum of correct samples' logits of label c
        mu = sums / np.maximum(counts, 1)[:, None]
        return np.where(counts[:, None] > 0, mu, pooled)
    raise ValueError(f"unknown mode {mode!r}")


def knowledge_infusion(Z, y, mode="pooled"):
    """Correct rows unchanged; misclassified rows of label c replaced by ``infusion_table(...)[c]``."""
    Z, y = _f64(Z), _labels(y)
    table = infusion_table(Z, y, mode)
    return np.where(teacher_correct(Z, y)[:, None], Z, table[y])


def debiased_regions(logits, temperature=4.0, num_regions=12):
    """q = softmax(logits / T); idx = clip(floor(q n), 0, n - 1); lo = idx / n; hi = (idx + 1) / n."""
    n = int(num_regions)
    q = softmax(_f64(logits) / temperature)
    idx = np.clip(np.floor(q * n), 0, n - 1)
    return idx / n, (idx + 1) / n


def rectify_logits(Z, y, mode="swap"):
    """Rectify the wrong rows (c = argmax z != y); correct rows unchanged (method.md §9.2)."""
    Z, y = _f64(Z), _labels(y)
    rows = np.arange(Z.shape[0])
    c = np.argmax(Z, axis=-1)
    wrong = c != y
    zy, zc = Z[rows, y], Z[rows, c]
    if mode == "swap":
        new_y, new_c = zc, zy
    elif mode == "released":
        total = zy + zc
        zy2, zc2 = (zy + 1.0) / 2.0, zc / 2.0
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = total / (zy2 + zc2)
        new_y, new_c = zy2 * scale, zc2 * scale
    else:
        raise ValueError(f"unknown mode {mode!r}")
    out = Z.copy()
    # Write c first, then y: for the wrong rows c != y, so the order does not matter there.
    out[rows[wrong], c[wrong]] = new_c[wrong]
    out[rows[wrong], y[wrong]] = new_y[wrong]
    return out


def build_targets(
    Z,
    y,
    transforms=("knowledge_infusion",),
    ki_mode="pooled",
    rectify_mode="swap",
    temperature=4.0,
    num_regions=12,
):
    """Transforms in order, regions from the transformed logits, ``correct`` from the raw logits."""
    logits = _f64(Z)
    for name in transforms:
        if name == "knowledge_infusion":
            logits = knowledge_infusion(logits, y, ki_mode)
        elif name == "rectify":
            logits = rectify_logits(logits, y, rectify_mode)
        else:
            raise ValueError(f"unknown transform {name!r}")
    lo, hi = debiased_regions(logits, temperature, num_regions)
    return dict(logits=logits, lo=lo, hi=hi, correct=teacher_correct(Z, y))


# ----------------------------------------------------------------------------------------------------------
# Section 1.3: box projection, de-biased KL, DeBKD
# ----------------------------------------------------------------------------------------------------------


def box_projection_binary(p, lo, hi):
    """k = 2 closed form. The Euclidean projection onto the line t_0 + t_1 = 1 is
    t_0 = (p_0 - p_1 + 1) / 2 (= p_0 when p sums to 1); the box then clips t_0 into
    [max(lo_0, 1 - hi_1), min(hi_0, 1 - lo_1)] (method.md §5.2) and t_1 = 1 - t_0."""
    p, lo, hi = _f64(p), _f64(lo), _f64(hi)
    assert p.shape[-1] == 2
    t0 = (p[:, 0] - p[:, 1] + 1.0) / 2.0
    a = np.maximum(lo[:, 0], 1.0 - hi[:, 1])
    b = np.minimum(hi[:, 0], 1.0 - lo[:, 1])
    t0 = np.clip(t0, a, b)
    return np.stack([t0, 1.0 - t0], axis=-1)


def box_projection_sort(p, lo, hi):
    """Any k: exact root of f(tau) = sum_j clip(p_j - tau, lo_j, hi_j) = 1 by sorting breakpoints.

    f is continuous, non-increasing and linear between consecutive breakpoints of {p_j - hi_j, p_j - lo_j};
    f(-inf) = sum hi >= 1 >= sum lo = f(+inf). Take the last sorted breakpoint b_m with f(b_m) >= 1 and
    interpolate linearly to b_{m+1}; t = clip(p - tau, lo, hi) is then the projection (KKT conditions of
    min ||t - p||^2 subject to the box and sum t = 1).
    """
    p, lo, hi = _f64(p), _f64(lo), _f64(hi)
    kk = 2 * p.shape[-1]
    bps = np.sort(np.concatenate([p - hi, p - lo], axis=-1), axis=-1)  # (B, 2k)
    f = np.clip(p[:, None, :] - bps[:, :, None], lo[:, None, :], hi[:, None, :]).sum(-1)  # (B, 2k)
    m = np.maximum((f >= 1.0).sum(-1) - 1, 0)  # f is non-increasing along the sorted breakpoints
    m1 = np.minimum(m + 1, kk - 1)
    f_m, f_m1, b_m, b_m1 = _take(f, m), _take(f, m1), _take(bps, m), _take(bps, m1)
    denom = f_m - f_m1
    frac = np.where(denom > 0, (f_m - 1.0) / np.where(denom > 0, denom, 1.0), 0.0)
    tau = b_m + frac * (b_m1 - b_m)
    return np.clip(p - tau[:, None], lo, hi)


def box_projection(p, lo, hi):
    """The projection of method.md §5.2: the closed-form clip for k = 2, the breakpoint sort for k > 2."""
    if np.shape(p)[-1] == 2:
        return box_projection_binary(p, lo, hi)
    return box_projection_sort(p, lo, hi)


def debiased_kl(s, lo, hi, temperature=4.0):
    """Per-sample KL(t || p), t = proj(p), p = softmax(s / T); no T^2."""
    log_p = log_softmax(_f64(s) / temperature)
    t = box_projection(np.exp(log_p), lo, hi)
    return kl(t, log_p)


def debkd_loss(s, y, lo, hi, beta=0.2, temperature=4.0, scale_by_t2=True):
    """mean(beta * T^2 * KL(t || p) + CE(s, y)) (paper eq. 6 with method.md §5.1's surrogate)."""
    scale = temperature**2 if scale_by_t2 else 1.0
    return np.mean(beta * scale * debiased_kl(s, lo, hi, temperature) + cross_entropy(s, y))


def region_hit(s, y, lo, hi, temperature=4.0, margin=0.0):
    """Per-sample indicator lo_y <= p_y < hi_y, where p_y == 1 counts when hi_y == 1.

    Since p_y <= 1, "p_y < hi_y or (p_y == 1 and hi_y == 1)" is "p_y < hi_y or hi_y >= 1".
    ``margin`` > 0 shrinks the interval by margin on each finite side (hits robust to rounding); < 0 grows it.
    """
    y = _labels(y)
    p_y = _take(softmax(_f64(s) / temperature), y)
    lo_y, hi_y = _take(_f64(lo), y), _take(_f64(hi), y)
    return (p_y >= lo_y + margin) & ((hi_y >= 1.0) | (p_y < hi_y - margin))


def region_hit_rate(s, y, lo, hi, temperature=4.0, margin=0.0):
    return np.mean(region_hit(s, y, lo, hi, temperature, margin))


# ----------------------------------------------------------------------------------------------------------
# Section 2: baselines
# ----------------------------------------------------------------------------------------------------------


def kd_loss(s, zt, y, alpha=0.9, temperature=4.0):
    """mean(alpha T^2 KL(softmax(zt/T) || softmax(s/T)) + (1 - alpha) CE(s, y)) (Hinton et al. 2015)."""
    T = temperature
    soft = T**2 * kl(softmax(_f64(zt) / T), log_softmax(_f64(s) / T))
    return np.mean(alpha * soft + (1.0 - alpha) * cross_entropy(s, y))


def _binary_and_nontarget(logits, y, T):
    """log [p_y, 1 - p_y] (B, 2) and log of the non-target classes renormalized (B, k), -inf at y."""
    lsm = log_softmax(_f64(logits) / T)
    gt = _onehot(y, lsm.shape[-1])
    log_gt = _take(lsm, _labels(y))
    masked = np.where(gt, -np.inf, lsm)
    mx = masked.max(-1, keepdims=True)
    log_rest = (mx + np.log(np.exp(masked - mx).sum(-1, keepdims=True)))[:, 0]  # log(1 - p_y)
    return np.stack([log_gt, log_rest], -1), masked - log_rest[:, None]


def dkd_parts(s, zt, y, temperature=4.0):
    """Per-sample (TCKD, NCKD), each times T^2 (mdistiller's formula, with exact exclusion of the target).

    TCKD = KL([pt_y, 1 - pt_y] || [ps_y, 1 - ps_y]); NCKD = KL of the non-target classes renormalized.
    """
    T = temperature
    bt, nt = _binary_and_nontarget(zt, y, T)
    bs, ns = _binary_and_nontarget(s, y, T)
    tckd = kl(np.exp(bt), bs)
    if np.shape(s)[-1] == 2:
        nckd = np.zeros_like(tckd)  # one non-target class: its renormalized distribution is [1] for both
    else:
        nckd = kl(np.exp(nt), np.where(np.isfinite(ns), ns, 0.0))
    return T**2 * tckd, T**2 * nckd


def dkd_loss(s, zt, y, alpha=1.0, beta=8.0, temperature=4.0, warmup=1.0):
    """mean(CE) + warmup * (alpha * TCKD + beta * NCKD), TCKD and NCKD batch means (Zhao et al. 2022)."""
    tckd, nckd = dkd_parts(s, zt, y, temperature)
    return np.mean(cross_entropy(s, y)) + warmup * (alpha * np.mean(tckd) + beta * np.mean(nckd))


def hint_loss(student_features, teacher_features):
    """sum over layers l of mean((s_l - t_l)^2)."""
    if len(student_features) != len(teacher_features):
        raise ValueError("layer counts differ")
    total = 0.0
    for a, b in zip(student_features, teacher_features, strict=True):
        a, b = _f64(a), _f64(b)
        if a.shape != b.shape:
            raise ValueError("shapes differ")
        total += np.mean((a - b) ** 2)
    return total


# ----------------------------------------------------------------------------------------------------------
# Section 3: BTKD
# ----------------------------------------------------------------------------------------------------------


def dynamic_weight(epoch, num_epochs):
    return np.cos(np.pi / 2 * epoch / num_epochs) ** 2


def btkd_loss(s, zt, y, easy_weight=1.0, lam=0.5, temperature=4.0, rectify="swap", teacher_correct_=None):
    """lam mean(CE) + (1 - lam)(w L_easy + (1 - w) L_hard), subset means, an empty subset giving 0."""
    T = temperature
    zt = _f64(zt)
    correct = teacher_correct(zt, y) if teacher_correct_ is None else np.asarray(teacher_correct_, bool)
    z_hard = zt if rectify is None else rectify_logits(zt, y, rectify)
    log_p = log_softmax(_f64(s) / T)
    kl_easy = T**2 * kl(softmax(zt / T), log_p)
    kl_hard = T**2 * kl(softmax(z_hard / T), log_p)
    l_easy = kl_easy[correct].mean() if correct.any() else 0.0
    l_hard = kl_hard[~correct].mean() if (~correct).any() else 0.0
    return lam * np.mean(cross_entropy(s, y)) + (1.0 - lam) * (
        easy_weight * l_easy + (1.0 - easy_weight) * l_hard
    )


# ----------------------------------------------------------------------------------------------------------
# Test data and comparison helpers shared by test_targets.py and test_losses.py
# ----------------------------------------------------------------------------------------------------------

F32_EPS = float(np.finfo(np.float32).eps)


def assert_close(actual, expected, *, scale=1.0, rtol=1e-5, atol=1e-6, err_msg=""):
    """float32 result vs float64 reference: ``rtol`` relative plus ``atol * max(1, scale)`` absolute.

    ``scale`` is the largest |logit / T| involved: a float32 log-softmax is exact only to about one ulp of
    that     magnitude, so a loss near 0 computed from logits of size 160 carries an absolute error of ~1e-5.
    """
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64),
        np.asarray(expected, dtype=np.float64),
        rtol=rtol,
        atol=atol * max(1.0, float(scale)),
        err_msg=err_msg,
    )


def random_logits(rng, shape, scale):
    """Gaussian logits of the given scale, clipped to +-80, with a few rows pinned to the extremes."""
    z = np.clip(rng.normal(size=shape) * scale, -80.0, 80.0)
    if shape[0] >= 4:
        z[0] = 80.0 * np.where(np.arange(shape[-1]) == 0, 1.0, -1.0)  # saturated one-hot-like row
        z[1] = 0.0  # all-equal row
    return z.astype(np.float32)


def teacher_data(rng, n, k, scale=3.0, wrong_frac=0.3):
    """Teacher logits (n, k) float32 and int32 labels with about ``wrong_frac`` misclassified rows, no ties.

    At least one row is correct and, for n >= 2, at least one is wrong.
    """
    y = rng.integers(0, k, size=n)
    z = rng.normal(size=(n, k)) * scale
    wrong = rng.random(n) < wrong_frac
    if n >= 2:
        wrong[0], wrong[1] = False, True
    else:
        wrong[:] = False
    rows = np.arange(n)
    others = np.where(_onehot(y, k), -np.inf, z).max(-1)
    gap = rng.uniform(0.1, 2.0, size=n) * scale
    z[rows, y] = np.where(wrong, others - gap, others + gap)
    return np.clip(z, -80.0, 80.0).astype(np.float32), y.astype(np.int32)
