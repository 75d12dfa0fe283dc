"""Saliency localisation ablation: which network and map settings let Grad-CAM point at the lesion.

Trains one resnet10 per variant with the pipeline's own code (``pipeline.train.run_train``, the
workspace's ``configs/params.yaml`` with only the listed ``model.*`` keys changed) on the ingested
demo cohort (``data/ingested``, from ``make repro``), then, on every positive test case, computes
the lesion class's map with ``pipeline.saliency.class_map`` for Grad-CAM / Grad-CAM++ and
``shifts`` 1 / 2, and scores it against the lesion mask taken onto the tensor grid:

- pointing game: the map's peak voxel inside the lesion (random baseline: the lesion's share of
  the volume);
- energy inside: the share of the map's sum inside the lesion;
- peak distance: median distance (voxels, 5 mm) from the peak to the lesion's centre.

The explain stage scores the same maps on each scan's native grid (``reports/explain/sanity.json``).

Run: ``.venv/bin/python benchmarks/saliency.py`` (about 20 min on 2 cores: four trainings);
``--variants`` picks a subset, ``--out`` the results JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "stride32-zeros-avg": {"output_stride": 32, "padding": "zeros", "pool": "avg"},  # the classic ResNet
    "stride8-zeros-avg": {"output_stride": 8, "padding": "zeros", "pool": "avg"},
    "stride8-zeros-lse": {"output_stride": 8, "padding": "zeros", "pool": "lse"},
    "stride8-replicate-avg": {"output_stride": 8, "padding": "replicate", "pool": "avg"},
    "stride8-replicate-lse": {"output_stride": 8, "padding": "replicate", "pool": "lse"},  # the demo default
}


def lesion_cases(params, ingest_dir: Path):
    """(case id, tensor, lesion mask on the tensor grid) for every positive test case with a mask."""
    from pipeline.core.preprocess import resample_to_grid
    from pipeline.io.tensors import load_split, read_native_mask, read_sidecar

    data = load_split(ingest_dir, "test")
    for n, cid in enumerate(data.case_ids):
        native = read_native_mask(ingest_dir, cid)
        if int(data.labels[n]) != 1 or native is None:
            continue
        side = read_sidecar(ingest_dir, cid)
        shape = tuple(side["tensor_shape"])
        mask = resample_to_grid(native.astype(np.float32), np.asarray(side["native_affine"]), shape,
                                np.asarray(side["tensor_affine"]), order=1) > 0.5
        yield cid, data.images[n], mask


def score(model, cases, method: str, shifts: int) -> dict:
    from pipeline.core.saliency import class_map

    hits, inside, dist, share = [], [], [], []
    t0 = time.perf_counter()
    for _, x, mask in cases:
        cam = class_map(model, x.unsqueeze(0).float(), 1, method, "layer4", shifts)
        peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
        hits.append(bool(mask[peak]))
        inside.append(float(cam[mask].sum() / max(cam.sum(), 1e-12)))
        dist.append(float(np.linalg.norm(np.array(peak) - np.argwhere(mask).mean(0))))
        share.append(float(mask.mean()))
    return {"pointing_game": round(float(np.mean(hits)), 3), "random_baseline": round(float(np.mean(share)), 4),
            "energy_inside": round(float(np.mean(inside)), 3),
            "median_peak_distance_vox": round(float(np.median(dist)), 1),
            "n": len(hits), "s_per_case": round((time.perf_counter() - t0) / max(len(hits), 1), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=str(ROOT / "configs/params.yaml"))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/saliency.json"))
    args = ap.parse_args()

    import torch

    from pipeline.config import load_params, params_from_dict
    from pipeline.io.checkpoint import load_checkpoint
    from pipeline.stages.train import run_train

    base = load_params(args.params)
    ingest_dir = ROOT / base.ingest.out_dir
    cases = list(lesion_cases(base, ingest_dir))
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            raw = base.model_dump(mode="json")
            raw["model"].update(VARIANTS[name])
            raw["ingest"]["out_dir"] = str(ingest_dir)
            raw["train"].update(out_dir=f"{tmp}/{name}", state_dir=f"{tmp}/{name}-state", resume=False)
            raw["mlflow"]["enabled"] = False
            summary = run_train(params_from_dict(raw), progress=False)
            model, _ = load_checkpoint(f"{tmp}/{name}")
            row = {"model": VARIANTS[name], "train_s": round(summary.seconds, 1),
                   "best_val_auroc": round(summary.best_val_auroc, 4)}
            for method in ("gradcam", "gradcampp"):
                for shifts in (1, 2):
                    row[f"{method}_shifts{shifts}"] = score(model, cases, method, shifts)
            results["variants"][name] = row
            print(json.dumps({name: row}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
