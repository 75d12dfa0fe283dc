"""Train stage: models, determinism, resume, DDP (gloo, 2 processes), checkpoints, MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_params
from helpers import train_params
from safetensors.torch import load_file

from pipeline.config import params_from_dict
from pipeline.core.models import ModelSpec, build_model
from pipeline.io.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["resnet10", "resnet18", "resnet34", "resnet50", "plain_cnn"])
@pytest.mark.parametrize("dims,input_ndim", [(3, 3), (2, 3), (2, 2)])
def test_every_model_builds_for_2d_and_3d(name, dims, input_ndim):
    spec = ModelSpec(name=name, spatial_dims=dims, in_channels=1, n_classes=3, input_ndim=input_ndim)
    model = build_model(spec).eval()
    x = torch.zeros((2, 1) + (32,) * input_ndim)
    assert model(x).shape == (2, 3)


def test_resnets_default_to_a_stride_2_stem():
    model = build_model(ModelSpec("resnet18", 3, 1, 2, 3))
    assert model.conv1.stride == (2, 2, 2)


def test_plain_cnn_explains_its_last_conv_stage():
    from pipeline.core.saliency import class_map

    model = build_model(ModelSpec("plain_cnn", 3, 1, 2, 3)).eval()
    cam = class_map(model, torch.randn(1, 1, 24, 24, 24), 1, target_layer="layer4")
    assert cam.shape == (24, 24, 24) and 0 <= cam.min() and cam.max() <= 1


def test_plain_cnn_has_no_residual_connections():
    model = build_model(ModelSpec("plain_cnn", 2, 1, 2, 2))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears[0].out_features == 512


def test_training_is_deterministic_on_cpu_and_writes_the_contract(tiny_ingested, tmp_path):
    from pipeline.stages.train import run_train

    a = run_train(train_params(tmp_path / "a", tiny_ingested), progress=False)
    b = run_train(train_params(tmp_path / "b", tiny_ingested), progress=False)
    wa = load_file(str(tmp_path / "a/models/model.safetensors"))
    wb = load_file(str(tmp_path / "b/models/model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [h["val_auroc"] for h in a.history] == [h["val_auroc"] for h in b.history]
    _assert_contract(tmp_path / "a" / "models", epochs=2)


def test_validating_less_often_leaves_the_weights_and_marks_the_epochs_it_skipped(tiny_ingested, tmp_path):
    from pipeline.stages.train import run_train

    every = run_train(train_params(tmp_path / "a", tiny_ingested, train={"epochs": 3, "select": "last",
                                                                        "val_interval": 1}), progress=False)
    fewer = run_train(train_params(tmp_path / "b", tiny_ingested, train={"epochs": 3, "select": "last",
                                                                        "val_interval": 2}), progress=False)
    wa = load_file(str(tmp_path / "a/models/model.safetensors"))
    wb = load_file(str(tmp_path / "b/models/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # a validation pass draws no random numbers
    assert [np.isnan(h["val_auroc"]) for h in fewer.history] == [True, False, False]  # epochs 2 and 3 (the last)
    assert [h["val_auroc"] for h in fewer.history][1:] == [h["val_auroc"] for h in every.history][1:]
    rows = (tmp_path / "b/models/history.csv").read_text().splitlines()
    assert rows[1].split(",")[2:4] == ["", ""] and all(rows[2].split(",")[2:4]), rows


def _assert_contract(models: Path, epochs: int) -> None:
    for name in ("model.safetensors", "model.json", "plan.json", "train_metrics.json", "history.csv",
                 "mlflow_run.json"):
        assert (models / name).exists(), name
    model, info = load_checkpoint(models)
    assert info["spec"]["name"] == "resnet10" and info["class_names"]
    assert json.loads((models / "train_metrics.json").read_text())["epochs_run"] == epochs
    assert len((models / "history.csv").read_text().splitlines()) == epochs + 1
    x = torch.zeros((1, 1, 24, 24, 24))
    assert model(x).shape == (1, 2)


def test_killed_run_resumes_to_the_same_weights(tiny_ingested, tmp_path, monkeypatch):
    from pipeline.stages import train as train_mod

    full = tmp_path / "full"
    train_mod.run_train(train_params(full, tiny_ingested, train={"epochs": 3}), progress=False)
    part = tmp_path / "part"
    real_save = train_mod._save_state

    def save_then_die(state, model, opt, sched, progress):
        real_save(state, model, opt, sched, progress)
        if progress["epoch"] == 1:
            raise KeyboardInterrupt  # the kill, right after epoch 1's state is on disk

    monkeypatch.setattr(train_mod, "_save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_mod.run_train(train_params(part, tiny_ingested, train={"epochs": 3}), progress=False)
    import mlflow

    mlflow.end_run()
    monkeypatch.setattr(train_mod, "_save_state", real_save)
    resumed = train_mod.run_train(train_params(part, tiny_ingested, train={"epochs": 3}), progress=False)
    assert len(resumed.history) == 3
    wa = load_file(str(full / "models/model.safetensors"))
    wb = load_file(str(part / "models/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_finished_run_is_not_reused_when_the_tensors_change(tiny_ingested, tmp_path):
    """Same sources, same plan, other tensor bytes (a preprocessing code change): train again, not resume."""
    import shutil

    from pipeline.stages.train import run_train

    ing = tmp_path / "ing"
    shutil.copytree(tiny_ingested, ing)
    first = run_train(train_params(tmp_path, ing, train={"epochs": 1}), progress=False)
    (state,) = (tmp_path / "state").iterdir()
    # finished: no last weights nor optimizer kept (a longer run is another run key), the best weights exported
    assert sorted(f.name for f in state.iterdir()) == ["best.safetensors", "progress.json"]
    weights = (tmp_path / "models/model.safetensors").read_bytes()
    again = run_train(train_params(tmp_path, ing, train={"epochs": 1}), progress=False)
    assert len(list((tmp_path / "state").iterdir())) == 1  # the same run key: the finished run is reused
    assert (tmp_path / "models/model.safetensors").read_bytes() == weights and again.history == first.history
    assert first.members_trained and not again.members_trained
    from helpers import read_index

    case = next(r["case_id"] for r in read_index(ing) if r["split"] == "train" and r["status"] == "ok")
    tensor = ing / "tensors" / f"{case}.npy"
    x = np.load(tensor)
    np.save(tensor, np.nextafter(x, np.inf).astype(x.dtype))  # one ulp: what a resampling change does
    run_train(train_params(tmp_path, ing, train={"epochs": 1}), progress=False)
    assert len(list((tmp_path / "state").iterdir())) == 2  # a second run key: trained anew


def test_mlflow_run_has_params_metrics_tags_and_plan(tiny_ingested, tmp_path):
    import mlflow

    from pipeline.stages.train import run_train

    s = run_train(train_params(tmp_path, tiny_ingested), progress=False)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(s.run_id)
    assert run.data.params["model.name"] == "resnet10" and run.data.params["train.batch_size"] == "4"
    assert {"git_commit", "dvc_data_hash", "device"} <= set(run.data.tags)
    assert len(client.get_metric_history(s.run_id, "val_auroc")) == 2
    assert "plan.json" in [a.path for a in client.list_artifacts(s.run_id)]
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "resdx-demo"


def test_ddp_with_two_gloo_processes_matches_the_single_process_contract(tiny_ingested, tmp_path):
    raw = tiny_params(tmp_path, tiny_ingested)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "pipeline.cli", "train", "--params", str(tmp_path / "p.yaml")]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    _assert_contract(tmp_path / "models", epochs=2)
    info = json.loads((tmp_path / "models" / "model.json").read_text())
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(info["mlflow_run_id"])
    assert run.data.tags["world_size"] == "2"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # rank 0 alone logged


def test_medicalnet_weights_load_from_a_local_path(tmp_path):
    from pipeline.core.models import load_medicalnet

    source = build_model(ModelSpec("resnet10", 3, 1, 2, 3))
    state = {f"module.{k}": v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    torch.save({"state_dict": state}, tmp_path / "resnet_10.pth")  # MedicalNet's layout: no head, DataParallel names
    target = build_model(ModelSpec("resnet10", 3, 1, 2, 3))
    missing = load_medicalnet(target, tmp_path / "resnet_10.pth")
    assert missing == ["fc.bias", "fc.weight"]
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    with pytest.raises(ValueError, match="no parameter matches"):
        load_medicalnet(build_model(ModelSpec("plain_cnn", 3, 1, 2, 3)), tmp_path / "resnet_10.pth")


def test_stages_log_to_a_stand_in_run_when_the_training_run_is_not_in_the_store(tmp_path):
    """Train outputs restored by DVC's run cache (or a `--temp` experiment's lost SQLite store) name a
    run the store lacks: later stages log to one tagged stand-in instead of failing."""
    import mlflow

    from pipeline.tracking.runs import training_run_id

    params = params_from_dict({"mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    models = tmp_path / "models"
    models.mkdir()
    (models / "mlflow_run.json").write_text(json.dumps({"run_id": "0123456789abcdef0123456789abcdef"}))
    (models / "model.json").write_text(json.dumps({"spec": {"name": "resnet10", "pool": "lse"}}))
    first = training_run_id(params, models)
    assert first and first != "0123456789abcdef0123456789abcdef"
    assert training_run_id(params, models) == first  # found again by its tag, not created twice
    run = mlflow.MlflowClient().get_run(first)
    assert run.data.tags["resdx.source_run_id"] == "0123456789abcdef0123456789abcdef"
    assert run.data.params["model.pool"] == "lse"
    (models / "mlflow_run.json").write_text(json.dumps({"run_id": first}))
    assert training_run_id(params, models) == first  # a run the store has is used as is
    off = params_from_dict({"mlflow": {"enabled": False}})
    assert training_run_id(off, models) is None


def test_a_kill_between_the_state_files_leaves_the_previous_epoch_whole(tmp_path):
    """progress.json names the epoch's weight and optimizer files and is written last: weights of a newer epoch
    on disk without their progress.json are not resumed, and older epochs' files are removed."""
    from pipeline.io.checkpoint import load_train_state, save_train_state, save_weights

    def parts():
        model = build_model(ModelSpec("plain_cnn", 3, 1, 2, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, 1)

    model, opt, sched = parts()
    save_train_state(tmp_path, model, opt, sched, {"epoch": 0, "best": 0.5})
    epoch0 = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for w in model.parameters():
            w.add_(1.0)
    save_weights(model, tmp_path / "last-1.safetensors")  # killed here: epoch 1's optimizer and progress not written
    fresh, fopt, fsched = parts()
    assert load_train_state(tmp_path, fresh, fopt, fsched)["epoch"] == 0
    assert all(torch.equal(fresh.state_dict()[k], epoch0[k]) for k in epoch0)
    save_train_state(tmp_path, model, opt, sched, {"epoch": 1, "best": 0.6})
    assert sorted(f.name for f in tmp_path.iterdir()) == ["last-1.safetensors", "optim-1.pt", "progress.json"]
