"""Tests of ``debkd_jax.losses`` (docs/method.md §5-9) against the float64 references in
``reference.py``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.scipy.special import xlogy
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from debkd_jax import losses, targets

try:
    from . import reference as R
except ImportError:  # tests/ is not a package: pytest puts tests/ on sys.path
    import reference as R

# One jitted function per loss (and per static option). The numeric hyperparameters are passed as float32
# arrays, so a sweep over temperature, num_regions, alpha, beta, ... reuses one compile per shape.
_f32 = np.float32
_ce = jax.jit(losses.cross_entropy)
_proj = jax.jit(losses.box_projection)
_dkl_jit = jax.jit(lambda s, lo, hi, T: losses.debiased_kl(s, lo, hi, temperature=T))
_debkd_jit = jax.jit(
    lambda s, y, lo, hi, beta, T, scale_by_t2: losses.debkd_loss(
        s, y, lo, hi, beta=beta, temperature=T, scale_by_t2=scale_by_t2
    ),
    static_argnames="scale_by_t2",
)
_hit_jit = jax.jit(lambda s, y, lo, hi, T: losses.region_hit_rate(s, y, lo, hi, temperature=T))
_kd_jit = jax.jit(lambda s, z, y, alpha, T: losses.kd_loss(s, z, y, alpha=alpha, temperature=T))
_dkd_jit = jax.jit(
    lambda s, z, y, alpha, beta, T, warmup: losses.dkd_loss(
        s, z, y, alpha=alpha, beta=beta, temperature=T, warmup=warmup
    )
)
_btkd_jit = jax.jit(
    lambda s, z, y, easy_weight, lam, T, rectify, correct: losses.btkd_loss(
        s, z, y, easy_weight=easy_weight, lam=lam, temperature=T, rectify=rectify, teacher_correct=correct
    ),
    static_argnames="rectify",
)
_hint = jax.jit(losses.hint_loss)
_dw = jax.jit(losses.dynamic_weight)
_grad_dkl = jax.jit(jax.grad(lambda s, lo, hi, T: jnp.sum(losses.debiased_kl(s, lo, hi, temperature=T))))
_grad_debkd = jax.jit(
    jax.grad(lambda s, y, lo, hi, beta, T: losses.debkd_loss(s, y, lo, hi, beta=beta, temperature=T))
)
_grad_ce = jax.jit(jax.grad(lambda s, y: jnp.mean(losses.cross_entropy(s, y))))
_grad_btkd = jax.jit(jax.grad(_btkd_jit), static_argnames="rectify")


def _dkl(s, lo, hi, temperature=4.0):
    return _dkl_jit(s, lo, hi, _f32(temperature))


def _debkd(s, y, lo, hi, beta=0.2, temperature=4.0, scale_by_t2=True):
    return _debkd_jit(s, y, lo, hi, _f32(beta), _f32(temperature), scale_by_t2=scale_by_t2)


def _hit(s, y, lo, hi, temperature=4.0):
    return _hit_jit(s, y, lo, hi, _f32(temperature))


def _kd(s, z, y, alpha=0.9, temperature=4.0):
    return _kd_jit(s, z, y, _f32(alpha), _f32(temperature))


def _dkd(s, z, y, alpha=1.0, beta=8.0, temperature=4.0, warmup=1.0):
    return _dkd_jit(s, z, y, _f32(alpha), _f32(beta), _f32(temperature), _f32(warmup))


def _btkd(s, z, y, easy_weight=1.0, lam=0.5, temperature=4.0, rectify="swap", teacher_correct=None):
    """teacher_correct=None is passed through as None (the loss computes the split itself)."""
    correct = None if teacher_correct is None else np.asarray(teacher_correct, bool)
    return _btkd_jit(
        s, z, y, _f32(easy_weight), _f32(lam), _f32(temperature), rectify=rectify, correct=correct
    )


# (B, k): k in {2, 3, 10, 100}, batch 1 to 1024.
SHAPES = [(1, 2), (1024, 2), (33, 3), (256, 10), (64, 100)]
TEMPERATURES = [0.5, 1.0, 4.0, 10.0]
NUM_REGIONS = [1, 2, 12, 1000]
LOGIT_SCALES = [1.0, 10.0, 80.0]


def _scale(*logits, T):
    """Largest |logit / T|: sets the absolute float32 tolerance (see reference.assert_close)."""
    return max(float(np.max(np.abs(z))) for z in logits) / T


def _regions32(z, T, n):
    """Regions of the float64 reference as float32 arrays, the dtype the losses receive from Targets."""
    lo, hi = R.debiased_regions(z, T, n)
    return lo.astype(np.float32), hi.astype(np.float32)


def _sweep(rng, B, k):
    """(student logits, teacher logits, labels) for each logit scale."""
    for scale in LOGIT_SCALES:
        yield (
            scale,
            R.random_logits(rng, (B, k), scale),
            R.random_logits(rng, (B, k), scale / 2),
            rng.integers(0, k, B).astype(np.int32),
        )


# ----------------------------------------------------------------------------------------------------------
# Reference self-checks (the references must be right before they judge anything)
# ----------------------------------------------------------------------------------------------------------


def test_reference_box_projection_is_the_euclidean_projection():
    rng = np.random.default_rng(0)
    for k in (2, 3, 10, 100):
        s, z = rng.normal(size=(2, 200, k)) * 3
        for n in NUM_REGIONS:
            lo, hi = R.debiased_regions(z, 4.0, n)
            p = R.softmax(s / 4.0)
            t = R.box_projection_sort(p, lo, hi)
            assert np.all(t >= lo - 1e-12) and np.all(t <= hi + 1e-12)
            np.testing.assert_allclose(t.sum(-1), 1.0, atol=1e-12)
            # Variational inequality: <p - t, x - t> <= 0 for every feasible x (x = the teacher's q).
            assert np.all(np.sum((p - t) * (R.softmax(z / 4.0) - t), -1) <= 1e-12)
            if k == 2:
                np.testing.assert_allclose(t, R.box_projection_binary(p, lo, hi), atol=1e-12)


def test_reference_dkd_decomposition():
    """DKD's identity KL(q_t || p_s) = TCKD + (1 - q_t[y]) NCKD holds for the reference's two parts."""
    rng = np.random.default_rng(1)
    s, z = rng.normal(size=(2, 50, 10)) * 3
    y = rng.integers(0, 10, 50)
    tckd, nckd = R.dkd_parts(s, z, y, 4.0)
    q = R.softmax(z / 4.0)
    full = 16.0 * R.kl(q, R.log_softmax(s / 4.0))
    np.testing.assert_allclose(full, tckd + (1 - q[np.arange(50), y]) * nckd, rtol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Equivalence with the float64 references
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,k", SHAPES)
def test_cross_entropy_matches_reference(B, k):
    for scale, s, _, y in _sweep(np.random.default_rng(B + k), B, k):
        out = _ce(s, y)
        assert out.shape == (B,)
        R.assert_close(out, R.cross_entropy(s, y), scale=_scale(s, T=1.0), err_msg=f"scale={scale}")


@pytest.mark.parametrize("B,k", SHAPES)
def test_box_projection_matches_sort_reference(B, k):
    rng = np.random.default_rng(10 * B + k)
    for scale, s, z, _ in _sweep(rng, B, k):
        for T in TEMPERATURES:
            p = np.asarray(jax.nn.softmax(jnp.asarray(s) / T))
            for n in NUM_REGIONS:
                lo, hi = _regions32(z, T, n)
                err = f"scale={scale} T={T} n={n}"
                t = np.asarray(_proj(p, lo, hi))
                assert t.shape == (B, k)
                np.testing.assert_allclose(t, R.box_projection(p, lo, hi), rtol=1e-5, atol=2e-6, err_msg=err)
                # In the box, on the simplex.
                assert np.all(t >= lo - 1e-6) and np.all(t <= hi + 1e-6), err
                np.testing.assert_allclose(t.sum(-1), 1.0, atol=1e-5, err_msg=err)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.sampled_from([3, 10]),
    n=st.sampled_from([1, 2, 3, 12, 1000]),
    T=st.sampled_from(TEMPERATURES),
    spread=st.floats(0.0, 20.0),
)
def test_box_projection_properties(seed, k, n, T, spread):
    """Euclidean projection: feasible, idempotent, the identity inside, <p - t, x - t> <= 0 for feasible x."""
    rng = np.random.default_rng(seed)
    s = (rng.normal(size=(16, k)) * spread).astype(np.float32)
    z = (rng.normal(size=(16, k)) * spread).astype(np.float32)
    p = np.asarray(jax.nn.softmax(jnp.asarray(s) / T))
    lo, hi = _regions32(z, T, n)
    t = np.asarray(_proj(p, lo, hi))
    assert np.all(t >= lo - 1e-6) and np.all(t <= hi + 1e-6)
    np.testing.assert_allclose(t.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(_proj(t, lo, hi)), t, atol=2e-6)
    np.testing.assert_allclose(t, R.box_projection_sort(p, lo, hi), atol=2e-6)
    x = R.softmax(z.astype(np.float64) / T)  # the teacher's q: feasible
    assert np.all(np.sum((p - t) * (x - t), -1) <= 1e-5)
    inside = np.all((p >= lo) & (p <= hi), -1)
    np.testing.assert_allclose(t[inside], p[inside], rtol=0, atol=1e-7)


def test_box_projection_of_an_unnormalized_point():
    """The docstring's Euclidean projection of any p (not only softmax outputs), k > 2."""
    rng = np.random.default_rng(2)
    p = rng.uniform(-0.5, 1.5, size=(33, 3)).astype(np.float32)
    lo, hi = _regions32(rng.normal(size=(33, 3)) * 2, 1.0, 3)
    np.testing.assert_allclose(np.asarray(_proj(p, lo, hi)), R.box_projection_sort(p, lo, hi), atol=2e-6)


@pytest.mark.parametrize("B,k", SHAPES)
def test_debiased_kl_and_debkd_loss_match_reference(B, k):
    rng = np.random.default_rng(20 * B + k)
    for scale, s, z, y in _sweep(rng, B, k):
        for T in TEMPERATURES:
            sc = _scale(s, T=T)
            for n in NUM_REGIONS:
                lo, hi = _regions32(z, T, n)
                err = f"scale={scale} T={T} n={n}"
                out = np.asarray(_dkl(s, lo, hi, temperature=T))
                assert out.shape == (B,)
                ref = R.debiased_kl(s, lo, hi, T)
                R.assert_close(out, ref, scale=sc, err_msg=err)
                assert np.all(out >= 0), err
                R.assert_close(
                    _debkd(s, y, lo, hi, beta=0.2, temperature=T),
                    R.debkd_loss(s, y, lo, hi, 0.2, T),
                    scale=sc * T**2,
                    err_msg=err,
                )


@pytest.mark.parametrize("B,k", SHAPES)
def test_region_hit_rate_matches_reference(B, k):
    rng = np.random.default_rng(30 * B + k)
    for scale, s, z, y in _sweep(rng, B, k):
        for T in TEMPERATURES:
            for n in NUM_REGIONS:
                lo, hi = _regions32(z, T, n)
                out = float(_hit(s, y, lo, hi, temperature=T))
                # Between the hits robust to a 1e-6 perturbation of p_y and those within 1e-6 of the region.
                low = R.region_hit_rate(s, y, lo, hi, T, margin=1e-6)
                high = R.region_hit_rate(s, y, lo, hi, T, margin=-1e-6)
                assert low - 1e-6 <= out <= high + 1e-6, (
                    f"scale={scale} T={T} n={n}: {out} not in [{low}, {high}]"
                )
            # Regions of the student's own soft labels: every sample hits (agrees with the region index).
            lo, hi = (np.asarray(a) for a in targets.debiased_regions(s, temperature=T, num_regions=12))
            assert float(_hit(s, y, lo, hi, temperature=T)) == 1.0


def test_region_hit_rate_exact_boundaries():
    """lo_y <= p_y < hi_y: p_y == lo_y counts, p_y == hi_y < 1 does not, p_y == 1 counts when hi_y == 1."""
    s = np.zeros((2, 4), np.float32)  # p = 0.25 exactly
    y = np.array([0, 3], np.int32)
    lo = np.full((2, 4), 0.25, np.float32)
    hi = np.full((2, 4), 0.5, np.float32)
    assert float(_hit(s, y, lo, hi, temperature=1.0)) == 1.0
    assert float(_hit(s, y, lo - 0.25, hi - 0.25, temperature=1.0)) == 0.0  # [0, 0.25): excluded
    assert float(_hit(s, y, lo, np.where(np.arange(2)[:, None] == 0, hi, 0.25), temperature=1.0)) == 0.5
    # Saturated p_y == 1 (and the other class p == 0) in the last / first region.
    s = np.array([[80.0, -80.0], [80.0, -80.0]], np.float32)
    y = np.array([0, 1], np.int32)
    lo = np.array([[11 / 12, 0.0], [11 / 12, 0.0]], np.float32)
    hi = np.array([[1.0, 1 / 12], [1.0, 1 / 12]], np.float32)
    assert float(_hit(s, y, lo, hi, temperature=0.5)) == 1.0
    assert float(_hit(s, y, lo, hi, temperature=4.0)) == 1.0


@pytest.mark.parametrize("B,k", SHAPES)
def test_kd_loss_matches_reference(B, k):
    rng = np.random.default_rng(40 * B + k)
    for scale, s, z, y in _sweep(rng, B, k):
        for T in TEMPERATURES:
            for alpha in (0.0, 0.9, 1.0):
                R.assert_close(
                    _kd(s, z, y, alpha=alpha, temperature=T),
                    R.kd_loss(s, z, y, alpha, T),
                    scale=_scale(s, z, T=T) * T**2,
                    err_msg=f"scale={scale} T={T} alpha={alpha}",
                )


@pytest.mark.parametrize("B,k", SHAPES)
def test_dkd_loss_matches_reference(B, k):
    rng = np.random.default_rng(50 * B + k)
    for scale, s, z, y in _sweep(rng, B, k):
        for T in TEMPERATURES:
            for alpha, beta, warmup in ((1.0, 8.0, 1.0), (0.5, 2.0, 0.25), (0.0, 0.0, 1.0), (1.0, 8.0, 0.0)):
                R.assert_close(
                    _dkd(s, z, y, alpha=alpha, beta=beta, temperature=T, warmup=warmup),
                    R.dkd_loss(s, z, y, alpha, beta, T, warmup),
                    scale=_scale(s, z, T=T) * T**2 * 8,
                    err_msg=f"scale={scale} T={T} alpha={alpha} beta={beta} warmup={warmup}",
                )


def test_default_hyperparameters():
    """Called without keywords: DeBKD beta = 0.2, T = 4; KD alpha = 0.9; DKD alpha = 1, beta = 8, warmup 1;
    BTKD easy_weight = 1, lam = 0.5, rectify = swap; all at T = 4."""
    rng = np.random.default_rng(3)
    s, z = R.random_logits(rng, (33, 3), 3.0), R.random_logits(rng, (33, 3), 3.0)
    y = rng.integers(0, 3, 33).astype(np.int32)
    lo, hi = _regions32(z, 4.0, 12)
    out = jax.jit(
        lambda s, z, y, lo, hi: dict(
            debkd=losses.debkd_loss(s, y, lo, hi),
            dkl=losses.debiased_kl(s, lo, hi),
            hit=losses.region_hit_rate(s, y, lo, hi),
            kd=losses.kd_loss(s, z, y),
            dkd=losses.dkd_loss(s, z, y),
            btkd=losses.btkd_loss(s, z, y),
        )
    )(s, z, y, lo, hi)
    R.assert_close(out["debkd"], R.debkd_loss(s, y, lo, hi, 0.2, 4.0, True))
    R.assert_close(out["dkl"], R.debiased_kl(s, lo, hi, 4.0))
    hit = float(out["hit"])
    assert (
        R.region_hit_rate(s, y, lo, hi, 4.0, margin=1e-6) - 1e-6
        <= hit
        <= R.region_hit_rate(s, y, lo, hi, 4.0, margin=-1e-6) + 1e-6
    )
    R.assert_close(out["kd"], R.kd_loss(s, z, y, 0.9, 4.0))
    R.assert_close(out["dkd"], R.dkd_loss(s, z, y, 1.0, 8.0, 4.0, 1.0))
    R.assert_close(out["btkd"], R.btkd_loss(s, z, y, 1.0, 0.5, 4.0, "swap"))
    # scale_by_t2=False drops the T^2.
    for T in TEMPERATURES:
        R.assert_close(
            _debkd(s, y, lo, hi, beta=1.5, temperature=T, scale_by_t2=False),
            R.debkd_loss(s, y, lo, hi, 1.5, T, scale_by_t2=False),
            scale=_scale(s, T=T),
        )


@pytest.mark.parametrize("shapes", [[(8, 4, 4, 16)], [(8, 8, 8, 16), (8, 4, 4, 32), (8, 64)], [(1, 3)]])
def test_hint_loss_matches_reference(shapes):
    rng = np.random.default_rng(len(shapes))
    fs = [rng.normal(size=sh).astype(np.float32) for sh in shapes]
    ft = [rng.normal(size=sh).astype(np.float32) * 2 for sh in shapes]
    R.assert_close(_hint(fs, ft), R.hint_loss(fs, ft))
    R.assert_close(_hint(tuple(fs), tuple(ft)), R.hint_loss(fs, ft))
    assert float(_hint(fs, fs)) == 0.0


@pytest.mark.parametrize("B,k", SHAPES[1:])
def test_btkd_loss_matches_reference(B, k):
    rng = np.random.default_rng(60 * B + k)
    s = R.random_logits(rng, (B, k), 5.0)
    z, y = R.teacher_data(rng, B, k, scale=3.0, wrong_frac=0.4)
    for rectify in ("swap", "released"):
        for T in (0.5, 4.0):
            for easy_weight, lam in ((1.0, 0.5), (0.3, 0.5), (0.0, 0.2), (0.7, 1.0), (0.7, 0.0)):
                kw = dict(easy_weight=easy_weight, lam=lam, temperature=T)
                sc = _scale(s, z, R.rectify_logits(z, y, rectify), T=T) * T**2
                R.assert_close(
                    _btkd(s, z, y, rectify=rectify, **kw),
                    R.btkd_loss(s, z, y, rectify=rectify, **kw),
                    scale=sc,
                    err_msg=f"rectify={rectify} {kw}",
                )


def test_btkd_teacher_correct_and_prerectified_logits():
    B, k = 256, 10
    rng = np.random.default_rng(61)
    s = R.random_logits(rng, (B, k), 5.0)
    z, y = R.teacher_data(rng, B, k, scale=3.0, wrong_frac=0.4)
    correct = R.teacher_correct(z, y)
    sc = _scale(s, z, T=4.0) * 16
    # Passing the argmax split explicitly changes nothing.
    R.assert_close(
        _btkd(s, z, y, rectify="swap", easy_weight=0.4, teacher_correct=correct),
        R.btkd_loss(s, z, y, 0.4, 0.5, 4.0, "swap"),
        scale=sc,
    )
    # teacher_correct overrides the argmax split.
    flipped = correct.copy()
    flipped[:3] = ~flipped[:3]
    R.assert_close(
        _btkd(s, z, y, rectify="swap", easy_weight=0.4, teacher_correct=flipped),
        R.btkd_loss(s, z, y, 0.4, 0.5, 4.0, "swap", flipped),
        scale=sc,
    )
    # rectify=None: the teacher logits are taken as already rectified (correct rows are left unchanged by
    # rectification, so this equals rectifying inside the loss).
    for mode in ("swap", "released"):
        zr = R.rectify_logits(z, y, mode).astype(np.float32)
        out = _btkd(s, zr, y, rectify=None, easy_weight=0.4, teacher_correct=correct)
        R.assert_close(out, _btkd(s, z, y, rectify=mode, easy_weight=0.4), rtol=1e-6)
        R.assert_close(
            out, R.btkd_loss(s, zr, y, 0.4, 0.5, 4.0, None, correct), scale=_scale(s, zr, T=4.0) * 16
        )


@pytest.mark.parametrize("which", ["all_correct", "all_wrong"])
@pytest.mark.parametrize("rectify", ["swap", "released"])
def test_btkd_loss_with_an_empty_subset_is_finite(which, rectify):
    rng = np.random.default_rng(5)
    s = R.random_logits(rng, (256, 10), 5.0)
    z, y = R.teacher_data(rng, 258, 10, wrong_frac=0.0 if which == "all_correct" else 1.0)
    z, y = z[2:], y[2:]  # teacher_data pins row 0 correct and row 1 wrong
    correct = R.teacher_correct(z, y)
    assert correct.all() if which == "all_correct" else not correct.any()
    for easy_weight in (0.0, 0.5, 1.0):
        out = _btkd(s, z, y, easy_weight=easy_weight, rectify=rectify)
        assert np.isfinite(float(out))
        R.assert_close(
            out, R.btkd_loss(s, z, y, easy_weight, 0.5, 4.0, rectify), scale=_scale(s, z, T=4.0) * 16
        )
    g = _grad_btkd(s, z, y, _f32(0.5), _f32(0.5), _f32(4.0), rectify=rectify, correct=None)
    assert np.all(np.isfinite(np.asarray(g)))
    # The empty subset contributes 0: with easy_weight selecting it, only lam * CE remains.
    empty_weight = 0.0 if which == "all_correct" else 1.0
    R.assert_close(
        _btkd(s, z, y, easy_weight=empty_weight, rectify=rectify),
        0.5 * R.cross_entropy(s, y).mean(),
        scale=_scale(s, T=1.0),
    )


def test_dynamic_weight():
    E = 50
    v = np.array([float(_dw(e, E)) for e in range(E + 1)])
    np.testing.assert_allclose(v, R.dynamic_weight(np.arange(E + 1), E), rtol=1e-6, atol=1e-7)
    assert v[0] == pytest.approx(1.0, abs=1e-7) and v[-1] == pytest.approx(0.0, abs=1e-7)
    assert np.all(np.diff(v) < 0)  # strictly decreasing: easy first, hard later
    assert float(losses.dynamic_weight(0, 240)) == pytest.approx(1.0)
    assert float(losses.dynamic_weight(240, 240)) == pytest.approx(0.0, abs=1e-7)
    assert float(losses.dynamic_weight(120, 240)) == pytest.approx(0.5, abs=1e-6)
    assert float(_dw(jnp.int32(10), jnp.int32(40))) == pytest.approx(np.cos(np.pi / 8) ** 2, rel=1e-6)


def test_dynamic_weight_is_optax_cosine_decay():
    """`cos^2(pi/2 * e / E) = (1 + cos(pi * e / E)) / 2`: the spec's form is optax's cosine decay over E."""
    for E in (1, 3, 15, 50, 240):
        e = np.arange(E + 1, dtype=np.float32)
        spec_form = np.cos(np.pi / 2 * e.astype(np.float64) / E) ** 2
        np.testing.assert_allclose(np.asarray(optax.cosine_decay_schedule(1.0, E)(e)), spec_form, atol=2e-7)
        np.testing.assert_allclose(np.asarray(_dw(e, E)), spec_form, atol=2e-7)


# ----------------------------------------------------------------------------------------------------------
# The properties of docs/method.md §5.3
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.sampled_from([2, 3, 10]),
    n=st.sampled_from(NUM_REGIONS),
    T=st.sampled_from(TEMPERATURES),
    scale=st.floats(0.0, 80.0),
)
def test_debiased_kl_is_nonnegative(seed, k, n, T, scale):
    rng = np.random.default_rng(seed)
    s = R.random_logits(rng, (16, k), scale)
    lo, hi = _regions32(R.random_logits(rng, (16, k), scale), T, n)
    out = np.asarray(_dkl(s, lo, hi, temperature=T))
    assert np.all(np.isfinite(out)) and np.all(out >= 0)


# Gradient tests compile the projection's while loop under grad, the costliest compile here: three shapes.
GRAD_SHAPES = [(1024, 2), (33, 3), (64, 100)]


@pytest.mark.parametrize("B,k", GRAD_SHAPES)
def test_debiased_term_is_exactly_zero_with_zero_gradient_inside_the_region(B, k):
    rng = np.random.default_rng(k)
    s = R.random_logits(rng, (B, k), 4.0)
    y = rng.integers(0, k, B).astype(np.int32)
    for T in (0.5, 4.0):
        p = R.softmax(s.astype(np.float64) / T)
        margin_lo, margin_hi = np.clip(p - 0.02, 0, 1), np.clip(p + 0.02, 0, 1)  # p well inside
        lo, hi = R.debiased_regions(s, T, 12)  # the student's own regions, as after convergence
        # Inside by a margin where a bound is interior (float32 p cannot leave [0, 1]).
        inside = np.all(((p >= lo + 1e-6) | (lo == 0)) & ((p <= hi - 1e-6) | (hi == 1)), -1)
        assert inside.mean() > 0.5
        boxes = {
            "margin": (margin_lo, margin_hi),
            "own regions": (
                np.where(inside[:, None], lo, margin_lo),
                np.where(inside[:, None], hi, margin_hi),
            ),
        }
        for name, (box_lo, box_hi) in boxes.items():
            lo, hi = box_lo.astype(np.float32), box_hi.astype(np.float32)
            err = f"{name} T={T}"
            np.testing.assert_array_equal(np.asarray(_dkl(s, lo, hi, temperature=T)), 0.0, err_msg=err)
            np.testing.assert_array_equal(np.asarray(_grad_dkl(s, lo, hi, _f32(T))), 0.0, err_msg=err)
            # So debkd's gradient is CE's, and its value the mean CE.
            np.testing.assert_allclose(
                np.asarray(_grad_debkd(s, y, lo, hi, _f32(0.2), _f32(T))),
                np.asarray(_grad_ce(s, y)),
                rtol=1e-6,
                atol=1e-9,
                err_msg=err,
            )
            R.assert_close(_debkd(s, y, lo, hi, temperature=T), R.cross_entropy(s, y).mean(), scale=80)


@pytest.mark.parametrize("B,k", SHAPES[1:4])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_debiased_term_tends_to_hinton_kd_as_regions_shrink(B, k, T):
    """n = 10^6: T^2 KL(proj(p) || p) -> T^2 KL(q || p), DeBKD contains KD as its limit."""
    rng = np.random.default_rng(k)
    s, z = R.random_logits(rng, (B, k), 3.0), R.random_logits(rng, (B, k), 3.0)
    y = rng.integers(0, k, B).astype(np.int32)
    lo, hi = jax.jit(targets.debiased_regions)(z, _f32(T), 10**6)
    deb = T**2 * np.asarray(_dkl(s, lo, hi, temperature=T), np.float64)
    hinton = T**2 * R.kl(R.softmax(z.astype(np.float64) / T), R.log_softmax(s.astype(np.float64) / T))
    np.testing.assert_allclose(deb, hinton, rtol=1e-3, atol=1e-5)
    # And the losses: debkd with beta = alpha / (1 - alpha) is KD scaled by 1 / (1 - alpha).
    R.assert_close(_debkd(s, y, lo, hi, beta=9.0, temperature=T), 10 * R.kd_loss(s, z, y, 0.9, T), rtol=1e-3)


def test_beta_zero_and_alpha_zero_reduce_to_cross_entropy():
    rng = np.random.default_rng(6)
    s, z = R.random_logits(rng, (256, 10), 10.0), R.random_logits(rng, (256, 10), 10.0)
    y = rng.integers(0, 10, 256).astype(np.int32)
    lo, hi = _regions32(z, 4.0, 12)
    ce = R.cross_entropy(s, y).mean()
    R.assert_close(_debkd(s, y, lo, hi, beta=0.0, temperature=4.0), ce, rtol=1e-6)
    R.assert_close(_kd(s, z, y, alpha=0.0, temperature=4.0), ce, rtol=1e-6)
    R.assert_close(_dkd(s, z, y, alpha=0.0, beta=0.0, temperature=4.0), ce, rtol=1e-6)
    R.assert_close(_dkd(s, z, y, temperature=4.0, warmup=0.0), ce, rtol=1e-6)
    R.assert_close(_btkd(s, z, y, lam=1.0, rectify="swap"), ce, rtol=1e-6)
    # k = 2: no non-target structure, NCKD = 0.
    s2, z2 = R.random_logits(rng, (1024, 2), 10.0), R.random_logits(rng, (1024, 2), 10.0)
    y2 = rng.integers(0, 2, 1024).astype(np.int32)
    R.assert_close(
        _dkd(s2, z2, y2, alpha=0.0, beta=8.0, temperature=4.0), R.cross_entropy(s2, y2).mean(), rtol=1e-6
    )


def test_kd_at_high_temperature_is_logit_matching():
    """Hinton et al. 2015, section 2.1: for T >> |logits|, T^2 KL -> (1 / 2k) sum_j (d_j - mean d)^2,
    d = z_t - s.

    (The float64 reference is within 6e-5 of the limit at T = 100 and 3e-4 at T = 30 on this data.)
    """
    rng = np.random.default_rng(7)
    s, z = rng.normal(size=(2, 32, 10)).astype(np.float32)
    y = rng.integers(0, 10, 32).astype(np.int32)
    d = z.astype(np.float64) - s
    limit = np.mean(np.sum((d - d.mean(-1, keepdims=True)) ** 2, -1) / (2 * 10))
    for T in (30.0, 100.0):
        np.testing.assert_allclose(float(_kd(s, z, y, alpha=1.0, temperature=T)), limit, rtol=2e-3)
        np.testing.assert_allclose(
            float(_btkd(s, z, y, lam=0.0, temperature=T, rectify=None, teacher_correct=np.ones(32, bool))),
            limit,
            rtol=2e-3,
        )


@pytest.mark.parametrize("B,k", SHAPES)
def test_box_projection_is_the_identity_inside(B, k):
    rng = np.random.default_rng(8)
    p = np.asarray(jax.nn.softmax(jnp.asarray(rng.normal(size=(B, k)), jnp.float32)))
    lo, hi = np.clip(p - 0.01, 0, 1), np.clip(p + 0.01, 0, 1)
    # Up to float32 rounding (for k = 2, t_1 = 1 - t_0 is not bit-equal to p_1 when p_0 + p_1 != 1 exactly).
    np.testing.assert_allclose(np.asarray(_proj(p, lo, hi)), p, rtol=0, atol=2.5e-7)


@jax.jit
def _all_values_and_grads(s, z, y, lo, hi, T):
    """Every loss's value and gradient w.r.t. the student's logits, plus the projection and the metric."""
    fs = {
        "ce": lambda x: jnp.mean(losses.cross_entropy(x, y)),
        "debkd": lambda x: losses.debkd_loss(x, y, lo, hi, beta=0.2, temperature=T),
        "debiased_kl": lambda x: jnp.sum(losses.debiased_kl(x, lo, hi, temperature=T)),
        "kd": lambda x: losses.kd_loss(x, z, y, alpha=0.9, temperature=T),
        "dkd": lambda x: losses.dkd_loss(x, z, y, temperature=T),
        "btkd swap": lambda x: losses.btkd_loss(x, z, y, easy_weight=0.5, temperature=T, rectify="swap"),
        "btkd released": lambda x: losses.btkd_loss(
            x, z, y, easy_weight=0.5, temperature=T, rectify="released"
        ),
        "hint": lambda x: losses.hint_loss([x[:, :, None, None]], [z[:, :, None, None]]),
    }
    out = {name: jax.value_and_grad(f)(s) for name, f in fs.items()}
    out["projection"] = (losses.box_projection(jax.nn.softmax(s / T), lo, hi), 0.0)
    out["hit"] = (losses.region_hit_rate(s, y, lo, hi, temperature=T), 0.0)
    out["per-sample debiased_kl"] = (losses.debiased_kl(s, lo, hi, temperature=T), 0.0)
    return out


def test_no_nan_or_inf_for_extreme_finite_inputs():
    """Logits +-80 at T = 0.5 (p saturates to exactly 0 and 1), all-equal rows, boxes that are one point."""
    s = np.array(
        [
            [80.0, -80.0, -80.0, -80.0],
            [-80.0, -80.0, -80.0, 80.0],
            [0.0] * 4,
            [80.0] * 4,
            [-80.0, 80.0, 80.0, -80.0],
            [1e-30, 0.0, -1e-30, 0.0],
            [80.0, 79.9, -80.0, 0.0],
            [-80.0] * 4,
        ],
        np.float32,
    )
    y = np.array([1, 0, 2, 3, 0, 1, 3, 2], np.int32)
    teachers = {
        "reversed": s[::-1].copy(),
        "same": s.copy(),
        "confident": np.where(np.eye(4, dtype=bool)[y], 80.0, -80.0).astype(np.float32),
    }
    failures = []
    for tname, z in teachers.items():
        boxes = {f"regions T={T} n={n}": _regions32(z, T, n) for T in (0.5, 4.0) for n in NUM_REGIONS}
        boxes["lo = hi = 1/4"] = (np.full((8, 4), 0.25, np.float32),) * 2
        boxes["sum lo = 1"] = (np.full((8, 4), 0.25, np.float32), np.full((8, 4), 0.5, np.float32))
        boxes["sum hi = 1"] = (np.zeros((8, 4), np.float32), np.full((8, 4), 0.25, np.float32))
        for T in (0.5, 1.0, 4.0):
            for bname, (lo, hi) in boxes.items():
                out = _all_values_and_grads(s, z, y, lo, hi, _f32(T))
                for name, (val, grad) in out.items():
                    if not (np.all(np.isfinite(np.asarray(val))) and np.all(np.isfinite(np.asarray(grad)))):
                        failures.append(f"{name}: teacher {tname}, T={T}, box {bname}")
                t = np.asarray(out["projection"][0])
                if not np.allclose(t.sum(-1), 1.0, atol=1e-5):
                    failures.append(f"projection sum {t.sum(-1)}: teacher {tname}, T={T}, box {bname}")
                R.assert_close(out["per-sample debiased_kl"][0], R.debiased_kl(s, lo, hi, T), scale=160.0)
    assert not failures, "non-finite values or gradients:\n" + "\n".join(sorted(set(failures)))


# ----------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------


def _grad_check(fs, *args):
    """Reverse-mode check of each function in the dict ``fs`` against central differences, all at once (one
    compile); on a failure, each alone so the message names the culprit.

    The losses compute in float32 whatever the input dtype (so x64 would not help): a step of 1e-2 keeps the
    rounding error of the differences near 1e-5 relative, and 2e-3 is far below the size of any wrong term.
    """
    kw = dict(order=1, modes=["rev"], eps=1e-2, atol=2e-3, rtol=2e-3)
    try:
        check_grads(jax.jit(lambda *a: {name: f(*a) for name, f in fs.items()}), args, **kw)
    except AssertionError:
        for name, f in fs.items():
            try:
                check_grads(jax.jit(f), args, **kw)
            except AssertionError as e:
                raise AssertionError(f"gradient of {name}: {e}") from None
        raise


def test_gradients_numerical():
    """check_grads (reverse mode) w.r.t. the student's logits / features."""
    rng = np.random.default_rng(9)
    B, k = 8, 5
    s, z = (rng.normal(size=(2, B, k)) * 2).astype(np.float32)
    y = rng.integers(0, k, B).astype(np.int32)
    q = np.asarray(jax.nn.softmax(z / 4.0))
    ft = [rng.normal(size=(B, 4, 4, 3)).astype(np.float32), rng.normal(size=(B, k)).astype(np.float32)]
    _grad_check(
        {
            "cross_entropy": lambda x: losses.cross_entropy(x, y),
            "kd": lambda x: losses.kd_loss(x, z, y, alpha=0.9, temperature=4.0),
            "dkd": lambda x: losses.dkd_loss(x, z, y, temperature=4.0),
            "btkd swap": lambda x: losses.btkd_loss(x, z, y, easy_weight=0.3, rectify="swap"),
            "btkd released": lambda x: losses.btkd_loss(x, z, y, easy_weight=0.3, rectify="released"),
            "hint": lambda x: losses.hint_loss([x[:, None, :1, None] * ft[0], x], ft),
            # One-point box lo = hi = q: t = q is constant, so finite differences see the stopped gradient.
            "debiased_kl lo=hi": lambda x: losses.debiased_kl(x, q, q, temperature=4.0),
        },
        s,
    )

    # The de-biased term holds t = stop_gradient(proj(p)) fixed, so finite differences agree with it where t
    # is locally constant: k = 2 (t_y is a clip, so outside the region t is an endpoint) and a k = 3 vertex of
    # the box. test_debiased_gradient_is_the_analytic_one covers the general case.
    s2 = (rng.normal(size=(64, 2)) * 3).astype(np.float32)
    lo2, hi2 = _regions32(rng.normal(size=(64, 2)) * 3, 4.0, 12)
    y2 = rng.integers(0, 2, 64).astype(np.int32)
    _grad_check(
        {
            "debiased_kl k=2": lambda x: losses.debiased_kl(x, lo2, hi2, temperature=4.0),
            "debkd k=2": lambda x: losses.debkd_loss(x, y2, lo2, hi2, beta=0.2, temperature=4.0),
        },
        s2,
    )

    lo3, hi3 = np.array([[0.5, 0.0, 0.0]], np.float32), np.array([[1.0, 0.5, 0.5]], np.float32)
    s3 = (np.log(np.array([[0.1, 0.1, 0.8]])) * 4.0).astype(
        np.float32
    )  # p = (.1, .1, .8) -> vertex (.5, 0, .5)
    np.testing.assert_allclose(
        np.asarray(_proj(np.asarray(jax.nn.softmax(s3 / 4.0)), lo3, hi3)), [[0.5, 0.0, 0.5]], atol=1e-6
    )
    _grad_check({"debiased_kl vertex": lambda x: losses.debiased_kl(x, lo3, hi3, temperature=4.0)}, s3)


@pytest.mark.parametrize("B,k", GRAD_SHAPES)
def test_debiased_gradient_is_the_analytic_one(B, k):
    """With t held fixed, d/ds sum_i KL(t_i || softmax(s_i / T)) = (p - t) / T, t from the sort reference."""
    rng = np.random.default_rng(70 * B + k)
    for scale, s, z, y in _sweep(rng, B, k):
        for T in TEMPERATURES:
            for n in (2, 12):
                lo, hi = _regions32(z, T, n)
                p = R.softmax(s.astype(np.float64) / T)
                t = R.box_projection(p, lo, hi)
                err = f"scale={scale} T={T} n={n}"
                np.testing.assert_allclose(
                    np.asarray(_grad_dkl(s, lo, hi, _f32(T))),
                    (p - t) / T,
                    rtol=1e-4,
                    atol=1e-5 / T,
                    err_msg=err,
                )
                expected = (0.2 * T * (p - t) + R.softmax(s) - np.eye(k)[y]) / B
                np.testing.assert_allclose(
                    np.asarray(_grad_debkd(s, y, lo, hi, _f32(0.2), _f32(T))),
                    expected,
                    rtol=1e-4,
                    atol=1e-5 * T / B,
                    err_msg=err,
                )


def test_debiased_gradient_just_outside_the_region():
    """p_0 above hi_0 by delta in [1e-5, 1e-2]: the gradient is (p - t) / T however small the KL value.

    KL(t || p) is O(delta^2) there, below float32's resolution of the sum for the smallest deltas; the value
    may round to 0, the gradient must not (it is what pulls p into the region).
    """
    rng = np.random.default_rng(14)
    T = 4.0
    s = (rng.normal(size=(33, 3)) * 2).astype(np.float32)
    p = np.asarray(jax.nn.softmax(jnp.asarray(s) / T)).astype(np.float64)
    delta = np.logspace(-5, -2, 33)
    lo, hi = np.clip(p - 0.05, 0, 1), np.clip(p + 0.05, 0, 1)
    hi[:, 0] = p[:, 0] - delta
    lo, hi = lo.astype(np.float32), hi.astype(np.float32)
    expected = (p - R.box_projection(p, lo, hi)) / T
    got = np.asarray(_grad_dkl(s, lo, hi, _f32(T)))
    row_scale = np.abs(expected).max(-1, keepdims=True)
    bad = np.flatnonzero(np.any(np.abs(got - expected) > 0.02 * row_scale, -1))
    assert bad.size == 0, (
        f"{bad.size}/33 rows off by more than 2%: delta={delta[bad]}, d/ds_0 got {got[bad, 0]}, "
        f"expected {expected[bad, 0]}, value {np.asarray(_dkl(s, lo, hi, temperature=T))[bad]}"
    )


# ----------------------------------------------------------------------------------------------------------
# vmap and sharding
# ----------------------------------------------------------------------------------------------------------


def _batch(B=64, k=10, seed=11):
    rng = np.random.default_rng(seed)
    s = R.random_logits(rng, (B, k), 5.0)
    z, y = R.teacher_data(rng, B, k, scale=3.0, wrong_frac=0.4)
    lo, hi = _regions32(z, 4.0, 12)
    fs = [rng.normal(size=(B, 4, 4, 8)).astype(np.float32), rng.normal(size=(B, 16)).astype(np.float32)]
    ft = [rng.normal(size=(B, 4, 4, 8)).astype(np.float32), rng.normal(size=(B, 16)).astype(np.float32)]
    return dict(s=s, z=z, y=y, lo=lo, hi=hi, fs=fs, ft=ft)


def _all_losses(b):
    """Every function of the batch dict b: per-sample ones (B, ...) and batch means (scalars)."""
    s, z, y, lo, hi = b["s"], b["z"], b["y"], b["lo"], b["hi"]
    return dict(
        cross_entropy=losses.cross_entropy(s, y),
        box_projection=losses.box_projection(jax.nn.softmax(s / 4.0), lo, hi),
        debiased_kl=losses.debiased_kl(s, lo, hi, temperature=4.0),
        debkd_loss=losses.debkd_loss(s, y, lo, hi, beta=0.2, temperature=4.0),
        region_hit_rate=losses.region_hit_rate(s, y, lo, hi, temperature=4.0),
        kd_loss=losses.kd_loss(s, z, y, alpha=0.9, temperature=4.0),
        dkd_loss=losses.dkd_loss(s, z, y, temperature=4.0),
        hint_loss=losses.hint_loss(b["fs"], b["ft"]),
        btkd_swap=losses.btkd_loss(s, z, y, easy_weight=0.3, rectify="swap"),
        btkd_released=losses.btkd_loss(s, z, y, easy_weight=0.3, rectify="released"),
        grad_debkd=jax.grad(lambda x: losses.debkd_loss(x, y, lo, hi, beta=0.2, temperature=4.0))(s),
    )


_PER_SAMPLE = ("cross_entropy", "box_projection", "debiased_kl")
_all_losses_jit = jax.jit(_all_losses)
_all_losses_vmap = jax.jit(jax.vmap(_all_losses))


def _compare(got, expected, rtol=2e-6, atol=1e-7):
    bad = []
    for name in expected:
        try:
            np.testing.assert_allclose(
                np.asarray(got[name]), np.asarray(expected[name]), rtol=rtol, atol=atol
            )
        except AssertionError as e:
            bad.append(f"{name}: {e}")
    assert not bad, "\n".join(bad)


def test_vmap_over_examples_equals_the_batch():
    """Each example as a batch of one: per-sample outputs match row by row, batch means match as means.

    BTKD averages over the correct / wrong subsets, so it is checked on one-sided batches below; grad_debkd is
    a batch mean's gradient, B times the per-example one.
    """
    b = _batch()
    expected = _all_losses_jit(b)
    vm = _all_losses_vmap(jax.tree.map(lambda a: a[:, None], b))
    got = {
        name: (v[:, 0] if name in _PER_SAMPLE or name == "grad_debkd" else jnp.mean(v))
        for name, v in vm.items()
        if not name.startswith("btkd")
    }
    got["grad_debkd"] = got["grad_debkd"] / 64
    _compare(got, {name: v for name, v in expected.items() if not name.startswith("btkd")}, atol=1e-6)


def test_vmap_btkd_on_one_sided_batches():
    """BTKD averages over subsets; on an all-correct or all-wrong batch it is a mean of per-example values."""
    for frac in (0.0, 1.0):
        b = _batch(seed=12)
        z, y = R.teacher_data(np.random.default_rng(13), 66, 10, wrong_frac=frac)
        b["z"], b["y"] = z[2:], y[2:]
        expected = _all_losses_jit(b)
        vm = _all_losses_vmap(jax.tree.map(lambda a: a[:, None], b))
        _compare(
            {n: jnp.mean(vm[n]) for n in ("btkd_swap", "btkd_released")},
            {n: expected[n] for n in ("btkd_swap", "btkd_released")},
        )


def test_sharded_batch_equals_single_device():
    """jit over a batch sharded on a Mesh of 8 (fake CPU) devices, P('data'), equals the single device."""
    assert len(jax.devices()) >= 8
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    b = _batch()
    expected = _all_losses_jit(b)
    sharded = jax.device_put(b, NamedSharding(mesh, P("data")))
    assert len(sharded["s"].sharding.device_set) == 8
    got = _all_losses_jit(sharded)
    assert len(got["debiased_kl"].sharding.device_set) == 8
    _compare(got, expected)


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


def test_hint_loss_rejects_mismatched_features():
    a, b = np.zeros((4, 3, 3, 8), np.float32), np.zeros((4, 3, 3, 16), np.float32)
    with pytest.raises(ValueError):
        losses.hint_loss([a, a], [a])
    with pytest.raises(ValueError):
        losses.hint_loss([a], [b])
    with pytest.raises(ValueError):
        losses.hint_loss([a], [a[:2]])


def _bad_loss_calls():
    b = _batch(B=8, k=3)
    s, z, y, lo, hi = b["s"], b["z"], b["y"], b["lo"], b["hi"]
    return [
        ("btkd unknown rectify", lambda: losses.btkd_loss(s, z, y, rectify="calibrate"), "rectify"),
        ("debkd lo/hi width", lambda: losses.debkd_loss(s, y, lo[:, :2], hi[:, :2]), "lo|hi"),
        ("debiased_kl lo width", lambda: losses.debiased_kl(s, lo[:, :1], hi), "lo"),
        ("box_projection lo width", lambda: losses.box_projection(s, lo[:, :2], hi), "lo"),
        ("region_hit_rate hi rows", lambda: losses.region_hit_rate(s, y, lo, hi[:4]), "hi"),
        ("kd teacher width", lambda: losses.kd_loss(s, z[:, :2], y), "teacher_logits"),
        ("dkd teacher rows", lambda: losses.dkd_loss(s, z[:4], y), "teacher_logits"),
        ("btkd teacher rows", lambda: losses.btkd_loss(s, z[:4], y), "teacher_logits"),
        ("cross_entropy labels rank", lambda: losses.cross_entropy(s, y[:, None]), "labels"),
        ("cross_entropy float labels", lambda: losses.cross_entropy(s, y.astype(np.float32)), "labels"),
        ("debkd student rank", lambda: losses.debkd_loss(s[0], y[:1], lo, hi), "student_logits|logits"),
    ]


@pytest.mark.parametrize("case", _bad_loss_calls(), ids=lambda c: c[0])
def test_losses_reject_bad_shapes_and_options(case):
    """Static (shape, dtype, option) errors are caught at trace time, as ValueError naming the argument."""
    _, call, match = case
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("k", [3, 100])
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 2.5])
def test_debkd_loss_with_a_static_temperature_matches_the_reference(k, T):
    """A Python-number T (folded into the compiled code as a constant): the float64 reference's value and the
    same gradient as a traced T."""
    rng = np.random.default_rng(k)
    s, z = R.random_logits(rng, (64, k), 8.0), R.random_logits(rng, (64, k), 4.0)
    y = rng.integers(0, k, 64).astype(np.int32)
    lo, hi = _regions32(z, T, 12)
    static = jax.jit(jax.value_and_grad(lambda x: losses.debkd_loss(x, y, lo, hi, beta=0.2, temperature=T)))
    value, grad = static(s)
    R.assert_close(value, R.debkd_loss(s, y, lo, hi, 0.2, T), scale=80)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(_grad_debkd(s, y, lo, hi, _f32(0.2), _f32(T))),
                               rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("k", [2, 10])
@pytest.mark.parametrize("scale_by_t2", [True, False])
def test_debkd_loss_gradients_for_beta_and_temperature(k, scale_by_t2):
    """The gradient w.r.t. the hyperparameters (a schedule may differentiate them) equals autodiff of the same
    surrogate written plainly: t = stop_gradient(proj(p)), zero inside the region. (debkd_loss clamps the
    value with a stop-gradient trick, so its T gradient is not autodiff's of the obvious formula by
    construction.)"""
    rng = np.random.default_rng(5 + k)
    s, z = R.random_logits(rng, (32, k), 6.0), R.random_logits(rng, (32, k), 3.0)
    y = rng.integers(0, k, 32).astype(np.int32)
    lo, hi = _regions32(z, 4.0, 12)

    def plain(x, beta, T):
        log_p = jax.nn.log_softmax(x / T)
        p = jnp.exp(log_p)
        t = jax.lax.stop_gradient(losses.box_projection(p, lo, hi))
        outside = jax.lax.stop_gradient(~jnp.all((p >= lo) & (p <= hi), axis=-1))
        kl = jnp.where(outside, jnp.sum(xlogy(t, t) - t * log_p, axis=-1), 0.0)
        weight = beta * T**2 if scale_by_t2 else beta
        return jnp.mean(weight * kl + losses.cross_entropy(x, y))

    def loss(x, beta, T):
        return losses.debkd_loss(x, y, lo, hi, beta=beta, temperature=T, scale_by_t2=scale_by_t2)

    args = (s, _f32(0.3), _f32(3.0))
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
    expected = jax.jit(jax.grad(plain, argnums=(0, 1, 2)))(*args)
    for name, g, e in zip(("logits", "beta", "temperature"), got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-4, atol=1e-7, err_msg=name)
    assert abs(float(got[2])) > 1e-3  # the temperature gradient is not trivially zero here
