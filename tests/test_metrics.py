"""Tests for pipeline.core.metrics: hand-worked examples, cross-checks against scikit-learn, simulation checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from pipeline.core import metrics as M


def binormal(rng: np.random.Generator, n_neg: int, n_pos: int, d: float) -> tuple[np.ndarray, np.ndarray]:
    """Negatives ~ N(0, 1), positives ~ N(d, 1): true AUROC = Phi(d / sqrt(2))."""
    y = np.r_[np.zeros(n_neg, dtype=int), np.ones(n_pos, dtype=int)]
    s = np.r_[rng.normal(0.0, 1.0, n_neg), rng.normal(d, 1.0, n_pos)]
    return y, s


def delong_variance_bruteforce(y: np.ndarray, s: np.ndarray) -> float:
    """DeLong (1988) straight from the definition: O(m n) kernel psi(x, y) = 1, 1/2, 0."""
    x, w = s[y == 1], s[y == 0]
    psi = (x[:, None] > w[None, :]) + 0.5 * (x[:, None] == w[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return float(np.var(v10, ddof=1) / x.size + np.var(v01, ddof=1) / w.size)


# --------------------------------------------------------------------------- AUROC


def test_auroc_perfect_random_inverted():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 4000)
    perfect = y + rng.uniform(0, 0.5, y.size)
    assert M.auroc(y, perfect) == 1.0
    assert M.auroc(y, -perfect) == 0.0
    assert M.auroc(y, rng.uniform(size=y.size)) == pytest.approx(0.5, abs=0.03)
    assert M.auroc(y, np.zeros(y.size)) == 0.5  # all tied: every pair counts one half


def test_worked_example_auroc_and_delong_variance():
    # positives X = {0.35, 0.8}, negatives Y = {0.1, 0.4}; psi(x, y) = 1 if x > y, 1/2 if tied, else 0.
    #   V10(0.35) = mean(psi(0.35, 0.1), psi(0.35, 0.4)) = (1 + 0) / 2 = 0.5
    #   V10(0.8)  = (1 + 1) / 2 = 1.0
    #   V01(0.1)  = mean(psi(0.35, 0.1), psi(0.8, 0.1)) = (1 + 1) / 2 = 1.0
    #   V01(0.4)  = (0 + 1) / 2 = 0.5
    # AUROC = mean V10 = mean V01 = 0.75 (3 of 4 pairs ordered correctly).
    # S10 = sample variance (ddof 1) of {0.5, 1.0} = 2 * 0.25^2 / 1 = 0.125; S01 likewise 0.125.
    # Var = S10 / m + S01 / n = 0.125 / 2 + 0.125 / 2 = 0.125.
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert M.auroc(y, s) == 0.75
    assert M.delong_auroc_variance(y, s) == 0.125
    low, high = M.delong_ci(y, s)
    half = stats.norm.ppf(0.975) * math.sqrt(0.125)
    assert (low, high) == pytest.approx((max(0.0, 0.75 - half), min(1.0, 0.75 + half)))


def test_delong_variance_matches_definition_with_ties():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    s = np.round(y * 0.8 + rng.normal(size=y.size), 1)  # rounding makes many ties
    assert M.delong_auroc_variance(y, s) == pytest.approx(delong_variance_bruteforce(y, s), rel=1e-12)


def test_delong_ci_and_bootstrap_ci_agree():
    y, s = binormal(np.random.default_rng(3), 300, 300, 1.0)
    d_low, d_high = M.delong_ci(y, s)
    b_low, b_high = M.bootstrap_auroc_ci(y, s, n_resamples=2000, seed=0)
    assert d_low < M.auroc(y, s) < d_high
    assert b_low == pytest.approx(d_low, abs=0.015)
    assert b_high == pytest.approx(d_high, abs=0.015)


def test_delong_test_paired():
    rng = np.random.default_rng(4)
    y, s = binormal(rng, 200, 200, 1.0)
    same = M.delong_test(y, s, s)
    assert same["delta"] == 0.0 and same["z"] == 0.0 and same["p_value"] == 1.0
    better = s + 1.5 * y  # strictly more separated
    res = M.delong_test(y, better, s)
    assert res["auc_a"] == pytest.approx(M.auroc(y, better)) and res["auc_b"] == pytest.approx(M.auroc(y, s))
    assert res["delta"] > 0 and res["p_value"] < 1e-6
    back = M.delong_test(y, s, better)
    assert back["delta"] == pytest.approx(-res["delta"]) and back["p_value"] == pytest.approx(res["p_value"])
    noisy = s + rng.normal(0, 0.05, s.size)  # nearly the same model
    assert M.delong_test(y, s, noisy)["p_value"] > 0.05
    # se^2 = Var(a) + Var(b) - 2 Cov(a, b): for independent-looking scores it is bounded by Var(a) + Var(b) + 2 SDs
    va, vb = M.delong_auroc_variance(y, better), M.delong_auroc_variance(y, s)
    assert res["se"] ** 2 <= va + vb + 2 * math.sqrt(va * vb) + 1e-15


def test_delong_needs_two_per_class():
    with pytest.raises(ValueError, match="two positives"):
        M.delong_auroc_variance([0, 0, 1], [0.1, 0.2, 0.3])


def test_multiclass_auroc_against_sklearn():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, 500)
    logits = rng.normal(size=(500, 4)) + 1.2 * np.eye(4)[y]
    p = special.softmax(logits, axis=1)
    res = M.auroc_multiclass(y, p)
    assert res["macro"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert res["micro"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="micro"))
    assert res["per_class"][2] == pytest.approx(roc_auc_score(y == 2, p[:, 2]))
    raw = M.auroc_multiclass(y, logits)  # any scores are accepted (sklearn's multi_class="ovr" wants probabilities)
    assert raw["macro"] == pytest.approx(roc_auc_score(np.eye(4)[y], logits, average="macro"))
    with pytest.raises(ValueError, match="do not occur"):
        M.auroc_multiclass(np.r_[y[y != 3]], p[y != 3])


def test_one_class_raises():
    with pytest.raises(ValueError, match="one class"):
        M.auroc([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(ValueError, match="0/1"):
        M.auroc([0, 2, 1], [0.2, 0.5, 0.9])


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_reproducible_and_seeded():
    y, s = binormal(np.random.default_rng(6), 60, 40, 1.0)
    a = M.bootstrap_auroc_ci(y, s, n_resamples=300, seed=11)
    assert a == M.bootstrap_auroc_ci(y, s, n_resamples=300, seed=11)
    assert a != M.bootstrap_auroc_ci(y, s, n_resamples=300, seed=12)
    assert a[0] < M.auroc(y, s) < a[1]
    assert all(isinstance(v, float) for v in a)


def test_bootstrap_fast_path_equals_generic_metric():
    y, s = binormal(np.random.default_rng(7), 50, 30, 0.8)
    fast = M.bootstrap_auroc_ci(y, s, n_resamples=200, alpha=0.1, seed=3)
    generic = M.bootstrap_ci(y, s, metric=M.auroc, n_resamples=200, alpha=0.1, seed=3)
    assert fast == pytest.approx(generic, abs=1e-12)


def test_bootstrap_is_stratified():
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1])  # unstratified resampling would often draw no positive
    s = np.arange(8.0)
    counts = M.bootstrap_ci(y, s, metric=lambda yy, ss: float(yy.sum()), n_resamples=500, seed=0)
    assert counts == (2.0, 2.0)
    assert M.bootstrap_auroc_ci(y, s, n_resamples=500) == (1.0, 1.0)


def test_bootstrap_coverage_binormal():
    d = 1.0
    truth = stats.norm.cdf(d / math.sqrt(2.0))
    rng = np.random.default_rng(8)
    hits = 0
    n_sets = 200
    for i in range(n_sets):
        y, s = binormal(rng, 80, 80, d)
        low, high = M.bootstrap_auroc_ci(y, s, n_resamples=200, seed=i)
        hits += low <= truth <= high
    assert 0.88 <= hits / n_sets <= 0.99


def test_bootstrap_multiclass_ci():
    rng = np.random.default_rng(9)
    y = rng.integers(0, 3, 300)
    p = special.softmax(rng.normal(size=(300, 3)) + np.eye(3)[y], axis=1)
    point = M.auroc_multiclass(y, p)
    for average in ("macro", "micro"):
        low, high = M.bootstrap_auroc_multiclass_ci(y, p, average=average, n_resamples=100, seed=1)
        assert low < point[average] < high
        assert high - low < 0.2


# --------------------------------------------------------------------------- operating points


def test_youden_threshold_separable():
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    t = M.youden_threshold(y, s)
    assert t == 0.7
    rep = M.binary_report(y, s, t)
    assert rep["sensitivity"] == 1.0 and rep["specificity"] == 1.0


def test_threshold_for_sensitivity():
    y = np.array([0, 0, 1, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    assert M.threshold_for_sensitivity(y, s, 0.5) == 0.6  # positives 0.6, 0.8 caught
    assert M.threshold_for_sensitivity(y, s, 0.75) == 0.5
    assert M.threshold_for_sensitivity(y, s, 1.0) == 0.3
    for target in (0.1, 0.5, 0.6, 0.9, 1.0):
        t = M.threshold_for_sensitivity(y, s, target)
        assert M.binary_report(y, s, t)["sensitivity"] >= target


def test_binary_report_hand_checked():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.6, 0.2, 0.7, 0.4, 0.3, 0.2, 0.1, 0.05])
    # threshold 0.5: predicted positive = 0.9, 0.8, 0.6 (true) and 0.7 (false)
    # tp = 3, fn = 1, fp = 1, tn = 5
    r = M.binary_report(y, s, 0.5)
    assert r["confusion_matrix"] == [[5, 1], [1, 3]]
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (3, 1, 5, 1)
    assert (r["n"], r["n_positive"], r["n_negative"], r["n_predicted_positive"]) == (10, 4, 6, 4)
    assert r["accuracy"] == pytest.approx(0.8)
    assert r["sensitivity"] == pytest.approx(3 / 4)
    assert r["specificity"] == pytest.approx(5 / 6)
    assert r["balanced_accuracy"] == pytest.approx((3 / 4 + 5 / 6) / 2)
    assert r["ppv"] == pytest.approx(3 / 4)
    assert r["npv"] == pytest.approx(5 / 6)
    assert M.binary_report(y, s, 0.6)["tp"] == 3  # score == threshold counts as positive
    json.dumps(r)  # plain Python types only


def test_binary_report_zero_divisions_are_nan():
    r = M.binary_report([0, 1, 0], [0.1, 0.2, 0.3], threshold=0.9)  # nobody called positive
    assert math.isnan(r["ppv"]) and r["sensitivity"] == 0.0 and r["npv"] == pytest.approx(2 / 3)
    r = M.binary_report([0, 0, 0], [0.1, 0.6, 0.3], threshold=0.5)  # no positives
    assert math.isnan(r["sensitivity"]) and math.isnan(r["balanced_accuracy"]) and r["ppv"] == 0.0
    assert r["confusion_matrix"] == [[2, 1], [0, 0]]


# --------------------------------------------------------------------------- calibration


def test_ece_calibrated_sampler_is_near_zero():
    rng = np.random.default_rng(10)
    p = rng.uniform(size=20_000)
    y = (rng.uniform(size=p.size) < p).astype(int)
    assert M.ece(y, p) < 0.02
    assert M.ece(y, p, strategy="quantile") < 0.02
    assert M.ece(y, np.c_[1 - p, p]) == M.ece(y, p)  # two columns = binary
    # multiclass top-label: labels drawn from the predicted distribution
    probs = rng.dirichlet(np.ones(4) * 0.5, size=20_000)
    labels = (probs.cumsum(axis=1) < rng.uniform(size=(20_000, 1))).sum(axis=1)
    assert M.ece(labels, probs) < 0.02


def test_ece_confidently_wrong_is_large():
    y = np.tile([0, 1], 500)
    p_wrong = np.where(y == 1, 0.01, 0.99)
    assert M.ece(y, p_wrong) > 0.4
    assert M.mce(y, p_wrong) == pytest.approx(0.99)
    probs = np.full((y.size, 3), 0.005)
    probs[np.arange(y.size), 2] = 0.99  # always class 2, never right
    assert M.ece(y, probs) == pytest.approx(0.99)


def test_ece_mce_hand_example():
    # binary, 2 uniform bins [0, .5) and [.5, 1]: bin 1 p = .1, .3 (mean .2), labels 0, 1 (frac .5): gap .3
    # bin 2 p = .6, .8, 1.0 (mean .8), labels 1, 1, 1 (frac 1): gap .2.  ECE = 2/5 * .3 + 3/5 * .2 = .24
    y = [0, 1, 1, 1, 1]
    p = [0.1, 0.3, 0.6, 0.8, 1.0]
    assert M.ece(y, p, n_bins=2) == pytest.approx(0.24)
    assert M.mce(y, p, n_bins=2) == pytest.approx(0.3)
    curve = M.reliability_curve(y, p, n_bins=2)
    np.testing.assert_allclose(curve["confidence"], [0.2, 0.8])
    np.testing.assert_allclose(curve["accuracy"], [0.5, 1.0])
    np.testing.assert_array_equal(curve["count"], [2, 3])


def test_reliability_curve_matches_sklearn_calibration_curve():
    rng = np.random.default_rng(11)
    p = rng.beta(2, 3, 1000)
    y = (rng.uniform(size=p.size) < p**1.3).astype(int)
    for strategy in ("uniform", "quantile"):
        curve = M.reliability_curve(y, p, n_bins=10, strategy=strategy)
        frac_pos, mean_pred = calibration_curve(y, p, n_bins=10, strategy=strategy)
        np.testing.assert_allclose(curve["accuracy"], frac_pos)
        np.testing.assert_allclose(curve["confidence"], mean_pred)
        assert curve["count"].sum() == y.size


def test_brier_and_nll():
    y = np.array([0, 1])
    p = np.array([0.2, 0.6])
    assert M.brier(y, p) == pytest.approx((0.2**2 + 0.4**2) / 2)
    assert M.brier(y, np.c_[1 - p, p]) == pytest.approx(M.brier(y, p))
    assert M.nll(y, p) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    yk = np.array([0, 1, 1])
    expected = np.mean(np.sum((np.eye(3)[yk] - probs) ** 2, axis=1))
    assert M.brier(yk, probs) == pytest.approx(expected)
    assert M.nll(yk, probs) == pytest.approx(-np.mean(np.log([0.7, 0.8, 0.2])))
    with pytest.raises(ValueError, match="logits"):
        M.brier(y, [-1.0, 2.0])
    with pytest.raises(ValueError, match="sum to 1"):
        M.nll(yk, probs * 0.5)


# --------------------------------------------------------------------------- temperature scaling


def test_temperature_recovers_known_temperature_binary():
    rng = np.random.default_rng(12)
    true_logit = rng.normal(0.0, 2.0, 20_000)
    y = (rng.uniform(size=true_logit.size) < special.expit(true_logit)).astype(int)
    logits = 3.0 * true_logit  # over-confident model
    t = M.fit_temperature(logits, y)
    assert t == pytest.approx(3.0, rel=0.1)
    assert M.nll(y, M.apply_temperature(logits, t)) < M.nll(y, special.expit(logits))
    two_col = np.c_[np.zeros_like(logits), logits]  # softmax of [0, z] = sigmoid(z)
    assert M.fit_temperature(two_col, y) == pytest.approx(t, rel=1e-4)
    np.testing.assert_allclose(M.apply_temperature(two_col, t)[:, 1], M.apply_temperature(logits, t))


def test_temperature_recovers_known_temperature_multiclass():
    rng = np.random.default_rng(13)
    true_logits = rng.normal(0.0, 1.5, (20_000, 4))
    probs = special.softmax(true_logits, axis=1)
    y = (probs.cumsum(axis=1) < rng.uniform(size=(probs.shape[0], 1))).sum(axis=1)
    logits = 3.0 * true_logits + rng.normal(0, 5, (probs.shape[0], 1))  # per-row shift: softmax-invariant
    t = M.fit_temperature(logits, y)
    assert t == pytest.approx(3.0, rel=0.1)
    calibrated = M.apply_temperature(logits, t)
    assert M.ece(y, calibrated) < M.ece(y, special.softmax(logits, axis=1))


def test_apply_temperature_is_stable():
    p = M.apply_temperature(np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]]), 0.5)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p[1], 1 / 3)
    q = M.apply_temperature(np.array([-1000.0, 0.0, 1000.0]), 1.0)
    np.testing.assert_allclose(q, [0.0, 0.5, 1.0])
    assert M.fit_temperature(np.array([-800.0, 800.0, -5.0, 5.0]), np.array([0, 1, 1, 0])) > 0
    with pytest.raises(ValueError):
        M.apply_temperature(q, 0.0)


# --------------------------------------------------------------------------- curve points


def test_roc_and_pr_points_are_plain_json():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    roc = M.roc_points(y, s)
    assert roc[0] == {"fpr": 0.0, "tpr": 0.0, "threshold": None}
    assert roc[-1]["fpr"] == 1.0 and roc[-1]["tpr"] == 1.0
    assert np.trapezoid([r["tpr"] for r in roc], [r["fpr"] for r in roc]) == pytest.approx(0.75)
    pr = M.pr_points(y, s)
    assert pr[0] == {"recall": 0.0, "precision": 1.0, "threshold": None}
    assert pr[-1]["recall"] == 1.0
    recalls = [r["recall"] for r in pr]
    assert recalls == sorted(recalls)
    json.dumps({"roc": roc, "pr": pr}, allow_nan=False)


# --------------------------------------------------------------------------- properties


labelled_scores = st.integers(min_value=4, max_value=60).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n).filter(lambda v: 0 < sum(v) < len(v)),
        st.lists(st.integers(-50, 50), min_size=n, max_size=n),
    )
)


@settings(max_examples=60, deadline=None)
@given(labelled_scores)
def test_auroc_invariant_to_monotone_transforms(data):
    y, s = np.array(data[0]), np.array(data[1], dtype=float)
    base = M.auroc(y, s)
    for transformed in (2.5 * s - 7.0, s**3, np.arctan(s / 10.0), special.expit(s / 25.0)):
        assert M.auroc(y, transformed) == pytest.approx(base, abs=1e-12)
    assert M.auroc(y, -s) == pytest.approx(1.0 - base, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.integers(0, 2**32 - 1), st.integers(1, 20), st.sampled_from(["uniform", "quantile"]))
def test_ece_in_unit_interval_and_below_mce(n, seed, n_bins, strategy):
    rng = np.random.default_rng(seed)
    p = rng.uniform(size=n)
    y = rng.integers(0, 2, n)
    e, m = M.ece(y, p, n_bins=n_bins, strategy=strategy), M.mce(y, p, n_bins=n_bins, strategy=strategy)
    assert 0.0 <= e <= m + 1e-12 <= 1.0 + 1e-12
