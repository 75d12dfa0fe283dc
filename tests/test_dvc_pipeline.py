"""`dvc repro` runs the real stages (synthesize -> ingest) in a fresh copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml
from helpers import S3_TEST_ENV, s3_server

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dvc_repro_on_a_tiny_cohort(tmp_path):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    work = tmp_path / "repo"
    outputs = ("data/", "models/", "reports/", "predictions/", "mlflow.db", ".cache/", "tests/artifacts/")
    for f in files:
        if (REPO / f).is_file() and not f.startswith(outputs):
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, work / f)
    params = yaml.safe_load((work / "configs/params.yaml").read_text())
    params["synthesize"]["n_patients"] = 20
    params["ingest"].update(spacing=[10.0, 10.0, 10.0], shape=[24, 24, 24])
    params["train"].update(epochs=2, batch_size=4, threads=1)
    params["mlflow"]["system_metrics"] = False
    params["evaluate"]["n_bootstrap"] = 200
    params["explain"]["target_layer"] = "layer1"
    # the gate passes (a champion): a 2-epoch model is not held to the metric or explanation thresholds
    params["register"].update(min_auroc_ci_low=0.0, max_ece_calibrated=1.0, require_randomization_check=False,
                              min_pointing_margin=-1.0)
    (work / "configs/params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (work / "dvc.lock").unlink(missing_ok=True)
    (work / "params.yaml").unlink(missing_ok=True)
    (work / "params.yaml").symlink_to("configs/params.yaml")
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.org")

    def run(*cmd):
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (cmd, r.stdout[-3000:], r.stderr[-3000:])
        return r

    run("git", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "copy")
    run("dvc", "repro")
    index = (work / "data/ingested/index.csv").read_text().splitlines()
    manifest = (work / "data_manifests/demo.csv").read_text().splitlines()
    assert len(index) == len(manifest) > 12
    for f in ("data/ingested/plan.json", "dvc.lock", "models/model.safetensors", "reports/metrics.json",
              "reports/explain/report.html", "reports/model_card.md"):
        assert (work / f).exists(), f
    registration = json.loads((work / "reports/registration.json").read_text())
    assert registration["champion"] == registration["version"] == "1"
    again = run("dvc", "repro")
    assert "didn't change" in again.stdout or "up to date" in again.stdout
    metrics = json.loads(run("dvc", "metrics", "show", "--json").stdout)
    flat = json.dumps(metrics)
    for key in ("auroc", "auroc_ci95_low", "auroc_ci95_high", "ece_calibrated", "brier", "n_ok", "pointing_game"):
        assert key in flat, key
    assert len(json.loads((work / "reports/metrics.json").read_text())["test"]["auroc_ci95"]) == 2
    shown = run("dvc", "exp", "show", "--md").stdout
    for col in ("test.auroc", "test.auroc_ci95_low", "test.ece", "test.ece_calibrated", "test.brier"):
        assert col in shown, col

    # A DVC remote (a local folder, as README "Sharing data and models: a DVC remote" shows): push the
    # outputs, then a fresh clone pulls them and `dvc repro` has nothing to do.
    remote = tmp_path / "dvc-remote"
    run("dvc", "remote", "add", "-d", "shared", str(remote))
    run("dvc", "push")
    assert any(p.is_file() for p in remote.rglob("*"))
    run("git", "add", "-A")
    run("git", "commit", "-qm", "pipeline outputs tracked, remote configured")
    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(work), str(clone))
    env_clone = dict(env)

    def in_clone(*cmd):
        r = subprocess.run(cmd, cwd=clone, env=env_clone, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (cmd, r.stdout[-3000:], r.stderr[-3000:])
        return r

    assert not (clone / "models/model.safetensors").exists()
    in_clone("dvc", "pull")
    assert (clone / "models/model.safetensors").read_bytes() == (work / "models/model.safetensors").read_bytes()
    status = in_clone("dvc", "status").stdout
    assert "up to date" in status, status
    again = in_clone("dvc", "repro").stdout
    assert "Running stage" not in again and ("up to date" in again or "didn't change" in again), again

    # The same through an S3 API (moto's server on 127.0.0.1; dvc-s3 speaks to it as to AWS, MinIO or Ceph):
    # push from the first checkout, pull into a third clone that has never seen the local folder remote.
    with s3_server(tmp_path / "moto.log", "resdx-dvc") as endpoint:
        env.update(S3_TEST_ENV)
        run("dvc", "remote", "add", "s3", "s3://resdx-dvc/cache")
        run("dvc", "remote", "modify", "s3", "endpointurl", endpoint)
        run("dvc", "push", "-r", "s3")
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="resdx-dvc", Prefix="cache/")
                for o in page.get("Contents", [])]
        assert len(keys) == sum(1 for f in remote.rglob("*") if f.is_file()) > 0  # the same objects as the folder
        run("git", "add", "-A")
        run("git", "commit", "-qm", "an S3 remote")
        clone_s3 = tmp_path / "clone-s3"
        run("git", "clone", "-q", str(work), str(clone_s3))
        r = subprocess.run(["dvc", "pull", "-r", "s3"], cwd=clone_s3, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert (clone_s3 / "models/model.safetensors").read_bytes() == (work / "models/model.safetensors").read_bytes()
    status = subprocess.run(["dvc", "repro"], cwd=clone_s3, env=env, capture_output=True, text=True, timeout=600)
    assert status.returncode == 0 and "Running stage" not in status.stdout, status.stdout[-3000:]
