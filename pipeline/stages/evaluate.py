"""Evaluate stage: discrimination with intervals, calibration before/after temperature scaling.

The operating threshold and the temperature are fitted on validation only and applied
unchanged to test. Outputs: reports/metrics.json (DVC metrics), reports/predictions.csv,
reports/calibration.json (temperature + threshold, bundled with the registered model),
DVC plot tables under reports/plots/ and offline PNG figures under reports/figures/.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.config import Params
from pipeline.core import metrics as M
from pipeline.core.classifier import DecisionRule, predict_logits, resolve_device
from pipeline.io.artifacts import save_csv, save_json
from pipeline.io.checkpoint import load_checkpoint
from pipeline.io.tensors import CaseSet, load_split
from pipeline.layout import ReportDir
from pipeline.reporting.figures import write_plots


def _r(x: float, nd: int = 4):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


def split_metrics(y: np.ndarray, logits: np.ndarray, temperature: float, threshold: float | None,
                  n_boot: int, seed: int) -> dict:
    """Every metric of one split: discrimination, operating point, calibration before/after scaling."""
    raw = M.apply_temperature(logits, 1.0)
    cal = M.apply_temperature(logits, temperature)
    out: dict = {"n": int(len(y)), "n_positive": int((y == 1).sum()) if raw.shape[1] == 2 else None}
    two_classes = len(np.unique(y)) >= 2
    if raw.shape[1] == 2:
        score = cal[:, 1]
        if two_classes:
            out["auroc"] = _r(M.auroc(y, score))
            out["auroc_ci95"] = [_r(v) for v in M.bootstrap_auroc_ci(y, score, n_resamples=n_boot, seed=seed)]
            # Scalars too: `dvc metrics show` / `dvc exp show` display numbers, not lists.
            out["auroc_ci95_low"], out["auroc_ci95_high"] = out["auroc_ci95"]
            if min((y == 1).sum(), (y == 0).sum()) >= 2:
                out["auroc_ci95_delong"] = [_r(v) for v in M.delong_ci(y, score)]
        if threshold is not None:
            rep = M.binary_report(y, score, threshold)
            out.update({k: (_r(v) if isinstance(v, float) else v) for k, v in rep.items()})
        brier_raw, brier_cal = M.brier(y, raw[:, 1]), M.brier(y, cal[:, 1])
    else:
        if two_classes and len(np.unique(y)) == raw.shape[1]:
            aucs = M.auroc_multiclass(y, cal)
            out.update(auroc=_r(aucs["macro"]), auroc_micro=_r(aucs["micro"]),
                       auroc_ci95=[_r(v) for v in M.bootstrap_auroc_multiclass_ci(y, cal, n_resamples=n_boot,
                                                                                   seed=seed)])
        pred = cal.argmax(axis=1)
        out["accuracy"] = _r(float((pred == y).mean()))
        from sklearn.metrics import balanced_accuracy_score

        out["balanced_accuracy"] = _r(balanced_accuracy_score(y, pred))
        brier_raw, brier_cal = M.brier(y, raw), M.brier(y, cal)
    probs_raw = raw if raw.shape[1] > 2 else raw[:, 1]
    probs_cal = cal if cal.shape[1] > 2 else cal[:, 1]
    out.update(
        ece=_r(M.ece(y, probs_raw)), ece_calibrated=_r(M.ece(y, probs_cal)),
        ece_adaptive=_r(M.ece(y, probs_raw, strategy="quantile")),
        ece_adaptive_calibrated=_r(M.ece(y, probs_cal, strategy="quantile")),
        mce=_r(M.mce(y, probs_raw)), mce_calibrated=_r(M.mce(y, probs_cal)),
        brier=_r(brier_raw), brier_calibrated=_r(brier_cal),
        nll=_r(M.nll(y, probs_raw)), nll_calibrated=_r(M.nll(y, probs_cal)),
    )
    return out


def subgroup_metrics(cases: CaseSet, y: np.ndarray, logits: np.ndarray, temperature: float, threshold,
                     min_cases: int, seed: int) -> dict:
    """Per modality and per manufacturer; 'too few cases' below `min_cases` or with one class."""
    out: dict = {}
    for key in ("modality", "manufacturer"):
        values = np.array([m.get(key, "") or "unknown" for m in cases.meta])
        groups = {}
        for v in sorted(set(values)):
            sel = values == v
            if sel.sum() < min_cases or len(np.unique(y[sel])) < 2:
                groups[v] = {"n": int(sel.sum()), "result": "too few cases"}
            else:
                groups[v] = split_metrics(y[sel], logits[sel], temperature, threshold, n_boot=200, seed=seed)
        out[key] = groups
    return out


def run_evaluate(params: Params, models_dir: Path | str | None = None, ingest_dir: Path | str | None = None,
                 out_dir: Path | str | None = None) -> dict:
    cfg = params.evaluate
    models_dir = Path(models_dir or params.train.out_dir)
    ingest_dir = Path(ingest_dir or params.ingest.out_dir)
    out = Path(out_dir or cfg.out_dir)
    device = resolve_device(params.train.device)
    model, info = load_checkpoint(models_dir, device=str(device))
    splits = {s: load_split(ingest_dir, s) for s in ("val", "test")}
    logits = {s: predict_logits(model, c.images, device, params.train.batch_size).numpy() for s, c in splits.items()}
    labels = {s: c.labels.numpy() for s, c in splits.items()}
    binary = logits["val"].shape[1] == 2

    temperature = M.fit_temperature(logits["val"], labels["val"])
    threshold = None
    if binary and len(np.unique(labels["val"])) < 2:
        threshold = 0.5  # one class in val: no ROC to choose from; the calibrated 0.5 is the honest default
    elif binary:
        val_score = M.apply_temperature(logits["val"], temperature)[:, 1]
        if cfg.operating_point == "youden":
            threshold = M.youden_threshold(labels["val"], val_score)
        else:
            threshold = M.threshold_for_sensitivity(labels["val"], val_score, cfg.target_sensitivity)
    result = {
        s: split_metrics(labels[s], logits[s], temperature, threshold, cfg.n_bootstrap, params.seed)
        for s in ("val", "test")
    }
    result["calibration"] = {"temperature": _r(temperature, 6), "threshold": _r(threshold, 6),
                             "operating_point": cfg.operating_point, "fitted_on": "val"}
    result["subgroups"] = {
        s: subgroup_metrics(splits[s], labels[s], logits[s], temperature, threshold, cfg.min_subgroup_cases,
                            params.seed) for s in ("test",)
    }
    out.mkdir(parents=True, exist_ok=True)
    save_json(ReportDir(out).metrics, result)
    rule = DecisionRule(temperature, threshold, tuple(info.get("class_names") or
                                                      [str(i) for i in range(logits["val"].shape[1])]),
                        cfg.operating_point)
    save_json(ReportDir(out).calibration, rule.to_calibration())
    _write_predictions(ReportDir(out).predictions, splits, labels, logits, rule)
    write_plots(out, labels["test"], logits["test"], temperature, threshold, binary)
    _log_mlflow(params, models_dir, out, result)
    return result


def _write_predictions(path: Path, splits, labels, logits, rule: DecisionRule) -> None:
    """One row per case: the uncalibrated and calibrated probability of the decided (binary: positive) class."""
    rows = []
    for s, cases in splits.items():
        raw = M.apply_temperature(logits[s], 1.0)
        cal = rule.probs(logits[s])
        decisions = rule.decide(cal)
        for i, cid in enumerate(cases.case_ids):
            k = 1 if rule.binary else int(decisions[i])
            rows.append([cid, s, int(labels[s][i]), f"{raw[i, k]:.6f}", f"{cal[i, k]:.6f}", int(decisions[i])])
    save_csv(path, ["case_id", "split", "label", "probability", "calibrated_probability", "decision"], rows)


def _log_mlflow(params: Params, models_dir: Path, out: Path, result: dict) -> None:
    """Log metrics, figures and predictions to the training run."""

    from pipeline.core.records import flatten
    from pipeline.tracking.runs import training_run_id

    run_id = training_run_id(params, models_dir)
    if run_id is None:
        return
    import mlflow

    flat = {}
    for split in ("val", "test"):
        for k, v in flatten(result[split]).items():
            try:
                flat[f"{split}_{k}"] = float(v)
            except ValueError:
                continue
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({k: v for k, v in flat.items() if math.isfinite(v)})
        mlflow.log_metric("temperature", result["calibration"]["temperature"])
        mlflow.log_artifact(str(ReportDir(out).metrics), "evaluation")
        mlflow.log_artifact(str(ReportDir(out).predictions), "evaluation")
        mlflow.log_artifacts(str(out / "figures"), "evaluation/figures")


__all__ = ["run_evaluate", "split_metrics"]
