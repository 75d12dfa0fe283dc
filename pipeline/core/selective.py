"""Fitting the decision rule on held-out predictions, and what referral buys (pure).

`fit_rule` fits the temperature and the operating point on held-out logits: the validation split
(K = 1) or every training case's out-of-fold logits (K > 1, each from the fold model that did not
train on it). `selective_curve` is the risk-coverage curve of selective prediction (Geifman &
El-Yaniv 2017): the most certain fraction of cases kept, AUROC and error rate on them.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import EvaluateConfig
from pipeline.core import metrics as M
from pipeline.core import multilabel
from pipeline.core.calibration import fit_temperature_bias
from pipeline.core.classifier import DecisionRule


def fit_rule(logits: np.ndarray, y: np.ndarray, class_names: tuple[str, ...], cfg: EvaluateConfig) -> DecisionRule:
    """Temperature (NLL on the held-out logits) and, for binary models, the threshold of
    `evaluate.operating_point` on the calibrated held-out probabilities; TTA and referral recorded.
    Multi-label labels (N, L): one shared temperature and a threshold per label (`core.multilabel`)."""
    if np.asarray(y).ndim == 2:
        return multilabel.fit_rule(logits, y, class_names, cfg)
    bias = None
    if cfg.calibration == "temperature_bias" and len(np.unique(y)) == logits.shape[1]:
        temperature, b = fit_temperature_bias(logits, y)
        bias = tuple(float(v) for v in b)
    else:  # temperature only (also when a class is missing from the held-out cases: no bias to fit for it)
        temperature = M.fit_temperature(logits, y)
    threshold = None
    base = DecisionRule(float(temperature), None, tuple(class_names), bias=bias)
    if logits.shape[1] == 2:
        if len(np.unique(y)) < 2:
            threshold = 0.5  # one class held out: no ROC to choose from; the calibrated 0.5 is the honest default
        else:
            score = base.probs(logits)[:, 1]
            threshold = (M.youden_threshold(y, score) if cfg.operating_point == "youden"
                         else M.threshold_for_sensitivity(y, score, cfg.target_sensitivity))
    return DecisionRule(float(temperature), threshold, tuple(class_names), cfg.operating_point, cfg.tta,
                        cfg.referral.band, cfg.referral.max_spread, bias=bias)


def discrimination(y: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUROC of class 1, or macro one-vs-rest; NaN with one class present. Multi-label (N, L):
    the macro AUROC over the labels with both classes present."""
    if np.asarray(y).ndim == 2:
        return multilabel.macro_auroc(y, probs)
    if len(np.unique(y)) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(M.auroc(y, probs[:, 1]))
    if len(np.unique(y)) == probs.shape[1]:
        return float(M.auroc_multiclass(y, probs)["macro"])
    return float("nan")


def certainty_order(uncertainty: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """Cases from most to least certain: lowest views' spread first, ties by the larger margin."""
    return np.lexsort((-np.asarray(margin), np.asarray(uncertainty)))


def selective_curve(y: np.ndarray, probs: np.ndarray, decisions: np.ndarray, uncertainty: np.ndarray,
                    margin: np.ndarray, steps: int = 20) -> list[dict]:
    """(coverage, n, AUROC, error rate) keeping the most certain cases, at coverage 1/steps ... 1.
    Multi-label: macro AUROC, and the error rate over every (case, label) decision (Hamming)."""
    order = certainty_order(uncertainty, margin)
    n = len(y)
    rows = []
    for i in range(1, steps + 1):
        k = max(1, int(round(n * i / steps)))
        keep = order[:k]
        auc = discrimination(y[keep], probs[keep])
        rows.append({"coverage": round(k / n, 4) if n else 0.0, "n": int(k),
                     "auroc": None if np.isnan(auc) else round(auc, 4),
                     "error_rate": round(float((decisions[keep] != y[keep]).mean()), 4)})
    return rows


def referral_summary(y: np.ndarray, probs: np.ndarray, decisions: np.ndarray, referred: np.ndarray) -> dict:
    """How many cases go to a human, and how the automatic decisions fare on the rest (multi-label:
    error rates over every (case, label) decision)."""
    auto = ~np.asarray(referred, dtype=bool)
    out = {"n": int(len(y)), "n_referred": int((~auto).sum()),
           "referral_rate": round(float((~auto).mean()), 4) if len(y) else None,
           "error_rate_all": round(float((decisions != y).mean()), 4) if len(y) else None,
           "error_rate_automatic": round(float((decisions[auto] != y[auto]).mean()), 4) if auto.any() else None}
    auc = discrimination(y[auto], probs[auto]) if auto.any() else float("nan")
    out["auroc_automatic"] = None if np.isnan(auc) else round(auc, 4)
    return out


__all__ = ["certainty_order", "discrimination", "fit_rule", "referral_summary", "selective_curve"]
