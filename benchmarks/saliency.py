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

Each map is also scored with its point reflection averaged in (``explain.reflect``), and each variant can be
trained with several seeds (``--seeds 42 1 7``): a localising recipe has to localise whatever the seed, since
the seed stands for every other thing that moves a training trajectory (the CPU's float kernels, a changed
tensor in the 7th decimal).

Run: ``.venv/bin/python benchmarks/saliency.py --seeds 42 1 7`` (about 35 min on 2 cores: six trainings);
``--variants`` picks a subset, ``--seeds`` the seeds, ``--epochs`` overrides the plan's, ``--out`` the results JSON.
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

VARIANTS = {  # model.* (and train.* under "train") changed from the shipped params
    "shipped": {},  # the network plan's choices: 32-64-128-128, lr 1e-3 with the evidence head
    "w64-lr3e-4": {"width": 64, "max_channels": 512, "train": {"lr": 3e-4}},  # the plan's choice before issue 16
    "w32-lr3e-4": {"width": 32, "max_channels": 512, "train": {"lr": 3e-4}},
    "w32-lr1e-3": {"width": 32, "max_channels": 512, "train": {"lr": 1e-3}},
    "stride32-zeros-avg": {"output_stride": 32, "padding": "zeros", "pool": "avg"},  # the classic ResNet
    "stride8-zeros-avg": {"output_stride": 8, "padding": "zeros", "pool": "avg"},
    "stride8-zeros-lse": {"output_stride": 8, "padding": "zeros", "pool": "lse"},
    "stride8-replicate-avg": {"output_stride": 8, "padding": "replicate", "pool": "avg"},
    "stride8-replicate-lse": {"output_stride": 8, "padding": "replicate", "pool": "lse"},  # = shipped
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


def score(model, cases, method: str, shifts: int, reflect: bool = False) -> dict:
    from pipeline.core.saliency import class_map

    hits, inside, dist, share = [], [], [], []
    t0 = time.perf_counter()
    for _, x, mask in cases:
        cam = class_map(model, x.unsqueeze(0).float(), 1, method, "layer4", shifts, reflect=reflect)
        peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
        hits.append(bool(mask[peak]))
        inside.append(float(cam[mask].sum() / max(cam.sum(), 1e-12)))
        dist.append(float(np.linalg.norm(np.array(peak) - np.argwhere(mask).mean(0))))
        share.append(float(mask.mean()))
    return {"pointing_game": round(float(np.mean(hits)), 3), "random_baseline": round(float(np.mean(share)), 4),
            "energy_inside": round(float(np.mean(inside)), 3),
            "median_peak_distance_vox": round(float(np.median(dist)), 1),
            "n": len(hits), "s_per_case": round((time.perf_counter() - t0) / max(len(hits), 1), 2)}


def test_auroc(model, test) -> float:
    """Test AUROC of the plain forward pass (no test-time views, no calibration: ranks only)."""
    import torch
    from sklearn.metrics import roc_auc_score

    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(test.images[i:i + 8].float()) for i in range(0, len(test), 8)])
    return float(roc_auc_score(test.labels.numpy(), torch.softmax(logits, 1)[:, 1].numpy()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=str(ROOT / "configs/params.yaml"))
    ap.add_argument("--variants", nargs="*", default=["shipped", "w64-lr3e-4"], choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[42])
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the plan's)")
    ap.add_argument("--methods", nargs="*", default=["gradcam", "gradcampp"], choices=["gradcam", "gradcampp"])
    ap.add_argument("--ingest", default=None, help="an ingested folder (default: the params' ingest.out_dir)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/saliency.json"))
    args = ap.parse_args()

    import torch

    from pipeline.config import load_params, params_from_dict
    from pipeline.io.checkpoint import load_checkpoint
    from pipeline.io.tensors import load_split
    from pipeline.stages.train import run_train

    base = load_params(args.params)
    ingest_dir = Path(args.ingest) if args.ingest else ROOT / base.ingest.out_dir
    cases = list(lesion_cases(base, ingest_dir))
    test = load_split(ingest_dir, "test")
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            for seed in args.seeds:
                change = dict(VARIANTS[name])
                raw = base.model_dump(mode="json")
                raw["seed"] = seed
                raw["train"].update(change.pop("train", {}))
                raw["model"].update(change)
                raw["ingest"]["out_dir"] = str(ingest_dir)
                raw["train"].update(out_dir=f"{tmp}/{name}", state_dir=f"{tmp}/{name}-state", resume=False)
                if args.epochs:
                    raw["train"]["epochs"] = args.epochs
                raw["mlflow"]["enabled"] = False
                summary = run_train(params_from_dict(raw), progress=False)
                model, _ = load_checkpoint(f"{tmp}/{name}")
                row = {"model": VARIANTS[name], "seed": seed, "network": summary.network,
                       "train_s": round(summary.seconds, 1), "epochs": summary.epochs_run,
                       "last_val_auroc": round(summary.history[-1]["val_auroc"], 4),
                       "test_auroc_no_tta": round(test_auroc(model, test), 4)}
                for method in args.methods:
                    for shifts in (1, 2):
                        row[f"{method}_shifts{shifts}"] = score(model, cases, method, shifts)
                    row[f"{method}_shifts2_reflect"] = score(model, cases, method, 2, reflect=True)
                results["variants"][f"{name}-seed{seed}"] = row
                print(json.dumps({f"{name}-seed{seed}": row}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
