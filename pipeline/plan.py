"""Fit the preprocessing plan once, from the dataset fingerprint of the training cases.

The plan (plan.json) records every decision: orientation, target spacing, input shape,
resampling orders, CT window and z-score statistics, MR policy. Later stages and
`resdx predict` read it and never re-derive anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline.config import Params

PLAN_VERSION = 1


def _spacing(prep: dict) -> np.ndarray:
    return np.linalg.norm(np.array(prep["canonical_affine"])[:3, :3], axis=0)


def target_spacing(spacings: np.ndarray, anisotropy_threshold: float) -> list[float]:
    """nnU-Net's rule: median spacing per axis; if the median is anisotropic, the coarse axis
    takes the 10th percentile instead, so thin-slice cases are not over-smoothed."""
    target = np.median(spacings, axis=0)
    axis = int(np.argmax(target))
    if target[axis] / target.min() > anisotropy_threshold:
        target[axis] = np.percentile(spacings[:, axis], 10)
    return [round(float(t), 4) for t in target]


def fit_plan(prepared_ok: list[dict], cache: Path, params: Params) -> dict:
    """Plan from the `ok` results of the prepare pass (each with `split`, `modality`, `key`)."""
    cfg = params.ingest
    train = [p for p in prepared_ok if p["split"] == "train"] or prepared_ok
    spacings = np.array([_spacing(p) for p in train]) if train else np.ones((1, 3))
    shapes = np.array([p["canonical_shape"] for p in train]) if train else np.ones((1, 3))
    fitted_spacing = target_spacing(spacings, cfg.anisotropy_threshold)
    plan: dict = {
        "version": PLAN_VERSION,
        "orientation": "RAS",
        "mode": cfg.mode,
        "slices_per_case": cfg.slices_per_case,
        "target_spacing": list(cfg.spacing) if cfg.spacing else fitted_spacing,
        "target_spacing_source": "configured" if cfg.spacing else "fingerprint (median, nnU-Net rule)",
        "shape": list(cfg.shape),
        "fit": cfg.fit,
        "anisotropy_threshold": cfg.anisotropy_threshold,
        "resampling": "cubic spline; nearest along the coarse axis of anisotropic images",
        "take_volume": cfg.take_volume,
        "fitted_on": "train" if any(p["split"] == "train" for p in prepared_ok) else "all",
        "fingerprint": {
            "n_cases": len(train),
            "spacing_median": [round(float(v), 4) for v in np.median(spacings, axis=0)],
            "spacing_min": [round(float(v), 4) for v in spacings.min(axis=0)],
            "spacing_max": [round(float(v), 4) for v in spacings.max(axis=0)],
            "shape_median": [int(v) for v in np.median(shapes, axis=0)],
            "modalities": sorted({p["modality"] for p in train}),
        },
        "mr": {"normalization": "per-image z-score", "clip_percentiles":
               list(cfg.mr.clip_percentiles) if cfg.mr.clip_percentiles else None},
    }
    plan["ct"] = _fit_ct(train, cache, params)
    labels = sorted({int(p["label"]) for p in prepared_ok if p.get("label") is not None})
    n_classes = max(2, (labels[-1] + 1) if labels else 2)
    names = params.data.class_names or [str(i) for i in range(n_classes)]
    if len(names) < n_classes:
        raise ValueError(f"data.class_names has {len(names)} names but labels go up to {n_classes - 1}")
    plan.update(source="manifest", n_classes=n_classes, class_names=list(names[:n_classes]))
    return plan


def _fit_ct(train: list[dict], cache: Path, params: Params) -> dict:
    cfg = params.ingest.ct
    samples = [np.load(cache / f"{p['key']}.sample.npy", allow_pickle=False)
               for p in train if p["modality"] == "CT"]
    pooled = np.concatenate(samples) if samples else np.array([-1000.0, 1000.0], dtype=np.float32)
    if cfg.window:
        window = [float(cfg.window[0]), float(cfg.window[1])]
        source = "configured"
    else:
        window = [float(v) for v in np.percentile(pooled, cfg.percentiles)]
        source = f"percentiles {list(cfg.percentiles)} of training foreground (HU > {cfg.foreground_hu:g})"
    clipped = np.clip(pooled, *window)
    return {
        "normalization": "clip to window, then global z-score",
        "window": [round(w, 3) for w in window], "window_source": source,
        "mean": round(float(clipped.mean()), 4), "std": round(float(clipped.std()), 4),
        "n_cases": len(samples), "n_voxels_sampled": int(pooled.size) if samples else 0,
    }


def plan_hash(plan: dict) -> str:
    """Hash of the decisions that shape tensors (not of counts or provenance)."""
    keys = ("version", "orientation", "mode", "slices_per_case", "target_spacing", "shape", "fit",
            "anisotropy_threshold", "take_volume", "ct", "mr")
    blob = json.dumps({k: plan[k] for k in keys}, sort_keys=True).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def load_plan(path: Path | str) -> dict:
    plan = json.loads(Path(path).read_text())
    if plan.get("version") != PLAN_VERSION:
        raise ValueError(f"{path}: plan version {plan.get('version')} is not {PLAN_VERSION}; re-run ingest")
    return plan
