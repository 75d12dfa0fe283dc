"""Calibration: ECE/MCE (uniform or adaptive bins, top-label for several classes), reliability curves,
Brier, NLL, and temperature scaling. Conventions as in `pipeline.core.metrics`.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize, special
from sklearn.metrics import brier_score_loss, log_loss

from pipeline.core.metric_inputs import _binary_labels, _labels, _labels_for_probs, _probs

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


def fit_temperature_bias(logits, y, bounds: tuple[float, float] = (1e-2, 1e2)) -> tuple[float, np.ndarray]:
    """Temperature T and class biases b (b[0] = 0) minimising the NLL of ``softmax(logits / T + b)``
    on held-out data: temperature scaling plus the bias of Platt scaling (Platt 1999; Guo et al. 2017's
    "vector scaling" with one shared scale). The bias is what temperature alone cannot remove: a
    prior shift, e.g. from class-weighted training or a balanced sampler, moves every logit
    difference by about log(prior ratio), and dividing by T only rescales it.

    The NLL is taken against Platt's smoothed targets: the true class gets (n_k + 1) / (n_k + 2) for
    a class with n_k held-out cases, the other classes share the rest. With a held-out set the model
    separates perfectly (the demo's val split) the plain maximum-likelihood fit has no finite optimum
    (T -> 0, bias -> infinity); the smoothed targets keep it finite and honest about n.

    Parameters: ``logits`` (N, K>=2); ``y`` (N,) labels in 0..K-1. Returns (T, b) with b of shape (K,).
    L-BFGS-B over (log T, b[1:]) from T = 1, b = 0.
    """
    z = _logits(logits)
    y = _labels(y)
    if z.ndim != 2:
        raise ValueError("fit_temperature_bias needs (N, K) class logits")
    k = z.shape[1]
    counts = np.bincount(y, minlength=k).astype(float)
    own = (counts[y] + 1.0) / (counts[y] + 2.0)  # Platt (1999): targets that a finite sample can support
    targets = np.repeat(((1.0 - own) / (k - 1))[:, None], k, axis=1)
    targets[np.arange(len(y)), y] = own

    def nll(theta: np.ndarray) -> float:
        b = np.concatenate([[0.0], theta[1:]])
        return float(-np.mean((targets * special.log_softmax(z / np.exp(theta[0]) + b, axis=1)).sum(axis=1)))

    start = np.zeros(k)
    res = optimize.minimize(nll, start, method="L-BFGS-B",
                            bounds=[(np.log(bounds[0]), np.log(bounds[1]))] + [(-20.0, 20.0)] * (k - 1))
    theta = res.x if res.success and nll(res.x) <= nll(start) else start
    return float(np.exp(theta[0])), np.concatenate([[0.0], theta[1:]])


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
