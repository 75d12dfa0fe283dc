"""Ingest throughput: the local pool (1 and 2 workers) against Ray (1 and 2 nodes on this machine), issue 15.

    .venv/bin/python benchmarks/ray_ingest.py [--series 200] [--repeat 1] [--json FILE]

1. Synthesizes a CT-only cohort of `--series` DICOM series (the demo's generator: 2 series per patient,
   30% RLE-compressed) in a temporary folder.
2. Runs `resdx ingest` as a whole process (start-up and imports count) for each engine, each time with a
   fresh output and cache folder (nothing reused): `local` with 1 and 2 workers; `ray` against a cluster
   of 1 node (1 CPU) and of 2 nodes (1 CPU each) started beforehand with `ray start` (tools/ray_local.py;
   the cluster's start-up is reported apart, it is paid once per cluster, not per ingest).
3. Times the engines alone on `--series` no-op tasks (the map with nothing to do, in this process): the
   per-case overhead of a Ray task against a supervised local worker.

Prints markdown tables (the numbers in benchmarks/README.md "ray_ingest.py") and writes the raw figures
with `--json`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.ray_local import RAY_ENV, ray_cluster  # noqa: E402


def synthesize_cohort(root: Path, series: int) -> Path:
    from pipeline.config import SynthesizeConfig
    from pipeline.stages.synthesize import synthesize

    cfg = SynthesizeConfig(out_dir=root / "data", manifest=root / "cohort.csv", n_patients=(series + 1) // 2,
                           studies_per_patient=(2, 2), ct_fraction=1.0, workers=2)
    synthesize(cfg, seed=11, progress=False)
    return cfg.manifest


def run_ingest(manifest: Path, work: Path, env: dict, **ingest) -> dict:
    """One `resdx ingest` process with a fresh output and cache; its wall time and the index's counts."""
    params = yaml.safe_load((REPO / "configs/params.yaml").read_text())
    params["data"]["manifest"] = str(manifest)
    params["ingest"].update(out_dir=str(work / "out"), cache_dir=str(work / "cache"), splits_file=None, **ingest)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    resdx = str(Path(sys.executable).with_name("resdx"))
    t0 = time.perf_counter()
    proc = subprocess.run([resdx, "ingest", "--params", str(work / "params.yaml")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"resdx ingest failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with (work / "out/index.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    stage = json.loads((work / "out/summary.json").read_text())["seconds"]
    return {"wall_s": round(wall, 2), "stage_s": stage, "rows": len(rows),
            "ok": sum(r["status"] == "ok" for r in rows)}


def noop(task: dict) -> dict:
    return {"n": task["n"]}


def engine_overhead(n: int, address: str | None) -> dict:
    """Seconds per task of the map itself: local supervised pool (2 workers) and Ray (the given cluster)."""
    from pipeline.progress import progress_map
    from pipeline.ray_engine import ray_map

    tasks = [{"n": i} for i in range(n)]
    fail = lambda t, why: {"n": t["n"], "failed": why}  # noqa: E731
    out = {}
    t0 = time.perf_counter()
    progress_map(noop, tasks, 2, "local", False, 300.0, fail)
    out["local_pool_ms_per_task"] = round(1000 * (time.perf_counter() - t0) / n, 3)
    if address:
        ray_map(noop, tasks[:4], address, "warm-up", False, 300.0, fail)  # workers started, module imported
        t0 = time.perf_counter()
        ray_map(noop, tasks, address, "ray", False, 300.0, fail)
        out["ray_ms_per_task"] = round(1000 * (time.perf_counter() - t0) / n, 3)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=200, help="CT series in the synthetic cohort (>= 200)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    env = dict(os.environ, DVC_NO_ANALYTICS="1", **RAY_ENV)
    os.environ.update(RAY_ENV)
    results: dict = {"runs": {}, "cluster_start_s": {}, "overhead": {}}
    with tempfile.TemporaryDirectory(prefix="resdx-ray-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        manifest = synthesize_cohort(root / "cohort", args.series)
        results["synthesize_s"] = round(time.perf_counter() - t0, 1)
        configs = [("local, 1 worker", {"engine": "local", "workers": 1}, 0),
                   ("local, 2 workers", {"engine": "local", "workers": 2}, 0),
                   ("ray, 1 node x 1 CPU", {"engine": "ray"}, 1),
                   ("ray, 2 nodes x 1 CPU", {"engine": "ray"}, 2)]
        for name, ingest, nodes in configs:
            runs = []
            for r in range(args.repeat):
                work = root / f"run-{len(results['runs'])}-{r}"
                work.mkdir()
                if nodes:
                    t0 = time.perf_counter()
                    with ray_cluster(nodes=nodes, cpus_per_node=1) as cluster:
                        results["cluster_start_s"][name] = round(time.perf_counter() - t0, 1)
                        runs.append(run_ingest(manifest, work, env, ray_address=cluster.address, **ingest))
                        if nodes == 2 and r == 0:
                            results["overhead"] = engine_overhead(args.series, cluster.address)
                            import ray

                            ray.shutdown()
                else:
                    runs.append(run_ingest(manifest, work, env, **ingest))
                print(f"{name}: {runs[-1]}", file=sys.stderr)
            results["runs"][name] = runs
    base = min(r["wall_s"] for r in results["runs"]["local, 1 worker"])
    print("| engine | series | ok | wall s (whole process) | ingest stage s | cases/s | speed-up vs local 1 |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for name, runs in results["runs"].items():
        best = min(runs, key=lambda r: r["wall_s"])
        print(f"| {name} | {best['rows']} | {best['ok']} | {best['wall_s']:.1f} | {best['stage_s']:.1f} | "
              f"{best['rows'] / best['wall_s']:.2f} | {base / best['wall_s']:.2f}x |")
    o = results["overhead"]
    print(f"\nengine overhead on {args.series} no-op tasks: local pool {o.get('local_pool_ms_per_task')} ms/task, "
          f"Ray (2 nodes) {o.get('ray_ms_per_task')} ms/task; cluster start {results['cluster_start_s']} s; "
          f"cohort synthesized in {results['synthesize_s']} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
