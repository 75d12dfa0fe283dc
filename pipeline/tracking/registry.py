"""The MLflow Model Registry side of ResDx: the client, logging the pickle-free pyfunc, aliases, decision logs.

Manual decisions (`promote`, `demote`) record who (`getpass.getuser()`), when (UTC) and why in
tags and in a ``decisions`` log tag. The gate's rules are `pipeline.core.gate`; the register
stage (`pipeline.stages.register`) applies them. Whatever moves an alias holds the model's
`gate_lock`, so that pipelines sharing one registry (a tracking server) take turns.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from pipeline.config import Params
from pipeline.errors import MissingInput, RegistryError
from pipeline.layout import ModelDir, ReportDir

CANDIDATE = "candidate"
CHAMPION = "champion"
SERVING_MODEL = Path(__file__).with_name("serving_model.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
REQUIREMENTS = ("torch", "monai", "numpy", "scipy", "scikit-learn", "pandas", "pydicom", "pylibjpeg",
                "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "nibabel", "safetensors", "pydantic",
                "pyyaml", "rich", "mlflow")
MAX_TAG = 4000
GATE_LOCK_SUFFIX = ".resdx-gate-lock"
GATE_LOCK_STALE_S = 3600.0  # a gate takes minutes; a lock older than this was left by a killed process


def now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def who() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError, ImportError):
        return "unknown"


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "none"
    if isinstance(v, float):
        return f"{v:.6g}"
    return v if isinstance(v, str) else json.dumps(v)


def client_for(params: Params):
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


def newest_version(client, name: str) -> str:
    """The highest version number of registered model `name` (the most recent registration)."""
    found = client.search_model_versions(f"name = '{name}'", max_results=1, order_by=["version_number DESC"])
    return str(found[0].version)


def _try_lock(client, lock: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS, ErrorCode

    owner = f"{who()}@{socket.gethostname()} pid {os.getpid()} since {now()}"
    try:
        client.create_registered_model(lock, tags={"resdx.lock_owner": owner},
                                       description="held while a ResDx gate or decision moves this model's aliases")
        return True
    except MlflowException as err:
        if err.error_code in (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(ALREADY_EXISTS)):
            return False
        raise


def _break_if_stale(client, lock: str, stale_s: float) -> None:
    from mlflow.exceptions import MlflowException

    try:
        held = client.get_registered_model(lock)
    except MlflowException:
        return  # released meanwhile
    age_s = time.time() - held.creation_timestamp / 1000
    if age_s > stale_s:
        logging.getLogger("resdx").warning("breaking registry lock %s held for %.0f s (%s)", lock, age_s,
                                           held.tags.get("resdx.lock_owner", "owner unknown"))
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock)


@contextlib.contextmanager
def gate_lock(client, name: str, stale_s: float = GATE_LOCK_STALE_S, poll_s: float = 0.2):
    """Hold model `name`'s lock for the block: the registered model `<name>.resdx-gate-lock` exists while held.

    Why: the gate reads the champion, scores it against the candidate, then moves the alias. Two pipelines
    doing that at once on one registry both compare with the same champion, and the later alias write
    replaces a champion its version was never compared with (and `candidate` ends on whichever wrote last).
    The registry has no compare-and-set for aliases, but creating a registered model is atomic (the name is
    unique in the store, behind a tracking server too), so it serves as a lock across processes and machines.
    A lock left by a killed process is broken once older than `stale_s`.
    """
    lock = name + GATE_LOCK_SUFFIX
    while not _try_lock(client, lock):
        _break_if_stale(client, lock, stale_s)
        time.sleep(poll_s)
    try:
        yield
    finally:
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException):  # broken as stale by another process meanwhile
            client.delete_registered_model(lock)


def requirements() -> list[str]:
    reqs = []
    for pkg in REQUIREMENTS:
        try:
            reqs.append(f"{pkg}=={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def append_decision(client, name: str, version: str, entry: dict) -> None:
    mv = client.get_model_version(name, version)
    log = json.loads(mv.tags.get("decisions", "[]"))
    log.append(entry)
    blob = json.dumps(log)
    while len(blob) > MAX_TAG and len(log) > 1:
        log.pop(0)
        blob = json.dumps(log)
    client.set_model_version_tag(name, version, "decisions", blob)


def _stage_artifacts(tmp: Path, models_dir: Path, reports_dir: Path, card: Path) -> dict[str, str]:
    art = tmp / "artifacts"
    art.mkdir()
    m, r = ModelDir(models_dir), ReportDir(reports_dir)
    files = {"weights": m.weights, "spec": m.spec, "plan": m.plan, "calibration": r.calibration, "model_card": card}
    out = {}
    for key, src in files.items():
        name = src.name
        if not src.exists():
            raise MissingInput(f"{src} is missing", hint="run the train and evaluate stages first")
        shutil.copyfile(src, art / name)
        out[key] = str(art / name)
    # The reader settings travel inside plan.json: the model reads studies as its training data were read.
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


def log_pyfunc(run_id: str, models_dir: Path, reports_dir: Path, card: Path, input_shape: tuple[int, ...],
               n_classes: int):
    """Log the models-from-code pyfunc into the training run; returns MLflow's ModelInfo."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="resdx-register-") as tmp:
        tmp = Path(tmp)
        artifacts = _stage_artifacts(tmp, models_dir, reports_dir, card)
        code = tmp / "code" / "pipeline"
        shutil.copytree(PACKAGE_DIR, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
        with mlflow.start_run(run_id=run_id):
            return mlflow.pyfunc.log_model(
                name="model", python_model=str(SERVING_MODEL), artifacts=artifacts, code_paths=[str(code)],
                signature=_signature(input_shape, n_classes), input_example=input_example(input_shape),
                pip_requirements=requirements(),
            )


def load_pyfunc(model_uri: str):
    """`mlflow.pyfunc.load_model`, leaving no download behind.

    From a server's artifact store MLflow downloads the model into a new `mkdtemp` folder on every load and never
    removes it (the demo's model: 9.5 MB; the gate loads two per `resdx register`): here it goes to a folder
    removed once loaded, which is safe because the ResDx model reads every artifact in `load_context` and
    `pipeline` (a regular package) keeps importing from its install. A local store's model is read in place, as
    MLflow does (a copy would cost seconds and print a progress bar for nothing)."""
    import mlflow
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    repo = get_artifact_repository(model_uri)
    if isinstance(getattr(repo, "repo", repo), LocalArtifactRepository):  # models:/ and runs:/ wrap the store's
        return mlflow.pyfunc.load_model(model_uri)
    with tempfile.TemporaryDirectory(prefix="resdx-load-") as tmp:
        return mlflow.pyfunc.load_model(model_uri, dst_path=tmp)


def aliases_of(client, name: str, version: str) -> list[str]:
    return sorted(client.get_model_version(name, version).aliases)


def jsonable(obj):
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def _require_reason(reason: str) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise RegistryError("a reason is required for a manual registry decision", code="reason_required",
                            hint='pass --reason "why"')
    return reason[:1000]


def _require_version(client, name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(f"model {name!r} has no version {version}",
                            hint="list the versions with: mlflow ui, or register one with resdx register") from None


def promote(params: Params, version: str | int, reason: str) -> dict:
    """Make `version` the champion by hand (bypasses the gate); recorded in tags."""
    reason = _require_reason(reason)
    name, version = params.register.model_name, str(version)
    client = client_for(params)
    _require_version(client, name, version)
    with gate_lock(client, name):  # `before` stays the champion until ours replaces it
        before = alias_version(client, name, CHAMPION)
        user, when = who(), now()
        client.set_registered_model_alias(name, CHAMPION, version)
        for k, v in {"promoted_by": user, "promoted_at": when, "promotion_reason": reason}.items():
            client.set_model_version_tag(name, version, k, v)
        if before and before != version:
            client.set_model_version_tag(name, before, "replaced_by", version)
            client.set_model_version_tag(name, before, "replaced_at", when)
        append_decision(client, name, version, {"action": "promote", "who": user, "when": when, "reason": reason,
                                                 "champion_before": before})
    return {"model_name": name, "version": version, "champion_before": before, "champion": version, "who": user,
            "when": when, "reason": reason}


def demote(params: Params, version: str | int, reason: str) -> dict:
    """Withdraw `version`: it loses the champion alias if it holds it (no automatic replacement)."""
    reason = _require_reason(reason)
    name, version = params.register.model_name, str(version)
    client = client_for(params)
    _require_version(client, name, version)
    with gate_lock(client, name):  # a gate applying meanwhile would otherwise see a champion that is going
        was_champion = alias_version(client, name, CHAMPION) == version
        if was_champion:
            client.delete_registered_model_alias(name, CHAMPION)
    user, when = who(), now()
    for k, v in {"demoted_by": user, "demoted_at": when, "demotion_reason": reason}.items():
        client.set_model_version_tag(name, version, k, v)
    append_decision(client, name, version, {"action": "demote", "who": user, "when": when, "reason": reason,
                                             "was_champion": was_champion})
    return {"model_name": name, "version": version, "was_champion": was_champion,
            "champion": alias_version(client, name, CHAMPION), "who": user, "when": when, "reason": reason}


__all__ = ["CANDIDATE", "CHAMPION", "client_for", "alias_version", "gate_lock", "newest_version", "log_pyfunc",
           "promote", "demote"]
