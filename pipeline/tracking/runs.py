"""MLflow and provenance helpers: one place that knows run ids, tags and the data hash."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import yaml

from pipeline.core.records import flatten


def git_commit(cwd: Path | str = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_hash(ingest_dir: Path) -> str:
    """The DVC md5 of the ingested tensors when dvc.lock records it; else a hash of index + plan."""
    lock = Path("dvc.lock")
    if lock.exists():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for out in stages.get("ingest", {}).get("outs", []):
            if Path(out.get("path", "")) == Path(ingest_dir) / "tensors" and out.get("md5"):
                return str(out["md5"])
    h = hashlib.md5()
    for name in ("index.csv", "plan.json"):
        p = Path(ingest_dir) / name
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()


def experiment_name(params) -> str:
    if params.mlflow.experiment:
        return params.mlflow.experiment
    if params.data.source == "medmnist":
        return f"resdx-medmnist-{params.data.medmnist.flag}"
    return f"resdx-{Path(params.data.manifest).stem}"


def start_run(params, run_id: str | None, run_name: str):
    """Start (or resume) the MLflow run of this training."""
    import mlflow

    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    mlflow.set_experiment(experiment_name(params))
    return mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name,
                            log_system_metrics=params.mlflow.system_metrics)


def training_run_id(params, models_dir: Path | str) -> str | None:
    """The MLflow run that trained `models_dir`'s model, in the configured store (None: MLflow off).

    When the store does not have that run (train outputs restored from DVC's run cache, a
    `dvc exp run --temp` whose relative SQLite store went with its temp folder, another tracking
    server), later stages log into a stand-in run tagged `resdx.source_run_id` = the missing id,
    created once and found again by that tag, instead of failing after their work is done.
    """
    import logging

    import mlflow
    from mlflow.exceptions import MlflowException

    run_file = Path(models_dir) / "mlflow_run.json"
    if not params.mlflow.enabled or not run_file.exists():
        return None
    run_id = json.loads(run_file.read_text())["run_id"]
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    client = mlflow.MlflowClient()
    try:
        client.get_run(run_id)
        return run_id
    except MlflowException:
        pass
    experiment = mlflow.set_experiment(experiment_name(params))
    found = client.search_runs([experiment.experiment_id], f"tags.`resdx.source_run_id` = '{run_id}'",
                               max_results=1)
    if found:
        return found[0].info.run_id
    logging.getLogger("resdx").warning(
        "MLflow run %s (from %s) is not in %s; logging to a stand-in run tagged resdx.source_run_id",
        run_id, run_file, params.mlflow.tracking_uri)
    run = client.create_run(experiment.experiment_id, run_name=f"restored-{run_id[:8]}",
                            tags={"resdx.source_run_id": run_id, "resdx.git_commit": git_commit()})
    spec = json.loads((Path(models_dir) / "model.json").read_text()).get("spec", {})
    for key, value in flatten({"model": spec, "train": params.train.model_dump(mode="json")}).items():
        client.log_param(run.info.run_id, key, value[:500])
    client.set_terminated(run.info.run_id)
    return run.info.run_id
