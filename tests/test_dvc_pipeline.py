"""`dvc repro` runs the real stages (synthesize -> ingest) in a fresh copy of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dvc_repro_on_a_tiny_cohort(tmp_path):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    work = tmp_path / "repo"
    for f in files:
        if (REPO / f).is_file():
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, work / f)
    params = yaml.safe_load((work / "configs/params.yaml").read_text())
    params["synthesize"]["n_patients"] = 4
    (work / "configs/params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (work / "dvc.lock").unlink(missing_ok=True)
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
    assert len(index) == len(manifest) > 4
    assert (work / "data/ingested/plan.json").exists() and (work / "dvc.lock").exists()
    again = run("dvc", "repro")
    assert "didn't change" in again.stdout or "up to date" in again.stdout
    metrics = run("dvc", "metrics", "show", "--json")
    assert "n_ok" in metrics.stdout
