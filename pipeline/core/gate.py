"""The promotion gate's rules (pure): thresholds on the candidate's test metrics, and the champion comparison.

The rule, in order: (1) the lower 95% bound of test AUROC >= `register.min_auroc_ci_low`;
(2) calibrated test ECE <= `register.max_ece_calibrated`; (3) not worse than the champion on the
same test cases: AUROC_candidate >= AUROC_champion - `register.champion_tolerance` (a paired DeLong
p-value is reported beside it; with small test sets a non-significant p-value is not evidence of
equality, so the decision is the tolerance rule).
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.config import RegisterConfig
from pipeline.core import metrics as M


def threshold_reasons(test: dict, cfg: RegisterConfig) -> list[str]:
    """Why the candidate's own test metrics fail the gate (empty when they pass)."""
    reasons: list[str] = []
    ci_low = (test.get("auroc_ci95") or [None, None])[0]
    if ci_low is None:
        reasons.append("no test AUROC confidence interval (one class in the test set?)")
    elif ci_low < cfg.min_auroc_ci_low:
        reasons.append(f"test AUROC 95% CI lower bound {ci_low:.4f} < register.min_auroc_ci_low "
                       f"{cfg.min_auroc_ci_low:.4f}")
    ece = test.get("ece_calibrated")
    if ece is None:
        reasons.append("no calibrated ECE on test")
    elif ece > cfg.max_ece_calibrated:
        reasons.append(f"test calibrated ECE {ece:.4f} > register.max_ece_calibrated {cfg.max_ece_calibrated:.4f}")
    return reasons


def auroc_of_probs(y: np.ndarray, probs: np.ndarray) -> float:
    if len(np.unique(y)) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return M.auroc(y, probs[:, 1])
    if len(np.unique(y)) == probs.shape[1]:
        return M.auroc_multiclass(y, probs)["macro"]
    return float("nan")


def compare_with_champion(y: np.ndarray, p_candidate: np.ndarray, p_champion: np.ndarray, tolerance: float) -> dict:
    """AUROCs of both models on the same cases, the tolerance rule, and DeLong's paired p-value."""
    a, b = auroc_of_probs(y, p_candidate), auroc_of_probs(y, p_champion)
    out = {"n": int(len(y)), "auroc_candidate": a, "auroc_champion": b, "delta": a - b, "tolerance": tolerance,
           "delong_p": None}
    if p_candidate.shape[1] == 2:
        try:
            out["delong_p"] = M.delong_test(y, p_candidate[:, 1], p_champion[:, 1])["p_value"]
        except ValueError:
            pass  # fewer than two cases of a class: no test
    out["worse"] = bool(math.isnan(a) or math.isnan(b) or a < b - tolerance - 1e-12)
    return out
