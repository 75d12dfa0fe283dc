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

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_curve, roc_curve

from pipeline.core.calibration import apply_temperature, brier, ece, fit_temperature, mce, nll, reliability_curve
from pipeline.core.discrimination import (
    auroc,
    auroc_multiclass,
    bootstrap_auroc_ci,
    bootstrap_auroc_multiclass_ci,
    bootstrap_ci,
    delong_auroc_variance,
    delong_ci,
    delong_test,
)
from pipeline.core.metric_inputs import _binary_labels, _both_classes, _scores

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
