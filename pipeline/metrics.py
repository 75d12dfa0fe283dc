"""Evaluation metrics: discrimination (AUROC with bootstrap and DeLong intervals), operating points,
calibration (ECE/MCE, Brier, NLL, reliability curves) and temperature scaling.

All functions are pure: numpy arrays in, plain floats / dicts / arrays out; nothing is stored.

Conventions (shared by every function here):

* ``y`` is a 1-D array of integer labels. Binary labels are 0/1 with 1 = positive (disease);
  multiclass labels are 0..K-1, matching the columns of ``probs`` / ``logits``.
* ``score`` is a 1-D array of real-valued scores, higher = more likely positive (a probability,
  a logit, anything monotone). A case is called positive when ``score >= threshold``.
* ``probs`` is either a 1-D array of positive-class probabilities (binary) or an (N, K) array of
  class probabilities whose rows sum to 1. An (N, 2) array is treated as binary and reduced to its
  column 1, so ``f(y, p)`` and ``f(y, np.c_[1 - p, p])`` give the same answer.
* AUROC, sensitivity, ECE, ... are fractions in [0, 1], never percentages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from scipy import optimize, special, stats
from sklearn.metrics import (
    brier_score_loss,
    confusion_matrix,
    log_loss,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

__all__ = [
    "apply_temperature",
    "auroc",
    "auroc_multiclass",
    "binary_report",
    "bootstrap_auroc_ci",
    "bootstrap_auroc_multiclass_ci",
    "bootstrap_ci",
    "brier",
    "delong_auroc_variance",
    "delong_ci",
    "delong_test",
    "ece",
    "fit_temperature",
    "mce",
    "nll",
    "pr_points",
    "reliability_curve",
    "roc_points",
    "threshold_for_sensitivity",
    "youden_threshold",
]

_PROB_SUM_ATOL = 1e-3  # rows of a probability matrix must sum to 1 within this (float32 softmax is ~1e-6)
_BOOTSTRAP_CHUNK_ELEMENTS = 2_000_000  # resamples are drawn in blocks of about this many indices


# --------------------------------------------------------------------------- input checks


def _labels(y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"y must be a non-empty 1-D array of labels, got shape {y.shape}")
    if y.dtype == bool:
        return y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.number) or not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
        raise ValueError("y must hold integer class labels")
    return y.astype(np.int64)


def _binary_labels(y) -> np.ndarray:
    y = _labels(y)
    if np.any((y != 0) & (y != 1)):
        raise ValueError(f"binary y must be 0/1, got labels {np.unique(y).tolist()}")
    return y


def _both_classes(y: np.ndarray) -> None:
    if y.min() == y.max():
        raise ValueError("y holds only one class; AUROC and thresholds need positives and negatives")


def _scores(score, n: int) -> np.ndarray:
    s = np.asarray(score, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.ndim != 1:
        raise ValueError(f"score must be 1-D (one score per case), got shape {s.shape}")
    if s.shape[0] != n:
        raise ValueError(f"score has {s.shape[0]} entries but y has {n}")
    if not np.all(np.isfinite(s)):
        raise ValueError("score contains NaN or infinite values")
    return s


def _probs(probs, n: int) -> np.ndarray:
    """Return probabilities as 1-D (binary, positive class) or (N, K>=3); an (N, 2) matrix becomes its column 1."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    if p.ndim not in (1, 2) or p.shape[0] != n:
        raise ValueError(f"probs must be (N,) or (N, K) with N = {n}, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("probs must be finite and in [0, 1] (pass probabilities, not logits)")
    if p.ndim == 2:
        if not np.allclose(p.sum(axis=1), 1.0, atol=_PROB_SUM_ATOL, rtol=0.0):
            raise ValueError("rows of probs must sum to 1")
        if p.shape[1] == 2:
            p = p[:, 1]
    return p


def _labels_for_probs(y, p: np.ndarray) -> np.ndarray:
    if p.ndim == 1:
        return _binary_labels(y)
    y = _labels(y)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must lie in 0..{p.shape[1] - 1} to match the columns of probs")
    return y


# --------------------------------------------------------------------------- AUROC


def auroc(y, score) -> float:
    """Area under the ROC curve of a binary classifier.

    Parameters: ``y`` (N,) 0/1 labels; ``score`` (N,) real scores, higher = more likely positive.
    Returns: AUROC in [0, 1] (ties count one half). Raises ValueError when ``y`` holds one class only.
    """
    y = _binary_labels(y)
    s = _scores(score, y.size)
    _both_classes(y)
    return float(roc_auc_score(y, s))


def auroc_multiclass(y, probs) -> dict[str, float]:
    """One-vs-rest AUROC of a K-class classifier.

    Parameters: ``y`` (N,) labels in 0..K-1; ``probs`` (N, K) class scores (probabilities or logits; rows need
    not sum to 1 here). Every class must occur in ``y``.
    Returns: ``{"macro": mean of the K per-class AUROCs, "micro": AUROC of the pooled N*K one-vs-rest
    decisions, "per_class": [K floats]}``.
    """
    y = _labels(y)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.size or p.shape[1] < 2:
        raise ValueError(f"probs must be (N, K) with N = {y.size} and K >= 2, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN or infinite values")
    k = p.shape[1]
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"labels must lie in 0..{k - 1}")
    missing = sorted(set(range(k)) - set(np.unique(y).tolist()))
    if missing:
        raise ValueError(f"classes {missing} do not occur in y; their one-vs-rest AUROC is undefined")
    onehot = np.eye(k, dtype=np.int64)[y]
    per_class = roc_auc_score(onehot, p, average=None)
    return {
        "macro": float(np.mean(per_class)),
        "micro": float(roc_auc_score(onehot, p, average="micro")),
        "per_class": [float(a) for a in per_class],
    }


# --------------------------------------------------------------------------- bootstrap


def _stratified_resamples(y: np.ndarray, n_resamples: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Yield (b, N) blocks of resample indices; each row redraws every class with replacement at its own size.

    Columns are grouped by class (sorted labels), so column j always holds a case of the same class.
    """
    members = [np.flatnonzero(y == c) for c in np.unique(y)]
    chunk = max(1, min(n_resamples, _BOOTSTRAP_CHUNK_ELEMENTS // y.size))
    done = 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        yield np.concatenate([m[rng.integers(0, m.size, size=(b, m.size))] for m in members], axis=1)
        done += b


def _percentile_interval(stats_: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.nanquantile(stats_, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def _check_bootstrap_args(n_resamples: int, alpha: float) -> None:
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")


def bootstrap_ci(y, score, metric: Callable[[np.ndarray, np.ndarray], float], n_resamples: int = 1000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Stratified percentile-bootstrap confidence interval of any ``metric(y, score) -> float``.

    Parameters: ``y`` (N,) integer labels (binary or multiclass); ``score`` array with N rows, passed row-indexed
    to ``metric``; ``n_resamples`` bootstrap replicates; ``alpha`` 1 - confidence level; ``seed`` for
    ``numpy.random.default_rng``.
    Each replicate resamples every class separately with replacement at its observed size, so every replicate
    has the original class counts (AUROC is always defined). Replicates where ``metric`` returns NaN are ignored.
    Returns: ``(low, high)``, the alpha/2 and 1 - alpha/2 quantiles of the replicate metrics, in metric units.
    """
    _check_bootstrap_args(n_resamples, alpha)
    y = _labels(y)
    s = np.asarray(score)
    if s.shape[0] != y.size:
        raise ValueError(f"score has {s.shape[0]} rows but y has {y.size}")
    rng = np.random.default_rng(seed)
    values = [float(metric(y[row], s[row])) for block in _stratified_resamples(y, n_resamples, rng) for row in block]
    return _percentile_interval(np.asarray(values), alpha)


def bootstrap_auroc_ci(y, score, n_resamples: int = 1000, alpha: float = 0.05,
                       seed: int = 0) -> tuple[float, float]:
    """Stratified percentile-bootstrap confidence interval of the binary AUROC.

    Parameters and resampling as :func:`bootstrap_ci` with ``metric=auroc`` (same seed -> same replicates and the
    same interval), but vectorised: replicate AUROCs come from midranks (Mann-Whitney), not a Python loop.
    Returns: ``(low, high)`` in AUROC units.
    """
    _check_bootstrap_args(n_resamples, alpha)
    y = _binary_labels(y)
    s = _scores(score, y.size)
    _both_classes(y)
    n_neg = int(np.sum(y == 0))
    n_pos = y.size - n_neg
    rng = np.random.default_rng(seed)
    values = []
    for block in _stratified_resamples(y, n_resamples, rng):  # columns: n_neg negatives, then n_pos positives
        ranks = stats.rankdata(s[block], axis=1)
        values.append((ranks[:, n_neg:].sum(axis=1) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
    return _percentile_interval(np.concatenate(values), alpha)


def bootstrap_auroc_multiclass_ci(y, probs, average: str = "macro", n_resamples: int = 1000, alpha: float = 0.05,
                                  seed: int = 0) -> tuple[float, float]:
    """Stratified percentile-bootstrap confidence interval of the one-vs-rest multiclass AUROC.

    Parameters: as :func:`auroc_multiclass`; ``average`` is ``"macro"`` or ``"micro"``; the rest as
    :func:`bootstrap_ci`. Returns: ``(low, high)`` in AUROC units.
    """
    if average not in ("macro", "micro"):
        raise ValueError("average must be 'macro' or 'micro'")
    return bootstrap_ci(y, np.asarray(probs, dtype=np.float64), lambda yy, pp: auroc_multiclass(yy, pp)[average],
                        n_resamples=n_resamples, alpha=alpha, seed=seed)


# --------------------------------------------------------------------------- DeLong
# scikit-learn and scipy have no DeLong estimator, so it is written here: the fast O(N log N) algorithm of
# Sun & Xu (2014, IEEE Signal Process. Lett. 21:1389) that gets DeLong's structural components from midranks.


def _delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For (k, N) scores return AUROCs (k,), V10 (k, m) over the m positives and V01 (k, n) over the n negatives.

    V10_i = P(score of negative < score of positive i) (+ half the ties); V01_j = P(score of negative j < score of
    a positive) (+ half the ties); the AUROC is the mean of either.
    """
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    if m < 2 or n < 2:
        raise ValueError("DeLong's variance needs at least two positives and two negatives")
    tx = stats.rankdata(pos, axis=1)  # midranks within positives
    ty = stats.rankdata(neg, axis=1)  # midranks within negatives
    tz = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # midranks in the pooled sample
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    aucs = v10.mean(axis=1)
    return aucs, v10, v01


def _delong_covariance(v10: np.ndarray, v01: np.ndarray) -> np.ndarray:
    """DeLong covariance matrix (k, k) of k correlated AUROCs: S10 / m + S01 / n (sample covariances, ddof=1)."""
    s10 = np.atleast_2d(np.cov(v10))
    s01 = np.atleast_2d(np.cov(v01))
    return s10 / v10.shape[1] + s01 / v01.shape[1]


def delong_auroc_variance(y, score) -> float:
    """DeLong's (1988) nonparametric variance of the empirical AUROC, computed with midranks (Sun & Xu 2014).

    Parameters: ``y`` (N,) 0/1 labels with at least two of each class; ``score`` (N,) real scores.
    Returns: the variance (AUROC units squared); 0 for perfectly separated data.
    """
    y = _binary_labels(y)
    s = _scores(score, y.size)
    _, v10, v01 = _delong_components(y, s[None, :])
    return float(_delong_covariance(v10, v01)[0, 0])


def delong_ci(y, score, alpha: float = 0.05) -> tuple[float, float]:
    """Wald confidence interval ``AUROC -/+ z_(1-alpha/2) * sqrt(DeLong variance)``, clipped to [0, 1].

    Parameters: as :func:`delong_auroc_variance`; ``alpha`` 1 - confidence level.
    Returns: ``(low, high)`` in AUROC units (degenerate ``(1, 1)`` for perfectly separated data).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")
    y = _binary_labels(y)
    s = _scores(score, y.size)
    aucs, v10, v01 = _delong_components(y, s[None, :])
    half = stats.norm.ppf(1.0 - alpha / 2.0) * np.sqrt(_delong_covariance(v10, v01)[0, 0])
    return float(np.clip(aucs[0] - half, 0.0, 1.0)), float(np.clip(aucs[0] + half, 0.0, 1.0))


def delong_test(y, score_a, score_b) -> dict[str, float]:
    """DeLong's paired test of two AUROCs measured on the same cases (H0: equal AUROC), two-sided.

    Parameters: ``y`` (N,) 0/1 labels with at least two of each class; ``score_a``, ``score_b`` (N,) scores of the
    two models for the same cases in the same order.
    Returns: ``{"auc_a", "auc_b", "delta" (= auc_a - auc_b), "se" (standard error of delta), "z", "p_value"}``.
    Identical scores give ``delta = 0, z = 0, p_value = 1``.
    """
    y = _binary_labels(y)
    s = np.stack([_scores(score_a, y.size), _scores(score_b, y.size)])
    aucs, v10, v01 = _delong_components(y, s)
    cov = _delong_covariance(v10, v01)
    delta = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    se = float(np.sqrt(max(var, 0.0)))
    if se > 1e-12:
        z = delta / se
    else:  # no sampling variability in the difference
        z = 0.0 if abs(delta) < 1e-12 else float(np.copysign(np.inf, delta))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "delta": delta, "se": se, "z": float(z),
            "p_value": float(2.0 * stats.norm.sf(abs(z)))}


# --------------------------------------------------------------------------- operating points


def youden_threshold(y, score) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1 on the empirical ROC curve.

    Parameters: ``y`` (N,) 0/1 labels; ``score`` (N,) real scores. Rule: positive when ``score >= threshold``.
    Returns: the threshold (one of the observed scores; the highest one when several maximise J).
    """
    y = _binary_labels(y)
    s = _scores(score, y.size)
    _both_classes(y)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    j = tpr - fpr
    j[~np.isfinite(thr)] = -np.inf  # the (0, 0) point calls nobody positive
    return float(thr[int(np.argmax(j))])


def threshold_for_sensitivity(y, score, target: float) -> float:
    """Highest threshold whose sensitivity is at least ``target`` (so the best specificity at that sensitivity).

    Parameters: ``y`` (N,) 0/1 labels; ``score`` (N,) real scores; ``target`` sensitivity in (0, 1].
    Rule: positive when ``score >= threshold``. Returns: the threshold (one of the observed scores).
    """
    if not 0.0 < target <= 1.0:
        raise ValueError("target sensitivity must be in (0, 1]")
    y = _binary_labels(y)
    s = _scores(score, y.size)
    _both_classes(y)
    _, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    idx = int(np.argmax(tpr >= target - 1e-12))  # tpr is non-decreasing and ends at 1
    return float(thr[idx])


def _ratio(num: int, den: int) -> float:
    return float(num) / den if den else float("nan")


def binary_report(y, score, threshold: float) -> dict:
    """Confusion-matrix statistics of the decision ``score >= threshold``.

    Parameters: ``y`` (N,) 0/1 labels; ``score`` (N,) real scores; ``threshold`` in score units.
    Returns: dict of floats ``accuracy, balanced_accuracy, sensitivity, specificity, ppv, npv`` (NaN where the
    denominator is 0; balanced accuracy is NaN unless both classes occur), ints ``tp, fp, tn, fn, n,
    n_positive, n_negative, n_predicted_positive``, ``threshold``, and ``confusion_matrix`` ``[[tn, fp], [fn, tp]]``
    (rows = truth, columns = decision).
    """
    y = _binary_labels(y)
    s = _scores(score, y.size)
    pred = (s >= threshold).astype(np.int64)
    (tn, fp), (fn, tp) = confusion_matrix(y, pred, labels=[0, 1]).tolist()
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {
        "threshold": float(threshold),
        "accuracy": _ratio(tp + tn, y.size),
        "balanced_accuracy": (sens + spec) / 2.0,
        "sensitivity": sens,
        "specificity": spec,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "n": int(y.size), "n_positive": tp + fn, "n_negative": tn + fp, "n_predicted_positive": tp + fp,
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


# --------------------------------------------------------------------------- calibration
# ECE / MCE / per-bin reliability are written here: scikit-learn's calibration_curve is binary-only, drops the
# bin counts and has no top-label (multiclass) mode.


def _confidence_and_outcome(y, probs) -> tuple[np.ndarray, np.ndarray]:
    """Binary: (positive-class probability, label). Multiclass: (top-label probability, 1 if argmax is right)."""
    y = _labels(y)
    p = _probs(probs, y.size)
    y = _labels_for_probs(y, p)
    if p.ndim == 1:
        return p, y.astype(np.float64)
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)


def _bin_edges(conf: np.ndarray, n_bins: int, strategy: str) -> np.ndarray:
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, n_bins + 1)
    if strategy == "quantile":
        edges = np.quantile(conf, np.linspace(0.0, 1.0, n_bins + 1))
        edges[0], edges[-1] = 0.0, 1.0
        return edges
    raise ValueError("strategy must be 'uniform' or 'quantile'")


def _binned(y, probs, n_bins: int, strategy: str) -> dict[str, np.ndarray]:
    conf, outcome = _confidence_and_outcome(y, probs)
    edges = _bin_edges(conf, n_bins, strategy)
    # bins are [lo, hi) except the last, which includes 1.0 (as sklearn.calibration.calibration_curve)
    idx = np.searchsorted(edges[1:-1], conf, side="right")
    count = np.bincount(idx, minlength=n_bins)
    keep = count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        mean_out = np.bincount(idx, weights=outcome, minlength=n_bins) / count
    return {"bin_lower": edges[:-1][keep], "bin_upper": edges[1:][keep], "confidence": mean_conf[keep],
            "accuracy": mean_out[keep], "count": count[keep]}


def ece(y, probs, n_bins: int = 15, strategy: str = "uniform") -> float:
    """Expected calibration error: sum over bins of (bin share of cases) * |accuracy - mean confidence|.

    Parameters: ``y`` (N,) labels; ``probs`` (N,) positive-class probabilities (binary: bins the predicted risk and
    compares it with the fraction positive) or (N, K>=3) class probabilities (top-label: bins max probability and
    compares it with the fraction correct); ``n_bins``; ``strategy`` ``"uniform"`` (equal-width bins on [0, 1])
    or ``"quantile"`` (equal-count bins). Returns: ECE in [0, 1].
    """
    b = _binned(y, probs, n_bins, strategy)
    return float(np.sum(b["count"] * np.abs(b["accuracy"] - b["confidence"])) / np.sum(b["count"]))


def mce(y, probs, n_bins: int = 15, strategy: str = "uniform") -> float:
    """Maximum calibration error: the largest |accuracy - mean confidence| over non-empty bins.

    Parameters and binning as :func:`ece`. Returns: MCE in [0, 1].
    """
    b = _binned(y, probs, n_bins, strategy)
    return float(np.max(np.abs(b["accuracy"] - b["confidence"])))


def reliability_curve(y, probs, n_bins: int = 15, strategy: str = "uniform") -> dict[str, np.ndarray]:
    """Per-bin data for a reliability diagram; empty bins are left out.

    Parameters and binning as :func:`ece`.
    Returns: dict of equal-length 1-D arrays ``bin_lower, bin_upper`` (bin edges), ``confidence`` (mean predicted
    probability; top-label for multiclass), ``accuracy`` (fraction positive for binary, fraction correct for
    multiclass), ``count`` (cases in the bin).
    """
    return _binned(y, probs, n_bins, strategy)


def brier(y, probs) -> float:
    """Brier score (scikit-learn's ``brier_score_loss``): mean over cases of the squared error against one-hot truth.

    Parameters: ``y`` (N,) labels; ``probs`` (N,) positive-class probabilities or (N, K) class probabilities.
    Returns: binary (1-D or 2 columns): mean (p - y)^2 in [0, 1]; K >= 3: mean over cases of the sum over classes
    of (p_k - onehot_k)^2, in [0, 2].
    """
    y = _labels(y)
    p = _probs(probs, y.size)
    y = _labels_for_probs(y, p)
    if p.ndim == 1:
        return float(brier_score_loss(y, p, labels=[0, 1]))
    return float(brier_score_loss(y, p, labels=list(range(p.shape[1]))))


def nll(y, probs) -> float:
    """Mean negative log-likelihood (log loss, natural log) of the true labels.

    Parameters: ``y`` (N,) labels; ``probs`` (N,) positive-class probabilities or (N, K) class probabilities
    (probabilities are clipped away from 0 and 1 by scikit-learn). Returns: NLL in nats per case, >= 0.
    """
    y = _labels(y)
    p = _probs(probs, y.size)
    y = _labels_for_probs(y, p)
    labels = [0, 1] if p.ndim == 1 else list(range(p.shape[1]))
    return float(log_loss(y, p, labels=labels))


# --------------------------------------------------------------------------- temperature scaling
# Written here because scikit-learn's CalibratedClassifierCV wraps an estimator (and its temperature method works
# on the estimator's outputs), while here only stored validation logits are available.


def _logits(logits, n: int | None = None) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 2 and z.shape[1] == 1:
        z = z[:, 0]
    if z.ndim not in (1, 2) or (z.ndim == 2 and z.shape[1] < 2):
        raise ValueError(f"logits must be (N,) or (N, K>=2), got shape {z.shape}")
    if n is not None and z.shape[0] != n:
        raise ValueError(f"logits has {z.shape[0]} rows but y has {n}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or infinite values")
    return z


def _nll_from_logits(z: np.ndarray, y: np.ndarray) -> float:
    if z.ndim == 1:  # binary cross-entropy with logits: log(1 + e^z) - y z
        return float(np.mean(np.logaddexp(0.0, z) - y * z))
    return float(-np.mean(special.log_softmax(z, axis=1)[np.arange(y.size), y]))


def fit_temperature(logits, y, bounds: tuple[float, float] = (1e-2, 1e2)) -> float:
    """Temperature T > 0 minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017) on validation data.

    Parameters: ``logits`` (N,) one logit per case (binary, sigmoid), or (N, K>=2) class logits (softmax; K = 2 is
    binary); ``y`` (N,) labels in 0..K-1 (0/1 for one logit); ``bounds`` search range for T.
    Minimises over log T with ``scipy.optimize.minimize_scalar(method="bounded")``.
    Returns: T (dimensionless; > 1 softens over-confident logits). A value at a bound means the optimum lies
    outside ``bounds``.
    """
    z = _logits(logits)
    y = _binary_labels(y) if z.ndim == 1 else _labels(y)
    if y.size != z.shape[0]:
        raise ValueError(f"logits has {z.shape[0]} rows but y has {y.size}")
    if z.ndim == 2 and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels must lie in 0..{z.shape[1] - 1}")
    lo, hi = bounds
    if not 0.0 < lo < hi:
        raise ValueError("bounds must satisfy 0 < low < high")
    res = optimize.minimize_scalar(lambda log_t: _nll_from_logits(z / np.exp(log_t), y), method="bounded",
                                   bounds=(np.log(lo), np.log(hi)), options={"xatol": 1e-6})
    return float(np.exp(res.x))


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """Calibrated probabilities from logits divided by a temperature.

    Parameters: ``logits`` (N,) binary logits or (N, K) class logits; ``temperature`` T > 0 (from
    :func:`fit_temperature`).
    Returns: (N,) positive-class probabilities ``sigmoid(z / T)`` or (N, K) rows ``softmax(z / T)``.
    """
    if not temperature > 0.0:
        raise ValueError("temperature must be > 0")
    z = _logits(logits) / float(temperature)
    if z.ndim == 1:
        return special.expit(z)
    return special.softmax(z, axis=1)


# --------------------------------------------------------------------------- curve points for DVC plots


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None  # JSON has no Infinity


def roc_points(y, score, drop_intermediate: bool = True) -> list[dict[str, float | None]]:
    """ROC curve as rows for a DVC plots JSON/CSV file.

    Parameters: ``y`` (N,) 0/1 labels; ``score`` (N,) real scores; ``drop_intermediate`` drops collinear points
    (as ``sklearn.metrics.roc_curve``).
    Returns: list of ``{"fpr", "tpr", "threshold"}`` from (0, 0) to (1, 1); the first point's threshold (nobody
    called positive; +inf in scikit-learn) is ``None``.
    """
    y = _binary_labels(y)
    s = _scores(score, y.size)
    _both_classes(y)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=drop_intermediate)
    return [{"fpr": float(f), "tpr": float(t), "threshold": _finite_or_none(h)} for f, t, h in zip(fpr, tpr, thr)]


def pr_points(y, score) -> list[dict[str, float | None]]:
    """Precision-recall curve as rows for a DVC plots JSON/CSV file.

    Parameters: ``y`` (N,) 0/1 labels; ``score`` (N,) real scores.
    Returns: list of ``{"recall", "precision", "threshold"}`` in order of increasing recall (
    ``sklearn.metrics.precision_recall_curve`` reversed), starting at (recall 0, precision 1), whose threshold is
    ``None``.
    """
    y = _binary_labels(y)
    s = _scores(score, y.size)
    _both_classes(y)
    precision, recall, thr = precision_recall_curve(y, s)
    thr_full = np.append(thr, np.inf)
    rows = [{"recall": float(r), "precision": float(p), "threshold": _finite_or_none(h)}
            for r, p, h in zip(recall, precision, thr_full)]
    return rows[::-1]
