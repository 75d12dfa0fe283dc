"""Register stage: the trained model into the MLflow Model Registry, versioned, tagged and gated.

`run_register` logs the model to its training run as an MLflow *models-from-code* pyfunc
(`pipeline/tracking/serving_model.py` plus the `pipeline` package as code; safetensors weights, the
model spec, the ingest plan, the calibration (temperature + threshold) and the model card as
artifacts: nothing is pickled), creates a new version of `register.model_name`, points the
alias ``candidate`` at it and tags it with its provenance (data hash, git commit, plan hash,
run id) and key test metrics.

Promotion gate (applied to every new version; the rule, in order):

1. ``test.auroc_ci95[0] >= register.min_auroc_ci_low`` (lower 95% bootstrap bound of the test
   AUROC, from reports/metrics.json);
2. ``test.ece_calibrated <= register.max_ece_calibrated`` (ECE after temperature scaling);
3. explanation quality, from the explain stage's sanity checks (``sanity.json`` in
   ``params.explain.out_dir``, `pipeline.layout.ExplainDir`): the file must exist unless
   ``register.require_explanations`` is false; the model-parameter randomization check must have
   passed (``register.require_randomization_check``); where lesion masks exist, the pointing-game
   hit rate must be >= its random baseline + ``register.min_pointing_margin``; without masks
   (e.g. MedMNIST) that rule is "not applicable (no lesion masks)" and does not fail. Each rule's
   status is in the gate result (``explanations``) and the ``gate_explanations`` tag;
4. not worse than the current champion *on the same test set*: the champion (if any) and the
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
Pipelines sharing one registry (a tracking server) take turns: moving an alias and the applied gate
hold the model's lock (`pipeline.tracking.registry.gate_lock`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pipeline.config import Params
from pipeline.core.gate import NO_MASKS, compare_with_champion, explanation_checks, threshold_reasons
from pipeline.core.plan import load_plan
from pipeline.errors import MissingInput
from pipeline.io.artifacts import read_json
from pipeline.io.tensors import load_split
from pipeline.layout import ExplainDir, ModelDir, ReportDir
from pipeline.tracking.registry import (
    CANDIDATE,
    CHAMPION,
    MAX_TAG,
    alias_version,
    aliases_of,
    append_decision,
    client_for,
    fmt,
    gate_lock,
    jsonable,
    load_pyfunc,
    log_pyfunc,
    newest_version,
    now,
    who,
)


def _score_champion(client, params: Params, name: str, champion: str, candidate_plan_hash: str, test,
                    ingest_dir: Path) -> np.ndarray:
    """Champion probabilities on the test cases: from the same tensors when it shares the plan,
    else from the source studies (manifest paths) through its own bundled preprocessing."""
    model = load_pyfunc(f"models:/{name}/{champion}")
    tags = client.get_model_version(name, champion).tags
    shape = model.metadata.get_input_schema().inputs[0].shape if model.metadata.get_input_schema() else None
    same_input = shape is not None and tuple(shape[1:]) == tuple(test.images.shape[1:])
    if tags.get("plan_hash") == candidate_plan_hash and same_input:
        return np.asarray(model.predict(test.images.numpy()))
    if params.data.source != "manifest":
        raise ValueError("the champion was trained with another preprocessing plan and the test cases have no "
                         "source studies to re-read")
    from pipeline.sources.manifest import read_manifest

    rows = {r.case_id: r for r in read_manifest(params.data.manifest)}
    import pandas as pd

    df = pd.DataFrame([{"path": str(rows[c].path), "modality": rows[c].modality, "series_uid": rows[c].series_uid}
                       for c in test.case_ids])
    out = model.unwrap_python_model().predict_studies(df)
    if (out["status"] != "ok").any():
        raise ValueError(f"the champion rejected {(out['status'] != 'ok').sum()} test case(s)")
    cols = [c for c in out.columns if c.startswith("p_")]
    return out[cols].to_numpy(dtype=float)


def read_sanity(params: Params) -> tuple[dict | None, Path]:
    """The explain stage's sanity.json (None when it has not written one) and its path."""
    path = ExplainDir(params.explain.out_dir).sanity
    if not path.exists():
        return None, path
    sanity = read_json(path)
    if not isinstance(sanity, dict):
        raise ValueError(f"{path}: expected a JSON object of sanity checks, got {type(sanity).__name__}")
    return sanity, path


def _notes(explanations: list[dict]) -> str:
    """The explanation rules that passed without being checked, for a passed gate's `gate_reason`."""
    skipped = [c for c in explanations if c["status"] in (NO_MASKS, "not required")
               or (c["status"] == "not checked" and c["rule"] == "explanations")]
    return "".join(f"; {c['rule'].replace('_', ' ')} {c['status']}" for c in skipped)


def run_gate(params: Params, version: str | int, metrics: dict | None = None, ingest_dir: Path | str | None = None,
             apply: bool = True) -> dict:
    """Check the promotion gate for `version`; with `apply`, move `champion` or tag `gate_reason`."""
    client = client_for(params)
    if not apply:
        return _gate(client, params, str(version), metrics, ingest_dir, apply=False)
    # One applied gate at a time per model (pipelines sharing a registry): from reading the champion to
    # moving the alias, so that a new champion has always been compared with the one it replaces.
    with gate_lock(client, params.register.model_name):
        return _gate(client, params, str(version), metrics, ingest_dir, apply=True)


def _gate(client, params: Params, version: str, metrics: dict | None, ingest_dir: Path | str | None,
          apply: bool) -> dict:
    cfg = params.register
    name = cfg.model_name
    mv = client.get_model_version(name, version)
    if metrics is None:
        metrics = json.loads(mv.tags.get("metrics_json", "{}"))
    test = metrics.get("test", {})
    sanity, sanity_path = read_sanity(params)
    reasons = threshold_reasons(test, cfg, sanity, str(sanity_path))
    explanations = explanation_checks(sanity, cfg, str(sanity_path))
    ci_low, ece = (test.get("auroc_ci95") or [None, None])[0], test.get("ece_calibrated")

    champion = alias_version(client, name, CHAMPION)
    comparison = None
    if champion is not None and champion != version:
        test_set = load_split(Path(ingest_dir or params.ingest.out_dir), "test")
        y = test_set.labels.numpy()
        try:
            cand = load_pyfunc(f"models:/{name}/{version}")
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
              "ece_calibrated": ece, "explanations": explanations, "champion_before": champion,
              "comparison": comparison, "thresholds": cfg.model_dump(mode="json")}
    if apply:
        when = now()
        tags = {"gate": "passed" if passed else "failed", "gate_checked_at": when,
                "gate_explanations": json.dumps({c["rule"]: c["status"] for c in explanations})}
        if comparison:
            tags["gate_comparison"] = json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                                                  for k, v in comparison.items()})
        if passed:
            client.set_registered_model_alias(name, CHAMPION, version)
            tags["gate_reason"] = "passed all checks" + _notes(explanations)
            if champion and champion != version:
                client.set_model_version_tag(name, champion, "replaced_by", version)
                client.set_model_version_tag(name, champion, "replaced_at", when)
        else:
            tags["gate_reason"] = "; ".join(reasons)[:MAX_TAG]
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
        append_decision(client, name, version, {"action": "gate", "passed": passed, "who": who(), "when": when,
                                                 "reason": tags["gate_reason"][:500]})
    result["champion_after"] = alias_version(client, name, CHAMPION)
    return result


# ----------------------------------------------------------------------------- the stage
def _read_reports(reports_dir: Path) -> tuple[dict, dict]:
    layout = ReportDir(reports_dir)
    for path in (layout.metrics, layout.calibration):
        if not path.exists():
            raise MissingInput(f"{path} is missing", hint="run the evaluate stage first")
    return read_json(layout.metrics), read_json(layout.calibration)


def run_register(params: Params, models_dir: Path | str | None = None, reports_dir: Path | str | None = None,
                 ingest_dir: Path | str | None = None) -> dict:
    """Log, register (alias `candidate`), tag, write the model card, then apply the promotion gate."""
    import mlflow

    from pipeline.io.artifacts import save_json
    from pipeline.io.tensors import load_split
    from pipeline.reporting.model_card import write_model_card
    from pipeline.tracking.runs import git_commit, training_run_id

    models_dir = Path(models_dir or params.train.out_dir)
    reports_dir = Path(reports_dir or params.evaluate.out_dir)
    ingest_dir = Path(ingest_dir or params.ingest.out_dir)
    name = params.register.model_name
    run_file = ModelDir(models_dir).run
    if not run_file.exists():
        raise MissingInput(f"{run_file} is missing", hint="run the train stage first (with mlflow.enabled: true)")
    run_id = training_run_id(params, models_dir) or json.loads(run_file.read_text())["run_id"]
    info = read_json(ModelDir(models_dir).spec)
    phash = load_plan(ModelDir(models_dir).plan).hash()
    metrics, calibration = _read_reports(reports_dir)
    commit = git_commit()

    shape_source = next((s for s in ("test", "val", "train") if len(load_split(ingest_dir, s))), None)
    if shape_source is None:
        raise MissingInput(f"{ingest_dir}: no ok cases to take the input shape from", hint="re-run the ingest stage")
    input_shape = tuple(int(n) for n in load_split(ingest_dir, shape_source).images.shape[1:])
    n_classes = int(info["spec"]["n_classes"])

    card = write_model_card(params, ReportDir(reports_dir).model_card, models_dir=models_dir, reports_dir=reports_dir,
                            ingest_dir=ingest_dir, extra={"model_name": name, "git_commit": commit,
                                                          "plan_hash": phash, "run_id": run_id})
    client = client_for(params)
    model_info = log_pyfunc(run_id, models_dir, reports_dir, card, input_shape, n_classes)

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
        "input_shape": list(input_shape), "registered_by": who(), "registered_at": now(),
        "metrics_json": json.dumps({"test": {k: test.get(k) for k in ("auroc", "auroc_ci95", "ece_calibrated",
                                                                        "brier", "brier_calibrated", "n")}}),
    }
    mv = mlflow.register_model(model_info.model_uri, name, tags={k: fmt(v) for k, v in tags.items()})
    version = str(mv.version)
    with gate_lock(client, name):
        # The newest version, not necessarily ours: of two registrations finishing at once, the one that
        # wrote last would otherwise leave `candidate` on the older version.
        client.set_registered_model_alias(name, CANDIDATE, newest_version(client, name))
    append_decision(client, name, version, {"action": "register", "who": tags["registered_by"],
                                             "when": tags["registered_at"], "reason": "new registration"})
    gate = run_gate(params, version, metrics=metrics, ingest_dir=ingest_dir)
    result = {"model_name": name, "version": version, "model_uri": f"models:/{name}/{version}",
              "logged_model_uri": model_info.model_uri, "run_id": run_id, "aliases": aliases_of(client, name, version),
              "champion": gate["champion_after"], "gate": gate, "model_card": str(card),
              "tags": {k: fmt(v) for k, v in tags.items() if k != "metrics_json"}}
    save_json(ReportDir(reports_dir).registration, jsonable(result))
    return result


__all__ = ["run_register", "run_gate", "compare_with_champion", "CANDIDATE", "CHAMPION"]
