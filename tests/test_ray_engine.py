"""Ingest and batch prediction on a real Ray cluster: a head and a second node started on this machine.

The Ray runs must equal the local ones (the same index.csv, plan and tensor bytes; the same prediction
records), and a worker process killed in the middle of a case must neither lose it nor count it twice.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import read_index, register_tiny_champion
from ray_fixtures import RAY_ENV, ray_cluster, require_ray

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one cluster at a time on two cores


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    exe = require_ray()
    with ray_cluster(nodes=2, cpus_per_node=1, log_dir=tmp_path_factory.mktemp("ray-logs"), exe=exe) as c:
        yield c
        import ray

        if ray.is_initialized():  # the driver this test process joined with (ray_map / run_predict)
            ray.shutdown()


def _manifest_with_bad_rows(demo_cohort: Path, tmp: Path) -> Path:
    """The demo manifest plus a damaged DICOM series and a missing path: both end rejected, with reasons."""
    broken = tmp / "broken-series"
    broken.mkdir()
    (broken / "1.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(300))
    with demo_cohort.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header, rows = reader.fieldnames, list(reader)
    for case_id, path in (("bad-dicom", broken), ("gone", tmp / "no-such-folder")):
        rows.append({**rows[0], "case_id": case_id, "patient_id": f"p-{case_id}", "path": str(path), "modality": "CT",
                     **({"mask_path": ""} if "mask_path" in header else {})})
    out = demo_cohort.parent / "with-bad-rows.csv"  # beside the original: its relative paths still resolve
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, header)
        writer.writeheader()
        writer.writerows(rows)
    return out


def _ingest_raw(root: Path, manifest: Path, **ingest) -> dict:
    return {"seed": 3, "data": {"manifest": str(manifest)},
            "ingest": {"out_dir": str(root / "out"), "cache_dir": str(root / "cache"), "splits_file": None,
                       "spacing": [10.0, 10.0, 10.0], "shape": [24, 24, 24], "max_rejected_fraction": 0.5, **ingest}}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_ray_ingest_on_two_nodes_equals_a_local_run_and_survives_a_killed_worker(cluster, demo_cohort, tmp_path):
    from pipeline.config import params_from_dict
    from pipeline.stages.ingest import run_ingest

    manifest = _manifest_with_bad_rows(demo_cohort, tmp_path)
    local = run_ingest(params_from_dict(_ingest_raw(tmp_path / "local", manifest, workers=1)), progress=False)

    raw = _ingest_raw(tmp_path / "ray", manifest, engine="ray", ray_address=cluster.address, workers=2)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    env = dict(os.environ, **RAY_ENV, COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ingest", "--params", str(tmp_path / "p.yaml")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.monotonic() + 240
    while proc.poll() is None and killed is None and time.monotonic() < deadline:
        running = cluster.workers("_run_case")  # a worker in the middle of a case
        if running:
            killed = running[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    output, _ = proc.communicate(timeout=300)
    assert killed is not None, "no worker was seen running a case: nothing was killed\n" + output[-2000:]
    assert proc.returncode == 0, output[-3000:]
    assert "ingest summary" in output and "manifest rows" in output

    ray_rows, local_rows = read_index(tmp_path / "ray" / "out"), read_index(tmp_path / "local" / "out")
    assert [r["case_id"] for r in ray_rows] == [r["case_id"] for r in local_rows]  # each row once, in manifest order
    assert ray_rows == local_rows  # status, reason, shapes, hashes: row for row
    rejected = {r["case_id"]: (r["reason_code"], r["reason"]) for r in ray_rows if r["status"] != "ok"}
    assert set(rejected) == {"bad-dicom", "gone"} and rejected["gone"][0] == "missing_path"
    assert all(code and why for code, why in rejected.values())
    assert local.n_rejected == 2 and local.n_ok == len(local_rows) - 2
    assert _files(tmp_path / "ray" / "out" / "tensors") == _files(tmp_path / "local" / "out" / "tensors")
    plans = [json.loads((tmp_path / k / "out" / "plan.json").read_text()) for k in ("ray", "local")]
    assert plans[0] == plans[1]


def test_ray_map_keeps_order_stops_a_hung_task_and_rejects_one_that_keeps_dying(cluster):
    from pipeline.ray_engine import MAX_RETRIES, ray_map

    def work(task: dict) -> dict:  # defined here: Ray ships it by value, so the workers need no tests/ folder
        if task["do"] == "hang":
            time.sleep(120)
        if task["do"] == "die":
            os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer or a crashing decoder would
        return {"n": task["n"], "pid": os.getpid()}

    tasks = [{"n": i, "do": "ok"} for i in range(6)]
    tasks[2]["do"], tasks[4]["do"] = "hang", "die"
    t0 = time.monotonic()
    out = ray_map(work, tasks, cluster.address, "test", show=False, timeout_s=6,
                  on_fail=lambda t, why: {"n": t["n"], "failed": why})
    assert [r["n"] for r in out] == list(range(6))
    assert out[2]["failed"] == "timeout"
    assert out[4]["failed"].startswith("died (") and f"after {MAX_RETRIES} retries" in out[4]["failed"]
    assert all("failed" not in out[i] for i in (0, 1, 3, 5))
    assert len({out[i]["pid"] for i in (0, 1, 3, 5)}) >= 2  # both nodes' workers took cases
    assert time.monotonic() - t0 < 100  # the hung task was stopped at its limit, not waited for


def test_batch_predict_on_ray_equals_the_local_run(cluster, tiny_ingested, demo_cohort, tmp_path):
    import nibabel as nib
    import numpy as np

    from pipeline.sources.manifest import read_manifest
    from pipeline.stages.predict import run_predict

    params = register_tiny_champion(tmp_path, tiny_ingested, "resdx-ray")
    studies = [r.path for r in read_manifest(demo_cohort) if r.modality == "CT"][:5] + [tmp_path / "not-a-study"]
    (tmp_path / "not-a-study").write_text("no image here")
    modality = None
    uri = "models:/resdx-ray@champion"
    runs = {}
    for engine in ("local", "ray"):
        runs[engine] = run_predict(uri, studies, tmp_path / engine, modality=modality, saliency=True,
                                   tracking_uri=params.mlflow.tracking_uri, progress=False, engine=engine,
                                   ray_address=cluster.address if engine == "ray" else None)
    assert runs["ray"]["engine"] == {"name": "ray", "workers": 2}  # one model load per worker, 6 studies
    volatile = ("created_at", "timing")
    same = [{k: v for k, v in r.items() if k not in volatile} for r in runs["ray"]["records"]]
    assert same == [{k: v for k, v in r.items() if k not in volatile} for r in runs["local"]["records"]]
    assert runs["ray"]["n_ok"] >= 1 and runs["ray"]["n_rejected"] >= 1
    for rec in runs["ray"]["records"]:
        saved = json.loads((tmp_path / "ray" / f"{rec['study_id']}.json").read_text())
        assert saved == rec
        if rec.get("saliency"):
            maps = [np.asarray(nib.load(tmp_path / e / rec["saliency"]).dataobj) for e in ("ray", "local")]
            assert np.array_equal(*maps)
