"""Host metrics and the statistics of the reports, against independent computations on fixed numbers."""

import math

import numpy as np
import pytest
from scipy import stats

from debkd_jax import metrics


def _reference_prf(pred, labels, classes):
    """Per-class precision/recall/F1 by counting, averaged over `classes` (0 where undefined), in float64."""
    p, r, f = [], [], []
    for c in classes:
        tp = sum(1 for a, b in zip(pred, labels, strict=True) if a == c and b == c)
        fp = sum(1 for a, b in zip(pred, labels, strict=True) if a == c and b != c)
        fn = sum(1 for a, b in zip(pred, labels, strict=True) if a != c and b == c)
        pc = tp / (tp + fp) if tp + fp else 0.0
        rc = tp / (tp + fn) if tp + fn else 0.0
        p.append(pc)
        r.append(rc)
        f.append(2 * pc * rc / (pc + rc) if pc + rc else 0.0)
    return sum(p) / len(p), sum(r) / len(r), sum(f) / len(f)


def test_binary_metrics_on_fixed_predictions():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    pred = np.array([1, 0, 1, 1, 0, 0, 0, 1])  # tp 3, fn 1, fp 1, tn 3
    logits = np.eye(2)[pred] * 3.0
    teacher = np.eye(2)[np.array([1, 1, 1, 1, 0, 0, 1, 1])]
    got = metrics.classification_metrics(logits, labels, teacher_logits=teacher, region_hits=np.array([1, 0]))
    assert got == pytest.approx(
        {"accuracy": 6 / 8, "precision": 3 / 4, "recall": 3 / 4, "f1": 3 / 4, "agreement": 6 / 8,
         "region_hit_rate": 0.5}
    )


@pytest.mark.parametrize("k", [2, 3, 10])
def test_precision_recall_f1_match_counting(k):
    rng = np.random.default_rng(k)
    labels = rng.integers(0, k, size=300)
    logits = rng.normal(size=(300, k)) + 2.0 * np.eye(k)[labels] * rng.integers(0, 2, size=(300, 1))
    if k > 2:
        logits[:, k - 1] = -100.0  # a class never predicted scores 0 and still counts in the macro mean
    pred = np.argmax(logits, -1)
    got = metrics.classification_metrics(logits, labels, num_classes=k)
    want = _reference_prf(pred.tolist(), labels.tolist(), [1] if k == 2 else list(range(k)))
    np.testing.assert_allclose([got["precision"], got["recall"], got["f1"]], want, rtol=1e-12)
    assert got["accuracy"] == np.mean(pred == labels)


def test_mean_std_is_the_population_std_over_seeds():
    out = metrics.mean_std([{"accuracy": 0.8, "f1": 0.5}, {"accuracy": 0.9}, {"accuracy": 1.0, "f1": 0.7}])
    assert set(out) == {"accuracy"}  # only metrics every run has
    assert out["accuracy"]["mean"] == pytest.approx(0.9) and out["accuracy"]["n"] == 3
    assert out["accuracy"]["std"] == pytest.approx(math.sqrt(((0.1) ** 2 * 2) / 3))


def test_paired_difference_against_fixed_numbers_and_scipy():
    a, b = [0.91, 0.88, 0.90], [0.89, 0.89, 0.86]  # d = 0.02, -0.01, 0.04
    out = metrics.paired_difference(a, b)
    d = np.array([0.02, -0.01, 0.04])
    sd = math.sqrt(np.sum((d - d.mean()) ** 2) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert out["mean"] == pytest.approx(d.mean(), abs=1e-12)
    assert out["std"] == pytest.approx(sd, abs=1e-12)
    np.testing.assert_allclose(out["ci"], [d.mean() - half, d.mean() + half], atol=1e-12)
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    np.testing.assert_allclose(out["ci"], [ci.low, ci.high], atol=1e-12)
    assert (out["wins"], out["ties"], out["n"]) == (2, 0, 3)
    np.testing.assert_allclose(out["per_seed"], d, atol=1e-12)


def test_paired_difference_edge_cases():
    one = metrics.paired_difference([0.9], [0.8])
    assert one["ci"] is None and one["std"] is None and one["wins"] == 1
    same = metrics.paired_difference([0.5, 0.6], [0.5, 0.6])
    assert same["mean"] == 0 and same["ci"] == [0.0, 0.0] and same["ties"] == 2 and same["wins"] == 0
    wider = metrics.paired_difference([0.91, 0.88, 0.90], [0.89, 0.89, 0.86], confidence=0.99)
    narrow = metrics.paired_difference([0.91, 0.88, 0.90], [0.89, 0.89, 0.86], confidence=0.9)
    assert wider["ci"][0] < narrow["ci"][0] < narrow["ci"][1] < wider["ci"][1]
    with pytest.raises(ValueError, match="equal, non-empty"):
        metrics.paired_difference([0.1, 0.2], [0.1])
