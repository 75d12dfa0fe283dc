"""Prediction from the registry: study paths through the bundled ingest code, batches with bad studies,
and the champion served over HTTP by `mlflow models serve`."""

from __future__ import annotations

import csv
import json
import re
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pytest
from helpers import mlflow_serve, register_tiny_champion

NAME = "resdx-serve"
CHAMPION = f"models:/{NAME}@champion"


@pytest.fixture(scope="module")
def served(tiny_ingested, demo_cohort, tmp_path_factory):
    """A tiny model trained, evaluated and registered as champion; evaluate's probabilities by case."""
    from pipeline.sources.manifest import read_manifest

    tmp = tmp_path_factory.mktemp("serve")
    params = register_tiny_champion(tmp, tiny_ingested, NAME)
    rows = list(csv.DictReader((tmp / "reports/predictions.csv").open()))
    manifest = {r.case_id: r for r in read_manifest(demo_cohort)}
    evaluated = {r["case_id"]: float(r["calibrated_probability"]) for r in rows}
    pick = {}
    for r in rows:  # one evaluated CT (DICOM folder) and one MR (NIfTI file) study
        case = manifest[r["case_id"]]
        pick.setdefault(case.modality, case)
    assert set(pick) == {"CT", "MR"}
    return {"tmp": tmp, "params": params, "uri": params.mlflow.tracking_uri, "evaluated": evaluated,
            "ct": pick["CT"], "mr": pick["MR"], "threshold": json.loads((tmp / "reports/calibration.json")
                                                                       .read_text())["threshold"]}


def _load(served):
    mlflow.set_tracking_uri(served["uri"])
    mlflow.set_registry_uri(served["uri"])
    return mlflow.pyfunc.load_model(CHAMPION)


def test_a_dataframe_of_paths_is_read_by_the_ingest_code(served):
    import pandas as pd

    model = _load(served)
    ct, mr = served["ct"], served["mr"]
    assert ct.path.is_dir() and mr.path.name.endswith(".nii.gz")
    df = pd.DataFrame({"path": [str(ct.path), str(mr.path)], "modality": [None, "MR"]})
    out = model.unwrap_python_model().predict_studies(df)
    assert list(out["status"]) == ["ok", "ok"] and list(out["modality"]) == ["CT", "MR"]  # CT read from the header
    for (_, row), case in zip(out.iterrows(), (ct, mr)):
        assert row["p_lesion"] == pytest.approx(served["evaluated"][case.case_id], abs=1e-4)
        assert row["decision"] == int(row["p_lesion"] >= served["threshold"])
    # The tensor signature is enforced before `predict`: paths never reach the model through it (nor over HTTP).
    with pytest.raises(mlflow.exceptions.MlflowException, match="schema"):
        model.predict(df)


def test_a_batch_reports_bad_studies_and_keeps_going_without_phi(served, tmp_path):
    from pipeline.stages.predict import run_predict, study_id

    empty = tmp_path / "empty-study"
    empty.mkdir()
    note = tmp_path / "report.txt"
    note.write_text("not an image\n")
    phi_named = tmp_path / "DOE^JOHN_MRN12345"
    phi_named.symlink_to(served["ct"].path, target_is_directory=True)
    out = tmp_path / "out"
    summary = run_predict(CHAMPION, [phi_named, empty, note], out, tracking_uri=served["uri"], progress=False)
    assert (summary["n"], summary["n_ok"], summary["n_rejected"]) == (3, 1, 2)
    files = sorted(p.name for p in out.iterdir())
    assert all(re.fullmatch(r"study-[0-9a-f]{12}\.json", f) for f in files) and len(files) == 3
    good = json.loads((out / f"{study_id(phi_named)}.json").read_text())
    assert good["status"] == "ok" and good["model"] == {"uri": CHAMPION, "name": NAME, "version": "1"}
    p1 = good["probabilities"]["lesion"]
    assert p1 == pytest.approx(served["evaluated"][served["ct"].case_id], abs=1e-4)
    assert sum(good["probabilities"].values()) == pytest.approx(1.0)
    assert good["decision"]["index"] == int(p1 >= served["threshold"]) and good["decision"]["threshold"] > 0
    bad = json.loads((out / f"{study_id(empty)}.json").read_text())
    assert bad["status"] == "rejected" and bad["reason_code"] == "empty" and bad["probabilities"] is None
    odd = json.loads((out / f"{study_id(note)}.json").read_text())
    assert odd["status"] == "rejected" and odd["reason_code"] and odd["reason"]
    for f in out.iterdir():
        text = f.read_text()
        assert "DOE" not in text and "MRN12345" not in text and str(tmp_path) not in text, f.name


def test_nifti_study_with_modality_and_optional_saliency(served, tmp_path):
    from pipeline.stages.predict import run_predict

    out = tmp_path / "out"
    summary = run_predict(CHAMPION, [served["mr"].path], out, modality="MR", saliency=True,
                          tracking_uri=served["uri"], progress=False)
    rec = summary["records"][0]
    assert rec["status"] == "ok" and rec["modality"] == "MR"
    assert rec["probabilities"]["lesion"] == pytest.approx(served["evaluated"][served["mr"].case_id], abs=1e-4)
    import nibabel as nib

    overlay = nib.load(str(out / rec["saliency"]))
    native = nib.load(str(served["mr"].path))
    assert overlay.shape[:3] == native.shape[:3]
    np.testing.assert_allclose(overlay.affine, native.affine, atol=1e-4)


def _post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_the_champion_is_served_over_http(served, tiny_ingested, tmp_path):
    from pipeline.io.tensors import load_split

    with mlflow_serve(CHAMPION, served["uri"], tmp_path / "serve.log", timeout_s=90) as (base, _, _):
        test = load_split(tiny_ingested, "test")
        status, body = _post(f"{base}/invocations", {"inputs": test.images.numpy().tolist()})
        assert status == 200, body
        probs = np.asarray(body["predictions"])
        expected = np.array([served["evaluated"][c] for c in test.case_ids])
        np.testing.assert_allclose(probs[:, 1], expected, atol=1e-5)
        status, body = _post(f"{base}/invocations", {"dataframe_records": [{"path": str(served["ct"].path)}]})
        assert status == 400  # the signature admits tensors only: the server never opens paths
        status, body = _post(f"{base}/invocations", {"inputs": np.zeros((1, 1, 8, 8, 8)).tolist()})
        assert status == 400 and "shape" in body.get("message", "").lower()


@pytest.mark.parametrize("class_index", [None, 1])
def test_explain_and_predict_give_one_decision_and_one_map(served, tmp_path, class_index):
    """The same case through `resdx explain` (ingested tensor, checkpoint) and `resdx predict --saliency`
    (source study, registered model): one calibrated decision, one explained class (the decided one, or
    the configured `explain.class_index`), one map with the same method and shifts."""
    import nibabel as nib

    from pipeline.stages.explain import run_explain
    from pipeline.stages.predict import run_predict

    case = served["ct"]
    split = next(r["split"] for r in csv.DictReader((served["tmp"] / "reports/predictions.csv").open())
                 if r["case_id"] == case.case_id)
    params = served["params"]
    ex_cfg = params.explain.model_copy(update={"out_dir": tmp_path / "explain", "splits": [split],
                                               "write_dicom": False, "class_index": class_index})
    assert ex_cfg.shifts == 2  # the shipped default, used by both
    run_explain(params.model_copy(update={"explain": ex_cfg}), case_ids=[case.case_id])
    explained = next(csv.DictReader((tmp_path / "explain/cases.csv").open()))
    evaluated = next(r for r in csv.DictReader((served["tmp"] / "reports/predictions.csv").open())
                     if r["case_id"] == case.case_id)
    assert explained["decision"] == evaluated["decision"]  # evaluate and explain decide alike
    expected_class = int(explained["decision"]) if class_index is None else class_index
    assert int(explained["explained_class"]) == expected_class

    rec = run_predict(CHAMPION, [case.path], tmp_path / "pred", saliency=True, tracking_uri=served["uri"],
                      progress=False, explain=ex_cfg)["records"][0]
    assert rec["status"] == "ok"
    assert rec["decision"]["index"] == int(explained["decision"])
    assert rec["saliency_class"] == ["no lesion", "lesion"][expected_class]
    a = np.asarray(nib.load(str(tmp_path / "explain" / explained["overlay"])).dataobj)
    b = np.asarray(nib.load(str(tmp_path / "pred" / rec["saliency"])).dataobj)
    assert a.shape == b.shape
    if class_index == 1:
        assert a.max() > 0.5  # a real map, not two empty ones
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_run_predict_defaults_to_the_params_explain_settings():
    import inspect

    from pipeline.config import ExplainConfig
    from pipeline.stages.predict import run_predict

    assert inspect.signature(run_predict).parameters["explain"].default is None  # None -> ExplainConfig()
    assert ExplainConfig().shifts == 2 and ExplainConfig().class_index is None
