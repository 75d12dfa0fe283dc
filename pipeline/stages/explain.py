"""Explain stage: Grad-CAM maps in the scanner's geometry, sanity checks, and the review report.

For every case of the configured splits:
- the calibrated decision and a map of the class it chose (`pipeline.core.saliency.explain_case`,
  the same call as `resdx predict --saliency`), taken back to the case's native voxel grid and
  written as a NIfTI overlay with the source's own affine and shape, and for DICOM inputs also as
  a DICOM Secondary Capture series (overlay burned in) with new, de-identified UIDs;
- three orthogonal slices through the map's peak for the report.
Sanity checks (reported every run): model-parameter randomization (Spearman rank correlation
and SSIM between trained and randomized maps) and, where lesion masks exist, the pointing
game and the saliency share inside the lesion, each beside a random-map baseline.

What it reads: the ingest outputs (tensors, their sidecars with the native grid, the masks that
ingest put on the native grid), the model and calibration; the DICOM sources only for the
burned-in Secondary Capture (dvc.yaml lists the manifest and the data folder as deps).
Multi-label models: the map of the most probable label decided present (label 0 when none is), its
own logit; label and decision are shown as ';'-joined vectors, a case is correct when every label is;
the pointing game asks about a label the case has (the explained one where it has it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pipeline.config import Params
from pipeline.core import sanity as S
from pipeline.core.classifier import Classifier, DecisionRule
from pipeline.core.saliency import class_map, explain_case, randomized_copy, to_native
from pipeline.core.volume import Volume
from pipeline.errors import MissingInput
from pipeline.io.artifacts import save_csv, save_json
from pipeline.io.checkpoint import load_checkpoint, model_id
from pipeline.io.nifti import write_nifti
from pipeline.io.tensors import load_split, read_native_mask, read_plan, read_sidecar
from pipeline.layout import ExplainDir, ReportDir
from pipeline.reporting.figures import orthogonal_views
from pipeline.reporting.viewer import ViewerCase, viewer_case


def load_rule(params: Params, info: dict) -> DecisionRule:
    path = ReportDir(params.evaluate.out_dir).calibration
    if not path.exists():
        raise MissingInput(f"{path} is missing", hint="run the evaluate stage first")
    return DecisionRule.from_calibration(json.loads(path.read_text()), info.get("class_names"))


def run_explain(params: Params, case_ids: list[str] | None = None) -> dict:
    """Maps, overlays, sanity checks and the report for the configured splits (or given cases)."""
    from pipeline.reporting.report import contact_sheet, write_report

    cfg = params.explain
    out = Path(cfg.out_dir)
    ingest_dir = Path(params.ingest.out_dir)
    model, info = load_checkpoint(params.train.out_dir)
    rule = load_rule(params, info)
    clf = Classifier(model, rule, batch_size=cfg.batch_size)
    rand = randomized_copy(model, params.seed)
    names = list(rule.class_names)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    (out / "dicom").mkdir(parents=True, exist_ok=True)  # a DVC output even when no input is DICOM
    sources = _sources(params)
    salt = os.urandom(16)  # de-identified DICOM UIDs: consistent within this run, unlinkable across runs

    cases, loc, rand_stats = [], [], []
    dicom_written = 0
    for split in cfg.splits:
        data = load_split(ingest_dir, split)
        for n, cid in enumerate(data.case_ids):
            if case_ids and cid not in case_ids:
                continue
            if len(cases) >= cfg.max_cases:
                break
            x = data.images[n]
            side = read_sidecar(ingest_dir, cid)
            ex = explain_case(clf, x, cfg.class_index, cfg.method, cfg.target_layer, cfg.shifts, cfg.reflect)
            centered = not rule.multi_label
            cam_rand = class_map(rand, x.unsqueeze(0).float(), ex.explained_class, cfg.method, cfg.target_layer,
                                 cfg.shifts, centered, cfg.batch_size, cfg.reflect)
            rand_stats.append(S.spearman_ssim(ex.cam, cam_rand))
            label, label_name, decision, correct, annotated = _truth(rule, ex, data.labels[n], names)
            p_shown = float(ex.probs[ex.explained_class] if rule.multi_label else rule.score(ex.probs[None])[0])
            rel, native = "", None
            if ex.cam.ndim == 3 and side:
                native = to_native(ex.cam, side["tensor_affine"], side["native_shape"], side["native_affine"])
                rel = f"overlays/{cid}_saliency.nii.gz"
                write_nifti(Volume(native, np.asarray(side["native_affine"]), {"integer_valued": False}), out / rel)
                mask = read_native_mask(ingest_dir, cid) if annotated is not None else None
                if mask is not None:
                    # The pointing game asks about the annotated class (Zhang et al. 2016), also
                    # where the model decided otherwise.
                    own = native
                    if ex.explained_class != annotated:
                        own = to_native(class_map(model, x.unsqueeze(0).float(), annotated, cfg.method,
                                                  cfg.target_layer, cfg.shifts, centered, cfg.batch_size,
                                                  cfg.reflect),
                                        side["tensor_affine"], side["native_shape"], side["native_affine"])
                    loc.append(S.localization(own, mask))
            volume = _native_volume(sources, cid, native)  # read once: for the viewer and the DICOM overlay
            if cfg.write_dicom and native is not None and cid in sources:
                dicom_written += _write_dicom_overlay(sources[cid][0], native, volume, out / "dicom" / cid, salt)
            cls = ex.explained_class
            title = f"{cid}: {names[cls] if cls < len(names) else cls} map, p={p_shown:.2f}"
            cases.append({
                "case_id": cid, "split": split, "label": label, "class_name": label_name, "probability": p_shown,
                "decision": decision, "explained_class": cls,
                "correct": correct, "uncertainty": ex.uncertainty,
                "referred": ex.referred,
                "images": [orthogonal_views(x[0].numpy(), ex.cam, title)], "overlay_path": rel,
                "viewer": _viewer(params, volume, sources.get(cid), x[0].numpy(), ex.cam, side, native),
            })
    sanity = S.summarize(rand_stats, loc)
    if cfg.write_dicom:
        sanity["dicom_series_written"] = dicom_written
    save_json(ExplainDir(out).sanity, sanity)
    summary = _report_summary(params, info, sanity)
    summary.update(model_id=model_id(params.train.out_dir), class_names=names, multi_label=rule.multi_label)
    _attach_verdicts(params, summary["model_id"], cases)
    write_report(out / "report.html", summary, cases)
    contact_sheet(cases, out / "contact_sheet.png")
    save_csv(out / "cases.csv", ["case_id", "split", "label", "calibrated_probability", "decision",
                                 "explained_class", "overlay", "uncertainty", "referred"],
             [[c["case_id"], c["split"], c["label"], f"{c['probability']:.6f}", c["decision"], c["explained_class"],
               c["overlay_path"], f"{c['uncertainty']:.6f}", int(c["referred"])] for c in cases])
    _log_mlflow(params, out, sanity, cases)
    return {"n_cases": len(cases), "sanity": sanity, "report": str(out / "report.html")}


def _sources(params: Params) -> dict:
    """case id -> manifest row and the plan's reader settings, to re-read a case's native volume for the viewer."""
    from pipeline.errors import ManifestError
    from pipeline.sources.manifest import read_manifest

    if params.data.source != "manifest":
        return {}
    try:
        rows = read_manifest(params.data.manifest)
    except ManifestError:  # moved or gone since ingest: the viewer shows the model's input instead
        return {}
    reader = read_plan(params.ingest.out_dir).reader
    return {r.case_id: (r, reader) for r in rows if not r.problem}


def _native_volume(sources: dict, cid: str, native: np.ndarray | None) -> Volume | None:
    """The case's source re-read on its native grid (the values a radiologist knows, e.g. HU), or None when it
    is gone, unreadable, or not on the map's grid."""
    from pipeline.errors import ResDxError
    from pipeline.io.reader import read_case

    if native is None or cid not in sources:
        return None
    row, reader = sources[cid]
    try:
        volume = read_case(row.path, row.modality, reader, row.series_uid)
    except (ResDxError, OSError):  # a source gone or unreadable since ingest: the viewer shows the input
        return None
    return volume if volume.data.shape == native.shape else None


def _viewer(params: Params, volume: Volume | None, source, x: np.ndarray, cam: np.ndarray, side: dict,
            native: np.ndarray | None) -> ViewerCase | None:
    """The case's scan and map for the report's viewer: the native volume with the native map, or else the
    model's input with the tensor-grid map."""
    if cam.ndim != 3:
        return None
    limit = params.explain.viewer_max_voxels
    if volume is not None and native is not None:
        return viewer_case(volume.data, native, volume.affine, source[0].modality, limit)
    affine = np.asarray(side.get("tensor_affine", np.eye(4)), dtype=np.float64)
    return viewer_case(x, cam, affine, "", limit, grid="model input")


def _attach_verdicts(params: Params, model: str, cases: list[dict]) -> None:
    """Earlier readers' verdicts on this model and this case set (`resdx review import`), shown per case."""
    from pipeline.core.review import case_set_id
    from pipeline.io.reviews import read_reviews_for

    by_case: dict[str, list] = {}
    verdicts = read_reviews_for(params.data.reviews_dir, model, case_set_id(c["case_id"] for c in cases))
    for reader in sorted(verdicts):
        for v in verdicts[reader]:
            by_case.setdefault(v.case_id, []).append(v)
    for c in cases:
        c["verdicts"] = by_case.get(c["case_id"], [])


def _truth(rule: DecisionRule, ex, y, names: list[str]) -> tuple:
    """(label, its name, decision, correct, the annotated class the pointing game asks about or None).
    Multi-label: label and decision as ';'-joined vectors, correct when every label is, the annotated
    class the explained label if the case has it, else its most probable present label."""
    if not rule.multi_label:
        label = int(y)
        return (label, names[label] if label < len(names) else str(label), ex.decision, ex.decision == label,
                label if label > 0 else None)
    truth = np.asarray(y).astype(int)
    present = np.flatnonzero(truth)
    annotated = None
    if len(present):
        annotated = ex.explained_class if truth[ex.explained_class] else int(present[np.argmax(ex.probs[present])])
    return (";".join(map(str, truth)), "+".join(names[k] for k in present) or "none",
            ";".join(map(str, np.asarray(ex.decisions).astype(int))), bool((ex.decisions == truth).all()), annotated)


def _write_dicom_overlay(row, native: np.ndarray, volume: Volume | None, folder: Path, salt: bytes) -> int:
    """The Secondary Capture series of a DICOM input (1 when written, 0 for other inputs or another grid)."""
    from pipeline.io.dicom_overlay import write_overlay_series

    if not row.path.is_dir():
        return 0
    return int(write_overlay_series(row.path, row.series_uid, native, folder, row.patient_id, row.case_id, salt,
                                    volume=volume))


def _report_summary(params: Params, info: dict, sanity: dict) -> dict:
    from pipeline.tracking.runs import git_commit

    ev = Path(params.evaluate.out_dir)
    metrics = json.loads((ev / "metrics.json").read_text()) if (ev / "metrics.json").exists() else {}
    calib_png = ev / "figures" / "calibration_test.png"
    from pipeline.reporting.model_card import build_model_card

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
                                  f"{params.explain.shifts} shift(s) per axis"
                                  + (", mean with the reflected view" if params.explain.reflect else "")},
        "data": {"data_hash": info.get("data_hash", ""), "source": info.get("source", "")},
        "metrics": {k: metrics[k] for k in ("val", "test", "calibration") if k in metrics},
        "calibration_png": calib_png.read_bytes() if calib_png.exists() else None,
        "sanity": sanity,
        "model_card_md": card_md,
    }


def _log_mlflow(params: Params, out: Path, sanity: dict, cases: list) -> None:
    """Sanity numbers as metrics; report, contact sheet, sanity.json and each case's map (PNG) as artifacts."""
    import tempfile

    from pipeline.tracking.runs import training_run_id

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
        mlflow.log_artifact(str(ExplainDir(out).sanity), "explain")
        with tempfile.TemporaryDirectory(prefix="resdx-maps-") as tmp:
            for c in cases:
                for i, png in enumerate(c["images"]):
                    (Path(tmp) / f"{c['case_id']}{'' if i == 0 else f'_{i}'}.png").write_bytes(png)
            mlflow.log_artifacts(tmp, "explain/maps")
