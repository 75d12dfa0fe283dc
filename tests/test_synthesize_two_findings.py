"""End to end on the multi-label synthetic cohort: synthesize(task=two_findings) -> ingest -> train ->
evaluate -> explain -> register -> predict, with one sigmoid and one threshold per finding."""

from __future__ import annotations

import csv
import json

import mlflow
import numpy as np
import pytest
import torch
from helpers import read_index, synthetic_task_cohort, train_params
from scipy.special import expit

from pipeline.stages.synthesize import CLASS_NAMES

NAMES = ["hyperdense", "hypodense"]
MODEL = "resdx-two-findings"


@pytest.mark.slow
def test_two_findings_cohort_trains_evaluates_and_serves(tmp_path):
    from pipeline.core import sanity as S
    from pipeline.io.artifacts import save_json
    from pipeline.io.checkpoint import load_checkpoint
    from pipeline.io.tensors import load_split
    from pipeline.sources.manifest import read_manifest
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.explain import run_explain
    from pipeline.stages.predict import run_predict
    from pipeline.stages.register import run_register
    from pipeline.stages.train import run_train
    from pipeline.tracking.runs import experiment_name

    # 12 patients x 2-3 studies; each finding in half of them, independently: (this seed) every label
    # combination in val and both classes of each finding in test.
    summary, cfg, ing, data = synthetic_task_cohort(tmp_path, "two_findings", NAMES, lesion_fraction=0.5)
    assert list(summary.class_names) == NAMES == list(CLASS_NAMES["two_findings"])
    assert summary.label_counts == (round(summary.n_studies / 2),) * 2
    manifest = [r for r in csv.DictReader(cfg.manifest.open())]
    assert {r["label"] for r in manifest} == {"0;0", "1;0", "0;1", "1;1"}  # both findings may co-occur
    truth = json.loads((cfg.out_dir / "truth.json").read_text())
    both = [c for c in truth["cases"] if c["label"] == [1, 1]]
    assert both and all(c["second_lesion_centre_ras"] and c["second_lesion_contrast"] < 0 for c in both)

    plan = json.loads((ing / "plan.json").read_text())
    assert plan["task"] == "multi_label" and plan["n_classes"] == 2 and plan["class_names"] == NAMES
    rows = [r for r in read_index(ing) if r["status"] == "ok"]
    assert len(rows) == summary.n_studies
    assert {r["label"] for r in rows if r["split"] == "val"} == {"0;0", "1;0", "0;1", "1;1"}
    test_labels = load_split(ing, "test").labels
    assert test_labels.shape[1] == 2 and {tuple(np.unique(test_labels[:, k]).tolist()) for k in (0, 1)} == {(0, 1)}

    params = train_params(tmp_path, ing, data=data, model={"name": "plain_cnn"},
                          register={"model_name": MODEL, "min_auroc_ci_low": 0.0, "max_ece_calibrated": 1.0,
                                    "min_pointing_margin": -1.0},
                          explain={"out_dir": str(tmp_path / "explain"), "write_dicom": False, "max_cases": 2,
                                   "splits": ["test"]})
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    mlflow.create_experiment(experiment_name(params), artifact_location=(tmp_path / "artifacts").as_uri())
    run_train(params, progress=False)
    model, info = load_checkpoint(tmp_path / "models")
    assert info["class_names"] == NAMES and info["task"] == "multi_label"
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 24, 24, 24)).shape == (2, 2)

    result = run_evaluate(params)
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert metrics["test"] == result["test"]
    test = metrics["test"]
    assert test["task"] == "multi_label" and set(test["per_label"]) == set(NAMES)
    for name in NAMES:
        lab = test["per_label"][name]
        assert 0.0 <= lab["auroc"] <= 1.0 and len(lab["auroc_ci95"]) == 2
        assert 0.0 <= lab["threshold"] <= 1.0 and {"ece", "ece_calibrated", "sensitivity"} <= set(lab)
    assert test["auroc"] == pytest.approx(np.mean([test["per_label"][n]["auroc"] for n in NAMES]), abs=1e-4)
    assert len(test["auroc_ci95"]) == 2 and test["ece_calibrated"] is not None  # what the gate reads
    cal_m = metrics["calibration"]
    assert cal_m["threshold"] is None and set(cal_m["thresholds"]) == set(NAMES)
    cal = json.loads((tmp_path / "reports/calibration.json").read_text())
    assert cal["task"] == "multi_label" and len(cal["thresholds"]) == 2 and cal["binary"] is False
    for k, name in enumerate(NAMES):
        assert test["per_label"][name]["threshold"] == pytest.approx(cal["thresholds"][k], abs=1e-4)

    with (tmp_path / "reports/predictions.csv").open(newline="") as fh:
        preds = list(csv.DictReader(fh))
    assert {p["split"] for p in preds} == {"val", "test"}
    assert {"p_hyperdense", "p_hypodense", "decision_hyperdense", "decision_hypodense"} <= set(preds[0])
    for p in preds:
        probs = [float(p[f"p_{n}"]) for n in NAMES]
        for q, t, d in zip(probs, cal["thresholds"], p["decision"].split(";")):
            if abs(q - t) > 1e-5:  # the CSV's 6 decimals cannot tell a case at the threshold itself
                assert int(d) == int(q >= t)
        assert p["decision"] == f"{p['decision_hyperdense']};{p['decision_hypodense']}"
        assert p["label"] in {"0;0", "1;0", "0;1", "1;1"}
    sums = np.array([sum(float(p[f"p_{n}"]) for n in NAMES) for p in preds])
    assert np.abs(sums - 1.0).max() > 1e-3  # independent sigmoids, not a softmax
    # They are sigmoid(mean view logit / T) of the model's own logits.
    from pipeline.core.views import view_logits

    test_set = load_split(ing, "test")
    logits = view_logits(model, test_set.images, torch.device("cpu"), 4, cal["tta"]).numpy().mean(axis=(0, 1))
    by_case = {p["case_id"]: p for p in preds if p["split"] == "test"}
    for c, z in zip(test_set.case_ids, logits):
        assert [float(by_case[c][f"p_{n}"]) for n in NAMES] == pytest.approx(expit(z / cal["temperature"]),
                                                                             abs=1e-5)
    for name in ("roc_test.csv", "pr_test.csv", "confusion_test.csv", "calibration_test.csv", "selective_test.csv"):
        assert (tmp_path / "reports/plots" / name).exists(), name

    explained = run_explain(params)
    assert explained["n_cases"] == 2
    cases = list(csv.DictReader((tmp_path / "explain/cases.csv").open()))
    assert all(c["label"].count(";") == 1 and c["decision"].count(";") == 1 for c in cases)

    save_json(tmp_path / "explain" / "sanity.json", S.summarize([(0.1, 0.3)] * 4, []))  # a passing explanation
    reg = run_register(params)
    assert reg["version"] == "1" and reg["gate"]["passed"], reg["gate"]["reasons"]
    case_id = next(iter(by_case))
    row = next(r for r in read_manifest(cfg.manifest) if r.case_id == case_id)
    rec = run_predict(f"models:/{MODEL}/1", [row.path], tmp_path / "pred", modality=row.modality,
                      tracking_uri=params.mlflow.tracking_uri, progress=False)["records"][0]
    assert rec["status"] == "ok"
    assert rec["probabilities"] == pytest.approx({n: float(by_case[case_id][f"p_{n}"]) for n in NAMES}, abs=1e-4)
    labels = rec["decision"]["labels"]
    assert set(labels) == set(NAMES)
    for k, name in enumerate(NAMES):
        assert labels[name]["decision"] == int(by_case[case_id][f"decision_{name}"])
        assert labels[name]["threshold"] == pytest.approx(cal["thresholds"][k])
    assert rec["decision"]["positive"] == [n for n in NAMES if labels[n]["decision"]]
    assert isinstance(rec["referral"]["refer"], bool) and rec["uncertainty"]["n_views"] == 8
