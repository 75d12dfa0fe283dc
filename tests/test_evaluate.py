"""Evaluate stage on a tiny trained model: metrics contract, predictions, plots, MLflow."""

from __future__ import annotations

import csv
import json

import mlflow
import numpy as np
import pytest
from helpers import train_params

from pipeline.stages.evaluate import split_metrics


@pytest.fixture(scope="module")
def evaluated(tiny_ingested, tmp_path_factory):
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.train import run_train

    tmp = tmp_path_factory.mktemp("eval")
    params = train_params(tmp, tiny_ingested)
    run_train(params, progress=False)
    return tmp, run_evaluate(params)


def test_metrics_json_has_the_dvc_contract(evaluated):
    tmp, _ = evaluated
    m = json.loads((tmp / "reports/metrics.json").read_text())
    for split in ("val", "test"):
        for key in ("auroc", "auroc_ci95", "accuracy", "ece", "ece_calibrated", "brier", "nll", "mce",
                    "ece_adaptive", "sensitivity", "specificity", "ppv", "npv"):
            assert key in m[split], (split, key)
        lo, hi = m[split]["auroc_ci95"]
        assert lo <= m[split]["auroc"] <= hi
    assert m["calibration"]["temperature"] > 0 and 0 <= m["calibration"]["threshold"] <= 1
    assert "modality" in m["subgroups"]["test"]


def test_predictions_are_phi_free_and_consistent_with_the_threshold(evaluated, tiny_ingested):
    tmp, result = evaluated
    rows = list(csv.DictReader((tmp / "reports/predictions.csv").open()))
    assert set(rows[0]) == {"case_id", "split", "label", "probability", "calibrated_probability", "decision",
                            "uncertainty", "referred"}
    thr = result["calibration"]["threshold"]
    for r in rows:
        assert int(r["decision"]) == int(float(r["calibrated_probability"]) >= thr - 1e-6)
        assert r["case_id"].startswith("demo-c")


def test_offline_figures_and_dvc_plot_tables_exist(evaluated):
    tmp, _ = evaluated
    for f in ("figures/calibration_test.png", "plots/calibration_test.csv"):
        assert (tmp / "reports" / f).stat().st_size > 100
    assert (tmp / "reports/figures/calibration_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_are_logged_to_the_training_run(evaluated):
    tmp, _ = evaluated
    run_id = json.loads((tmp / "models/mlflow_run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert "test_auroc" in run.data.metrics and "temperature" in run.data.metrics
    assert "evaluation" in [a.path for a in client.list_artifacts(run_id)]


def test_split_metrics_on_a_known_case():
    y = np.array([0, 0, 1, 1])
    logits = np.log(np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]]))
    m = split_metrics(y, logits, temperature=1.0, threshold=0.5, n_boot=200, seed=0)
    assert m["auroc"] == 0.75 and m["accuracy"] == 0.75 and m["sensitivity"] == 0.5 and m["specificity"] == 1.0
    assert m["ece"] == m["ece_calibrated"]  # T = 1 changes nothing
