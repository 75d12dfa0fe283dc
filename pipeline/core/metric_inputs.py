"""Input checks shared by the metric modules (labels, scores, probability matrices, logits), with clear errors."""

from __future__ import annotations

import numpy as np

PROB_SUM_ATOL = 1e-3  # rows of a probability matrix must sum to 1 within this (float32 softmax is ~1e-6)

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
        if not np.allclose(p.sum(axis=1), 1.0, atol=PROB_SUM_ATOL, rtol=0.0):
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
