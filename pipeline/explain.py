"""Explain stage: Grad-CAM maps in the scanner's geometry, sanity checks, and the review report.

For every case of the configured splits:
- a map in the tensor grid (pipeline.saliency), taken back to the case's native voxel grid and
  written as a NIfTI overlay with the source's own affine and shape (lines up in 3D Slicer /
  ITK-SNAP with the source NIfTI or `resdx convert`'s output), and for DICOM inputs also as a
  DICOM Secondary Capture series (overlay burned in) with new, de-identified UIDs;
- three orthogonal slices through the map's peak for the report.
Sanity checks (reported every run): model-parameter randomization (Spearman rank correlation
and SSIM between trained and randomized maps) and, where lesion masks exist, the pointing
game and the saliency share inside the lesion, each beside a random-map baseline.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from pipeline.checkpoint import load_checkpoint
from pipeline.config import Params
from pipeline.data import load_split
from pipeline.ingest import save_json
from pipeline.io.volume import Volume
from pipeline.saliency import class_map, randomized_copy, saliency, to_native


def _masks(params: Params) -> dict[str, Path]:
    """case_id -> lesion mask path, from the manifest's optional `mask_path` column."""
    from pipeline.manifest import read_manifest

    if params.data.source != "manifest" or not Path(params.data.manifest).exists():
        return {}
    return {r.case_id: r.mask_path for r in read_manifest(params.data.manifest) if r.mask_path}


def _spearman_ssim(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    import warnings

    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    with warnings.catch_warnings():  # a constant map (e.g. all-zero after ReLU) has no rank order: rho = 0
        warnings.simplefilter("ignore")
        rho = spearmanr(a.ravel(), b.ravel()).statistic
    ssim = structural_similarity(a, b, data_range=1.0, win_size=min(7, *[s | 1 for s in a.shape if s >= 3] or [3]))
    return float(np.nan_to_num(rho)), float(ssim)


def _localization(cam: np.ndarray, mask: np.ndarray) -> dict:
    """Pointing game hit and saliency share inside the lesion, with their random-map expectations."""
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    share = float(mask.mean())
    total = float(cam.sum())
    return {"hit": bool(mask[peak]), "inside": float(cam[mask].sum() / total) if total > 0 else 0.0,
            "random_hit": share, "random_inside": share}


def orthogonal_views(image: np.ndarray, cam: np.ndarray, title: str) -> bytes:
    """PNG: axial, coronal and sagittal slices through the map's peak, overlay + colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if image.ndim == 2:
        views = [("image", image, cam)]
    else:
        i, j, k = np.unravel_index(int(np.argmax(cam)), cam.shape)
        views = [("axial", image[:, :, k], cam[:, :, k]), ("coronal", image[:, j, :], cam[:, j, :]),
                 ("sagittal", image[i, :, :], cam[i, :, :])]
    fig, axes = plt.subplots(1, len(views), figsize=(3.1 * len(views) + 0.6, 3.2))
    axes = np.atleast_1d(axes)
    for ax, (name, img, m) in zip(axes, views):
        ax.imshow(img.T, origin="lower", cmap="gray")  # RAS: right on the viewer's right, anterior/superior up
        im = ax.imshow(m.T, origin="lower", cmap="inferno", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.colorbar(im, ax=list(axes), fraction=0.025, pad=0.02, label="saliency")
    fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def run_explain(params: Params, case_ids: list[str] | None = None) -> dict:
    """Maps, overlays, sanity checks and the report for the configured splits (or given cases)."""
    import torch

    from pipeline.report import contact_sheet, write_report

    cfg = params.explain
    out = Path(cfg.out_dir)
    ingest_dir = Path(params.ingest.out_dir)
    model, info = load_checkpoint(params.train.out_dir)
    rand = randomized_copy(model, params.seed)
    calib = json.loads((Path(params.evaluate.out_dir) / "calibration.json").read_text())
    temperature, threshold = float(calib["temperature"]), calib.get("threshold")
    names = info.get("class_names") or ["0", "1"]
    masks = _masks(params)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    (out / "dicom").mkdir(parents=True, exist_ok=True)  # a DVC output even when no input is DICOM

    cases, loc, rand_stats, overlays = [], [], [], []
    salt = os.urandom(16)  # de-identified DICOM UIDs: consistent within this run, unlinkable across runs
    for split in cfg.splits:
        data = load_split(ingest_dir, split)
        for n, cid in enumerate(data.case_ids):
            if case_ids and cid not in case_ids:
                continue
            if len(cases) >= cfg.max_cases:
                break
            x = data.images[n]
            side = json.loads((ingest_dir / "tensors" / f"{cid}.json").read_text()) \
                if (ingest_dir / "tensors" / f"{cid}.json").exists() else {}
            cam, cls, _ = saliency(model, x, cfg.class_index, cfg.method, cfg.target_layer, cfg.shifts)
            with torch.no_grad():
                logits = model(x.unsqueeze(0).float()).double()
                probs = torch.softmax(logits / temperature, dim=1)[0].numpy()
            cam_rand, _, _ = saliency(rand, x, cls, cfg.method, cfg.target_layer, cfg.shifts)
            rand_stats.append(_spearman_ssim(cam, cam_rand))
            label = int(data.labels[n])
            p_pos = float(probs[1]) if len(probs) == 2 else float(probs.max())
            decision = int(p_pos >= threshold) if (len(probs) == 2 and threshold is not None) else int(probs.argmax())
            rel = ""
            if cam.ndim == 3 and side:
                native = to_native(cam, side["tensor_affine"], side["native_shape"], side["native_affine"])
                rel = f"overlays/{cid}_saliency.nii.gz"
                from pipeline.io.nifti import write_nifti

                write_nifti(Volume(native, np.asarray(side["native_affine"]), {"integer_valued": False}), out / rel)
                overlays.append((cid, native, side))
                if label > 0 and cid in masks and masks[cid].exists():
                    # The pointing game asks about the annotated class (Zhang et al. 2016), also
                    # where the model decided otherwise.
                    if cls != label:
                        own = class_map(model, x.unsqueeze(0).float(), label, cfg.method, cfg.target_layer, cfg.shifts)
                        own = to_native(own, side["tensor_affine"], side["native_shape"], side["native_affine"])
                    else:
                        own = native
                    loc.append(_native_localization(own, masks[cid], side))
            image = x[0].numpy()
            title = f"{cid}: {names[cls] if cls < len(names) else cls} map, p={p_pos:.2f}"
            cases.append({
                "case_id": cid, "split": split, "label": label, "class_name": names[label] if label < len(names) else
                str(label), "probability": p_pos, "decision": decision, "correct": decision == label,
                "uncertainty": float(1.0 - abs(2.0 * p_pos - 1.0)), "images": [orthogonal_views(image, cam, title)],
                "overlay_path": rel,
            })
    sanity = _sanity(rand_stats, loc)
    if cfg.write_dicom:
        sanity["dicom_series_written"] = _write_dicom_overlays(params, overlays, out / "dicom", salt)
    save_json(out / "sanity.json", sanity)
    summary = _report_summary(params, info, sanity)
    write_report(out / "report.html", summary, cases)
    contact_sheet(cases, out / "contact_sheet.png")
    with (out / "cases.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "split", "label", "calibrated_probability", "decision", "overlay"])
        for c in cases:
            w.writerow([c["case_id"], c["split"], c["label"], f"{c['probability']:.6f}", c["decision"],
                        c["overlay_path"]])
    _log_mlflow(params, out, sanity, cases)
    return {"n_cases": len(cases), "sanity": sanity, "report": str(out / "report.html")}


def _native_localization(native: np.ndarray, mask_path: Path, side: dict) -> dict:
    import nibabel as nib

    from pipeline.preprocess import resample_to_grid

    img = nib.load(str(mask_path))
    mask = np.asarray(img.dataobj) > 0
    if mask.shape != native.shape or not np.allclose(img.affine, side["native_affine"], atol=1e-3):
        # A mask on another grid: bring it onto the image's native grid first.
        mask = resample_to_grid(mask.astype(np.float32), img.affine, native.shape, np.asarray(side["native_affine"]),
                                order=1) > 0.5
    return _localization(native, mask)


def _sanity(rand_stats: list, loc: list) -> dict:
    out: dict = {}
    if rand_stats:
        rho = float(np.mean([r for r, _ in rand_stats]))
        ssim = float(np.mean([s for _, s in rand_stats]))
        # Adebayo et al.: maps of a randomized model must differ from the trained model's. The flag
        # uses the rank correlation (their headline measure; < 0.5); SSIM is reported beside it.
        out["randomization"] = {"spearman": round(rho, 4), "ssim": round(ssim, 4), "n": len(rand_stats),
                                "passed": bool(rho < 0.5)}
    if loc:
        out["pointing_game"] = {"hit_rate": round(float(np.mean([d["hit"] for d in loc])), 4),
                                "random_baseline": round(float(np.mean([d["random_hit"] for d in loc])), 5),
                                "n": len(loc)}
        out["energy_inside"] = {"mean": round(float(np.mean([d["inside"] for d in loc])), 4),
                                "random_baseline": round(float(np.mean([d["random_inside"] for d in loc])), 5),
                                "n": len(loc)}
    return out


def _report_summary(params: Params, info: dict, sanity: dict) -> dict:
    from pipeline.tracking import git_commit

    ev = Path(params.evaluate.out_dir)
    metrics = json.loads((ev / "metrics.json").read_text()) if (ev / "metrics.json").exists() else {}
    calib_png = ev / "figures" / "calibration_test.png"
    from pipeline.model_card import build_model_card

    try:  # the card as it stands now (register logs the final one with the version)
        card_md = build_model_card(params)
    except (OSError, KeyError, ValueError):
        card_md = None
    return {
        "title": "ResDx saliency review",
        "model": {"name": info["spec"]["name"], "spatial_dims": info["spec"]["spatial_dims"],
                  "run_id": info.get("mlflow_run_id", ""), "git_commit": git_commit(),
                  "best_val_auroc": info.get("best_val_auroc"),
                  "saliency_map": f"{params.explain.method} of {params.explain.target_layer}, "
                                  f"{params.explain.shifts} shift(s) per axis"},
        "data": {"data_hash": info.get("data_hash", ""), "source": info.get("source", "")},
        "metrics": {k: metrics[k] for k in ("val", "test", "calibration") if k in metrics},
        "calibration_png": calib_png.read_bytes() if calib_png.exists() else None,
        "sanity": sanity,
        "model_card_md": card_md,
    }


def _deid_uid(salt: bytes, uid: str) -> str:
    """A new UID derived from a salted hash: consistent within a run, not reversible."""
    digest = hashlib.sha256(salt + uid.encode()).hexdigest()
    return "2.25." + str(int(digest[:30], 16))


def _write_dicom_overlays(params: Params, overlays: list, folder: Path, salt: bytes) -> int:
    """Secondary Capture series (overlay burned into the source slices) for DICOM inputs.

    The source study and series are referenced through de-identified UIDs; patient identity is
    the manifest's pseudonyms, never the source headers' values.
    """
    import highdicom as hd
    import matplotlib
    from pydicom.dataset import Dataset

    from pipeline.io.dicom import read_dicom_series
    from pipeline.io.dicom_scan import iter_candidate_files, read_header
    from pipeline.manifest import read_manifest

    if params.data.source != "manifest":
        return 0
    rows = {r.case_id: r for r in read_manifest(params.data.manifest)}
    cmap = matplotlib.colormaps["inferno"]
    written = 0
    for cid, native, _side in overlays:
        row = rows.get(cid)
        if row is None or not row.path.is_dir():
            continue
        vol = read_dicom_series(row.path, series_uid=row.series_uid or None)
        if vol.data.shape[:3] != native.shape:
            continue
        first = next((ds for f in iter_candidate_files(row.path) if (ds := read_header(f)) is not None
                      and "PixelData" in ds), None)
        study = _deid_uid(salt, str(first.StudyInstanceUID)) if first is not None else hd.UID()
        ref_series = _deid_uid(salt, str(first.SeriesInstanceUID)) if first is not None else hd.UID()
        series = hd.UID()
        lo, hi = np.percentile(vol.data, [1, 99])
        case_dir = folder / cid
        case_dir.mkdir(parents=True, exist_ok=True)
        for k in range(native.shape[2]):
            grey = np.clip((vol.data[:, :, k] - lo) / max(hi - lo, 1e-6), 0, 1).T  # rows x cols
            heat = cmap(native[:, :, k].T)[..., :3]
            alpha = 0.45 * native[:, :, k].T[..., None]
            rgb = (255 * ((1 - alpha) * grey[..., None] + alpha * heat)).astype(np.uint8)
            sc = hd.sc.SCImage(
                pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
                study_instance_uid=study, series_instance_uid=series, series_number=9001, sop_instance_uid=hd.UID(),
                instance_number=k + 1, manufacturer="ResDx", patient_id=row.patient_id, patient_name=f"{cid}^",
                patient_orientation=("L", "P"), series_description="ResDx saliency overlay (not for diagnosis)",
            )
            item = Dataset()
            item.SeriesInstanceUID = ref_series
            sc.ReferencedSeriesSequence = [item]
            sc.save_as(case_dir / f"{k + 1:04d}.dcm")
        written += 1
    return written


def _log_mlflow(params: Params, out: Path, sanity: dict, cases: list) -> None:
    """Sanity numbers as metrics; report, contact sheet, sanity.json and each case's map (PNG) as artifacts."""
    import tempfile

    from pipeline.tracking import training_run_id

    run_id = training_run_id(params, params.train.out_dir)
    if run_id is None:
        return
    import mlflow

    with mlflow.start_run(run_id=run_id):
        flat = {f"saliency_{key}_{k}": float(v) for key, vals in sanity.items() if isinstance(vals, dict)
                for k, v in vals.items() if isinstance(v, (int, float))}  # bools included, as 0/1
        mlflow.log_metrics(flat)
        mlflow.log_artifact(str(out / "report.html"), "explain")
        mlflow.log_artifact(str(out / "contact_sheet.png"), "explain")
        mlflow.log_artifact(str(out / "sanity.json"), "explain")
        with tempfile.TemporaryDirectory(prefix="resdx-maps-") as tmp:
            for c in cases:
                for i, png in enumerate(c["images"]):
                    (Path(tmp) / f"{c['case_id']}{'' if i == 0 else f'_{i}'}.png").write_bytes(png)
            mlflow.log_artifacts(tmp, "explain/maps")
