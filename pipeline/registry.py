"""Register stage: the trained model into the MLflow Model Registry, versioned, tagged and gated.

`run_register` logs the model to its training run as an MLflow *models-from-code* pyfunc
(`pipeline/serving_model.py` plus the `pipeline` package as code; safetensors weights, the
model spec, the ingest plan, the calibration (temperature + threshold) and the model card as
artifacts: nothing is pickled), creates a new version of `register.model_name`, points the
alias ``candidate`` at it and tags it with its provenance (data hash, git commit, plan hash,
run id) and key test metrics.

Promotion gate (applied to every new version; the rule, in order):

1. ``test.auroc_ci95[0] >= register.min_auroc_ci_low`` (lower 95% bootstrap bound of the test
   AUROC, from reports/metrics.json);
2. ``test.ece_calibrated <= register.max_ece_calibrated`` (ECE after temperature scaling);
3. not worse than the current champion *on the same test set*: the champion (if any) and the
   candidate are both loaded from the registry and score the currently ingested test split
   (``load_split(ingest.out_dir, "test")``); the candidate passes if
   ``AUROC_candidate >= AUROC_champion - register.champion_tolerance``. A paired DeLong test
   (`pipeline.metrics.delong_test`) is reported with it (binary models), but the decision is the
   tolerance rule: with small test sets a non-significant p-value is not evidence of equality.
   When the champion was trained with another preprocessing plan, it scores the same test cases
   from their source studies (manifest paths) through its own bundled plan; if it cannot, the
   gate fails (a human can still `promote`).

All pass: alias ``champion`` moves to the new version (the previous champion is tagged
``replaced_by``). Otherwise the version stays ``candidate`` with tag ``gate_reason``.
``candidate`` always names the most recent registration. `promote` / `demote` record manual
decisions (who = `getpass.getuser()`, when = UTC time, why) in tags and in a ``decisions`` log tag.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import math
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from pipeline.config import Params

CANDIDATE = "candidate"
CHAMPION = "champion"
SERVING_MODEL = Path(__file__).with_name("serving_model.py")
PACKAGE_DIR = Path(__file__).parent
REQUIREMENTS = ("torch", "monai", "numpy", "scipy", "scikit-learn", "pandas", "pydicom", "pylibjpeg",
                "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "nibabel", "safetensors", "pydantic",
                "pyyaml", "rich", "mlflow")
MAX_TAG = 4000


# ----------------------------------------------------------------------------- small helpers
def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def _who() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError, ImportError):
        return "unknown"


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "none"
    if isinstance(v, float):
        return f"{v:.6g}"
    return v if isinstance(v, str) else json.dumps(v)


def _client(params: Params):
    import mlflow
    from mlflow import MlflowClient

    uri = params.mlflow.tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def alias_version(client, name: str, alias: str) -> str | None:
    """The version an alias points to, or None (no such alias or model)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _requirements() -> list[str]:
    reqs = []
    for pkg in REQUIREMENTS:
        try:
            reqs.append(f"{pkg}=={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def _plan_hash(plan: dict) -> str:
    from pipeline.plan import plan_hash

    try:
        return plan_hash(plan)
    except KeyError:  # MedMNIST plans have other keys: hash the whole decision record
        import hashlib

        keep = {k: v for k, v in plan.items() if k not in ("counts", "warnings")}
        return hashlib.blake2b(json.dumps(keep, sort_keys=True).encode(), digest_size=16).hexdigest()


def _append_decision(client, name: str, version: str, entry: dict) -> None:
    mv = client.get_model_version(name, version)
    log = json.loads(mv.tags.get("decisions", "[]"))
    log.append(entry)
    blob = json.dumps(log)
    while len(blob) > MAX_TAG and len(log) > 1:
        log.pop(0)
        blob = json.dumps(log)
    client.set_model_version_tag(name, version, "decisions", blob)


# ----------------------------------------------------------------------------- logging the model
def _stage_artifacts(tmp: Path, models_dir: Path, reports_dir: Path, card: Path, params: Params,
                     plan: dict) -> dict[str, str]:
    art = tmp / "artifacts"
    art.mkdir()
    files = {"weights": (models_dir / "model.safetensors", "model.safetensors"),
             "spec": (models_dir / "model.json", "model.json"),
             "plan": (models_dir / "plan.json", "plan.json"),
             "calibration": (reports_dir / "calibration.json", "calibration.json"),
             "model_card": (card, "model_card.md")}
    out = {}
    for key, (src, name) in files.items():
        if not src.exists():
            raise FileNotFoundError(f"{src} is missing: run the train and evaluate stages first")
        shutil.copyfile(src, art / name)
        out[key] = str(art / name)
    take = plan.get("take_volume", params.ingest.take_volume)
    (art / "ingest.json").write_text(json.dumps({"take_volume": take, "min_slices": params.ingest.min_slices}))
    out["ingest"] = str(art / "ingest.json")
    return out


def _signature(input_shape: tuple[int, ...], n_classes: int):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float64), (-1, n_classes))]))


def input_example(input_shape: tuple[int, ...]) -> np.ndarray:
    """A synthetic z-scored volume of the model's input shape (no patient data in the registry)."""
    rng = np.random.default_rng(0)
    return np.round(rng.standard_normal((1, *input_shape)), 3).astype(np.float32)


def log_pyfunc(params: Params, run_id: str, models_dir: Path, reports_dir: Path, card: Path, plan: dict,
               input_shape: tuple[int, ...], n_classes: int):
    """Log the models-from-code pyfunc into the training run; returns MLflow's ModelInfo."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="resdx-register-") as tmp:
        tmp = Path(tmp)
        artifacts = _stage_artifacts(tmp, models_dir, reports_dir, card, params, plan)
        code = tmp / "code" / "pipeline"
        shutil.copytree(PACKAGE_DIR, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
        with mlflow.start_run(run_id=run_id):
            return mlflow.pyfunc.log_model(
                name="model", python_model=str(SERVING_MODEL), artifacts=artifacts, code_paths=[str(code)],
                signature=_signature(input_shape, n_classes), input_example=input_example(input_shape),
                pip_requirements=_requirements(),
            )


# ----------------------------------------------------------------------------- the gate
def _auroc(y: np.ndarray, probs: np.ndarray) -> float:
    from pipeline import metrics as M

    if len(np.unique(y)) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return M.auroc(y, probs[:, 1])
    if len(np.unique(y)) == probs.shape[1]:
        return M.auroc_multiclass(y, probs)["macro"]
    return float("nan")


def compare_with_champion(y: np.ndarray, p_candidate: np.ndarray, p_champion: np.ndarray, tolerance: float) -> dict:
    """AUROCs of both models on the same cases, the tolerance rule, and DeLong's paired p-value."""
    from pipeline import metrics as M

    a, b = _auroc(y, p_candidate), _auroc(y, p_champion)
    out = {"n": int(len(y)), "auroc_candidate": a, "auroc_champion": b, "delta": a - b, "tolerance": tolerance,
           "delong_p": None}
    if p_candidate.shape[1] == 2:
        try:
            out["delong_p"] = M.delong_test(y, p_candidate[:, 1], p_champion[:, 1])["p_value"]
        except ValueError:
            pass  # fewer than two cases of a class: no test
    out["worse"] = bool(math.isnan(a) or math.isnan(b) or a < b - tolerance - 1e-12)
    return out


def _score_champion(client, params: Params, name: str, champion: str, candidate_plan_hash: str, test,
                    ingest_dir: Path) -> np.ndarray:
    """Champion probabilities on the test cases: from the same tensors when it shares the plan,
    else from the source studies (manifest paths) through its own bundled preprocessing."""
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{name}/{champion}")
    tags = client.get_model_version(name, champion).tags
    shape = model.metadata.get_input_schema().inputs[0].shape if model.metadata.get_input_schema() else None
    same_input = shape is not None and tuple(shape[1:]) == tuple(test.images.shape[1:])
    if tags.get("plan_hash") == candidate_plan_hash and same_input:
        return np.asarray(model.predict(test.images.numpy()))
    if params.data.source != "manifest":
        raise ValueError("the champion was trained with another preprocessing plan and the test cases have no "
                         "source studies to re-read")
    from pipeline.manifest import read_manifest

    rows = {r.case_id: r for r in read_manifest(params.data.manifest)}
    import pandas as pd

    df = pd.DataFrame([{"path": str(rows[c].path), "modality": rows[c].modality, "series_uid": rows[c].series_uid}
                       for c in test.case_ids])
    out = model.unwrap_python_model().predict_studies(df)
    if (out["status"] != "ok").any():
        raise ValueError(f"the champion rejected {(out['status'] != 'ok').sum()} test case(s)")
    cols = [c for c in out.columns if c.startswith("p_")]
    return out[cols].to_numpy(dtype=float)


def run_gate(params: Params, version: str | int, metrics: dict | None = None, ingest_dir: Path | str | None = None,
             apply: bool = True) -> dict:
    """Check the promotion gate for `version`; with `apply`, move `champion` or tag `gate_reason`."""
    import mlflow

    cfg = params.register
    name = cfg.model_name
    version = str(version)
    client = _client(params)
    mv = client.get_model_version(name, version)
    if metrics is None:
        metrics = json.loads(mv.tags.get("metrics_json", "{}"))
    test = metrics.get("test", {})
    reasons: list[str] = []
    ci = test.get("auroc_ci95") or [None, None]
    ci_low = ci[0]
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

    champion = alias_version(client, name, CHAMPION)
    comparison = None
    if champion is not None and champion != version:
        from pipeline.data import load_split

        test_set = load_split(Path(ingest_dir or params.ingest.out_dir), "test")
        y = test_set.labels.numpy()
        try:
            cand = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
            p_cand = np.asarray(cand.predict(test_set.images.numpy()))
            p_champ = _score_champion(client, params, name, champion, mv.tags.get("plan_hash", ""), test_set,
                                      Path(ingest_dir or params.ingest.out_dir))
            comparison = compare_with_champion(y, p_cand, p_champ, cfg.champion_tolerance)
            comparison["champion_version"] = champion
            if comparison["worse"]:
                p = comparison["delong_p"]
                reasons.append(
                    f"worse than champion v{champion} on the same {len(y)} test cases: AUROC "
                    f"{comparison['auroc_candidate']:.4f} vs {comparison['auroc_champion']:.4f} "
                    f"(tolerance {cfg.champion_tolerance:g}; DeLong p={'n/a' if p is None else f'{p:.3g}'})")
        except Exception as err:  # noqa: BLE001 - any failure to compare must fail the gate, not the stage
            reasons.append(f"could not score champion v{champion} on the test set ({type(err).__name__}: "
                           f"{str(err)[:200]})")
    passed = not reasons
    result = {"version": version, "passed": passed, "reasons": reasons, "auroc_ci_low": ci_low,
              "ece_calibrated": ece, "champion_before": champion, "comparison": comparison,
              "thresholds": cfg.model_dump(mode="json")}
    if apply:
        when = _now()
        tags = {"gate": "passed" if passed else "failed", "gate_checked_at": when}
        if comparison:
            tags["gate_comparison"] = json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                                                  for k, v in comparison.items()})
        if passed:
            client.set_registered_model_alias(name, CHAMPION, version)
            tags["gate_reason"] = "passed all checks"
            if champion and champion != version:
                client.set_model_version_tag(name, champion, "replaced_by", version)
                client.set_model_version_tag(name, champion, "replaced_at", when)
        else:
            tags["gate_reason"] = "; ".join(reasons)[:MAX_TAG]
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
        _append_decision(client, name, version, {"action": "gate", "passed": passed, "who": _who(), "when": when,
                                                 "reason": tags["gate_reason"][:500]})
    result["champion_after"] = alias_version(client, name, CHAMPION)
    return result


# ----------------------------------------------------------------------------- the stage
def run_register(params: Params, models_dir: Path | str | None = None, reports_dir: Path | str | None = None,
                 ingest_dir: Path | str | None = None) -> dict:
    """Log, register (alias `candidate`), tag, write the model card, then apply the promotion gate."""
    import mlflow

    from pipeline.data import load_split
    from pipeline.ingest import save_json
    from pipeline.model_card import write_model_card
    from pipeline.tracking import git_commit, training_run_id

    models_dir = Path(models_dir or params.train.out_dir)
    reports_dir = Path(reports_dir or params.evaluate.out_dir)
    ingest_dir = Path(ingest_dir or params.ingest.out_dir)
    name = params.register.model_name
    run_file = models_dir / "mlflow_run.json"
    if not run_file.exists():
        raise FileNotFoundError(f"{run_file} is missing: run the train stage first")
    run_id = training_run_id(params, models_dir) or json.loads(run_file.read_text())["run_id"]
    info = json.loads((models_dir / "model.json").read_text())
    plan = json.loads((models_dir / "plan.json").read_text())
    metrics = json.loads((reports_dir / "metrics.json").read_text())
    calibration = json.loads((reports_dir / "calibration.json").read_text())
    phash = _plan_hash(plan)
    commit = git_commit()

    shape_source = next((s for s in ("test", "val", "train") if len(load_split(ingest_dir, s))), None)
    if shape_source is None:
        raise ValueError(f"{ingest_dir}: no ok cases to take the input shape from")
    input_shape = tuple(int(n) for n in load_split(ingest_dir, shape_source).images.shape[1:])
    n_classes = int(info["spec"]["n_classes"])

    card = write_model_card(params, reports_dir / "model_card.md", models_dir=models_dir, reports_dir=reports_dir,
                            ingest_dir=ingest_dir, extra={"model_name": name, "git_commit": commit,
                                                          "plan_hash": phash, "run_id": run_id})
    client = _client(params)
    model_info = log_pyfunc(params, run_id, models_dir, reports_dir, card, plan, input_shape, n_classes)

    test = metrics.get("test", {})
    ci = test.get("auroc_ci95") or [None, None]
    tags = {
        "data_hash": info.get("data_hash", ""), "git_commit": commit, "plan_hash": phash, "mlflow_run_id": run_id,
        "model_id": getattr(model_info, "model_id", "") or "", "architecture": info["spec"]["name"],
        "test_auroc": test.get("auroc"), "test_auroc_ci_low": ci[0], "test_auroc_ci_high": ci[1],
        "test_ece_calibrated": test.get("ece_calibrated"), "test_brier": test.get("brier"),
        "test_brier_calibrated": test.get("brier_calibrated"), "test_n": test.get("n"),
        "temperature": calibration.get("temperature"), "threshold": calibration.get("threshold"),
        "class_names": calibration.get("class_names") or info.get("class_names"),
        "input_shape": list(input_shape), "registered_by": _who(), "registered_at": _now(),
        "metrics_json": json.dumps({"test": {k: test.get(k) for k in ("auroc", "auroc_ci95", "ece_calibrated",
                                                                        "brier", "brier_calibrated", "n")}}),
    }
    mv = mlflow.register_model(model_info.model_uri, name, tags={k: _fmt(v) for k, v in tags.items()})
    version = str(mv.version)
    client.set_registered_model_alias(name, CANDIDATE, version)
    _append_decision(client, name, version, {"action": "register", "who": tags["registered_by"],
                                             "when": tags["registered_at"], "reason": "new registration"})
    gate = run_gate(params, version, metrics=metrics, ingest_dir=ingest_dir)
    result = {"model_name": name, "version": version, "model_uri": f"models:/{name}/{version}",
              "logged_model_uri": model_info.model_uri, "run_id": run_id, "aliases": _aliases_of(client, name, version),
              "champion": gate["champion_after"], "gate": gate, "model_card": str(card),
              "tags": {k: _fmt(v) for k, v in tags.items() if k != "metrics_json"}}
    save_json(reports_dir / "registration.json", _jsonable(result))
    return result


def _aliases_of(client, name: str, version: str) -> list[str]:
    return sorted(client.get_model_version(name, version).aliases)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


# ----------------------------------------------------------------------------- manual decisions
def _require_reason(reason: str) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise ValueError("a reason is required for a manual registry decision")
    return reason[:1000]


def promote(params: Params, version: str | int, reason: str) -> dict:
    """Make `version` the champion by hand (bypasses the gate); recorded in tags."""
    reason = _require_reason(reason)
    name, version = params.register.model_name, str(version)
    client = _client(params)
    client.get_model_version(name, version)  # raises if there is no such version
    before = alias_version(client, name, CHAMPION)
    who, when = _who(), _now()
    client.set_registered_model_alias(name, CHAMPION, version)
    for k, v in {"promoted_by": who, "promoted_at": when, "promotion_reason": reason}.items():
        client.set_model_version_tag(name, version, k, v)
    if before and before != version:
        client.set_model_version_tag(name, before, "replaced_by", version)
        client.set_model_version_tag(name, before, "replaced_at", when)
    _append_decision(client, name, version, {"action": "promote", "who": who, "when": when, "reason": reason,
                                             "champion_before": before})
    return {"model_name": name, "version": version, "champion_before": before, "champion": version, "who": who,
            "when": when, "reason": reason}


def demote(params: Params, version: str | int, reason: str) -> dict:
    """Withdraw `version`: it loses the champion alias if it holds it (no automatic replacement)."""
    reason = _require_reason(reason)
    name, version = params.register.model_name, str(version)
    client = _client(params)
    client.get_model_version(name, version)
    was_champion = alias_version(client, name, CHAMPION) == version
    if was_champion:
        client.delete_registered_model_alias(name, CHAMPION)
    who, when = _who(), _now()
    for k, v in {"demoted_by": who, "demoted_at": when, "demotion_reason": reason}.items():
        client.set_model_version_tag(name, version, k, v)
    _append_decision(client, name, version, {"action": "demote", "who": who, "when": when, "reason": reason,
                                             "was_champion": was_champion})
    return {"model_name": name, "version": version, "was_champion": was_champion,
            "champion": alias_version(client, name, CHAMPION), "who": who, "when": when, "reason": reason}


__all__ = ["run_register", "run_gate", "promote", "demote", "compare_with_champion", "CANDIDATE", "CHAMPION"]
