"""AUROC (binary and one-vs-rest) with stratified-bootstrap and DeLong intervals, and DeLong's paired test.

Conventions as in `pipeline.core.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

from pipeline.core.metric_inputs import _binary_labels, _both_classes, _labels, _scores

_BOOTSTRAP_CHUNK_ELEMENTS = 2_000_000  # resamples are drawn in blocks of about this many indices

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
