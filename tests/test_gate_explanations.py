"""Promotion gate, explanation rules (pure): sanity.json present, randomization check passed, pointing game
above its random baseline where lesion masks exist; reason sentences as they reach the `gate_reason` tag."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import RegisterConfig
from pipeline.core import sanity as S
from pipeline.core.gate import NO_MASKS, RANDOMIZATION_MAX_SPEARMAN, explanation_checks, threshold_reasons

GOOD_TEST = {"auroc_ci95": [0.9, 0.99], "ece_calibrated": 0.05}  # passes the metric thresholds
SRC = "reports/explain/sanity.json"


def _loc(hits: int, misses: int) -> list[dict]:
    """Localization records of `pipeline.core.sanity.localization`: 8^3 maps, a 2^3 lesion (share 1/64)."""
    mask = np.zeros((8, 8, 8), bool)
    mask[:2, :2, :2] = True
    out = []
    for i in range(hits + misses):
        cam = np.zeros((8, 8, 8))
        cam[(1, 1, 1) if i < hits else (6, 6, 6)] = 1.0
        out.append(S.localization(cam, mask))
    return out


def _sanity(rho: float = 0.1, hits: int | None = 8, misses: int = 2) -> dict:
    """What the explain stage writes (`pipeline.core.sanity.summarize`); hits None: no lesion masks."""
    return S.summarize([(rho, 0.3)] * 10, [] if hits is None else _loc(hits, misses))


def _status(checks: list[dict]) -> dict:
    return {c["rule"]: c["status"] for c in checks}


def test_the_defaults_gate_on_explanations():
    cfg = RegisterConfig()
    assert cfg.require_explanations and cfg.require_randomization_check and cfg.min_pointing_margin == 0.05


def test_good_explanations_with_masks_pass():
    sanity = _sanity(hits=8, misses=2)  # hit rate 0.8 vs baseline 1/64
    assert threshold_reasons(GOOD_TEST, RegisterConfig(), sanity, SRC) == []
    checks = explanation_checks(sanity, RegisterConfig(), SRC)
    assert _status(checks) == {"explanations": "passed", "randomization": "passed", "pointing_game": "passed"}
    pg = checks[2]
    assert pg["measured"]["hit_rate"] == 0.8 and pg["measured"]["random_baseline"] == pytest.approx(1 / 64, abs=1e-5)
    assert pg["measured"]["energy_inside"] == 0.8  # energy inside the mask is reported beside it, not gated
    assert "beats its random baseline 0.01562" in pg["detail"]


def test_without_lesion_masks_the_pointing_rule_is_not_applicable_and_does_not_fail():
    sanity = _sanity(hits=None)  # e.g. MedMNIST: no masks, no pointing_game / energy_inside keys
    assert "pointing_game" not in sanity and "randomization" in sanity
    assert threshold_reasons(GOOD_TEST, RegisterConfig(), sanity, SRC) == []
    checks = explanation_checks(sanity, RegisterConfig(), SRC)
    assert _status(checks)["pointing_game"] == NO_MASKS == "not applicable (no lesion masks)"
    assert _status(explanation_checks({**sanity, "pointing_game": {"hit_rate": 0.0, "random_baseline": 0.0,
                                                                    "n": 0}}, RegisterConfig()))[
        "pointing_game"] == NO_MASKS  # n = 0: no case with a mask either


def test_missing_sanity_json_fails_unless_explanations_are_not_required():
    reasons = threshold_reasons(GOOD_TEST, RegisterConfig(), None, SRC)
    assert reasons == ["no saliency sanity checks: reports/explain/sanity.json is missing (run the explain stage "
                       "first, or set register.require_explanations: false)"]
    relaxed = RegisterConfig(require_explanations=False)
    assert threshold_reasons(GOOD_TEST, relaxed, None, SRC) == []
    assert set(_status(explanation_checks(None, relaxed, SRC)).values()) == {"not checked"}


def test_a_failed_randomization_check_fails_with_its_values_and_key():
    sanity = _sanity(rho=0.8)
    assert sanity["randomization"]["passed"] is False
    (reason,) = threshold_reasons(GOOD_TEST, RegisterConfig(), sanity, SRC)
    assert reason == ("saliency model-parameter randomization check failed: Spearman 0.8000 between the trained "
                      "and the weight-randomized model's maps is not below 0.5 (SSIM 0.3000, n=10), so the maps "
                      "barely depend on the learned weights (register.require_randomization_check: true)")
    relaxed = RegisterConfig(require_randomization_check=False)
    assert threshold_reasons(GOOD_TEST, relaxed, sanity, SRC) == []
    assert _status(explanation_checks(sanity, relaxed, SRC))["randomization"] == "not required"


def test_a_sanity_json_without_a_randomization_result_fails():
    sanity = {k: v for k, v in _sanity().items() if k != "randomization"}
    (reason,) = threshold_reasons(GOOD_TEST, RegisterConfig(), sanity, SRC)
    assert reason == ("reports/explain/sanity.json has no model-parameter randomization check result (no case "
                      "explained?) and register.require_randomization_check is true")


def test_a_pointing_game_not_beating_its_baseline_by_the_margin_fails():
    sanity = _sanity(hits=0, misses=31)  # as the shipped demo run: hit rate 0 vs a random baseline of 1/64
    (reason,) = threshold_reasons(GOOD_TEST, RegisterConfig(), sanity, SRC)
    assert reason == ("saliency pointing game hit rate 0.0000 does not beat its random baseline 0.01562 by "
                      "register.min_pointing_margin 0.0500 (needs >= 0.06562; n=31 lesion case(s))")
    assert threshold_reasons(GOOD_TEST, RegisterConfig(min_pointing_margin=-1.0), sanity, SRC) == []


def test_the_margin_is_absolute_and_inclusive():
    base = 0.25
    sanity = {"randomization": {"spearman": 0.1, "ssim": 0.2, "n": 4, "passed": True},
              "pointing_game": {"hit_rate": 0.3, "random_baseline": base, "n": 20}}
    assert threshold_reasons(GOOD_TEST, RegisterConfig(min_pointing_margin=0.05), sanity) == []  # 0.30 >= 0.30
    (reason,) = threshold_reasons(GOOD_TEST, RegisterConfig(min_pointing_margin=0.06), sanity)
    assert "hit rate 0.3000 does not beat its random baseline 0.25000 by register.min_pointing_margin 0.0600" in reason


def test_every_failed_rule_adds_its_own_sentence_after_the_metric_reasons():
    bad_test = {"auroc_ci95": [0.5, 0.9], "ece_calibrated": 0.5}
    reasons = threshold_reasons(bad_test, RegisterConfig(), _sanity(rho=0.9, hits=0, misses=5), SRC)
    assert len(reasons) == 4
    assert "register.min_auroc_ci_low" in reasons[0] and "register.max_ece_calibrated" in reasons[1]
    assert "register.require_randomization_check" in reasons[2] and "register.min_pointing_margin" in reasons[3]


@pytest.mark.parametrize("rho", [RANDOMIZATION_MAX_SPEARMAN - 1e-3, RANDOMIZATION_MAX_SPEARMAN + 1e-3])
def test_the_named_spearman_bound_is_the_one_sanity_summarize_flags(rho):
    assert S.summarize([(rho, 0.5)], [])["randomization"]["passed"] is (rho < RANDOMIZATION_MAX_SPEARMAN)
