"""Multi-label (pure parts): the decision rule, metrics, calibration, thresholds, folds, manifest labels,
the label tensors, the loss and the gate's comparison. The end-to-end run is test_synthesize_two_findings.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.special import expit, logit
from sklearn.metrics import roc_auc_score

from pipeline.config import EvaluateConfig, RegisterConfig
from pipeline.core import metrics as M
from pipeline.core import multilabel as ML
from pipeline.core.classifier import Classifier, DecisionRule
from pipeline.errors import ConfigError

NAMES = ("hyperdense", "hypodense")


def _rule(**kw) -> DecisionRule:
    base = dict(temperature=2.0, threshold=None, class_names=NAMES, tta="none", refer_band=0.1, refer_spread=0.15,
                task="multi_label", thresholds=(0.3, 0.6))
    return DecisionRule(**(base | kw))


def _data(n: int = 400, n_labels: int = 3, seed: int = 0, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, (n, n_labels))
    y = (rng.random((n, n_labels)) < expit(z)).astype(int)
    return y, z * scale


# ----------------------------------------------------------------------------- the decision rule
def test_rule_gives_independent_sigmoids_and_per_label_decisions():
    rule = _rule()
    logits = np.array([[0.0, 0.0], [4.0, 2.0], [-1.0, -3.0]])
    p = rule.probs(logits)
    assert p == pytest.approx(expit(logits / 2.0))
    assert not np.allclose(p.sum(axis=1)[1:], 1.0)  # sigmoids, not a softmax
    assert rule.decide(p).tolist() == [[1, 0], [1, 1], [1, 0]]  # p >= 0.3 / p >= 0.6 per label
    assert not rule.binary and rule.multi_label  # two labels are not a binary softmax model
    assert rule.margin(p) == pytest.approx(np.abs(logit(p) - logit([0.3, 0.6])).min(axis=1))  # log-odds
    assert rule.label_margins(p).shape == (3, 2)
    assert "each label" in rule.rule_text()


def test_referral_when_any_label_is_in_the_band_or_the_views_disagree():
    rule = _rule(temperature=1.0)
    p = np.array([[0.9, 0.95], [0.35, 0.95], [0.9, 0.1]])
    assert rule.refer(p, np.zeros(3)).tolist() == [False, True, False]
    assert rule.refer(p, np.array([0.0, 0.0, 0.2])).tolist() == [False, True, True]
    views = np.array([[[0.5, 0.1]], [[0.5, 0.5]]])  # (V, N, L): label 1 spreads 0.2, label 0 not at all
    assert rule.uncertainty(views, None) == pytest.approx([0.2])
    assert rule.uncertainty(views[:1], None) == pytest.approx([0.0])


def test_calibration_round_trip_and_single_label_keys_unchanged():
    rule = _rule()
    cal = json.loads(json.dumps(rule.to_calibration()))
    assert cal["task"] == "multi_label" and cal["thresholds"] == [0.3, 0.6] and cal["threshold"] is None
    assert DecisionRule.from_calibration(cal) == rule
    single = DecisionRule(1.5, 0.4, ("no lesion", "lesion"), tta="flips", refer_band=0.1, refer_spread=0.15)
    assert set(single.to_calibration()) == {"temperature", "threshold", "class_names", "binary", "operating_point",
                                            "tta", "referral"}
    assert DecisionRule.from_calibration(single.to_calibration()) == single


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_classifier_assess_multi_label():
    torch.manual_seed(0)
    clf = Classifier(_Linear(), _rule(tta="flips"))
    x = np.random.default_rng(0).normal(size=(5, 1, 2, 2, 2)).astype(np.float32)
    a = clf.assess(x)
    assert a.probs.shape == a.decisions.shape == (5, 2) and a.n_views == 8
    assert a.probs == pytest.approx(expit(clf.logits(x) / 2.0))
    views = clf.views(x)
    assert a.uncertainty == pytest.approx(np.stack([expit(v / 2.0) for v in views]).std(axis=0).max(axis=1))
    assert a.referred.dtype == bool and a.referred.shape == (5,)


# ----------------------------------------------------------------------------- metrics and fitting
def test_macro_auroc_matches_sklearn_and_skips_one_class_labels():
    y, z = _data()
    p = expit(z)
    assert ML.macro_auroc(y, p) == pytest.approx(roc_auc_score(y, p, average="macro"))
    assert ML.micro_auroc(y, p) == pytest.approx(roc_auc_score(y, p, average="micro"))
    y[:, 1] = 0
    assert ML.macro_auroc(y, p) == pytest.approx(np.mean([roc_auc_score(y[:, k], p[:, k]) for k in (0, 2)]))
    assert np.isnan(ML.label_aurocs(y, p)[1])
    assert np.isnan(ML.macro_auroc(np.zeros_like(y), p))


def test_shared_temperature_recovers_a_known_temperature():
    y, z = _data(n=4000, scale=3.0)  # logits 3x too confident
    assert ML.fit_shared_temperature(z, y) == pytest.approx(3.0, rel=0.1)


def test_per_label_thresholds_follow_the_operating_point():
    y, z = _data()
    p = expit(z)
    y[:, 2] = 1  # one class held out: 0.5
    youden = ML.fit_thresholds(y, p, "youden", 0.9)
    assert youden[:2] == tuple(M.youden_threshold(y[:, k], p[:, k]) for k in range(2)) and youden[2] == 0.5
    sens = ML.fit_thresholds(y, p, "sensitivity", 0.95)
    assert all(M.binary_report(y[:, k], p[:, k], sens[k])["sensitivity"] >= 0.95 for k in range(2))
    rule = ML.fit_rule(z, y, ("a", "b", "c"), EvaluateConfig(operating_point="sensitivity", target_sensitivity=0.95))
    assert rule.multi_label and len(rule.thresholds) == 3 and rule.operating_point == "sensitivity"


def test_macro_auroc_bootstrap_interval():
    y, z = _data(n=200)
    p = expit(z)
    lo, hi = ML.bootstrap_macro_auroc_ci(y, p, n_resamples=300, seed=1)
    assert lo < ML.macro_auroc(y, p) < hi
    assert (lo, hi) == ML.bootstrap_macro_auroc_ci(y, p, n_resamples=300, seed=1)


def test_split_metrics_per_label_and_macro_for_the_gate():
    from pipeline.core.gate import threshold_reasons
    from pipeline.stages.evaluate import split_metrics

    y, z = _data(n=300, n_labels=2)
    m = split_metrics(y, z, 1.2, (0.4, 0.6), n_boot=200, seed=0, names=NAMES)
    assert set(m["per_label"]) == set(NAMES) and m["task"] == "multi_label" and m["n_labels"] == 2
    for k, name in enumerate(NAMES):
        lab = m["per_label"][name]
        assert lab["auroc"] == pytest.approx(roc_auc_score(y[:, k], z[:, k]), abs=1e-4)
        assert lab["threshold"] == [0.4, 0.6][k] and lab["auroc_ci95"][0] < lab["auroc"] < lab["auroc_ci95"][1]
        assert lab["ece_calibrated"] == pytest.approx(M.ece(y[:, k], expit(z[:, k] / 1.2)), abs=1e-4)
    assert m["auroc"] == pytest.approx(np.mean([m["per_label"][n]["auroc"] for n in NAMES]), abs=1e-4)
    assert m["ece_calibrated"] == pytest.approx(np.mean([m["per_label"][n]["ece_calibrated"] for n in NAMES]),
                                                abs=1e-4)
    assert m["auroc_ci95"][0] < m["auroc"] < m["auroc_ci95"][1]
    assert 0.0 <= m["hamming_loss"] <= 1.0 and 0.0 <= m["subset_accuracy"] <= 1.0
    ok = RegisterConfig(min_auroc_ci_low=0.0, max_ece_calibrated=1.0, require_explanations=False)
    assert threshold_reasons(m, ok, None) == []
    strict = RegisterConfig(min_auroc_ci_low=0.99, max_ece_calibrated=0.0, require_explanations=False)
    assert len(threshold_reasons(m, strict, None)) == 2


def test_pooled_plot_tables():
    y, z = _data(n=50, n_labels=2)
    p = expit(z)
    tables = ML.plot_tables(y, p, (p >= 0.5).astype(int))
    assert set(tables) == {"roc_test.csv", "pr_test.csv", "confusion_test.csv"}
    assert len(tables["confusion_test.csv"][1]) == y.size


def test_champion_comparison_uses_the_macro_auroc():
    from pipeline.core.gate import compare_with_champion

    y, z = _data(n=100, n_labels=2)
    good, bad = expit(z), expit(-z)
    c = compare_with_champion(y, good, bad, 0.0)
    assert c["auroc_candidate"] == pytest.approx(ML.macro_auroc(y, good)) and not c["worse"]
    assert c["delong_p"] is None
    assert compare_with_champion(y, bad, good, 0.0)["worse"]


# ----------------------------------------------------------------------------- data and training
def test_folds_and_splits_stratify_on_the_label_combination():
    from pipeline.core.splits import assign_folds, assign_splits, strata

    labels = [[a, b] for a in (0, 1) for b in (0, 1)] * 10
    assert strata(labels).tolist() == [0, 1, 2, 3] * 10
    assert strata([0, 1, 2]).tolist() == [0, 1, 2]
    patients = [f"p{i // 2}" for i in range(len(labels))]
    folds = assign_folds(patients, labels, 4, seed=0)
    assert set(folds.tolist()) == {0, 1, 2, 3}
    assert all(len({f for f, p in zip(folds, patients) if p == q}) == 1 for q in set(patients))
    splits = assign_splits(patients, labels, 0.2, 0.2, seed=0)
    assert set(splits) == {"train", "val", "test"}


def test_manifest_multi_label_values_and_clear_errors(tmp_path):
    from pipeline.sources.manifest import read_manifest

    lines = ["case_id,patient_id,modality,path,label", "a,P1,CT,x,1;0", "b,P2,CT,x,0;1", "c,P3,CT,x,1;1",
             "d,P4,CT,x,1;2", "e,P5,CT,x,1;", "f,P6,CT,x,1", "g,P7,CT,x,1;0;1"]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    rows = {r.case_id: r for r in read_manifest(tmp_path / "m.csv")}
    assert [rows[c].label for c in "abc"] == [(1, 0), (0, 1), (1, 1)] and not any(rows[c].problem for c in "abc")
    assert "must be 0 or 1 per label" in rows["d"].problem and "must be 0 or 1 per label" in rows["e"].problem
    assert "one class index, but this manifest is multi-label" in rows["f"].problem
    assert "has 3 values; the other rows of this multi-label manifest have 2" in rows["g"].problem


def test_load_split_gives_label_vectors(tmp_path):
    from pipeline.core.plan import Plan
    from pipeline.io.artifacts import save_json, save_npy
    from pipeline.io.index import write_index
    from pipeline.io.tensors import load_split
    from pipeline.layout import IngestDir

    layout = IngestDir(tmp_path)
    records = []
    for i, label in enumerate(["1;0", "0;1", "1;1"]):
        save_npy(layout.tensor(f"c{i}"), np.zeros((1, 2, 2, 2), dtype=np.float32))
        records.append({"case_id": f"c{i}", "patient_id": f"p{i}", "split": "train", "label": label, "status": "ok",
                        "tensor": f"tensors/c{i}.npy"})
    write_index(layout.index, records)
    save_json(layout.plan, Plan(source="manifest", shape=[2, 2, 2], task="multi_label", n_classes=2,
                                class_names=list(NAMES)).to_json())
    train = load_split(tmp_path, "train")
    assert train.labels.tolist() == [[1, 0], [0, 1], [1, 1]] and train.labels.dtype == torch.long
    assert load_split(tmp_path, "val").labels.shape == (0, 2)


def test_bce_loss_with_pos_weight_and_the_sampler_refused():
    from pipeline.core.training import auroc_of, check_imbalance, make_criterion, positive_weights

    labels = torch.tensor([[1, 0], [0, 0], [0, 1], [0, 1]])
    assert positive_weights(labels).tolist() == [3.0, 1.0]
    loss = make_criterion(labels, 2, "weights", True, torch.device("cpu"))
    logits = torch.zeros(4, 2)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float(),
                                                                    pos_weight=torch.tensor([3.0, 1.0]))
    assert float(loss(logits, labels)) == pytest.approx(float(expected))
    with pytest.raises(ConfigError, match="multi-label"):
        check_imbalance("sampler", True)
    check_imbalance("sampler", False)
    assert auroc_of(labels, torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 2.0]])) == pytest.approx(1.0)


def test_two_findings_cohort_plan_is_independent_with_co_occurrence():
    from pipeline.config import SynthesizeConfig
    from pipeline.core.phantom import lesion_mask, make_phantom
    from pipeline.stages.synthesize import CLASS_NAMES, plan_cohort

    cfg = SynthesizeConfig(n_patients=40, task="two_findings")
    plans = plan_cohort(cfg, seed=7)
    f = np.array([p.findings for p in plans])
    n = len(plans)
    assert f.sum(axis=0).tolist() == [round(0.5 * n)] * 2 and CLASS_NAMES["two_findings"] == NAMES
    both = f.sum(axis=1) == 2
    assert 0 < both.sum() < f[:, 0].sum()
    assert all((p.second_radius > 0) == b for p, b in zip(plans, both))
    assert all(p.lesion_contrast < 0 for p, row in zip(plans, f) if row.tolist() == [0, 1])
    assert all(p.lesion_contrast > 0 > p.second_contrast for p, b in zip(plans, both) if b)
    binary = plan_cohort(SynthesizeConfig(n_patients=40), seed=7)
    assert [p.label for p in binary] == f[:, 0].tolist()  # finding A is the binary cohort's label
    p = next(p for p, b in zip(plans, both) if b)
    ph = make_phantom(np.random.default_rng(0), p.lesion_radius, second_radius=p.second_radius)
    gap = np.linalg.norm(np.subtract(ph.lesion_centre, ph.second_centre))
    assert gap >= ph.lesion_radius + ph.second_radius + 4.0
    mask = lesion_mask(ph, np.array([ph.lesion_centre, ph.second_centre, (500.0, 0.0, 0.0)]))
    assert mask.tolist() == [True, True, False]  # the mask is the union of both lesions
