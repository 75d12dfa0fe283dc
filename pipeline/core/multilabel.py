"""Multi-label classification (pure): several independent 0/1 findings per case, one sigmoid each.

Conventions: ``y`` (N, L) 0/1; ``logits`` (N, L), one per label; ``probs`` (N, L) = sigmoid(logits / T),
whose rows need not sum to 1. One label's logit z is the binary problem whose two-class logits are
(0, z): softmax((0, z) / T) = (1 - sigmoid(z / T), sigmoid(z / T)), so every single-label binary metric
applies to each label unchanged (`as_binary_logits`).

Calibration: ONE temperature shared by all labels, minimising the mean binary cross-entropy (the NLL)
of every (case, label) pair of the held-out logits (`fit_shared_temperature`); per-label thresholds at
`evaluate.operating_point` on the calibrated held-out probabilities of each label (0.5 for a label with
one class held out). Summaries: per-label metrics and their macro mean over the labels where they are
defined; the macro AUROC's bootstrap interval resamples whole cases, so the labels stay paired.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import special, stats

from pipeline.config import EvaluateConfig
from pipeline.core import metrics as M
from pipeline.core.classifier import DecisionRule

_CHUNK_ELEMENTS = 2_000_000  # bootstrap resamples are drawn in blocks of about this many indices
# Per-label keys averaged into the macro summary (the gate reads auroc_ci95 and ece_calibrated).
MACRO_KEYS = ("auroc", "sensitivity", "specificity", "ppv", "npv", "accuracy", "balanced_accuracy", "ece",
              "ece_calibrated", "ece_adaptive", "ece_adaptive_calibrated", "mce", "mce_calibrated", "brier",
              "brier_calibrated", "nll", "nll_calibrated")


def as_binary_logits(z: np.ndarray) -> np.ndarray:
    """(n,) label logits -> (n, 2) two-class logits (0, z), whose softmax is the label's sigmoid."""
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    return np.stack([np.zeros_like(z), z], axis=1)


def sigmoid(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return special.expit(np.asarray(logits, dtype=np.float64) / float(temperature))


def fit_shared_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """One T > 0 for every label: minimises the BCE of sigmoid(logits / T) over all (case, label) pairs."""
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(y)
    if not z.size:
        return 1.0
    return M.fit_temperature(z.reshape(-1), y.reshape(-1))


def fit_thresholds(y: np.ndarray, probs: np.ndarray, operating_point: str, target_sensitivity: float
                   ) -> tuple[float, ...]:
    """Per label: the threshold of the operating point on its calibrated probabilities (0.5 with one class)."""
    out = []
    for k in range(probs.shape[1]):
        yk, pk = y[:, k], probs[:, k]
        if len(np.unique(yk)) < 2:
            out.append(0.5)
        elif operating_point == "youden":
            out.append(float(M.youden_threshold(yk, pk)))
        else:
            out.append(float(M.threshold_for_sensitivity(yk, pk, target_sensitivity)))
    return tuple(out)


def fit_rule(logits: np.ndarray, y: np.ndarray, names: tuple[str, ...], cfg: EvaluateConfig) -> DecisionRule:
    """The multi-label decision rule from held-out logits (N, L) and labels (N, L)."""
    temperature = fit_shared_temperature(logits, y)
    thresholds = fit_thresholds(y, sigmoid(logits, temperature), cfg.operating_point, cfg.target_sensitivity)
    return DecisionRule(float(temperature), None, tuple(names), cfg.operating_point, cfg.tta, cfg.referral.band,
                        cfg.referral.max_spread, task="multi_label", thresholds=thresholds)


# --------------------------------------------------------------------------- discrimination
def label_aurocs(y: np.ndarray, probs: np.ndarray) -> list[float]:
    """Per label AUROC; NaN for a label with one class in `y`."""
    return [float(M.auroc(y[:, k], probs[:, k])) if len(np.unique(y[:, k])) > 1 else float("nan")
            for k in range(y.shape[1])]


def macro_auroc(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean AUROC over the labels where it is defined (both classes present); NaN where none is."""
    aucs = [a for a in label_aurocs(np.asarray(y), np.asarray(probs)) if not np.isnan(a)] if len(y) else []
    return float(np.mean(aucs)) if aucs else float("nan")


def micro_auroc(y: np.ndarray, probs: np.ndarray) -> float:
    """AUROC of all (case, label) pairs pooled."""
    flat = np.asarray(y).reshape(-1)
    return float(M.auroc(flat, np.asarray(probs).reshape(-1))) if len(np.unique(flat)) > 1 else float("nan")


def _row_aurocs(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUROC per row of (b, n) labels and scores (Mann-Whitney from midranks); NaN with one class."""
    ranks = stats.rankdata(s, axis=1)
    n_pos = y.sum(axis=1)
    n_neg = y.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * y).sum(axis=1) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def bootstrap_macro_auroc_ci(y: np.ndarray, probs: np.ndarray, n_resamples: int = 1000, alpha: float = 0.05,
                             seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the macro AUROC: whole cases resampled with replacement (the labels
    of a case stay together); per replicate the mean over labels with both classes; NaN replicates ignored."""
    y, p = np.asarray(y), np.asarray(probs, dtype=np.float64)
    n = len(y)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, _CHUNK_ELEMENTS // max(1, n)))
    values, done = [], 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        idx = rng.integers(0, n, size=(b, n))
        per_label = np.stack([_row_aurocs(y[idx, k], p[idx, k]) for k in range(y.shape[1])], axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice": a replicate without AUROC
            values.append(np.nanmean(per_label, axis=1))
        done += b
    v = np.concatenate(values)
    if np.all(np.isnan(v)):
        return float("nan"), float("nan")
    lo, hi = np.nanquantile(v, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


# --------------------------------------------------------------------------- summaries
def macro(per_label: dict[str, dict], keys=MACRO_KEYS) -> dict:
    """Per key, the mean over the labels where it is a number (None where no label has it)."""
    out = {}
    for key in keys:
        vals = [m.get(key) for m in per_label.values()]
        nums = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)
                and np.isfinite(v)]
        out[key] = round(float(np.mean(nums)), 4) if nums else None
    return out


def summary(y: np.ndarray, logits: np.ndarray, temperature: float, per_label: dict[str, dict], n_boot: int,
            seed: int) -> dict:
    """A split's multi-label metrics: macro means of the per-label metrics under the single-label keys (the
    gate reads `auroc_ci95` and `ece_calibrated`), the macro AUROC's case-bootstrap interval, the micro
    AUROC, exact-match accuracy and Hamming loss at the per-label decisions, and `per_label` itself."""
    y = np.asarray(y)
    cal = sigmoid(logits, temperature)
    out: dict = {"n": int(len(y)), "task": "multi_label", "n_labels": int(y.shape[1]),
                 "n_any_positive": int((y.sum(axis=1) > 0).sum()) if len(y) else 0, "average": "macro over labels"}
    out |= macro(per_label)
    auc = macro_auroc(y, cal)
    out["auroc"] = None if np.isnan(auc) else round(auc, 4)
    if out["auroc"] is not None:
        lo, hi = bootstrap_macro_auroc_ci(y, cal, n_resamples=n_boot, seed=seed)
        out["auroc_ci95"] = [round(lo, 4), round(hi, 4)]
        out["auroc_ci95_low"], out["auroc_ci95_high"] = out["auroc_ci95"]
    micro = micro_auroc(y, cal) if len(y) else float("nan")
    out["auroc_micro"] = None if np.isnan(micro) else round(micro, 4)
    thresholds = [m.get("threshold") for m in per_label.values()]
    if len(y) and all(t is not None for t in thresholds):
        decisions = (cal >= np.asarray(thresholds, dtype=np.float64)).astype(int)
        out["subset_accuracy"] = round(float((decisions == y).all(axis=1).mean()), 4)
        out["hamming_loss"] = round(float((decisions != y).mean()), 4)
    out["per_label"] = per_label
    return out


def macro_of(metric, y: np.ndarray, probs: np.ndarray) -> float | None:
    """Mean over labels of a binary metric(y_k, p_k) (e.g. `metrics.ece`, `metrics.nll`)."""
    if not len(y):
        return None
    return float(np.mean([metric(y[:, k], probs[:, k]) for k in range(y.shape[1])]))


def plot_tables(y: np.ndarray, probs: np.ndarray, decisions: np.ndarray) -> dict[str, tuple[list, list]]:
    """DVC plot tables pooled over every (case, label) pair (micro): ROC, PR and the confusion of the
    per-label decisions. {file name: (columns, rows)}; empty when the pooled labels hold one class."""
    flat_y, flat_p, flat_d = (np.asarray(a).reshape(-1) for a in (y, probs, decisions))
    if len(np.unique(flat_y)) < 2:
        return {}
    roc, pr = M.roc_points(flat_y, flat_p), M.pr_points(flat_y, flat_p)
    names = ("negative", "positive")
    return {"roc_test.csv": (["fpr", "tpr", "threshold"], [[r["fpr"], r["tpr"], r["threshold"]] for r in roc]),
            "pr_test.csv": (["recall", "precision", "threshold"],
                            [[r["recall"], r["precision"], r["threshold"]] for r in pr]),
            "confusion_test.csv": (["actual", "predicted"], [[names[int(a)], names[int(d)]]
                                                               for a, d in zip(flat_y, flat_d)])}


__all__ = ["as_binary_logits", "bootstrap_macro_auroc_ci", "fit_rule", "fit_shared_temperature", "fit_thresholds",
           "label_aurocs", "macro", "macro_auroc", "macro_of", "micro_auroc", "plot_tables", "sigmoid", "summary"]
