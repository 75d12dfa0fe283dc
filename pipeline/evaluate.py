"""Evaluate stage: discrimination with intervals, calibration before/after temperature scaling.

The operating threshold and the temperature are fitted on validation only and applied
unchanged to test. Outputs: reports/metrics.json (DVC metrics), reports/predictions.csv,
reports/calibration.json (temperature + threshold, bundled with the registered model),
DVC plot tables under reports/plots/ and offline PNG figures under reports/figures/.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from pipeline import metrics as M
from pipeline.checkpoint import load_checkpoint
from pipeline.config import Params
from pipeline.data import CaseSet, load_split
from pipeline.ingest import save_json
from pipeline.train import predict_logits, resolve_device


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
    save_json(out / "metrics.json", result)
    save_json(out / "calibration.json", {"temperature": temperature, "threshold": threshold,
                                         "class_names": info.get("class_names"), "binary": binary,
                                         "operating_point": cfg.operating_point})
    _write_predictions(out / "predictions.csv", splits, labels, logits, temperature, threshold)
    _write_plots(out, labels["test"], logits["test"], temperature, threshold, binary)
    _log_mlflow(params, models_dir, out, result)
    return result


def _write_predictions(path: Path, splits, labels, logits, temperature, threshold) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "split", "label", "probability", "calibrated_probability", "decision"])
        for s, cases in splits.items():
            raw = M.apply_temperature(logits[s], 1.0)
            cal = M.apply_temperature(logits[s], temperature)
            for i, cid in enumerate(cases.case_ids):
                if raw.shape[1] == 2:
                    decision = int(cal[i, 1] >= threshold)
                    w.writerow([cid, s, int(labels[s][i]), f"{raw[i, 1]:.6f}", f"{cal[i, 1]:.6f}", decision])
                else:
                    k = int(cal[i].argmax())
                    w.writerow([cid, s, int(labels[s][i]), f"{raw[i, k]:.6f}", f"{cal[i, k]:.6f}", k])


def _write_plots(out: Path, y, logits, temperature, threshold, binary: bool) -> None:
    """DVC plot tables (CSV) and the same figures as PNG, which open offline anywhere."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots, figs = out / "plots", out / "figures"
    plots.mkdir(exist_ok=True)
    figs.mkdir(exist_ok=True)
    raw = M.apply_temperature(logits, 1.0)
    cal = M.apply_temperature(logits, temperature)
    p_raw = raw[:, 1] if binary else raw
    p_cal = cal[:, 1] if binary else cal
    rel_raw, rel_cal = M.reliability_curve(y, p_raw), M.reliability_curve(y, p_cal)
    _csv(plots / "calibration_test.csv", ["confidence", "observed", "count", "calibrated"],
         [[c, a, n, "before"] for c, a, n in zip(rel_raw["confidence"], rel_raw["accuracy"], rel_raw["count"])
          if n > 0] +
         [[c, a, n, "after"] for c, a, n in zip(rel_cal["confidence"], rel_cal["accuracy"], rel_cal["count"])
          if n > 0])
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    for rel, lab in ((rel_raw, "before scaling"), (rel_cal, f"after (T={temperature:.2f})")):
        keep = np.asarray(rel["count"]) > 0
        ax.plot(np.asarray(rel["confidence"])[keep], np.asarray(rel["accuracy"])[keep], "o-", label=lab)
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title="Reliability (test)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(figs / "calibration_test.png", dpi=110)
    plt.close(fig)
    if not binary or len(np.unique(y)) < 2:
        return
    roc = M.roc_points(y, p_cal)
    pr = M.pr_points(y, p_cal)
    _csv(plots / "roc_test.csv", ["fpr", "tpr", "threshold"], [[r["fpr"], r["tpr"], r["threshold"]] for r in roc])
    _csv(plots / "pr_test.csv", ["recall", "precision", "threshold"],
         [[r["recall"], r["precision"], r["threshold"]] for r in pr])
    rep = M.binary_report(y, p_cal, threshold)
    (tn, fp), (fn, tp) = rep["confusion_matrix"]
    _csv(plots / "confusion_test.csv", ["actual", "predicted"],
         [["negative", "negative"]] * tn + [["negative", "positive"]] * fp + [["positive", "negative"]] * fn +
         [["positive", "positive"]] * tp)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    axes[0].plot([r["fpr"] for r in roc], [r["tpr"] for r in roc])
    axes[0].plot([0, 1], [0, 1], "k:", lw=1)
    axes[0].set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC (test), AUROC {M.auroc(y, p_cal):.3f}")
    axes[1].plot([r["recall"] for r in pr], [r["precision"] for r in pr])
    axes[1].set(xlabel="recall", ylabel="precision", title="Precision-recall (test)")
    axes[2].imshow([[tn, fp], [fn, tp]], cmap="Blues")
    for (i, j), v in np.ndenumerate([[tn, fp], [fn, tp]]):
        axes[2].text(j, i, str(v), ha="center", va="center")
    axes[2].set(xticks=[0, 1], yticks=[0, 1], xticklabels=["neg", "pos"], yticklabels=["neg", "pos"],
                xlabel="predicted", ylabel="actual", title=f"Confusion at threshold {threshold:.3f}")
    fig.tight_layout()
    fig.savefig(figs / "roc_pr_confusion_test.png", dpi=110)
    plt.close(fig)


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _log_mlflow(params: Params, models_dir: Path, out: Path, result: dict) -> None:
    """Log metrics, figures and predictions to the training run."""

    from pipeline.tracking import flatten, training_run_id

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
        mlflow.log_artifact(str(out / "metrics.json"), "evaluation")
        mlflow.log_artifact(str(out / "predictions.csv"), "evaluation")
        mlflow.log_artifacts(str(out / "figures"), "evaluation/figures")


__all__ = ["run_evaluate", "split_metrics"]
