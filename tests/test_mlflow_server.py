"""tools/mlflow_server.py: the pipeline against a shared MLflow tracking server on PostgreSQL with proxied
artifacts (the register stage, its promotion gate, `resdx predict models:/NAME@champion`), and two pipelines
registering versions of one model at the same time.

The module starts PostgreSQL and `mlflow server` itself (on free ports, in a temporary folder) and stops both by
PID at the end. Without PostgreSQL or psycopg (`make setup-postgres`, `make setup-dev`) the tests skip, and fail
under CI=true.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from conftest import tiny_params

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # tools/ is not an installed package; `python -m pytest` from REPO has it anyway
    sys.path.insert(0, str(REPO))

from tools import mlflow_server as ms  # noqa: E402

# One server for the module: keep its tests on one xdist worker (`make test` runs with --dist loadgroup).
pytestmark = pytest.mark.xdist_group("mlflow_server")
NAME = "resdx-shared"
WORKER = Path(__file__).with_name("registry_race_worker.py")
OPEN_GATE = {"min_auroc_ci_low": 0.0, "max_ece_calibrated": 1.0}


def require_mlflow_server() -> None:
    """Skip the calling test (fail it under CI) when PostgreSQL, psycopg or mlflow is missing."""
    try:
        ms.check_installed()
    except ms.MlflowServerNotInstalled as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def server():
    """PostgreSQL + mlflow server on free ports of 127.0.0.1, stopped by PID at teardown."""
    require_mlflow_server()
    # Not tmp_path: pytest's base folder is private (0700) and, under root, PostgreSQL runs as `postgres`,
    # which must be able to reach its cluster folder. The system temp folder is world-searchable.
    state = Path(tempfile.mkdtemp(prefix="resdx-mlflow-server-"))
    try:
        with ms.running(state, workers=2, timeout_s=180) as srv:
            yield srv
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _client(server) -> mlflow.MlflowClient:
    return _client_of(server.tracking_uri)


def _client_of(uri: str) -> mlflow.MlflowClient:
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def trained(server, tiny_ingested, tmp_path_factory):
    """A tiny model trained and evaluated with `mlflow.tracking_uri` = the server, its gate open; the raw params
    and their folder. The pipeline runs in an empty working folder: nothing of MLflow's may land there."""
    from pipeline.core import sanity as S
    from pipeline.io.artifacts import save_json
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.train import run_train

    tmp = tmp_path_factory.mktemp("shared")
    raw = tiny_params(tmp, tiny_ingested)
    raw["mlflow"]["tracking_uri"] = server.tracking_uri
    raw["register"] = {"model_name": NAME, **OPEN_GATE}
    raw["explain"] = {"out_dir": str(tmp / "explain")}  # the gate reads this run's sanity.json, not the repo's
    save_json(tmp / "explain" / "sanity.json", S.summarize([(0.1, 0.3)] * 4, []))  # randomization passed, no masks
    (tmp / "cwd").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp / "cwd")
        run_train(params(raw), progress=False)
        run_evaluate(params(raw))
    return {"raw": raw, "tmp": tmp}


@pytest.fixture(scope="module")
def registered(trained):
    """`trained`'s model registered (version 1 of NAME; the first, so the gate makes it champion)."""
    from pipeline.stages.register import run_register

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(trained["tmp"] / "cwd")
        return run_register(params(trained["raw"]))


def params(raw: dict, **sections):
    from pipeline.config import params_from_dict

    return params_from_dict({**raw, **sections})


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


# ----------------------------------------------------------------------------- register, gate, predict
@pytest.mark.slow
def test_register_gate_and_predict_by_alias_through_the_server(server, trained, registered, demo_cohort, tmp_path):
    from pipeline.sources.manifest import read_manifest

    tmp, reg = trained["tmp"], registered
    assert reg["version"] == "1" and reg["gate"]["passed"] and reg["aliases"] == ["candidate", "champion"]

    # Proxied artifacts: the client uploaded through the server, which stored them in its artifacts folder.
    client = _client(server)
    run = client.get_run(reg["run_id"])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    stored = {p.name for p in _files_under(server.artifacts_dir)}
    assert {"MLmodel", "model.safetensors", "calibration.json", "serving_model.py"} <= stored
    assert _files_under(tmp / "cwd") == [], "MLflow wrote into the client's working folder"

    # `resdx predict` in a fresh process: only the params' tracking URI tells it where the registry is.
    rows = list(csv.DictReader((tmp / "reports" / "predictions.csv").open()))
    evaluated = {r["case_id"]: float(r["calibrated_probability"]) for r in rows}
    cases = {c.case_id: c for c in read_manifest(demo_cohort)}
    ct = next(cases[r["case_id"]] for r in rows if cases[r["case_id"]].modality == "CT")
    yaml_path = tmp_path / "params.yaml"
    yaml_path.write_text(yaml.safe_dump({"mlflow": {"tracking_uri": server.tracking_uri},
                                         "register": {"model_name": NAME}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    (tmp_path / "tmpdir").mkdir()
    env["TMPDIR"] = str(tmp_path / "tmpdir")  # MLflow downloads the model here, and ResDx removes it once loaded
    done = subprocess.run([str(Path(sys.executable).with_name("resdx")), "predict", str(ct.path), "-o",
                           str(tmp_path / "out"), "-m", f"models:/{NAME}@champion", "-p", str(yaml_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")]
    assert record["status"] == "ok" and record["model"] == {"uri": f"models:/{NAME}@champion", "name": NAME,
                                                            "version": "1"}
    assert record["probabilities"]["lesion"] == pytest.approx(evaluated[ct.case_id], abs=1e-4)
    assert list((tmp_path / "tmpdir").iterdir()) == []


def test_a_model_loaded_through_the_server_leaves_no_download_behind(server, registered, tmp_path, monkeypatch):
    from pipeline.tracking.registry import load_pyfunc

    _client(server)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    x = np.zeros((2, *load_pyfunc(f"models:/{NAME}/1").metadata.get_input_schema().inputs[0].shape[1:]),
                 dtype=np.float32)
    assert list(tmp_path.iterdir()) == []
    mlflow.pyfunc.load_model(f"models:/{NAME}/1").predict(x)
    assert len(list(tmp_path.iterdir())) == 1  # MLflow's own load: one download left behind per load


def test_the_explain_stage_logs_to_the_training_run_on_the_server(server, trained, demo_cohort):
    """The stage after evaluate, on the server: its report and sanity summary reach the training run's artifacts
    (proxied), and nothing lands in the working folder."""
    from pipeline.stages.explain import run_explain

    tmp = trained["tmp"]
    rows = list(csv.DictReader((tmp / "reports" / "predictions.csv").open()))
    case = next(r["case_id"] for r in rows)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp / "cwd")
        run_explain(params(trained["raw"], explain={"out_dir": str(tmp / "explain-run"), "shifts": 1},
                           data={"manifest": str(demo_cohort)}), case_ids=[case])
    run_id = json.loads((tmp / "models" / "model.json").read_text())["mlflow_run_id"]
    logged = {a.path for a in _client(server).list_artifacts(run_id, "explain")}
    assert {"explain/report.html", "explain/sanity.json"} <= logged
    assert _files_under(tmp / "cwd") == [], "MLflow wrote into the client's working folder"


# ----------------------------------------------------------------------------- concurrent registration
def _variant(models_dir: Path, out: Path, scale: float, run_id: str) -> str:
    """A copy of the checkpoint with the classifier head scaled (0: constant output, -1: reversed ranking),
    trained (as far as the registry can tell) by MLflow run `run_id`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(models_dir, out)
    w = load_file(str(out / "model.safetensors"))
    for k in [k for k in w if k.startswith(("fc.", "avgpool.evidence."))]:
        w[k] = (w[k] * scale).contiguous()
    save_file(w, str(out / "model.safetensors"))
    (out / "mlflow_run.json").write_text(json.dumps({"run_id": run_id}))
    return str(out)


def _race_spec(server, trained, root: Path, scales: dict[str, list[float]]) -> tuple[Path, dict[str, str]]:
    """Two pipelines' work: per pipeline its own MLflow run (in the server's experiment), models folders (one per
    registration) and reports folder. Returns the spec file and each pipeline's run id."""
    from pipeline.tracking.runs import experiment_name

    tmp, raw = trained["tmp"], trained["raw"]
    client = _client(server)
    experiment = client.get_experiment_by_name(experiment_name(params(raw)))
    pipelines, runs = {}, {}
    for label, head in scales.items():
        run = client.create_run(experiment.experiment_id, run_name=f"pipeline-{label}")
        client.set_terminated(run.info.run_id)
        runs[label] = run.info.run_id
        shutil.copytree(tmp / "reports", root / label / "reports")
        pipelines[label] = {"reports_dir": str(root / label / "reports"), "models_dirs": [
            _variant(tmp / "models", root / label / f"models-{i}", s, run.info.run_id) for i, s in enumerate(head)]}
    for folder in ("barrier", "out"):
        (root / folder).mkdir()
    spec = root / "spec.json"
    spec.write_text(json.dumps({"params": params(raw).model_dump(mode="json"), "pipelines": pipelines,
                                "barrier": str(root / "barrier"), "out": str(root / "out")}))
    return spec, runs


def _champion_chain(results: dict[str, dict], first: str) -> list[str]:
    """The champions, in turn, from `first`: consistent (as if the gates ran one after the other) only if each
    version that passed the gate replaced a different champion."""
    replaced = {v: r["champion_before"] for v, r in results.items() if r["passed"]}
    assert len(set(replaced.values())) == len(replaced), f"two versions replaced the same champion: {replaced}"
    chain, current = [first], first
    while (nxt := [v for v, before in replaced.items() if before == current]):
        current = nxt[0]
        chain.append(current)
    assert len(chain) == len(replaced) + 1, f"passed versions that replaced no champion of the chain: {replaced}"
    return chain


@pytest.mark.slow
def test_two_pipelines_registering_at_once_leave_consistent_versions_and_aliases(server, trained, registered,
                                                                                  tmp_path):
    from pipeline.tracking.registry import GATE_LOCK_SUFFIX, promote

    good = 1.0 if json.loads((trained["tmp"] / "reports/metrics.json").read_text())["test"]["auroc"] >= 0.5 else -1.0
    # After version 1 (`registered`, champion), each pipeline registers a good model, then a constant one (AUROC
    # 0.5, worse than any good champion). Their first registrations gate at the same moment, both scoring the
    # champion: both pass, and only gates that take turns make the second compare with the first.
    spec, runs = _race_spec(server, trained, tmp_path, {"a": [good, 0.0], "b": [good, 0.0]})
    t0 = time.monotonic()
    logs = {label: tmp_path / f"{label}.log" for label in runs}  # files, not pipes: a full pipe would stall one
    procs = {label: subprocess.Popen([sys.executable, str(WORKER), str(spec), label], cwd=trained["tmp"] / "cwd",
                                     stdout=logs[label].open("w"), stderr=subprocess.STDOUT) for label in runs}
    for label, p in procs.items():
        assert p.wait(timeout=400) == 0, f"pipeline {label}:\n{logs[label].read_text()[-4000:]}"
    wall = time.monotonic() - t0
    results = {r["version"]: {**r, "pipeline": label} for label in runs
               for r in json.loads((tmp_path / "out" / f"{label}.json").read_text())}

    client = _client(server)
    versions = {v.version: v for v in client.search_model_versions(f"name = '{NAME}'")}
    n = 1 + sum(len(json.loads(spec.read_text())["pipelines"][label]["models_dirs"]) for label in runs)
    assert sorted(int(v) for v in versions) == list(range(1, n + 1)), "versions with gaps or duplicates"
    assert sorted(results, key=int) == [str(v) for v in range(2, n + 1)], "two pipelines got the same version"
    for v, mv in versions.items():  # each version names the run and logged model of the pipeline that registered it
        if v == "1":
            assert mv.run_id == registered["run_id"]
            continue
        mine = results[str(v)]
        assert mv.run_id == mine["run_id"] == runs[mine["pipeline"]]
        assert mv.source == mine["logged_model_uri"]
        assert client.get_logged_model(mv.source.split("/")[-1]).source_run_id == runs[mine["pipeline"]]
        assert mv.tags["gate"] == ("passed" if mine["passed"] else "failed")

    # candidate: the most recent registration; champion: the end of one chain of gates, each of which compared
    # the candidate with the champion it replaced (no champion replaced without comparison).
    assert client.get_model_version_by_alias(NAME, "candidate").version == str(n)
    chain = _champion_chain(results, first="1")
    assert client.get_model_version_by_alias(NAME, "champion").version == chain[-1]
    for before, after in zip(chain, chain[1:]):
        assert results[after]["compared_with"] == before
        assert versions[before].tags["replaced_by"] == after
    for v, r in results.items():
        if not r["passed"]:  # compared with a version that was champion at the time
            assert r["compared_with"] in chain and int(r["compared_with"]) < int(v), r
    assert len(chain) == 3  # both good models passed (each is as good as the other); the constant ones did not
    assert _files_under(trained["tmp"] / "cwd") == [], "MLflow wrote into a pipeline's working folder"
    print(f"{n - 1} registrations by two pipelines in {wall:.1f} s; champion chain {chain}")

    # A manual decision takes the same lock, and no lock is left behind.
    decision = promote(params(trained["raw"]), 1, "back to the first version")
    assert decision["champion_before"] == chain[-1]
    assert client.get_model_version_by_alias(NAME, "champion").version == "1"
    assert client.get_model_version(NAME, chain[-1]).tags["replaced_by"] == "1"
    assert not client.search_registered_models(f"name = '{NAME}{GATE_LOCK_SUFFIX}'")


@pytest.mark.parametrize("store", ["sqlite", pytest.param("server", marks=pytest.mark.slow)])
def test_the_gate_lock_waits_for_its_holder_and_breaks_a_stale_one(store, request, tmp_path):
    """On the server and on the local SQLite store of the shipped params (other errors for a taken name)."""
    from pipeline.tracking.registry import GATE_LOCK_SUFFIX, gate_lock

    uri = request.getfixturevalue("server").tracking_uri if store == "server" else f"sqlite:///{tmp_path / 'm.db'}"
    client, name, events = _client_of(uri), "resdx-lock", []

    def holder():
        with gate_lock(client, name):
            events.append("held")
            time.sleep(1.0)
            events.append("released")

    thread = threading.Thread(target=holder)
    thread.start()
    deadline = time.monotonic() + 30
    while not events and time.monotonic() < deadline:
        time.sleep(0.01)
    with gate_lock(client, name, poll_s=0.05):
        events.append("taken")
    thread.join()
    assert events == ["held", "released", "taken"]

    client.create_registered_model(name + GATE_LOCK_SUFFIX)  # as a killed process leaves it
    time.sleep(1.5)
    with gate_lock(client, name, stale_s=1.0, poll_s=0.05):  # broken, then taken by us
        assert f" pid {os.getpid()} " in client.get_registered_model(name + GATE_LOCK_SUFFIX).tags["resdx.lock_owner"]
    assert not client.search_registered_models(f"name = '{name}{GATE_LOCK_SUFFIX}'")


# ----------------------------------------------------------------------------- the CLI
@pytest.mark.slow
def test_cli_status_then_stop_ends_both_by_pid(server):
    """Last in the module: it stops the module's server."""
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tools.mlflow_server", *args, "--state-dir",
                               str(server.state_dir)], cwd=REPO, capture_output=True, text=True, timeout=120)

    status = cli("status")
    assert status.returncode == 0 and f"pid {server.mlflow_pid}" in status.stdout, status.stdout + status.stderr
    assert f"pid {server.postgres_pid}" in status.stdout
    stopped = cli("stop")
    assert stopped.returncode == 0, stopped.stderr
    for pid in (server.mlflow_pid, server.postgres_pid):
        assert not ms.pid_alive(pid)
    assert not ms._group_alive(server.mlflow_pid)  # uvicorn and its workers went with it
    assert cli("status").returncode == 3 and ms.status(server.state_dir) is None
