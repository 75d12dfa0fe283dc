"""Register stage: models-from-code pyfunc, aliases, provenance tags, promotion gate, manual decisions."""

from __future__ import annotations

import csv
import getpass
import json
import pickle
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
from helpers import train_params

NAME = "resdx-reg"


REGISTER = {"model_name": NAME, "min_auroc_ci_low": 0.0, "max_ece_calibrated": 1.0}
POINTING_FAILS = ("saliency pointing game hit rate 0.0000 does not beat its random baseline 0.01562 by "
                  "register.min_pointing_margin 0.0500 (needs >= 0.06562; n=6 lesion case(s))")


def _write_sanity(folder: Path, hits: int | None, misses: int = 0, rho: float = 0.1) -> dict:
    """An explain stage's sanity.json (`pipeline.core.sanity`) in `folder`: 6 randomization pairs and, unless
    `hits` is None (no lesion masks), localization of 8^3 maps on a 2^3 lesion (random baseline 1/64)."""
    from pipeline.core import sanity as S
    from pipeline.io.artifacts import save_json
    from pipeline.layout import ExplainDir

    mask = np.zeros((8, 8, 8), bool)
    mask[:2, :2, :2] = True
    loc = []
    for i in range(0 if hits is None else hits + misses):
        cam = np.zeros((8, 8, 8))
        cam[(1, 1, 1) if i < hits else (6, 6, 6)] = 1.0
        loc.append(S.localization(cam, mask))
    sanity = S.summarize([(rho, 0.3)] * 6, loc)
    folder.mkdir(parents=True, exist_ok=True)
    save_json(ExplainDir(folder).sanity, sanity)
    return sanity


def _with(params, **sections):
    """`params` with some sections' keys replaced, e.g. explain={"out_dir": ...}."""
    return params.model_copy(update={k: getattr(params, k).model_copy(update=v) for k, v in sections.items()})


def _isolate_artifacts(params, tmp: Path) -> None:
    """Create the experiment first so that artifacts go to tmp, not to ./mlruns."""
    from pipeline.tracking.runs import experiment_name

    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    mlflow.create_experiment(experiment_name(params), artifact_location=(tmp / "artifacts").as_uri())


def _client(reg) -> mlflow.MlflowClient:
    uri = reg["params"].mlflow.tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _variant(models_dir: Path, out: Path, scale: float) -> Path:
    """A copy of the checkpoint with the classifier head scaled (0: constant output, -1: reversed ranking)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(models_dir, out)
    w = load_file(str(out / "model.safetensors"))
    head = [k for k in w if k.startswith(("fc.", "avgpool.evidence."))]  # avg-pool head or the LSE evidence head
    assert head, sorted(w)
    for k in head:
        w[k] = (w[k] * scale).contiguous()
    save_file(w, str(out / "model.safetensors"))
    return out


def _predictions(tmp: Path, split: str) -> np.ndarray:
    rows = [r for r in csv.DictReader((tmp / "reports/predictions.csv").open()) if r["split"] == split]
    return np.array([float(r["calibrated_probability"]) for r in rows])


@pytest.fixture(scope="module")
def reg(tiny_ingested, tmp_path_factory):
    """Train + evaluate once, then three registrations: pass, fail thresholds, worse than the champion."""
    from pipeline.io.tensors import load_split
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.register import run_register
    from pipeline.stages.train import run_train

    tmp = tmp_path_factory.mktemp("reg")
    _write_sanity(tmp / "explain", hits=5, misses=1)  # passes: hit rate 0.83 vs random baseline 1/64
    _write_sanity(tmp / "explain_bad", hits=0, misses=6)  # fails the pointing game
    params = train_params(tmp, tiny_ingested, register=REGISTER, explain={"out_dir": str(tmp / "explain")})
    _isolate_artifacts(params, tmp)
    run_train(params, progress=False)
    run_evaluate(params)
    out = {"tmp": tmp, "params": params}
    out["first"] = run_register(params)
    images = {s: load_split(tiny_ingested, s).images.numpy() for s in ("val", "test")}
    out["by_alias"] = {a: {s: mlflow.pyfunc.load_model(f"models:/{NAME}@{a}").predict(x) for s, x in images.items()}
                       for a in ("candidate", "champion")}
    out["second"] = run_register(train_params(
        tmp, tiny_ingested, register={**REGISTER, "min_auroc_ci_low": 1.0, "max_ece_calibrated": 0.0},
        explain={"out_dir": str(tmp / "explain_bad")}))
    client = mlflow.MlflowClient(tracking_uri=params.mlflow.tracking_uri)
    out["second_aliases"] = sorted(client.get_model_version(NAME, out["second"]["version"]).aliases)
    if float(out["first"]["tags"]["test_auroc"]) < 0.5:  # make sure the champion ranks better than chance
        out["flipped"] = run_register(params, models_dir=_variant(tmp / "models", tmp / "flipped", -1.0))
    out["constant"] = run_register(params, models_dir=_variant(tmp / "models", tmp / "constant", 0.0))
    out["local"] = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp / "download")))
    return out


def test_first_registration_is_tagged_and_becomes_champion(reg):
    from pipeline.core.plan import load_plan
    from pipeline.tracking.runs import git_commit

    tmp, first = reg["tmp"], reg["first"]
    assert first["version"] == "1" and first["aliases"] == ["candidate", "champion"] and first["gate"]["passed"]
    tags = _client(reg).get_model_version(NAME, "1").tags
    info = json.loads((tmp / "models/model.json").read_text())
    test = json.loads((tmp / "reports/metrics.json").read_text())["test"]
    assert tags["data_hash"] == info["data_hash"] and tags["git_commit"] == git_commit()
    assert tags["plan_hash"] == load_plan(tmp / "models/plan.json").hash()
    assert tags["mlflow_run_id"] == json.loads((tmp / "models/mlflow_run.json").read_text())["run_id"]
    assert float(tags["test_auroc"]) == pytest.approx(test["auroc"])
    assert float(tags["test_auroc_ci_low"]) == pytest.approx(test["auroc_ci95"][0])
    assert float(tags["test_auroc_ci_high"]) == pytest.approx(test["auroc_ci95"][1])
    assert float(tags["test_ece_calibrated"]) == pytest.approx(test["ece_calibrated"])
    assert float(tags["test_brier_calibrated"]) == pytest.approx(test["brier_calibrated"])
    assert tags["gate"] == "passed"
    assert "gate" in json.loads((tmp / "reports/registration.json").read_text())


def test_loaded_by_alias_it_reproduces_the_evaluate_stage(reg):
    for alias, preds in reg["by_alias"].items():
        for split, probs in preds.items():
            assert probs.shape[1] == 2
            np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
            np.testing.assert_allclose(probs[:, 1], _predictions(reg["tmp"], split), atol=1e-5, err_msg=alias)


def test_signature_and_input_example_describe_a_preprocessed_batch(reg):
    from mlflow.models import Model

    m = Model.load(str(reg["local"] / "MLmodel"))
    spec = m.signature.inputs.inputs[0]
    assert spec.type == np.dtype(np.float32) and spec.shape == (-1, 1, 24, 24, 24)
    assert m.signature.outputs.inputs[0].shape == (-1, 2)
    example = json.loads((reg["local"] / "serving_input_example.json").read_text())["inputs"]
    assert np.asarray(example).shape == (1, 1, 24, 24, 24)


def test_thresholds_that_fail_keep_the_version_a_candidate(reg):
    second = reg["second"]
    assert not second["gate"]["passed"] and reg["second_aliases"] == ["candidate"]
    assert second["champion"] == "1"
    reason = _client(reg).get_model_version(NAME, second["version"]).tags["gate_reason"]
    assert "max_ece_calibrated" in reason  # an ECE of 0 is out of reach; the CI bound may be a perfect 1.0
    if float(reg["first"]["tags"]["test_auroc_ci_low"]) < 1.0:
        assert "min_auroc_ci_low" in reason
    assert POINTING_FAILS in reason and POINTING_FAILS in second["gate"]["reasons"]  # its explain run's sanity.json
    assert [c["status"] for c in second["gate"]["explanations"]] == ["passed", "passed", "failed"]


def test_the_gate_reads_the_explain_stage_sanity_checks(reg, tmp_path):
    """Re-check the champion (no comparison with itself) against other explain outputs, without applying."""
    from pipeline.core.gate import NO_MASKS
    from pipeline.stages.register import run_gate

    tags = _client(reg).get_model_version(NAME, "1").tags
    assert tags["gate_reason"] == "passed all checks"
    assert json.loads(tags["gate_explanations"]) == {"explanations": "passed", "randomization": "passed",
                                                     "pointing_game": "passed"}
    params, champion = reg["params"], reg.get("flipped", reg["first"])["version"]
    missing = run_gate(_with(params, explain={"out_dir": tmp_path / "none"}), champion, apply=False)
    assert not missing["passed"] and missing["reasons"] == [
        f"no saliency sanity checks: {tmp_path / 'none' / 'sanity.json'} is missing (run the explain stage first, "
        "or set register.require_explanations: false)"]
    relaxed = _with(params, explain={"out_dir": tmp_path / "none"}, register={"require_explanations": False})
    assert run_gate(relaxed, champion, apply=False)["passed"]
    _write_sanity(tmp_path / "medmnist", hits=None, rho=0.7)  # no masks; maps ignore the weights
    no_masks = run_gate(_with(params, explain={"out_dir": tmp_path / "medmnist"}), champion, apply=False)
    assert [c["status"] for c in no_masks["explanations"]] == ["passed", "failed", NO_MASKS]
    assert len(no_masks["reasons"]) == 1 and "Spearman 0.7000" in no_masks["reasons"][0]
    assert "register.require_randomization_check: true" in no_masks["reasons"][0]
    _write_sanity(tmp_path / "medmnist_ok", hits=None)
    applied = run_gate(_with(params, explain={"out_dir": tmp_path / "medmnist_ok"}), champion)  # stays champion
    assert applied["passed"] and applied["champion_after"] == champion
    assert _client(reg).get_model_version(NAME, champion).tags["gate_reason"] == (
        "passed all checks; pointing game not applicable (no lesion masks)")


def test_a_model_worse_than_the_champion_on_the_same_test_set_is_not_promoted(reg):
    const = reg["constant"]
    champion = reg.get("flipped", reg["first"])["version"]
    cmp = const["gate"]["comparison"]
    assert cmp["champion_version"] == champion and cmp["n"] == len(_predictions(reg["tmp"], "test"))
    assert cmp["auroc_candidate"] == pytest.approx(0.5) and cmp["auroc_champion"] > 0.5 and cmp["worse"]
    assert not const["gate"]["passed"] and const["champion"] == champion
    tags = _client(reg).get_model_version(NAME, const["version"]).tags
    assert "worse than champion" in tags["gate_reason"] and tags["gate"] == "failed"
    assert json.loads(tags["gate_comparison"])["worse"] is True


def test_compare_with_champion_rule_and_delong():
    from pipeline.core.gate import compare_with_champion

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    good = np.clip(0.5 + 0.4 * (y - 0.5) + rng.normal(0, 0.2, y.size), 0, 1)
    noise = rng.uniform(size=y.size)
    as_probs = lambda p: np.stack([1 - p, p], axis=1)  # noqa: E731
    worse = compare_with_champion(y, as_probs(noise), as_probs(good), tolerance=0.0)
    assert worse["worse"] and worse["delong_p"] < 0.05
    same = compare_with_champion(y, as_probs(good), as_probs(good), tolerance=0.0)
    assert not same["worse"] and same["delong_p"] == pytest.approx(1.0)
    slack = compare_with_champion(y, as_probs(good * 0.9 + noise * 0.1), as_probs(good), tolerance=0.2)
    assert not slack["worse"]


def test_manual_promote_and_demote_are_recorded(reg):
    from pipeline.tracking.registry import demote, promote

    params = reg["params"].model_copy(update={"register": reg["params"].register.model_copy(
        update={"model_name": "resdx-manual"})})
    client = _client(reg)
    for _ in range(2):  # two versions of the already logged model: no re-logging
        mlflow.register_model(reg["first"]["logged_model_uri"], "resdx-manual")
    p2 = promote(params, 2, "reader study sign-off")
    assert p2["champion"] == "2" and p2["champion_before"] is None
    p1 = promote(params, "1", "rollback after drift")
    assert p1["champion_before"] == "2"
    tags1 = client.get_model_version("resdx-manual", "1").tags
    tags2 = client.get_model_version("resdx-manual", "2").tags
    assert tags1["promoted_by"] == getpass.getuser() and tags1["promotion_reason"] == "rollback after drift"
    assert tags1["promoted_at"].endswith("+00:00") and tags2["replaced_by"] == "1"
    d = demote(params, 1, "safety recall")
    assert d["was_champion"] and d["champion"] is None
    tags1 = client.get_model_version("resdx-manual", "1").tags
    assert tags1["demoted_by"] == getpass.getuser() and tags1["demotion_reason"] == "safety recall"
    assert [e["action"] for e in json.loads(tags1["decisions"])] == ["promote", "demote"]
    with pytest.raises(ValueError, match="reason"):
        demote(params, 2, "  ")


def test_loading_and_predicting_unpickles_nothing(reg, monkeypatch):
    import cloudpickle
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for mod, fn in ((pickle, "load"), (pickle, "loads"), (cloudpickle, "load"), (cloudpickle, "loads"),
                    (torch, "load")):
        monkeypatch.setattr(mod, fn, refuse)
    _client(reg)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    x = np.zeros((2, 1, 24, 24, 24), dtype=np.float32)
    assert model.predict(x).shape == (2, 2)
    files = [p for p in reg["local"].rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pkl", ".pickle", ".pt", ".pth", ".pt2", ".joblib")]
    mlmodel = (reg["local"] / "MLmodel").read_text()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel and "model_code_path" in mlmodel
    assert (reg["local"] / "artifacts/model.safetensors").exists()
    assert (reg["local"] / "code/pipeline/tracking/serving_model.py").exists()


def test_a_version_in_the_local_store_is_read_in_place(reg, tmp_path, monkeypatch):
    # load_pyfunc removes MLflow's download once loaded (tests/test_mlflow_server.py: through a server, where
    # MLflow downloads); a local store's model is read where it is: no copy, the same predictions.
    import tempfile

    from pipeline.io.tensors import load_split
    from pipeline.tracking.registry import load_pyfunc

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    _client(reg)
    x = load_split(reg["params"].ingest.out_dir, "test").images.numpy()
    probs = load_pyfunc(f"models:/{NAME}/1").predict(x)
    assert list(tmp_path.iterdir()) == []
    np.testing.assert_allclose(probs, reg["by_alias"]["candidate"]["test"], atol=1e-6)  # v1, loaded at the start


def test_after_a_load_every_module_still_comes_from_the_installed_package(reg, tmp_path):
    # Loading puts the model's bundled copy of `pipeline` on sys.path (MLflow's code_paths), then ResDx removes
    # that copy. Were `pipeline` a namespace package, its path would follow sys.path and a module first imported
    # after the load (what predict imports per study) would be looked for in the removed copy.
    import subprocess
    import sys

    import pipeline

    uri = reg["params"].mlflow.tracking_uri
    code = "\n".join(["import mlflow, pipeline.tracking.registry as r",
                       f"mlflow.set_tracking_uri({uri!r}); mlflow.set_registry_uri({uri!r})",
                       f"r.load_pyfunc('models:/{NAME}/1')",
                       "import pipeline.io.dicom_results as m; print(m.__file__)"])
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(done.stdout.strip()).parent.parent == Path(pipeline.__file__).parent


def test_model_card_is_written_and_bundled(reg):
    text = (reg["tmp"] / "reports/model_card.md").read_text()
    for heading in ("Intended use", "Data", "Preprocessing", "Performance", "Calibration", "Subgroups",
                    "Explainability", "Limitations", "CLAIM"):
        assert heading in text, heading
    assert "| test |" in text and "GE MEDICAL SYSTEMS" in text and "95% CI" in text
    assert (reg["local"] / "artifacts/model_card.md").read_text().startswith(f"# Model card: {NAME}")
