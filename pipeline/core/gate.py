"""The promotion gate's rules (pure): thresholds on the candidate's test metrics and explanations, and the
champion comparison.

The rule, in order: (1) the lower 95% bound of test AUROC >= `register.min_auroc_ci_low`;
(2) calibrated test ECE <= `register.max_ece_calibrated`; (3) explanation quality, from the explain
stage's sanity.json (`pipeline.core.sanity.summarize`): (a) it exists, unless
`register.require_explanations` is false; (b) the model-parameter randomization check passed
(Spearman between trained- and randomized-model maps < 0.5), when `register.require_randomization_check`;
(c) where lesion masks exist (pointing game with n > 0), the pointing-game hit rate >= its random
baseline + `register.min_pointing_margin`; without masks (e.g. MedMNIST) (c) is "not applicable (no
lesion masks)" and does not fail; (4) not worse than the champion on the same test cases:
AUROC_candidate >= AUROC_champion - `register.champion_tolerance` (a paired DeLong p-value is reported
beside it; with small test sets a non-significant p-value is not evidence of equality, so the decision is
the tolerance rule). Multi-label models: the macro values over labels (`core.multilabel.summary`) stand
in for AUROC, its interval and ECE, and the champion comparison uses the macro AUROC (no DeLong test).
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.config import RegisterConfig
from pipeline.core import metrics as M

# The flag of `pipeline.core.sanity.summarize` (its `passed`); named here for the reason text, and a test
# keeps the two in step.
RANDOMIZATION_MAX_SPEARMAN = 0.5
NO_MASKS = "not applicable (no lesion masks)"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _check(rule: str, status: str, detail: str, **measured) -> dict:
    return {"rule": rule, "status": status, "detail": detail, "measured": measured}


def _randomization(sanity: dict, cfg: RegisterConfig, source: str) -> dict:
    r = sanity.get("randomization")
    if not isinstance(r, dict) or "passed" not in r:
        if not cfg.require_randomization_check:
            return _check("randomization", "not required", f"{source} has no randomization check result")
        return _check("randomization", "failed",
                      f"{source} has no model-parameter randomization check result (no case explained?) and "
                      f"register.require_randomization_check is true")
    rho, ssim, n = r.get("spearman"), r.get("ssim"), r.get("n")
    values = f"Spearman {_num(rho)}, SSIM {_num(ssim)}, n={n}"
    measured = {"spearman": rho, "ssim": ssim, "n": n, "passed": bool(r["passed"])}
    if r["passed"]:
        return _check("randomization", "passed", f"saliency randomization check passed ({values})", **measured)
    if not cfg.require_randomization_check:
        return _check("randomization", "not required", f"saliency randomization check failed ({values}); "
                      "register.require_randomization_check is false", **measured)
    return _check("randomization", "failed",
                  f"saliency model-parameter randomization check failed: Spearman {_num(rho)} between the trained "
                  f"and the weight-randomized model's maps is not below {RANDOMIZATION_MAX_SPEARMAN:g} "
                  f"(SSIM {_num(ssim)}, n={n}), so the maps barely depend on the learned weights "
                  f"(register.require_randomization_check: true)", **measured)


def _pointing(sanity: dict, cfg: RegisterConfig, source: str) -> dict:
    pg, en = sanity.get("pointing_game"), sanity.get("energy_inside")
    if not isinstance(pg, dict) or not pg.get("n"):
        return _check("pointing_game", NO_MASKS, "no lesion masks among the explained cases")
    hit, base, n, margin = pg.get("hit_rate"), pg.get("random_baseline"), pg.get("n"), cfg.min_pointing_margin
    en = en if isinstance(en, dict) else {}
    measured = {"hit_rate": hit, "random_baseline": base, "n": n, "margin": margin,
                "energy_inside": en.get("mean"), "energy_inside_random_baseline": en.get("random_baseline")}
    if hit is None or base is None:
        return _check("pointing_game", "failed", f"the pointing game in {source} has no hit rate or random "
                      f"baseline (n={n}), so register.min_pointing_margin cannot be checked", **measured)
    text = (f"random baseline {base:.5f} by register.min_pointing_margin {margin:.4f} (needs >= "
            f"{base + margin:.5f}; n={n} lesion case(s))")
    if hit < base + margin - 1e-9:
        return _check("pointing_game", "failed",
                      f"saliency pointing game hit rate {hit:.4f} does not beat its {text}", **measured)
    return _check("pointing_game", "passed", f"saliency pointing game hit rate {hit:.4f} beats its {text}",
                  **measured)


def explanation_checks(sanity: dict | None, cfg: RegisterConfig, source: str = "sanity.json") -> list[dict]:
    """The explanation rules on the explain stage's sanity checks (`sanity` None: no sanity.json at
    `source`): one {"rule", "status", "detail", "measured"} per rule, status "passed", "failed",
    "not applicable (no lesion masks)", "not required" or "not checked"; `detail` of a failed one is its reason."""
    if sanity is None:
        if cfg.require_explanations:
            return [_check("explanations", "failed",
                           f"no saliency sanity checks: {source} is missing (run the explain stage first, or set "
                           f"register.require_explanations: false)")]
        why = f"{source} is missing and register.require_explanations is false"
        return [_check(rule, "not checked", why) for rule in ("explanations", "randomization", "pointing_game")]
    return [_check("explanations", "passed", f"{source} read"), _randomization(sanity, cfg, source),
            _pointing(sanity, cfg, source)]


def threshold_reasons(test: dict, cfg: RegisterConfig, sanity: dict | None,
                      sanity_source: str = "sanity.json") -> list[str]:
    """Why the candidate's own test metrics and explanations fail the gate (empty when they pass).
    `sanity` is the explain stage's sanity.json as read from `sanity_source` (None: it does not exist)."""
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
    reasons += [c["detail"] for c in explanation_checks(sanity, cfg, sanity_source) if c["status"] == "failed"]
    return reasons


def auroc_of_probs(y: np.ndarray, probs: np.ndarray) -> float:
    if np.asarray(y).ndim == 2:  # multi-label: the macro AUROC over labels (the metric the gate reads)
        from pipeline.core.multilabel import macro_auroc

        return macro_auroc(y, probs)
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
    if p_candidate.shape[1] == 2 and np.asarray(y).ndim == 1:
        try:
            out["delong_p"] = M.delong_test(y, p_candidate[:, 1], p_champion[:, 1])["p_value"]
        except ValueError:
            pass  # fewer than two cases of a class: no test
    out["worse"] = bool(math.isnan(a) or math.isnan(b) or a < b - tolerance - 1e-12)
    return out
