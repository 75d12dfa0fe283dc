"""Multi-node training: two torchrun agents ("nodes") on 127.0.0.1 meet by c10d rendezvous (gloo, CPU).

Each node runs in its own folder with its own params (models, train state, MLflow store): only the read-only
ingested data is common, as on two machines without a shared disk. Rank 0 alone writes, so the model lands
on the node whose worker got rank 0 (the rendezvous orders the agents; the test looks for it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_params
from helpers import free_port
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

EPOCHS = 3
TIMEOUT_S = 240  # one whole multi-process run, restarts included
# LOGLEVEL=INFO: the agents log their restarts. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: the workers' process group
# gets a fresh store each round; the store torch 2.13's agents share with their workers outlives a restart with the
# last round's keys (gloo then dials the dead worker's port), and the agents' restart counts that should tell the
# rounds apart differ between the node that failed and the node that was restarted (pytorch/pytorch#135712).
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", LOGLEVEL="INFO",
           TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")


def _node(root: Path, ingest: Path) -> Path:
    """A node's folder and its params (3 epochs, the last kept: the weights compared are the final ones)."""
    root.mkdir(parents=True)
    params = tiny_params(root, ingest, epochs=EPOCHS, select="last", val_interval=1)  # every epoch's val_loss
    (root / "p.yaml").write_text(yaml.safe_dump(params))
    return root


def _descendants(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            out += [k, *_descendants(k)]
    return out


def _stop(procs: list[subprocess.Popen]) -> None:
    """Stop torchrun agents and their workers (each worker runs in a session of its own): SIGTERM, then SIGKILL."""
    alive = [p for p in procs if p.poll() is None]
    tree = {q for p in alive for q in _descendants(p.pid)}
    for p in alive:
        os.killpg(p.pid, signal.SIGTERM)
    for p in alive:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    for q in tree:
        try:
            os.kill(q, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def _torchrun(*runs: tuple[Path, list[str]]):
    """Start `python -m torch.distributed.run ARGS -m pipeline.cli train` in each folder at once; yields the
    Popens, never leaves one (nor a worker) behind."""
    procs = []
    try:
        for folder, args in runs:
            cmd = [sys.executable, "-m", "torch.distributed.run", *args, "-m", "pipeline.cli", "train",
                   "--params", str(folder / "p.yaml")]
            with (folder / "torchrun.log").open("w") as log:
                # TMPDIR: torchrun's log folders (torchelastic_*) stay in the test's folder, not in /tmp
                procs.append(subprocess.Popen(cmd, cwd=folder, env=ENV | {"TMPDIR": str(folder)}, stdout=log,
                                              stderr=subprocess.STDOUT,
                                              start_new_session=True))
        yield procs
    finally:
        _stop(procs)


def _finish(procs: list[subprocess.Popen], folders: list[Path], deadline: float) -> None:
    for p, f in zip(procs, folders):
        try:
            rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rc = "timeout"
        assert rc == 0, f"{f.name}: torchrun returned {rc}\n" + (f / "torchrun.log").read_text()[-4000:]


def _two_nodes(a: Path, b: Path, max_restarts: int = 0) -> list[tuple[Path, list[str]]]:
    rdzv = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
            f"127.0.0.1:{free_port()}", "--rdzv_id", f"resdx-{uuid.uuid4().hex[:8]}", "--max-restarts",
            str(max_restarts)]
    return [(a, rdzv), (b, rdzv)]


def _rank0(*nodes: Path) -> Path:
    """The node whose worker was rank 0: it alone holds the model (and the train state)."""
    have = [n for n in nodes if (n / "models" / "model.safetensors").exists()]
    assert len(have) == 1, f"rank 0 alone writes the model; found it in {have}"
    return have[0]


def _weights(node: Path) -> dict[str, torch.Tensor]:
    return load_file(str(node / "models" / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


@pytest.fixture(scope="module")
def one_node_two_procs(tiny_ingested, tmp_path_factory) -> Path:
    """The reference: the same world size (2) and global batch on one node, `--nproc_per_node 2`."""
    ref = _node(tmp_path_factory.mktemp("one-node") / "node", tiny_ingested)
    with _torchrun((ref, ["--standalone", "--nproc_per_node", "2"])) as procs:
        _finish(procs, [ref], time.monotonic() + TIMEOUT_S)
    return ref


def test_two_nodes_train_the_weights_of_one_node_with_the_same_world_and_batch(tiny_ingested, tmp_path,
                                                                               one_node_two_procs):
    a, b = _node(tmp_path / "a", tiny_ingested), _node(tmp_path / "b", tiny_ingested)
    with _torchrun(*_two_nodes(a, b)) as procs:
        _finish(procs, [a, b], time.monotonic() + TIMEOUT_S)
    home = _rank0(a, b)
    wa, wr = _weights(home), _weights(one_node_two_procs)
    # Same ranks, same per-rank batches (batch_size is global: batch_size // world per rank), gloo's sum of
    # two gradients is commutative: bit for bit, not merely close.
    assert all(torch.equal(wa[k], wr[k]) for k in wr), f"max |diff| {_max_diff(wa, wr)}"
    metrics = json.loads((home / "models" / "train_metrics.json").read_text())
    assert metrics["epochs_run"] == EPOCHS
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    run = client.get_run(json.loads((home / "models" / "mlflow_run.json").read_text())["run_id"])
    assert run.data.tags["world_size"] == "2"


def _worker(agent: subprocess.Popen) -> int | None:
    """The pid of the training worker (`pipeline.cli train`) torchrun started, not torchrun itself."""
    for pid in _descendants(agent.pid):
        try:
            if b"pipeline.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


def _epoch_saved(nodes: list[Path]) -> int:
    """The last epoch whose train state is complete on any node (progress.json is written last), else -1."""
    done = -1
    for n in nodes:
        for prog in (n / "state").glob("*/progress.json"):
            try:
                done = max(done, json.loads(prog.read_text())["epoch"])
            except (OSError, ValueError, KeyError):
                continue
    return done


def test_a_killed_worker_is_restarted_and_resumes_from_the_last_epoch_state(tiny_ingested, tmp_path,
                                                                            one_node_two_procs):
    a, b = _node(tmp_path / "a", tiny_ingested), _node(tmp_path / "b", tiny_ingested)
    deadline = time.monotonic() + TIMEOUT_S
    with _torchrun(*_two_nodes(a, b, max_restarts=1)) as procs:
        while _epoch_saved([a, b]) < 1:  # epoch 1's state on disk: kill in epoch 2
            assert all(p.poll() is None for p in procs), "a node ended before epoch 1 was saved"
            assert time.monotonic() < deadline, "epoch 1 was not saved in time"
            time.sleep(0.05)
        victim = _worker(procs[1])
        assert victim, "no training worker under node b's torchrun"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        _finish(procs, [a, b], deadline)
    home = _rank0(a, b)
    log_b = (b / "torchrun.log").read_text()
    assert f"(pid: {victim})" in log_b, log_b[-4000:]  # node b saw its worker die ...
    assert "Worker group FAILED. 1/1 attempts left; will restart worker group" in log_b  # ... and restarted it

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    run_id = json.loads((home / "models" / "mlflow_run.json").read_text())["run_id"]
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1  # one run, continued
    points = sorted(client.get_metric_history(run_id, "val_loss"), key=lambda m: m.step)
    # Resumed, not restarted from epoch 0: epochs 0 and 1 were logged once, before the kill; only epoch 2 after.
    assert [m.step for m in points] == list(range(EPOCHS))
    assert [m.timestamp / 1000 < killed_at for m in points] == [True, True, False]
    assert client.get_run(run_id).info.status == "FINISHED"
    metrics = json.loads((home / "models" / "train_metrics.json").read_text())
    assert metrics["epochs_run"] == EPOCHS
    assert len((home / "models" / "history.csv").read_text().splitlines()) == EPOCHS + 1
    wk, wr = _weights(home), _weights(one_node_two_procs)
    assert all(torch.equal(wk[k], wr[k]) for k in wr), f"max |diff| {_max_diff(wk, wr)}"
