"""End to end on the three-class synthetic cohort: synthesize(task=three_class) -> ingest -> train -> evaluate."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from helpers import read_index, synthetic_task_cohort, train_params

from pipeline.stages.synthesize import CLASS_NAMES

NAMES = ["no lesion", "hyperdense", "hypodense"]


@pytest.mark.slow
def test_three_class_cohort_trains_and_evaluates(tmp_path):
    from pipeline.io.checkpoint import load_checkpoint
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.train import run_train

    # 12 patients x 2-3 studies, two thirds with a lesion: ~10 studies per class, and (this seed) all
    # three classes in val and in test, so the test split gets macro/micro one-vs-rest AUROC.
    summary, cfg, ing, data = synthetic_task_cohort(tmp_path, "three_class", NAMES, lesion_fraction=0.67)
    assert list(summary.class_names) == NAMES == list(CLASS_NAMES["three_class"])
    assert min(summary.label_counts) >= 8, summary.label_counts

    plan = json.loads((ing / "plan.json").read_text())
    assert plan["n_classes"] == 3 and plan["class_names"] == NAMES
    rows = [r for r in read_index(ing) if r["status"] == "ok"]
    assert len(rows) == summary.n_studies
    for split in ("val", "test"):
        assert {int(r["label"]) for r in rows if r["split"] == split} == {0, 1, 2}, split

    # The plain CNN: small, and named explicitly so the test does not depend on the network plan's choice.
    params = train_params(tmp_path, ing, data=data, model={"name": "plain_cnn"})
    run_train(params, progress=False)
    model, info = load_checkpoint(tmp_path / "models")
    assert info["class_names"] == NAMES
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 24, 24, 24)).shape == (2, 3)

    result = run_evaluate(params)
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert metrics["test"] == result["test"]
    for key in ("auroc", "auroc_micro", "accuracy"):  # auroc: macro one-vs-rest
        assert 0.0 <= metrics["test"][key] <= 1.0, key
    assert metrics["calibration"]["threshold"] is None  # argmax of calibrated probabilities
    per_class = metrics["test"]["per_class"]
    assert set(per_class) == {"no lesion", "hyperdense", "hypodense"}
    assert sum(c["n"] for c in per_class.values()) == metrics["test"]["n"]
    assert all(0.0 <= c["ece_ovr_calibrated"] <= 1.0 for c in per_class.values())
    assert len(metrics["calibration"]["bias"]) == 3  # temperature and a bias per class
    with (tmp_path / "reports/predictions.csv").open(newline="") as fh:
        preds = list(csv.DictReader(fh))
    assert {p["split"] for p in preds} == {"val", "test"}
    assert {int(p["decision"]) for p in preds} <= {0, 1, 2}
    assert {int(p["label"]) for p in preds} == {0, 1, 2}
