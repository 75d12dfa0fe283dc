"""K-fold cross-validation end to end: fold members, out-of-fold calibration, the ensemble registered,
served with uncertainty and referral, and explained as the mean of its members' maps."""

from __future__ import annotations

import csv
import json
import re

import mlflow
import numpy as np
import pytest
from conftest import tiny_params
from safetensors.torch import load_file

from pipeline.config import params_from_dict

pytestmark = pytest.mark.slow
NAME = "resdx-kfold"


@pytest.fixture(scope="module")
def kfold(tiny_ingested, tmp_path_factory):
    from pipeline.core import sanity as S
    from pipeline.io.artifacts import save_json
    from pipeline.stages.train import run_train
    from pipeline.tracking.runs import experiment_name

    tmp = tmp_path_factory.mktemp("kfold")
    raw = tiny_params(tmp, tiny_ingested, epochs=1)
    raw["split"] = {"folds": 3}
    raw["register"] = {"model_name": NAME, "min_auroc_ci_low": 0.0, "max_ece_calibrated": 1.0}
    raw["explain"] = {"out_dir": str(tmp / "explain"), "write_dicom": False, "max_cases": 1, "splits": ["test"]}
    save_json(tmp / "explain" / "sanity.json", S.summarize([(0.1, 0.3)] * 4, []))  # the gate's input, passing
    params = params_from_dict(raw)
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    mlflow.create_experiment(experiment_name(params), artifact_location=(tmp / "artifacts").as_uri())
    summary = run_train(params, progress=False)
    return tmp, params, summary


def test_members_train_on_patient_level_folds_of_train_and_val(kfold, tiny_ingested):
    from pipeline.io.index import read_index

    tmp, params, summary = kfold
    assert summary.members_trained == ["fold0", "fold1", "fold2"]
    rows = {r["case_id"]: r for r in read_index(tiny_ingested) if r["status"] == "ok"}
    folds = {r["case_id"]: int(r["fold"]) for r in csv.DictReader((tmp / "models/folds.csv").open())}
    assert set(folds) == {c for c, r in rows.items() if r["split"] in ("train", "val")}  # test is in no fold
    assert set(folds.values()) == {0, 1, 2}
    by_patient: dict = {}
    for c, f in folds.items():
        by_patient.setdefault(rows[c]["patient_id"], set()).add(f)
    assert all(len(f) == 1 for f in by_patient.values())
    info = json.loads((tmp / "models/model.json").read_text())
    assert info["spec"]["n_members"] == 3 and [f["fold"] for f in info["folds"]] == [0, 1, 2]
    assert all(k.startswith("members.") for k in load_file(str(tmp / "models/model.safetensors")))
    network = json.loads((tmp / "models/plan.json").read_text())["network"]
    assert network["choices"]["conv1_t_stride"] == 2 and network["why"]["conv1_t_stride"] == "params"
    assert network["why"]["batch_size"] == "params" and network["fingerprint"]["has_masks"] is True


def test_a_rerun_with_unchanged_inputs_trains_no_member_again(kfold):
    from pipeline.stages.train import run_train

    tmp, params, summary = kfold
    before = load_file(str(tmp / "models/model.safetensors"))
    again = run_train(params, progress=False)
    assert again.members_trained == []
    after = load_file(str(tmp / "models/model.safetensors"))
    assert all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in before)


@pytest.fixture(scope="module")
def evaluated(kfold):
    from pipeline.stages.evaluate import run_evaluate

    tmp, params, _ = kfold
    return run_evaluate(params)


def test_evaluate_reports_folds_out_of_fold_and_the_ensemble_on_test(kfold, evaluated):
    tmp, _, _ = kfold
    m = evaluated
    assert "oof" in m and "val" not in m
    n_pool = len(list(csv.DictReader((tmp / "models/folds.csv").open())))
    assert m["oof"]["n"] == n_pool == m["calibration"]["n_fitted"]
    assert m["calibration"]["fitted_on"] == "out-of-fold (3 folds)"
    assert [f["fold"] for f in m["per_fold"]] == [0, 1, 2]
    assert sum(f["n_held_out"] for f in m["per_fold"]) == n_pool
    alt = m["calibration"]["alternatives"]
    assert alt["out_of_fold"]["n_fitted"] == n_pool > alt["fold0_only"]["n_fitted"]
    assert m["tta_effect"]["n_views"] == 8 and "auroc_without" in m["tta_effect"]
    assert "3 member(s) x 8 test-time transform(s)" in m["uncertainty"]["measure"]
    assert {"referral_rate", "error_rate_automatic"} <= set(m["uncertainty"]["referral"])
    rows = list(csv.DictReader((tmp / "reports/predictions.csv").open()))
    assert {r["split"] for r in rows} == {"oof", "test"}
    assert any(float(r["uncertainty"]) > 0 for r in rows)
    curve = list(csv.DictReader((tmp / "reports/plots/selective_test.csv").open()))
    assert float(curve[-1]["coverage"]) == 1.0
    cal = json.loads((tmp / "reports/calibration.json").read_text())
    assert cal["tta"] == "flips" and cal["referral"] == {"band": 0.1, "max_spread": 0.15}


def test_the_ensemble_is_registered_served_and_explained(kfold, evaluated, demo_cohort, tmp_path):
    from pipeline.sources.manifest import read_manifest
    from pipeline.stages.explain import run_explain
    from pipeline.stages.predict import run_predict
    from pipeline.stages.register import run_register

    tmp, params, _ = kfold
    reg = run_register(params)
    assert reg["version"] == "1"
    test_case = next(r["case_id"] for r in csv.DictReader((tmp / "reports/predictions.csv").open())
                     if r["split"] == "test")
    case = next(c for c in read_manifest(demo_cohort) if c.case_id == test_case)
    rec = run_predict(f"models:/{NAME}/1", [case.path], tmp_path / "pred", modality=case.modality,
                      tracking_uri=params.mlflow.tracking_uri,
                      progress=False)["records"][0]
    assert rec["status"] == "ok"
    assert rec["uncertainty"]["n_views"] == 24 and rec["uncertainty"]["spread"] >= 0
    assert isinstance(rec["referral"]["refer"], bool) and rec["referral"]["rule"]["band"] == 0.1
    evaluated_p = next(float(r["calibrated_probability"])
                       for r in csv.DictReader((tmp / "reports/predictions.csv").open()) if r["case_id"] == test_case)
    assert rec["probabilities"]["lesion"] == pytest.approx(evaluated_p, abs=1e-4)  # served = evaluated
    run_explain(params, case_ids=[test_case])
    explained = next(csv.DictReader((tmp / "explain/cases.csv").open()))
    assert explained["case_id"] == test_case and explained["overlay"]
    assert float(explained["uncertainty"]) > 0 and explained["referred"] in ("0", "1")  # 24 views disagree a little
    assert explained["decision"] == str(rec["decision"]["index"])


def test_the_cli_summaries_name_the_folds_and_the_network(kfold, evaluated, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app

    _, params, _ = kfold
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    runner = CliRunner()
    train = runner.invoke(app, ["train", "--params", str(path)])
    assert train.exit_code == 0, train.output
    flat = re.sub(r"[\s│┃]", "", train.output)  # rich wraps cells at 80 columns
    assert "conv1_t_stride=2" in flat and "none(cached)" in flat
    result = runner.invoke(app, ["evaluate", "--params", str(path)])
    assert result.exit_code == 0, result.output
    flat = re.sub(r"[\s│┃]", "", result.output)
    assert "oof" in flat and "fold2" in flat and "out-of-fold(3folds)" in flat and "referredtoahuman" in flat
