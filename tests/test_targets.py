"""Tests of ``debkd_jax.targets`` (docs/method.md §2-4 and the rectification of §9.2) against
``reference.py``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from debkd_jax import targets

try:
    from . import reference as R
except ImportError:  # tests/ is not a package: pytest puts tests/ on sys.path
    import reference as R

# One jitted function per (function, static modes); shapes are reused across the sweeps below.
_correct = jax.jit(targets.teacher_correct)
_table = jax.jit(targets.infusion_table, static_argnames="mode")
_ki = jax.jit(targets.knowledge_infusion, static_argnames="mode")
_regions = jax.jit(targets.debiased_regions)  # temperature and num_regions traced
_rectify = jax.jit(targets.rectify_logits, static_argnames="mode")
_build = jax.jit(targets.build_targets, static_argnames=("transforms", "ki_mode", "rectify_mode"))

# (N, k) pairs for the sweeps: k in {2, 3, 10, 100}, N from 1 to 1024.
SHAPES = [(1, 2), (1024, 2), (33, 3), (256, 10), (64, 100)]
TEMPERATURES = [0.5, 1.0, 4.0, 10.0]
NUM_REGIONS = [1, 2, 12, 1000]


def _near_interior_boundary(q, n, tol=1e-3):
    """Entries whose q * n is within tol of an interior boundary 1..n-1: float32 may floor them otherwise."""
    x = q * n
    r = np.round(x)
    return (np.abs(x - r) < tol) & (r >= 1) & (r <= n - 1)


# ----------------------------------------------------------------------------------------------------------
# teacher_correct, knowledge infusion
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", SHAPES)
def test_teacher_correct_matches_reference(n, k):
    z, y = R.teacher_data(np.random.default_rng(n * 7 + k), n, k)
    out = np.asarray(_correct(z, y))
    assert out.dtype == np.bool_ and out.shape == (n,)
    np.testing.assert_array_equal(out, R.teacher_correct(z, y))


@pytest.mark.parametrize("mode", ["pooled", "per_class"])
@pytest.mark.parametrize("n,k", SHAPES)
def test_knowledge_infusion_matches_reference(n, k, mode):
    z, y = R.teacher_data(np.random.default_rng(n * 11 + k), n, k, scale=5.0)
    np.testing.assert_allclose(
        np.asarray(_table(z, y, mode=mode)), R.infusion_table(z, y, mode), rtol=1e-5, atol=1e-5
    )
    out = np.asarray(_ki(z, y, mode=mode))
    assert out.shape == (n, k)
    np.testing.assert_allclose(out, R.knowledge_infusion(z, y, mode), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["pooled", "per_class"])
def test_knowledge_infusion_eager_equals_jit_and_default_is_pooled(mode):
    """The host-side (validated) call and the jitted one agree; the default mode is pooled."""
    z, y = R.teacher_data(np.random.default_rng(1), 12, 3)  # the validation tests' shape: compiled once
    np.testing.assert_allclose(
        np.asarray(targets.knowledge_infusion(z, y, mode=mode)),
        np.asarray(_ki(z, y, mode=mode)),
        rtol=1e-6,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(targets.knowledge_infusion(z, y)),
        R.knowledge_infusion(z, y, "pooled"),
        rtol=1e-5,
        atol=1e-5,
    )


def test_pooled_binary_is_the_papers_rule():
    """k = 2: every misclassified sample gets [zC, zF] in (true, other) order, the paper's [z̄_C, z̄_F]."""
    z = np.array([[3.0, 1.0], [0.0, 2.0], [5.0, -1.0], [1.0, 4.0], [2.0, 0.0]], np.float32)
    y = np.array([0, 1, 1, 0, 1], np.int32)  # rows 0, 1 correct; rows 2, 3, 4 wrong
    zC, zF = (3.0 + 2.0) / 2, (1.0 + 0.0) / 2
    out = np.asarray(targets.knowledge_infusion(z, y, mode="pooled"))
    expected = np.array([[3.0, 1.0], [0.0, 2.0], [zF, zC], [zC, zF], [zF, zC]])
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(targets.infusion_table(z, y)), [[zC, zF], [zF, zC]], rtol=1e-6)


@pytest.mark.parametrize("mode", ["pooled", "per_class"])
@pytest.mark.parametrize("n,k", SHAPES)
def test_after_infusion_every_sample_is_correct_and_correct_rows_are_unchanged(n, k, mode):
    z, y = R.teacher_data(np.random.default_rng(n + 13 * k), n, k, scale=4.0, wrong_frac=0.6)
    out = np.asarray(_ki(z, y, mode=mode))
    np.testing.assert_array_equal(np.argmax(out, -1), y)
    correct = R.teacher_correct(z, y)
    np.testing.assert_array_equal(out[correct], z[correct])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    mode=st.sampled_from(["pooled", "per_class"]),
    wrong_frac=st.floats(0.0, 0.95),
    scale=st.floats(0.1, 20.0),
)
def test_after_infusion_every_sample_is_correct_hypothesis(seed, mode, wrong_frac, scale):
    z, y = R.teacher_data(np.random.default_rng(seed), 48, 6, scale=scale, wrong_frac=wrong_frac)
    out = np.asarray(_ki(z, y, mode=mode))
    np.testing.assert_array_equal(np.argmax(out, -1), y)


def test_per_class_falls_back_to_pooled_for_a_class_without_correct_sample():
    rng = np.random.default_rng(3)
    z, y = R.teacher_data(rng, 60, 4, wrong_frac=0.2)
    # Class 2: every sample misclassified. Class 3: no sample at all.
    y = np.where(y == 3, 0, y).astype(np.int32)
    rows = np.flatnonzero(y == 2)
    assert rows.size > 0
    z[rows, 2] = z[rows].min(-1) - 1.0
    assert not R.teacher_correct(z, y)[rows].any()
    z, y = z.astype(np.float32), y.astype(np.int32)

    per_class = np.asarray(targets.infusion_table(z, y, mode="per_class"))
    pooled = np.asarray(targets.infusion_table(z, y, mode="pooled"))
    np.testing.assert_allclose(per_class[2], pooled[2], rtol=1e-6)
    np.testing.assert_allclose(per_class[3], pooled[3], rtol=1e-6)
    np.testing.assert_allclose(per_class, R.infusion_table(z, y, "per_class"), rtol=1e-5, atol=1e-5)
    # Classes 0 and 1 use their own class means, not the pooled rows.
    c = R.teacher_correct(z, y)
    np.testing.assert_allclose(per_class[1], z[c & (y == 1)].mean(0), rtol=1e-5, atol=1e-5)
    out = np.asarray(targets.knowledge_infusion(z, y, mode="per_class"))
    np.testing.assert_allclose(out[rows], np.broadcast_to(pooled[2], (rows.size, 4)), rtol=1e-6)
    np.testing.assert_array_equal(np.argmax(out, -1), y)


# ----------------------------------------------------------------------------------------------------------
# Regions
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", SHAPES)
def test_debiased_regions_match_reference(n, k):
    rng = np.random.default_rng(100 + n + k)
    checked = 0
    for scale in (1.0, 10.0, 80.0):
        z = R.random_logits(rng, (n, k), scale)
        for T in TEMPERATURES:
            q = R.softmax(z.astype(np.float64) / T)
            for num in NUM_REGIONS:
                lo, hi = _regions(z, T, num)
                lo, hi = np.asarray(lo), np.asarray(hi)
                assert lo.shape == hi.shape == (n, k)
                rlo, rhi = R.debiased_regions(z, T, num)
                ok = ~_near_interior_boundary(q, num)
                checked += ok.sum()
                err = f"scale={scale} T={T} n={num}"
                np.testing.assert_allclose(lo[ok], rlo[ok], rtol=1e-6, atol=0, err_msg=err)
                np.testing.assert_allclose(hi[ok], rhi[ok], rtol=1e-6, atol=0, err_msg=err)
                # Everywhere (boundary entries included): regions of width 1/n on the grid, box never empty.
                np.testing.assert_allclose(hi - lo, 1.0 / num, rtol=0, atol=1e-7, err_msg=err)
                assert np.all(lo >= 0) and np.all(hi <= 1 + 1e-7), err
                assert np.all(lo <= q + 1e-6) and np.all(q <= hi + 1e-6), err
                assert np.all(lo.sum(-1) <= 1 + 1e-5) and np.all(hi.sum(-1) >= 1 - 1e-5), err
    # Exact ties (clipped +-80 logits, the all-equal row) put q on a boundary; those are masked above and
    # covered by test_debiased_regions_exact_boundaries.
    assert checked > 0.95 * 3 * len(TEMPERATURES) * len(NUM_REGIONS) * n * k


def test_debiased_regions_defaults_are_t4_n12():
    z = R.random_logits(np.random.default_rng(5), (33, 3), 5.0)
    lo, hi = targets.debiased_regions(z)
    rlo, rhi = R.debiased_regions(z, 4.0, 12)
    q = R.softmax(z.astype(np.float64) / 4.0)
    ok = ~_near_interior_boundary(q, 12)
    np.testing.assert_allclose(np.asarray(lo)[ok], rlo[ok], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(hi)[ok], rhi[ok], rtol=1e-6)


@pytest.mark.parametrize(
    "logits,T,num,lo,hi",
    [
        # k = 4 equal logits: q = 0.25 exactly, an interior boundary for n = 4, 8, 12 (a region's lower end).
        ([0.0] * 4, 1.0, 4, 0.25, 0.5),
        ([3.0] * 4, 0.5, 8, 0.25, 0.375),
        ([-7.0] * 4, 10.0, 12, 3 / 12, 4 / 12),
        ([0.0] * 4, 4.0, 2, 0.0, 0.5),
        ([0.0] * 4, 4.0, 1, 0.0, 1.0),
        ([0.0] * 4, 1.0, 1000, 0.25, 0.251),
        # k = 8 equal logits: q = 0.125 = 1/8.
        ([1.0] * 8, 1.0, 8, 0.125, 0.25),
        ([1.0] * 8, 1.0, 16, 0.125, 0.1875),
    ],
)
def test_debiased_regions_exact_boundaries(logits, T, num, lo, hi):
    z = np.asarray([logits], np.float32)
    for fn in (targets.debiased_regions, _regions):
        out_lo, out_hi = (np.asarray(a) for a in fn(z, T, num))
        np.testing.assert_allclose(out_lo, lo, rtol=1e-6, atol=0)
        np.testing.assert_allclose(out_hi, hi, rtol=1e-6, atol=0)
    rlo, rhi = R.debiased_regions(z, T, num)
    np.testing.assert_allclose(rlo, lo, rtol=1e-12)
    np.testing.assert_allclose(rhi, hi, rtol=1e-12)


@pytest.mark.parametrize("num", NUM_REGIONS)
def test_debiased_regions_saturated_probabilities(num):
    """q == 1 exactly goes to the last region [(n-1)/n, 1] (the clip), q == 0 to the first [0, 1/n]."""
    z = np.array([[80.0, -80.0, -80.0], [-80.0, 80.0, -80.0]], np.float32)
    lo, hi = (np.asarray(a) for a in _regions(z, 0.5, num))
    q = np.asarray(jax.nn.softmax(jnp.asarray(z) / 0.5))
    assert q[0, 0] == 1.0 and q[0, 1] == 0.0  # float32 saturates
    expected_lo = np.where(np.eye(2, 3, dtype=bool), (num - 1) / num, 0.0)
    np.testing.assert_allclose(lo, expected_lo, rtol=1e-6, atol=0)
    np.testing.assert_allclose(hi, expected_lo + 1.0 / num, rtol=1e-6, atol=0)


@pytest.mark.parametrize("num", [2, 3, 12, 1000])
def test_binary_regions_are_mirrored(num):
    """k = 2: if q_y lies in I_j the other class's region is I_(n-j+1):
    lo_other = 1 - hi_y, hi_other = 1 - lo_y.

    Holds for q off the region boundaries. (Exactly on a boundary the per-class floor puts q_y = j/n and
    q_other = 1 - j/n both at the lower ends of their regions, so the mirror cannot hold there; see
    test_binary_regions_on_a_boundary.)
    """
    rng = np.random.default_rng(num)
    z = R.random_logits(rng, (1024, 2), 3.0)
    q = R.softmax(z.astype(np.float64) / 4.0)
    ok = ~_near_interior_boundary(q, num).any(-1)
    lo, hi = (np.asarray(a) for a in _regions(z, 4.0, num))
    np.testing.assert_allclose(lo[ok, 1], 1.0 - hi[ok, 0], atol=1e-6)
    np.testing.assert_allclose(hi[ok, 1], 1.0 - lo[ok, 0], atol=1e-6)
    assert ok.sum() > 900


def test_binary_regions_on_a_boundary():
    """q = (0.5, 0.5) with n = 2 (or 4): both classes get [0.5, 1] ([0.5, 0.75]) by the per-class floor of
    docs/method.md §4.

    The box {lo <= t <= hi, sum t = 1} then holds the single point q, so the projection is q and the de-biased
    term reduces to KD at this point. This pins that formula; the label-free API cannot return the
    label-dependent mirror here.
    """
    z = np.zeros((1, 2), np.float32)
    for num, (lo, hi) in {2: (0.5, 1.0), 4: (0.5, 0.75)}.items():
        out_lo, out_hi = (np.asarray(a) for a in _regions(z, 1.0, num))
        np.testing.assert_allclose(out_lo, [[lo, lo]])
        np.testing.assert_allclose(out_hi, [[hi, hi]])


def test_debiased_regions_traced_temperature_and_num_regions():
    z = R.random_logits(np.random.default_rng(9), (33, 3), 4.0)
    f = jax.jit(lambda z, T, n: targets.debiased_regions(z, temperature=T, num_regions=n))
    for T, num in [(0.5, 1), (4.0, 12), (10.0, 1000)]:
        a = f(z, jnp.float32(T), jnp.int32(num))
        b = targets.debiased_regions(z, temperature=T, num_regions=num)
        for x, x2 in zip(a, b, strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(x2), rtol=1e-6)


def test_regions_have_no_nan_for_extreme_logits():
    z = np.array(
        [[80.0, -80.0, 80.0], [-80.0, -80.0, -80.0], [80.0, 80.0, 80.0], [0.0, 1e-30, -1e-30]], np.float32
    )
    for T in TEMPERATURES:
        for num in NUM_REGIONS:
            lo, hi = (np.asarray(a) for a in _regions(z, T, num))
            assert np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))
            assert np.all(lo.sum(-1) <= 1 + 1e-5) and np.all(hi.sum(-1) >= 1 - 1e-5)


# ----------------------------------------------------------------------------------------------------------
# Rectification
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["swap", "released"])
@pytest.mark.parametrize("n,k", SHAPES)
def test_rectify_matches_reference(n, k, mode):
    z, y = R.teacher_data(np.random.default_rng(200 + n + k), n, k, scale=4.0, wrong_frac=0.5)
    expected = R.rectify_logits(z, y, mode)
    assert np.all(np.isfinite(expected))
    out = np.asarray(_rectify(z, y, mode=mode))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    correct = R.teacher_correct(z, y)
    np.testing.assert_array_equal(out[correct], z[correct])
    # Only the entries y and argmax change.
    rows = np.arange(n)
    changed = np.zeros((n, k), bool)
    changed[rows[~correct], y[~correct]] = True
    changed[rows[~correct], np.argmax(z, -1)[~correct]] = True
    np.testing.assert_array_equal(out[~changed], z[~changed])


def test_rectify_default_mode_is_swap():
    z, y = R.teacher_data(np.random.default_rng(4), 20, 5, wrong_frac=0.5)
    np.testing.assert_array_equal(np.asarray(targets.rectify_logits(z, y)), R.rectify_logits(z, y, "swap"))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 80.0))
def test_swap_always_makes_the_teacher_right(seed, scale):
    """Without ties for the maximum (with a tie z_y == z_c, c < y, swapping equal values changes nothing)."""
    rng = np.random.default_rng(seed)
    z = (80.0 * np.tanh(rng.normal(size=(32, 5)) * scale / 80.0)).astype(np.float32)
    top2 = np.sort(z, -1)[:, -2:]
    no_tie = top2[:, 1] > top2[:, 0]
    y = rng.integers(0, 5, 32).astype(np.int32)
    out = np.asarray(_rectify(z, y, mode="swap"))
    np.testing.assert_array_equal(np.argmax(out, -1)[no_tie], y[no_tie])
    np.testing.assert_array_equal(np.sort(out, -1), np.sort(z, -1))  # a permutation of each row


def test_released_can_leave_the_teacher_wrong():
    """k = 2, z = [1, -3], y = 1: s = -2, z_y' = -1, z_c' = 0.5, scale 4 -> [2, -4]: still wrong
    (docs/method.md §9.2)."""
    z = np.array([[1.0, -3.0], [2.0, 1.5]], np.float32)
    y = np.array([1, 1], np.int32)
    out = np.asarray(_rectify(z, y, mode="released"))
    np.testing.assert_allclose(out, [[2.0, -4.0], [3.5 / 2.25, 1.25 * 3.5 / 2.25]], rtol=1e-6)
    np.testing.assert_array_equal(np.argmax(out, -1), [0, 1])  # row 0 still wrong, row 1 fixed
    np.testing.assert_array_equal(np.argmax(np.asarray(_rectify(z, y, mode="swap")), -1), y)


# ----------------------------------------------------------------------------------------------------------
# build_targets
# ----------------------------------------------------------------------------------------------------------


def _assert_targets(t, ref, n, k, T=4.0, num=12):
    assert isinstance(t, targets.Targets)
    assert t.logits.shape == t.lo.shape == t.hi.shape == (n, k) and t.correct.shape == (n,)
    assert t.logits.dtype == jnp.float32 and t.correct.dtype == jnp.bool_
    np.testing.assert_allclose(np.asarray(t.logits), ref["logits"], rtol=1e-5, atol=1e-5)
    q = R.softmax(np.asarray(t.logits, np.float64) / T)
    ok = ~_near_interior_boundary(q, num)
    np.testing.assert_allclose(np.asarray(t.lo)[ok], ref["lo"][ok], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(t.hi)[ok], ref["hi"][ok], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(t.correct), ref["correct"])


@pytest.mark.parametrize(
    "transforms,ki_mode,rectify_mode",
    [
        ((), "pooled", "swap"),
        (("knowledge_infusion",), "pooled", "swap"),
        (("knowledge_infusion",), "per_class", "swap"),
        (("rectify",), "pooled", "swap"),
        (("rectify",), "pooled", "released"),
        (("knowledge_infusion", "rectify"), "per_class", "released"),
        (
            ("rectify", "knowledge_infusion"),
            "pooled",
            "released",
        ),  # released leaves some wrong: KI fixes them
    ],
)
def test_build_targets_composes_transforms(transforms, ki_mode, rectify_mode):
    n, k = 256, 10
    z, y = R.teacher_data(np.random.default_rng(17), n, k, scale=3.0, wrong_frac=0.4)
    kw = dict(transforms=transforms, ki_mode=ki_mode, rectify_mode=rectify_mode)
    ref = R.build_targets(z, y, **kw)
    # correct always from the RAW teacher logits (compared in _assert_targets), whatever the transforms did.
    assert not ref["correct"].all()
    _assert_targets(_build(z, y, **kw), ref, n, k)


def test_build_targets_eager_equals_jit():
    z, y = R.teacher_data(np.random.default_rng(17), 12, 3, wrong_frac=0.4)
    for kw in (
        dict(),
        dict(
            transforms=("rectify", "knowledge_infusion"),
            ki_mode="per_class",
            rectify_mode="released",
            temperature=2.0,
            num_regions=5,
        ),
    ):
        ref = R.build_targets(z, y, **kw)
        _assert_targets(
            targets.build_targets(z, y, **kw),
            ref,
            12,
            3,
            T=kw.get("temperature", 4.0),
            num=kw.get("num_regions", 12),
        )


def test_build_targets_default_is_ki_then_regions():
    z, y = R.teacher_data(np.random.default_rng(18), 64, 3, wrong_frac=0.4)
    t = targets.build_targets(z, y)
    lo, hi = targets.debiased_regions(targets.knowledge_infusion(z, y), temperature=4.0, num_regions=12)
    np.testing.assert_array_equal(np.asarray(t.logits), np.asarray(targets.knowledge_infusion(z, y)))
    np.testing.assert_array_equal(np.asarray(t.lo), np.asarray(lo))
    np.testing.assert_array_equal(np.asarray(t.hi), np.asarray(hi))
    t2 = targets.build_targets(z, y, transforms=("rectify",), temperature=2.0, num_regions=5)
    lo2, hi2 = targets.debiased_regions(targets.rectify_logits(z, y), temperature=2.0, num_regions=5)
    np.testing.assert_array_equal(np.asarray(t2.lo), np.asarray(lo2))
    np.testing.assert_array_equal(np.asarray(t2.hi), np.asarray(hi2))


def test_targets_is_a_pytree_and_rows_can_be_taken():
    z, y = R.teacher_data(np.random.default_rng(19), 50, 4)
    t = targets.build_targets(z, y)
    idx = np.array([3, 0, 49, 7])
    sub = jax.tree.map(lambda a: a[idx], t)
    assert isinstance(sub, targets.Targets)
    for name in ("logits", "lo", "hi", "correct"):
        np.testing.assert_array_equal(np.asarray(getattr(sub, name)), np.asarray(getattr(t, name))[idx])
    assert len(jax.tree.leaves(t)) == 4
    # Passes through jit as an argument.
    out = jax.jit(lambda t: t.hi - t.lo)(t)
    np.testing.assert_allclose(np.asarray(out), 1 / 12, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Validation: ValueError naming the argument, on concrete (host) inputs
# ----------------------------------------------------------------------------------------------------------


def _good(n=12, k=3):
    return R.teacher_data(np.random.default_rng(0), n, k)


def _bad_cases():
    z, y = _good()
    nan_z = z.copy()
    nan_z[2, 1] = np.nan
    inf_z = z.copy()
    inf_z[3, 0] = np.inf
    all_wrong = z.copy()
    rows = np.arange(len(y))
    all_wrong[rows, y] = z.min(-1) - 1.0
    return [
        ("teacher_logits rank 1", dict(teacher_logits=z[0], labels=y[:1]), "teacher_logits"),
        ("teacher_logits rank 3", dict(teacher_logits=z[None], labels=y), "teacher_logits"),
        ("labels rank 2", dict(teacher_logits=z, labels=y[:, None]), "labels"),
        ("labels length", dict(teacher_logits=z, labels=y[:-1]), "labels|teacher_logits"),
        (
            "labels too large",
            dict(teacher_logits=z, labels=np.where(rows == 4, 3, y).astype(np.int32)),
            "labels",
        ),
        (
            "labels negative",
            dict(teacher_logits=z, labels=np.where(rows == 4, -1, y).astype(np.int32)),
            "labels",
        ),
        ("float labels", dict(teacher_logits=z, labels=y.astype(np.float32)), "labels"),
        ("nan logits", dict(teacher_logits=nan_z, labels=y), "teacher_logits"),
        ("inf logits", dict(teacher_logits=inf_z, labels=y), "teacher_logits"),
        ("num_regions 0", dict(teacher_logits=z, labels=y, num_regions=0), "num_regions"),
        ("num_regions -3", dict(teacher_logits=z, labels=y, num_regions=-3), "num_regions"),
        ("temperature 0", dict(teacher_logits=z, labels=y, temperature=0.0), "temperature"),
        ("temperature < 0", dict(teacher_logits=z, labels=y, temperature=-1.0), "temperature"),
        ("no correct sample", dict(teacher_logits=all_wrong.astype(np.float32), labels=y), "correct"),
        ("unknown ki_mode", dict(teacher_logits=z, labels=y, ki_mode="mean"), "ki_mode|mode"),
        (
            "unknown rectify_mode",
            dict(teacher_logits=z, labels=y, transforms=("rectify",), rectify_mode="flip"),
            "rectify_mode|mode",
        ),
        (
            "unknown transform",
            dict(teacher_logits=z, labels=y, transforms=("knowledge_infusion", "smooth")),
            "transform",
        ),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_build_targets_rejects_bad_input(case):
    _, kwargs, match = case
    with pytest.raises(ValueError, match=match):
        targets.build_targets(**kwargs)


def test_functions_reject_bad_input():
    z, y = _good()
    with pytest.raises(ValueError, match="mode"):
        targets.knowledge_infusion(z, y, mode="median")
    with pytest.raises(ValueError, match="mode"):
        targets.infusion_table(z, y, mode="median")
    with pytest.raises(ValueError, match="mode"):
        targets.rectify_logits(z, y, mode="flip")
    with pytest.raises(ValueError, match="labels"):
        targets.knowledge_infusion(z, np.full_like(y, 3))
    with pytest.raises(ValueError, match="labels"):
        targets.rectify_logits(z, y.astype(np.float32))
    with pytest.raises(ValueError, match="teacher_logits"):
        targets.knowledge_infusion(np.where(z > 1, np.nan, z).astype(np.float32), y)
    with pytest.raises(ValueError, match="logits"):
        targets.debiased_regions(z[0])
    with pytest.raises(ValueError, match="num_regions"):
        targets.debiased_regions(z, num_regions=0)
    with pytest.raises(ValueError, match="temperature"):
        targets.debiased_regions(z, temperature=0.0)
    all_wrong = z.copy()
    all_wrong[np.arange(len(y)), y] = z.min(-1) - 1.0
    for mode in ("pooled", "per_class"):
        with pytest.raises(ValueError, match="correct"):
            targets.knowledge_infusion(all_wrong, y, mode=mode)
        with pytest.raises(ValueError, match="correct"):
            targets.infusion_table(all_wrong, y, mode=mode)


def test_teacher_correct_rejects_bad_input():
    z, y = _good()
    with pytest.raises(ValueError, match="labels"):
        targets.teacher_correct(z, y[:-1])
    with pytest.raises(ValueError, match="teacher_logits"):
        targets.teacher_correct(z[0], y[:1])
