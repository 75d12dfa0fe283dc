"""Evaluate stage: discrimination with intervals, calibration, uncertainty and referral, on test.

The temperature and the operating threshold are fitted on held-out predictions only and applied
unchanged to test: the validation split (one model), or every train + val case out of fold (a
K-fold ensemble: each case scored by the member that did not train on it). Test is scored by
the mean logits over every view (fold members x `evaluate.tta` transforms); the views' spread is
each case's uncertainty. Outputs: reports/metrics.json (DVC metrics), reports/predictions.csv,
reports/calibration.json (temperature, threshold, TTA and referral: the rule registered with the
model), DVC plot tables under reports/plots/ (selective_test.csv: risk-coverage) and PNG figures.
Multi-label models (labels (N, L), `pipeline.core.multilabel`): per-label metrics under `per_label`, their
macro means under the single-label keys, one shared temperature, a threshold per label, predictions.csv
with p_<label> and decision_<label> columns, and the ROC/PR/confusion tables pooled over (case, label).
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Params
from pipeline.core import metrics as M
from pipeline.core import multilabel as ML
from pipeline.core.classifier import DecisionRule, resolve_device
from pipeline.core.selective import discrimination, fit_rule, referral_summary, selective_curve
from pipeline.core.views import members_of, spread, view_logits
from pipeline.io.artifacts import save_csv, save_dict_csv, save_json
from pipeline.io.checkpoint import load_checkpoint
from pipeline.io.index import is_multi_label, label_text, label_vector
from pipeline.io.tensors import CaseSet, load_split
from pipeline.layout import ModelDir, ReportDir
from pipeline.reporting.figures import write_plots


def _r(x: float, nd: int = 4):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


def _shifted(logits: np.ndarray, temperature: float, bias) -> np.ndarray:
    """Logits whose softmax at `temperature` is the calibrated softmax(logits / T + bias)."""
    return logits if bias is None else logits + temperature * np.asarray(bias)


def split_metrics(y: np.ndarray, logits: np.ndarray, temperature: float, threshold: float | None,
                  n_boot: int, seed: int, names=None, bias=None) -> dict:
    """Every metric of one split: discrimination, operating point, calibration before/after scaling.
    Multi-label (y (N, L), `threshold` one per label): each label's binary metrics under `per_label`
    (by name), and their macro summary (`core.multilabel.summary`)."""
    if y.ndim == 2:
        names = list(names or [str(k) for k in range(y.shape[1])])
        per_label = {n: split_metrics(y[:, k], ML.as_binary_logits(logits[:, k]), temperature,
                                      None if threshold is None else float(threshold[k]), n_boot, seed)
                     for k, n in enumerate(names)}
        return ML.summary(y, logits, temperature, per_label, n_boot, seed)
    raw = M.apply_temperature(logits, 1.0)
    cal = M.apply_temperature(_shifted(logits, temperature, bias), temperature)
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
        out["per_class"] = _per_class(y, raw, cal, names)
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


def _per_class(y: np.ndarray, raw: np.ndarray, cal: np.ndarray, names) -> dict:
    """One-vs-rest AUROC and calibration of each class (a softmax's top-label ECE hides a class that is
    always over-predicted)."""
    out = {}
    for k in range(raw.shape[1]):
        yk = (y == k).astype(int)
        name = str(names[k]) if names is not None and k < len(names) else str(k)
        out[name] = {"n": int(yk.sum()), "auroc_ovr": _r(M.auroc(yk, cal[:, k])) if 0 < yk.sum() < len(yk) else None,
                     "ece_ovr": _r(M.ece(yk, raw[:, k])), "ece_ovr_calibrated": _r(M.ece(yk, cal[:, k]))}
    return out


def subgroup_metrics(cases: CaseSet, y: np.ndarray, logits: np.ndarray, temperature: float, threshold,
                     min_cases: int, seed: int, names=None, bias=None) -> dict:
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
                groups[v] = split_metrics(y[sel], logits[sel], temperature, threshold, n_boot=200, seed=seed,
                                          names=names, bias=bias)
        out[key] = groups
    return out


@dataclass
class Held:
    """Held-out predictions: each case scored by the member that did not train on it."""

    cases: CaseSet
    views: np.ndarray  # (T, n, K): the test-time views of the case's own member
    fold: np.ndarray   # (n,) the member


def held_out(model, ingest_dir: Path, models_dir: Path, device, batch_size: int, tta: str) -> Held:
    """The validation split (one model), or every train + val case out of fold (a fold ensemble)."""
    from pipeline.io.tensors import concat, subset

    members = members_of(model)
    folds_file = ModelDir(models_dir).folds
    val = load_split(ingest_dir, "val")
    if len(members) == 1 or not folds_file.exists():
        fold_of = {c: 0 for c in val.case_ids}
        pool = val
    else:
        with folds_file.open() as fh:
            fold_of = {r["case_id"]: int(r["fold"]) for r in csv.DictReader(fh)}
        pool = concat(load_split(ingest_dir, "train"), val)
    keep = [i for i, c in enumerate(pool.case_ids) if c in fold_of]
    pool = subset(pool, keep)
    fold = np.array([fold_of[c] for c in pool.case_ids], dtype=int)
    views = None
    for f in range(len(members)):
        idx = np.flatnonzero(fold == f)
        if not len(idx):
            continue
        v = view_logits(members[f], pool.images[torch.as_tensor(idx)], device, batch_size, tta)[:, 0].numpy()
        if views is None:
            views = np.zeros((v.shape[0], len(pool), v.shape[2]))
        views[:, idx] = v
    return Held(pool, views if views is not None else np.zeros((1, 0, 2)), fold)


def _assess(rule: DecisionRule, views: np.ndarray) -> tuple[np.ndarray, ...]:
    """(uncalibrated probs, calibrated probs, decisions, uncertainty, referred) from (V, n, K) view logits."""
    probs = rule.probs(views.mean(axis=0))
    decisions = rule.decide(probs)
    if rule.multi_label:
        unc = rule.uncertainty(np.stack([rule.probs(v) for v in views]), decisions)
        return ML.sigmoid(views.mean(axis=0)), probs, decisions, unc, rule.refer(probs, unc)
    unc = spread(np.stack([rule.probs(v) for v in views]), rule.decided_column(decisions))
    return M.apply_temperature(views.mean(axis=0), 1.0), probs, decisions, unc, rule.refer(probs, unc)


def run_evaluate(params: Params, models_dir: Path | str | None = None, ingest_dir: Path | str | None = None,
                 out_dir: Path | str | None = None) -> dict:
    """Held-out (val or out-of-fold) and test metrics of the model or fold ensemble, with TTA,
    calibration fitted on the held-out predictions, per-case uncertainty and referral."""
    cfg = params.evaluate
    models_dir = Path(models_dir or params.train.out_dir)
    ingest_dir = Path(ingest_dir or params.ingest.out_dir)
    out = Path(out_dir or cfg.out_dir)
    device = resolve_device(params.train.device)
    model, info = load_checkpoint(models_dir, device=str(device))
    bs = params.train.batch_size or 8
    n_members = len(members_of(model))
    held_name = "val" if n_members == 1 else "oof"
    held = held_out(model, ingest_dir, models_dir, device, bs, cfg.tta)
    test = load_split(ingest_dir, "test")
    tv = view_logits(model, test.images, device, bs, cfg.tta).numpy()  # (T, M, n, K)
    y_held, y_test = held.cases.labels.numpy(), test.labels.numpy()
    names = tuple(info.get("class_names") or [str(i) for i in range(tv.shape[-1])])

    rule = fit_rule(held.views.mean(axis=0), y_held, names, cfg)
    test_logits = tv.mean(axis=(0, 1))
    T, thr = rule.temperature, (rule.label_thresholds if rule.multi_label else rule.threshold)
    b = rule.bias
    result = {held_name: split_metrics(y_held, held.views.mean(axis=0), T, thr, cfg.n_bootstrap, params.seed, names,
                                       b),
              "test": split_metrics(y_test, test_logits, T, thr, cfg.n_bootstrap, params.seed, names, b)}
    result["calibration"] = {"method": cfg.calibration if b is not None else "temperature", "temperature": _r(T, 6),
                             "bias": None if b is None else [_r(v, 6) for v in b], "threshold": _r(rule.threshold, 6),
                             "operating_point": cfg.operating_point,
                             "fitted_on": "val" if n_members == 1 else f"out-of-fold ({n_members} folds)",
                             "n_fitted": int(len(y_held)), "tta": cfg.tta}
    if rule.multi_label:
        result["calibration"] |= {"task": "multi_label", "thresholds": {n: _r(t, 6) for n, t in zip(names, thr)},
                                  "temperature_fit": "one temperature shared by all labels: BCE (NLL) of every "
                                                     "held-out (case, label) pair"}
    if cfg.tta != "none":  # the same pipeline without test-time views: rule refitted on held-out identity views
        plain = fit_rule(held.views[0], y_held, names, cfg.model_copy(update={"tta": "none"}))
        no_tta = split_metrics(y_test, tv[0].mean(axis=0), plain.temperature,
                               plain.label_thresholds if plain.multi_label else plain.threshold, cfg.n_bootstrap,
                               params.seed, names, plain.bias)
        result["tta_effect"] = {"tta": cfg.tta, "n_views": int(tv.shape[0]), **{
            f"{k}_{tag}": m.get(k) for tag, m in (("without", no_tta), ("with", result["test"]))
            for k in ("auroc", "ece", "ece_calibrated", "brier_calibrated")}}
    if n_members > 1:
        result["per_fold"] = _per_fold(held, y_held, tv, y_test, rule, cfg, params.seed)
        result["calibration"]["alternatives"] = _calibration_alternatives(held, y_held, test_logits, y_test, names,
                                                                          cfg, rule)
    assessed = _assess(rule, tv.reshape(-1, *tv.shape[2:]))
    _, probs_t, dec_t, unc_t, ref_t = assessed
    result["uncertainty"] = {
        "measure": f"std of the calibrated probability over {tv.shape[0] * tv.shape[1]} views "
                   f"({tv.shape[1]} member(s) x {tv.shape[0]} test-time transform(s))",
        "test_mean": _r(float(unc_t.mean())) if len(unc_t) else None,
        "referral": {"band": cfg.referral.band, "max_spread": cfg.referral.max_spread,
                     **referral_summary(y_test, probs_t, dec_t, ref_t)}}
    curve = selective_curve(y_test, probs_t, dec_t, unc_t, rule.margin(probs_t))
    result["subgroups"] = {"test": subgroup_metrics(test, y_test, test_logits, T, thr, cfg.min_subgroup_cases,
                                                    params.seed, names, b)}
    held_rows = _assess(rule, held.views)
    review = _review(params, models_dir, ingest_dir, test.case_ids, {
        c: label_text(d.tolist()) for ids, d in ((held.cases.case_ids, held_rows[2]), (test.case_ids, dec_t))
        for c, d in zip(ids, d)}, lambda y: split_metrics(y, test_logits, T, thr, cfg.n_bootstrap, params.seed,
                                                          names, b))
    if review:
        result["review"] = review
    out.mkdir(parents=True, exist_ok=True)
    save_json(ReportDir(out).metrics, result)
    save_json(ReportDir(out).calibration, rule.to_calibration())
    _write_predictions(ReportDir(out).predictions, {held_name: (held.cases, y_held, held_rows),
                                                    "test": (test, y_test, assessed)}, rule)
    if rule.multi_label:  # pooled over (case, label): reliability here, ROC/PR/confusion of the decisions below
        write_plots(out, y_test.reshape(-1), ML.as_binary_logits(test_logits), T, None, False)
        for name, (columns, rows) in ML.plot_tables(y_test, probs_t, dec_t).items():
            save_csv(ReportDir(out).plots / name, columns, rows)
    else:
        write_plots(out, y_test, _shifted(test_logits, T, b), T, thr, rule.binary, raw_logits=test_logits)
    save_dict_csv(ReportDir(out).plots / "selective_test.csv", ["coverage", "n", "auroc", "error_rate"], curve)
    _log_mlflow(params, models_dir, out, result, held_name)
    return result


REVIEW_METRICS = ("n", "auroc", "auroc_ci95", "accuracy", "balanced_accuracy", "sensitivity", "specificity",
                  "ece_calibrated", "brier_calibrated")


def _review(params: Params, models_dir: Path, ingest_dir: Path, test_ids: list[str], decisions: dict,
            metrics) -> dict | None:
    """metrics.json's `review` (None without verdicts): the readers' agreement with this model and each other
    (`io.reviews.review_summary`), and where readers corrected test labels, `test`: the test metrics against
    the source labels (`original`) and against the corrected reference (`corrected`), `metrics(y)` each."""
    from pipeline.io.checkpoint import model_id
    from pipeline.io.reviews import review_summary

    got = review_summary(params, model_id(models_dir), decisions, ingest_dir)
    if got is None:
        return None
    section, ref, original = got
    if any(c in ref.readers for c in test_ids):
        y = {tag: np.array([label_vector(t[c]) if is_multi_label(t[c]) else int(t[c]) for c in test_ids])
             for tag, t in (("original", original), ("corrected", ref.labels))}
        section["test"] = {"n_changed": sum(c in ref.changed for c in test_ids),
                           "n_conflicts": sum(c in ref.conflicts for c in test_ids)}
        for tag, labels in y.items():
            m = metrics(labels)
            section["test"][tag] = {k: m[k] for k in REVIEW_METRICS if k in m}
    return section


def _per_fold(held: Held, y_held, tv, y_test, rule: DecisionRule, cfg, seed: int) -> list[dict]:
    rows = []
    for f in range(tv.shape[1]):
        sel = held.fold == f
        p_held = rule.probs(held.views[:, sel].mean(axis=0))
        p_test = rule.probs(tv[:, f].mean(axis=0))
        rows.append({"fold": f, "n_held_out": int(sel.sum()), "held_out_auroc": _r(discrimination(y_held[sel], p_held)),
                     "test_auroc": _r(discrimination(y_test, p_test)), "test_ece": _r(_ece(rule, y_test, p_test))})
    return rows


def _calibration_alternatives(held: Held, y_held, test_logits, y_test, names, cfg, rule: DecisionRule) -> dict:
    """Test calibration when the rule is fitted on all out-of-fold cases vs on one fold's held-out cases
    alone (what a single train/val split would have had)."""
    out = {}
    one = held.fold == 0
    for tag, r in (("out_of_fold", rule), ("fold0_only", fit_rule(held.views[:, one].mean(axis=0), y_held[one],
                                                                  names, cfg))):
        p = r.probs(test_logits)
        out[tag] = {"n_fitted": int(len(y_held) if tag == "out_of_fold" else one.sum()),
                    "temperature": _r(r.temperature, 4), "threshold": _r(r.threshold, 4),
                    "test_ece_calibrated": _r(_ece(r, y_test, p)), "test_nll_calibrated": _r(_nll(r, y_test, p))}
        if r.binary and r.threshold is not None and len(np.unique(y_test)) > 1:
            rep = M.binary_report(y_test, p[:, 1], r.threshold)
            out[tag] |= {"test_sensitivity": _r(rep["sensitivity"]), "test_specificity": _r(rep["specificity"])}
    return out


def _ece(rule: DecisionRule, y: np.ndarray, p: np.ndarray) -> float:
    """Calibrated ECE as split_metrics reports it (multi-label: the macro mean over labels)."""
    if rule.multi_label:
        return ML.macro_of(M.ece, y, p)
    return M.ece(y, p[:, 1] if rule.binary else p)


def _nll(rule: DecisionRule, y: np.ndarray, p: np.ndarray) -> float:
    if rule.multi_label:
        return ML.macro_of(M.nll, y, p)
    return M.nll(y, p[:, 1] if rule.binary else p)


def _write_predictions(path: Path, splits: dict, rule: DecisionRule) -> None:
    """One row per case: the uncalibrated and calibrated probability of the decided (binary: positive)
    class, the decision, its uncertainty (views' spread) and whether it is referred to a human.
    Multi-label: label and decision as ';'-joined vectors, probability of the most probable label, then
    p_<label> (calibrated) and decision_<label> per label."""
    if rule.multi_label:
        return _write_multilabel_predictions(path, splits, rule)
    rows = []
    for s, (cases, y, (raw, probs, decisions, unc, referred)) in splits.items():
        for i, cid in enumerate(cases.case_ids):
            k = 1 if rule.binary else int(decisions[i])
            rows.append([cid, s, int(y[i]), f"{raw[i, k]:.6f}", f"{probs[i, k]:.6f}", int(decisions[i]),
                         f"{unc[i]:.6f}", int(referred[i])])
    save_csv(path, ["case_id", "split", "label", "probability", "calibrated_probability", "decision", "uncertainty",
                    "referred"], rows)


def _write_multilabel_predictions(path: Path, splits: dict, rule: DecisionRule) -> None:
    names = list(rule.class_names)
    rows = []
    for s, (cases, y, (raw, probs, decisions, unc, referred)) in splits.items():
        for i, cid in enumerate(cases.case_ids):
            k = int(np.argmax(probs[i]))
            rows.append([cid, s, ";".join(map(str, y[i].tolist())), f"{raw[i, k]:.6f}", f"{probs[i, k]:.6f}",
                         ";".join(map(str, decisions[i].tolist())), f"{unc[i]:.6f}", int(referred[i])]
                        + [f"{p:.6f}" for p in probs[i]] + [int(d) for d in decisions[i]])
    save_csv(path, ["case_id", "split", "label", "probability", "calibrated_probability", "decision", "uncertainty",
                    "referred"] + [f"p_{n}" for n in names] + [f"decision_{n}" for n in names], rows)


def _log_mlflow(params: Params, models_dir: Path, out: Path, result: dict, held_name: str) -> None:
    """Log metrics, figures and predictions to the training run."""

    from pipeline.core.records import flatten
    from pipeline.tracking.runs import training_run_id

    run_id = training_run_id(params, models_dir)
    if run_id is None:
        return
    import mlflow

    flat = {}
    for split in (held_name, "test", "tta_effect", "uncertainty", "review"):
        section = {k: v for k, v in (result.get(split) or {}).items() if k not in ("model_id", "case_set")}
        for k, v in flatten(section).items():
            try:
                flat[re.sub(r"[^\w\-. /]", "_", f"{split}_{k}")] = float(v)  # label names may hold any character
            except ValueError:
                continue
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({k: v for k, v in flat.items() if math.isfinite(v)})
        mlflow.log_metric("temperature", result["calibration"]["temperature"])
        mlflow.log_artifact(str(ReportDir(out).metrics), "evaluation")
        mlflow.log_artifact(str(ReportDir(out).predictions), "evaluation")
        mlflow.log_artifacts(str(out / "figures"), "evaluation/figures")


__all__ = ["run_evaluate", "split_metrics"]
