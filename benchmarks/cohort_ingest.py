"""Cohort-scale ingest: ResDx's `resdx ingest` against MONAI's usual dictionary pipeline and against dcm2niix
followed by the same resampling in Python (issue 16, target 2).

    .venv/bin/python benchmarks/cohort_ingest.py [--repo DIR] [--workers 2] [--repeat 2]
    .venv/bin/python benchmarks/cohort_ingest.py --cohort large [--series 200] [--workdir DIR]

All run as whole processes (interpreter start-up and imports count), with the same number of worker processes,
over the cases of `DIR`'s `data_manifests/demo.csv` (`--cohort demo`: run `make repro` or `dvc repro synthesize`
there first), or over `--series` larger CT series (`--cohort large`: 192^2-384^2 matrices, 60-180 slices,
0.9-1.8 mm pixels, 1-3 mm slices, 30% RLE Lossless; `benchmarks/ingest.py`'s trunk phantom, written once under
`--workdir` and reused):

- ResDx: `resdx ingest` with a fresh output and cache folder (nothing reused): every input file hashed, read,
  the plan fitted on the training split, cubic-spline resampling to `ingest.spacing`, crop/pad to
  `ingest.shape`, tensors written.
- MONAI: `LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd(bilinear, same spacing) ->
  ScaleIntensityRanged(a fixed CT window; MR: NormalizeIntensityd) -> ResizeWithPadOrCropd(same shape)`
  through a `DataLoader(num_workers=N)`, tensors kept in memory. A case MONAI cannot read is counted as
  failed (it would stop a plain `DataLoader` loop), not retried.
- dcm2niix + Python: `dcm2niix -z n -b n` per DICOM series (the C converter, no resampling) in a pool of the
  same number of processes, each followed in that process by nibabel's load and ResDx's own resampling
  (`canonicalize`, `plan_resample`: cubic, to the same spacing) and a fixed-window normalisation and crop/pad
  (`plan_normalize`): the reading floor of a C reader with the same resampling; NIfTI cases are loaded directly.

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


DCM2NIIX_SCRIPT = r"""
import csv, json, subprocess, sys, tempfile
from multiprocessing import Pool
from pathlib import Path

manifest, workers, params_file, dcm2niix = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
rows = list(csv.DictReader(manifest.open()))
base = manifest.parent


def one(row):
    import nibabel as nib
    import numpy as np

    from pipeline.config import load_params
    from pipeline.core.plan import CTNormalization, fixed_geometry, fit_plan
    from pipeline.core.preprocess import canonicalize, plan_normalize, plan_resample
    from pipeline.core.volume import Volume

    params = load_params(params_file)
    path = (base / row["path"]).resolve()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if path.is_dir():
                subprocess.run([dcm2niix, "-z", "n", "-b", "n", "-o", tmp, "-f", "out", str(path)], check=True,
                               capture_output=True)
                path = sorted(Path(tmp).glob("out*.nii"))[0]
            img = nib.load(str(path))
            vol = Volume(np.asarray(img.dataobj, dtype=np.float32), img.affine, {})
        data, affine = canonicalize(vol, row["modality"])
        out, aff, rinfo = plan_resample(data, affine, fixed_geometry(params))
        plan = fit_plan([], [], params).model_copy(update={"ct": CTNormalization(
            window=[-1000.0, 1000.0], window_source="fixed", mean=0.0, std=500.0)})
        tensor, _, _ = plan_normalize(out, aff, row["modality"], plan, rinfo)
        return 1 if np.isfinite(tensor).all() else 0
    except Exception:
        return 0


with Pool(workers) as pool:
    ok = sum(pool.map(one, rows, chunksize=1))
print(f"DCM2NIIX_RESULT {len(rows)} {ok}")
"""


def _timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, proc.stdout + proc.stderr


def _params(repo: Path, manifest: Path, work: Path, workers: int) -> Path:
    params = yaml.safe_load((repo / "configs/params.yaml").read_text())
    params["data"]["manifest"] = str(manifest)
    params["ingest"].update(out_dir=str(work / "out"), cache_dir=str(work / "cache"), workers=workers,
                            splits_file=None)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return work / "params.yaml"


def run_resdx(repo: Path, manifest: Path, workers: int, work: Path, env: dict) -> tuple[float, int, int]:
    resdx = str(Path(sys.executable).with_name("resdx"))
    wall, _ = _timed([resdx, "ingest", "--params", str(_params(repo, manifest, work, workers))], repo, env)
    with (work / "out/index.csv").open() as f:
        rows = list(csv.DictReader(f))
    return wall, len(rows), sum(r["status"] == "ok" for r in rows)


def run_monai(repo: Path, manifest: Path, workers: int, env: dict) -> tuple[float, int, int]:
    params = yaml.safe_load((repo / "configs/params.yaml").read_text())
    spacing, shape = params["ingest"]["spacing"], params["ingest"]["shape"]
    wall, out = _timed([sys.executable, "-c", MONAI_SCRIPT, str(manifest), str(workers), json.dumps(spacing),
                        json.dumps(shape)], repo, env)
    line = next(ln for ln in out.splitlines() if ln.startswith("MONAI_RESULT"))
    _, n, ok = line.split()
    return wall, int(n), int(ok)


def run_dcm2niix(repo: Path, manifest: Path, workers: int, work: Path, env: dict) -> tuple[float, int, int]:
    import shutil

    dcm2niix = shutil.which("dcm2niix", path=str(Path(sys.executable).parent)) or shutil.which("dcm2niix")
    if dcm2niix is None:
        raise SystemExit("dcm2niix not found: .venv/bin/pip install -e '.[bench]' -c constraints.txt")
    params = _params(repo, manifest, work, workers)
    wall, out = _timed([sys.executable, "-c", DCM2NIIX_SCRIPT, str(manifest), str(workers), str(params), dcm2niix],
                       repo, env)
    line = next(ln for ln in out.splitlines() if ln.startswith("DCM2NIIX_RESULT"))
    _, n, ok = line.split()
    return wall, int(n), int(ok)


def _write_series(job: tuple) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from ingest import generate_series

    folder, n_slices, size, spacing, thickness, rle, name = job
    if not folder.exists():
        partial = folder.with_name(folder.name + ".partial")
        generate_series(partial, n_slices, size, spacing, thickness, rle=rle, name=name)
        partial.rename(folder)


def large_cohort(root: Path, series: int, workers: int = 2) -> Path:
    """`series` CT series of mixed sizes, 30% RLE Lossless, and their manifest (written once, then reused)."""
    import random
    from multiprocessing import Pool

    manifest = root / f"large-{series}.csv"
    if manifest.exists():
        return manifest
    rng = random.Random(20261207)
    jobs, rows = [], []
    for i in range(series):
        size = rng.choice([192, 256, 320, 384])
        spacing = round(rng.uniform(320, 420) / size, 3)  # a 320-420 mm field of view
        thickness = rng.choice([1.0, 1.25, 2.0, 3.0])
        n_slices = rng.randint(60, 180)
        jobs.append((root / "series" / f"s{i:04d}", n_slices, size, spacing, thickness, rng.random() < 0.3,
                     f"large-{i}"))
        rows.append([f"large-c{i:04d}", f"large-p{i // 2:04d}", "CT", f"series/s{i:04d}", i % 2])
    with Pool(workers) as pool:
        pool.map(_write_series, jobs, chunksize=1)
    with manifest.with_suffix(".partial").open("w", newline="") as fh:
        csv.writer(fh).writerows([["case_id", "patient_id", "modality", "path", "label"], *rows])
    manifest.with_suffix(".partial").rename(manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=Path("."), help="a checkout where `synthesize` has run")
    ap.add_argument("--cohort", choices=["demo", "large"], default="demo")
    ap.add_argument("--series", type=int, default=200, help="--cohort large: how many CT series")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/resdx-cohort"), help="--cohort large: where it lives")
    ap.add_argument("--pipelines", default="resdx,monai,dcm2niix", help="which to run, comma-separated")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="write the raw timings here")
    args = ap.parse_args(argv)
    repo = args.repo.resolve()
    if args.cohort == "demo":
        manifest = repo / yaml.safe_load((repo / "configs/params.yaml").read_text())["data"]["manifest"]
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        manifest = large_cohort(args.workdir.resolve(), args.series, args.workers)
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    runners = {"resdx": lambda tmp: run_resdx(repo, manifest, args.workers, tmp, env),
               "monai": lambda tmp: run_monai(repo, manifest, args.workers, env),
               "dcm2niix": lambda tmp: run_dcm2niix(repo, manifest, args.workers, tmp, env)}
    results: dict[str, list] = {k: [] for k in args.pipelines.split(",")}
    for i in range(args.repeat):  # round-robin, so drift on the machine hits every pipeline alike
        for name in results:
            with tempfile.TemporaryDirectory(prefix="resdx-cohort-") as tmp:
                results[name].append(runners[name](Path(tmp)))
        print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]}" for k, v in results.items()), file=sys.stderr)
    rate = {}
    print("| pipeline | rows | read | failed or rejected | wall s | cases/s (all rows) | cases/s (read) |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for name, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        n, ok = runs[-1][1], runs[-1][2]
        rate[name] = n / wall
        print(f"| {name} | {n} | {ok} | {n - ok} | {wall:.1f} | {n / wall:.1f} | {ok / wall:.1f} |")
    for other in [k for k in rate if k != "resdx"]:
        if "resdx" in rate:
            print(f"ResDx / {other}, cases per second over all rows: {rate['resdx'] / rate[other]:.2f}x "
                  f"({args.workers} workers each, median of {args.repeat})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
