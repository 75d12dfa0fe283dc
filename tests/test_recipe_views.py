"""The network plan's rules, K-fold assignment, test-time views, ensembles, uncertainty and referral (pure)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig, Params, TrainConfig
from pipeline.core.classifier import Classifier, DecisionRule
from pipeline.core.models import EnsembleNet, ModelSpec, build_model
from pipeline.core.recipe import plan_network
from pipeline.core.selective import fit_rule, referral_summary, selective_curve
from pipeline.core.splits import assign_folds
from pipeline.core.views import apply_view, spread, transforms, view_logits


def test_the_plan_keeps_a_small_inputs_voxels_and_the_demo_network():
    small = plan_network([28, 28, 28], 1188, [942, 246], False, ModelConfig(), TrainConfig(), [76, 22])["choices"]
    assert small == {"name": "resnet10", "conv1_t_stride": 1, "conv1_t_size": 3, "pool": "avg", "output_stride": 32,
                     "padding": "zeros", "width": 64, "max_channels": 512, "lr": 3e-4, "batch_size": 16,
                     "epochs": 8, "select": "last", "val_interval": 5}
    demo = plan_network([48, 48, 48], 187, [95, 92], True, ModelConfig(), TrainConfig(), [32, 31])["choices"]
    assert demo == {"name": "resnet10", "conv1_t_stride": 2, "conv1_t_size": 7, "pool": "lse", "output_stride": 8,
                    "padding": "replicate", "width": 32, "max_channels": 128, "lr": 1e-3, "batch_size": 8,
                    "epochs": 15, "select": "last", "val_interval": 5}


def test_every_planned_choice_can_be_overridden_and_says_why():
    net = plan_network([28, 28, 28], 1188, [942, 246], False, ModelConfig(conv1_t_stride=2, pool="lse"),
                       TrainConfig(epochs=3))
    c, why = net["choices"], net["why"]
    assert (c["conv1_t_stride"], c["conv1_t_size"], c["pool"], c["epochs"]) == (2, 7, "lse", 3)
    assert why["conv1_t_stride"] == why["pool"] == why["epochs"] == "params"
    assert c["output_stride"] == 8 and "cells" in why["output_stride"]  # the evidence head still gets its cells
    assert set(why) == set(c) and all(why.values())


@pytest.mark.parametrize("n,batch", [(100, 8), (1100, 16), (2100, 32)])
def test_batch_size_keeps_enough_steps_per_epoch(n, batch):
    assert plan_network([32] * 3, n, [n // 2, n - n // 2], False, ModelConfig(), TrainConfig())["choices"][
        "batch_size"] == batch


def test_folds_are_patient_level_stratified_and_deterministic():
    rng = np.random.default_rng(0)
    patients = [f"p{i // 2}" for i in range(200)]  # two cases per patient
    labels = [int(rng.random() < 0.25) for _ in range(100) for _ in range(2)]
    folds = assign_folds(patients, labels, 5, seed=3)
    assert set(folds) == set(range(5))
    for p in set(patients):
        assert len({folds[i] for i, q in enumerate(patients) if q == p}) == 1
    prevalence = [np.mean(np.asarray(labels)[folds == k]) for k in range(5)]
    assert max(prevalence) - min(prevalence) < 0.15
    assert np.array_equal(folds, assign_folds(patients, labels, 5, seed=3))
    with pytest.raises(ValueError, match="patients"):
        assign_folds(["a", "a", "b"], [0, 1, 0], 3, seed=0)


def test_views_are_the_identity_first_then_flips_and_shifts():
    assert transforms("none", 3) == [((), None)]
    assert len(transforms("flips", 3)) == 8 and transforms("flips", 3)[0] == ((), None)
    assert len(transforms("flips_shifts", 2)) == 4 + 4
    x = torch.arange(2 * 1 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 1, 4, 5, 6)
    assert torch.equal(apply_view(x, ((0, 2), None)), x.flip([2, 4]))
    shifted = apply_view(x, ((), (1, 2)))
    assert torch.equal(shifted[:, :, :, 2:], x[:, :, :, :3]) and torch.equal(shifted[:, :, :, 0], x[:, :, :, 0])


def test_views_share_a_forward_pass_when_fewer_cases_than_the_batch_are_left():
    """One case with its 8 flip views in one pass of 8 (explain, predict) gives each view's own logits: the
    same as one view at a time and as the views of that case inside a batch of other cases."""
    torch.manual_seed(0)
    net = build_model(_spec(pool="lse", output_stride=8, padding="replicate", width=8)).eval()
    x = torch.randn(3, 1, 16, 16, 16)
    one_at_a_time = view_logits(net, x, torch.device("cpu"), 1, "flips")
    grouped = view_logits(net, x[:1], torch.device("cpu"), 8, "flips")
    assert grouped.shape == (8, 1, 1, 2)
    torch.testing.assert_close(grouped[:, :, 0], one_at_a_time[:, :, 0], atol=1e-5, rtol=1e-5)
    batched = view_logits(net, x, torch.device("cpu"), 3, "flips")
    torch.testing.assert_close(batched, one_at_a_time, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(grouped[0], grouped[7])  # the views differ: each got its own input


def _spec(**kw):
    base = {"name": "resnet10", "spatial_dims": 3, "in_channels": 1, "n_classes": 2, "input_ndim": 3,
            "conv1_t_stride": 2, "pool": "avg"}
    return ModelSpec(**{**base, **kw})


def test_an_ensemble_serves_the_mean_of_its_members_logits_and_one_state_dict_holds_them():
    torch.manual_seed(0)
    ens = build_model(_spec(n_members=3)).eval()
    assert isinstance(ens, EnsembleNet) and len(ens.members) == 3
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        per = torch.stack([m(x) for m in ens.members])
        torch.testing.assert_close(ens(x), per.mean(0))
    assert all(k.startswith("members.") for k in ens.state_dict())
    v = view_logits(ens, x, torch.device("cpu"), batch_size=1, tta="flips")
    assert v.shape == (8, 3, 2, 2)
    torch.testing.assert_close(v[0], per)  # the identity view is the plain forward pass, in input order


def test_uncertainty_is_zero_for_one_view_and_grows_when_views_disagree():
    probs = np.array([[[0.2, 0.8], [0.5, 0.5]]])
    assert np.array_equal(spread(probs, 1), [0.0, 0.0])
    views = np.array([[[0.2, 0.8], [0.5, 0.5]], [[0.6, 0.4], [0.5, 0.5]]])
    np.testing.assert_allclose(spread(views, 1), [0.2, 0.0])


def test_referral_takes_cases_near_the_threshold_or_with_a_large_spread():
    rule = DecisionRule(1.0, 0.5, ("no", "yes"), refer_band=0.1, refer_spread=0.15)
    probs = np.array([[0.45, 0.55], [0.1, 0.9], [0.1, 0.9]])
    referred = rule.refer(probs, np.array([0.0, 0.0, 0.3]))
    assert referred.tolist() == [True, False, True]
    summary = referral_summary(np.array([0, 1, 1]), probs, rule.decide(probs), referred)
    assert summary["n_referred"] == 2 and summary["error_rate_all"] == pytest.approx(1 / 3, abs=1e-4)
    assert summary["error_rate_automatic"] == 0.0
    back = DecisionRule.from_calibration(rule.to_calibration())
    assert back == rule


def test_the_referral_band_has_one_log_odds_width_at_every_threshold():
    # At 0.5 the band is p 0.4-0.6; at a threshold of 0.92 the same log-odds width is p 0.885-0.945, not
    # 0.82-1.0 (a probability band there referred 87% of a real test set).
    rule = DecisionRule(1.0, 0.92, ("no", "yes"), refer_band=0.1, refer_spread=None)
    assert rule.refer_margin == pytest.approx(np.log(0.6 / 0.4))
    p1 = np.array([0.8, 0.85, 0.89, 0.92, 0.94, 0.96, 0.99])
    referred = rule.refer(np.c_[1 - p1, p1], np.zeros(len(p1)))
    assert referred.tolist() == [False, False, True, True, True, False, False]
    at_half = DecisionRule(1.0, 0.5, ("no", "yes"), refer_band=0.1, refer_spread=None)
    q = np.array([0.39, 0.41, 0.59, 0.61])
    assert at_half.refer(np.c_[1 - q, q], np.zeros(4)).tolist() == [False, True, True, False]
    # Without a threshold (argmax) the margin is log(p_first / p_second): the same number at 0.5.
    argmax = DecisionRule(1.0, None, ("a", "b", "c"), refer_band=0.1, refer_spread=None)
    assert argmax.margin(np.array([[0.55, 0.45, 0.0]]))[0] == pytest.approx(at_half.margin(np.array([[0.45, 0.55]]))[0])
    assert DecisionRule(1.0, 0.5, ("no", "yes"), refer_band=0.5).refer(np.array([[0.0, 1.0]]), np.zeros(1)).all()


def test_the_selective_curve_keeps_the_most_certain_cases_first():
    y = np.array([1, 0, 1, 0])
    probs = np.array([[0.1, 0.9], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])  # the last two are wrong
    decisions = probs.argmax(1)
    curve = selective_curve(y, probs, decisions, uncertainty=np.array([0.0, 0.01, 0.3, 0.2]),
                            margin=np.abs(probs[:, 1] - 0.5), steps=4)
    assert [r["n"] for r in curve] == [1, 2, 3, 4]
    assert [r["error_rate"] for r in curve] == [0.0, 0.0, pytest.approx(1 / 3, abs=1e-4), 0.5]


def test_the_rule_is_fitted_on_held_out_logits_and_records_tta_and_referral():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = (y * 2 - 1) * 1.5 + rng.normal(0, 1.5, 300)  # the true log-odds are 4/3 s
    logits = np.c_[np.zeros(300), 3.0 * s]  # over-confident: T = 3 / (4/3) = 2.25 in the limit
    cfg = Params().evaluate
    rule = fit_rule(logits, y, ("no", "yes"), cfg)
    assert 1.5 < rule.temperature < 3.2 and 0.0 < rule.threshold < 1.0
    assert (rule.tta, rule.refer_band, rule.refer_spread) == (cfg.tta, cfg.referral.band, cfg.referral.max_spread)


def test_a_classifier_assesses_in_one_pass():
    torch.manual_seed(0)
    net = build_model(_spec(n_members=2)).eval()
    rule = DecisionRule(1.0, 0.5, ("no", "yes"), tta="flips", refer_band=0.0, refer_spread=None)
    a = Classifier(net, rule).assess(torch.randn(3, 1, 16, 16, 16))
    assert a.n_views == 16 and a.probs.shape == (3, 2) and (a.uncertainty > 0).all()
    np.testing.assert_allclose(a.probs.sum(1), 1.0)
    assert not a.referred.any()


def test_epoch_selection_by_validation_auroc_needs_enough_rare_cases():
    few = plan_network([48] * 3, 500, [250, 250], True, ModelConfig(), TrainConfig(), [80, 21])
    many = plan_network([48] * 3, 5000, [2500, 2500], True, ModelConfig(), TrainConfig(), [400, 300])
    assert few["choices"]["select"] == "last" and "21 case(s)" in few["why"]["select"]
    assert many["choices"]["select"] == "best"
    assert plan_network([48] * 3, 500, [250, 250], True, ModelConfig(), TrainConfig(select="best"),
                        [80, 21])["choices"]["select"] == "best"


def test_temperature_and_bias_remove_a_prior_shift_that_temperature_alone_cannot():
    from pipeline.core import metrics as M
    from pipeline.core.calibration import fit_temperature_bias

    rng = np.random.default_rng(2)
    y = (rng.random(4000) < 0.2).astype(int)
    s = (y * 2 - 1) * 1.0 + rng.normal(0, 1.0, 4000)  # true log-odds: 2 s + log(0.2 / 0.8)
    logits = np.c_[np.zeros(4000), 2 * s]  # what a class-balanced training learns: the prior is gone
    t, b = fit_temperature_bias(logits, y)
    assert t == pytest.approx(1.0, abs=0.1) and b[1] == pytest.approx(np.log(0.25), abs=0.15)
    both = M.apply_temperature(logits / t + b, 1.0)[:, 1]
    alone = M.apply_temperature(logits, M.fit_temperature(logits, y))[:, 1]
    assert M.ece(y, both) < 0.03 < M.ece(y, alone)
    cfg = Params().evaluate
    rule = fit_rule(logits, y, ("no", "yes"), cfg)
    assert rule.bias is not None and DecisionRule.from_calibration(rule.to_calibration()) == rule
    np.testing.assert_allclose(rule.probs(logits)[:, 1], both, atol=1e-4)


def test_a_perfectly_separated_held_out_set_still_gets_a_finite_calibration():
    from pipeline.core.calibration import fit_temperature_bias

    y = np.array([0] * 30 + [1] * 33)
    logits = np.c_[np.zeros(63), np.where(y == 1, 4.0, -4.0) + np.linspace(-1, 1, 63)]  # separable
    t, b = fit_temperature_bias(logits, y)
    assert 0.5 < t < 5.0 and abs(b[1]) < 3.0
    from pipeline.core import metrics as M

    p = M.apply_temperature(logits / t + b, 1.0)[:, 1]
    assert (p[y == 1] < 0.99).all() and (p[y == 1] > 0.9).all()  # confident, not certain, at n = 33
