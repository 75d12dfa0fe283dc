"""Cohort-scale ingest: ResDx's `resdx ingest` against MONAI's usual dictionary pipeline (issue 16, target 2).

    .venv/bin/python benchmarks/cohort_ingest.py [--repo DIR] [--workers 2] [--repeat 2]

Both run as whole processes (interpreter start-up and imports count) over the cases of `DIR`'s
`data_manifests/demo.csv` (run `make repro` or `dvc repro synthesize` there first), with the same number of
worker processes:

- ResDx: `resdx ingest` with a fresh output and cache folder (nothing reused): every input file hashed, read,
  the plan fitted on the training split, cubic-spline resampling to `ingest.spacing`, crop/pad to
  `ingest.shape`, tensors written.
- MONAI: `LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd(bilinear, same spacing) ->
  ScaleIntensityRanged(a fixed CT window; MR: NormalizeIntensityd) -> ResizeWithPadOrCropd(same shape)`
  through a `DataLoader(num_workers=N)`, tensors kept in memory. A case MONAI cannot read is counted as
  failed (it would stop a plain `DataLoader` loop), not retried.

Prints cases/s for each and the ratio ResDx / MONAI (higher is better for ResDx), medians of `--repeat`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

MONAI_SCRIPT = r"""
import csv, json, sys, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import (Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd, Orientationd,
                              ResizeWithPadOrCropd, ScaleIntensityRanged, Spacingd)

manifest, workers = Path(sys.argv[1]), int(sys.argv[2])
spacing, shape = json.loads(sys.argv[3]), json.loads(sys.argv[4])
rows = list(csv.DictReader(manifest.open()))
base = manifest.parent

def chain(modality):
    norm = (ScaleIntensityRanged("image", -1000, 1000, 0.0, 1.0, clip=True) if modality == "CT"
            else NormalizeIntensityd("image"))
    return Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"),
                    Orientationd("image", axcodes="RAS"), Spacingd("image", pixdim=spacing, mode="bilinear"),
                    norm, ResizeWithPadOrCropd("image", spatial_size=shape)])

class Cases(Dataset):
    def __getitem__(self, i):
        row = self.data[i]
        try:
            out = chain(row["modality"])({"image": str((base / row["path"]).resolve())})
            return {"ok": torch.tensor(1), "voxels": torch.tensor(out["image"].numel())}
        except Exception:
            return {"ok": torch.tensor(0), "voxels": torch.tensor(0)}

loader = DataLoader(Cases(rows), batch_size=1, num_workers=workers)
ok = sum(int(b["ok"]) for b in loader)
print(f"MONAI_RESULT {len(rows)} {ok}")
"""


def _timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, proc.stdout + proc.stderr


def run_resdx(repo: Path, workers: int, work: Path, env: dict) -> tuple[float, int, int]:
    params = yaml.safe_load((repo / "configs/params.yaml").read_text())
    params["ingest"].update(out_dir=str(work / "out"), cache_dir=str(work / "cache"), workers=workers)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    resdx = str(Path(sys.executable).with_name("resdx"))
    wall, _ = _timed([resdx, "ingest", "--params", str(work / "params.yaml")], repo, env)
    with (work / "out/index.csv").open() as f:
        rows = list(csv.DictReader(f))
    return wall, len(rows), sum(r["status"] == "ok" for r in rows)


def run_monai(repo: Path, workers: int, env: dict) -> tuple[float, int, int]:
    params = yaml.safe_load((repo / "configs/params.yaml").read_text())
    manifest = repo / params["data"]["manifest"]
    spacing, shape = params["ingest"]["spacing"], params["ingest"]["shape"]
    wall, out = _timed([sys.executable, "-c", MONAI_SCRIPT, str(manifest), str(workers), json.dumps(spacing),
                        json.dumps(shape)], repo, env)
    line = next(ln for ln in out.splitlines() if ln.startswith("MONAI_RESULT"))
    _, n, ok = line.split()
    return wall, int(n), int(ok)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=Path("."), help="a checkout where `synthesize` has run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="write the raw timings here")
    args = ap.parse_args(argv)
    repo = args.repo.resolve()
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    results: dict[str, list] = {"resdx": [], "monai": []}
    for i in range(args.repeat):  # alternating, so drift on the machine hits both alike
        with tempfile.TemporaryDirectory(prefix="resdx-cohort-") as tmp:
            results["resdx"].append(run_resdx(repo, args.workers, Path(tmp), env))
        results["monai"].append(run_monai(repo, args.workers, env))
        print(f"round {i + 1}: resdx {results['resdx'][-1]}, monai {results['monai'][-1]}", file=sys.stderr)
    rate = {}
    print("| pipeline | rows | read | failed or rejected | wall s | cases/s (all rows) | cases/s (read) |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for name, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        n, ok = runs[-1][1], runs[-1][2]
        rate[name] = n / wall
        print(f"| {name} | {n} | {ok} | {n - ok} | {wall:.1f} | {n / wall:.1f} | {ok / wall:.1f} |")
    print(f"ResDx / MONAI, cases per second over all rows: {rate['resdx'] / rate['monai']:.2f}x "
          f"({args.workers} workers each, median of {args.repeat})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
