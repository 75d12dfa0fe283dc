"""Model card (Markdown), organised along the CLAIM checklist (Checklist for Artificial Intelligence
in Medical Imaging, Mongan et al., Radiology: AI 2020; 2024 update) where its items apply.

Built only from pipeline outputs, never from raw inputs: models/{model.json, plan.json,
train_metrics.json}, reports/{metrics.json, calibration.json}, the ingested index.csv (counts
per split, label, modality, manufacturer, rejection reasons; no identifiers), and
reports/explain/sanity.json when the explain stage has written one. `pipeline.stages.register` writes
it to reports/model_card.md and bundles it with the registered model.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections import Counter
from pathlib import Path

from pipeline.config import Params
from pipeline.layout import ExplainDir, IngestDir, ModelDir, ReportDir


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _v(x, nd: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _ci(m: dict, key: str = "auroc_ci95") -> str:
    ci = m.get(key)
    return f"[{_v(ci[0])}, {_v(ci[1])}]" if ci and ci[0] is not None else "n/a"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_v(c) for c in r) + " |" for r in rows]
    return out + [""]


def _index_rows(ingest_dir: Path) -> list[dict]:
    path = IngestDir(ingest_dir).index
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _data_section(rows: list[dict], class_names: list[str]) -> list[str]:
    if not rows:
        return ["The ingest index was not available when this card was written.", ""]
    ok = [r for r in rows if r["status"] == "ok"]
    splits = [s for s in ("train", "val", "test") if any(r["split"] == s for r in rows)]
    label_name = {str(i): n for i, n in enumerate(class_names)}
    lines = ["Cases kept (`ok`) per split, by label, modality and manufacturer (counts of studies):", ""]
    labels = sorted({r["label"] for r in ok})
    modalities = sorted({r["modality"] or "unknown" for r in ok})
    makers = sorted({r["manufacturer"] or "unknown" for r in ok})
    header = ["split", "studies", "patients"] + [f"label: {label_name.get(x, x)}" for x in labels] + modalities
    body = []
    for s in splits:
        sel = [r for r in ok if r["split"] == s]
        lab, mod = Counter(r["label"] for r in sel), Counter(r["modality"] or "unknown" for r in sel)
        body.append([s, len(sel), len({r["patient_id"] for r in sel})] + [lab[x] for x in labels]
                    + [mod[m] for m in modalities])
    lines += _table(header, body)
    mk = [[m] + [sum(1 for r in ok if r["split"] == s and (r["manufacturer"] or "unknown") == m) for s in splits]
          for m in makers]
    lines += ["By manufacturer (from the DICOM header; NIfTI files carry none: `unknown`):", ""]
    lines += _table(["manufacturer"] + splits, mk)
    rejected = [r for r in rows if r["status"] != "ok"]
    if rejected:
        reasons = Counter((r["split"] or "-", r["reason_code"]) for r in rejected)
        lines += [f"Excluded at ingest: {len(rejected)} of {len(rows)} studies, each with a recorded reason:", ""]
        lines += _table(["split", "reason", "studies"], [[s, c, n] for (s, c), n in sorted(reasons.items())])
    else:
        lines += [f"Excluded at ingest: none of {len(rows)} studies.", ""]
    return lines


def _plan_section(plan: dict, plan_hash: str | None) -> list[str]:
    if plan.get("source") == "medmnist":
        origin, arrays = plan.get("medmnist") or {}, plan.get("arrays") or {}
        return [f"- MedMNIST `{origin.get('flag')}` at size {origin.get('size')}, official splits; normalization "
                f"{arrays.get('formula', 'n/a')} (fitted on train).", ""]
    ct, mr = plan.get("ct") or {}, plan.get("mr") or {}
    return [
        f"- Orientation: {plan.get('orientation')} (exact axis permutation/flip; gantry tilt de-sheared first).",
        f"- Target spacing: {plan.get('target_spacing')} mm ({plan.get('target_spacing_source', 'n/a')}); "
        f"model input {plan.get('shape')} voxels by {plan.get('fit')}; mode {plan.get('mode')}.",
        f"- Resampling: {plan.get('resampling', 'n/a')} (anisotropy threshold {plan.get('anisotropy_threshold')}).",
        f"- CT: {ct.get('normalization', 'n/a')}; window {ct.get('window')} HU ({ct.get('window_source', 'n/a')}), "
        f"mean {ct.get('mean')}, std {ct.get('std')}.",
        f"- MR: {mr.get('normalization', 'n/a')}; clip percentiles {mr.get('clip_percentiles')}.",
        f"- Fitted on: {plan.get('fitted_on', 'n/a')} ({plan.get('fingerprint', {}).get('n_cases', 'n/a')} cases; "
        f"modalities {plan.get('fingerprint', {}).get('modalities')}). Plan hash `{plan_hash or 'n/a'}`.",
        "- The registered model bundles this plan; prediction on new studies applies it unchanged.", ""]


def _performance(metrics: dict) -> list[str]:
    rows = []
    for s in ("val", "test"):
        m = metrics.get(s)
        if not m:
            continue
        rows.append([s, m.get("n"), m.get("n_positive"), m.get("auroc"), _ci(m), _ci(m, "auroc_ci95_delong"),
                     m.get("sensitivity"), m.get("specificity"), m.get("ppv"), m.get("npv"), m.get("accuracy")])
    if not rows:
        return ["No evaluation metrics were available.", ""]
    return _table(["split", "n", "positives", "AUROC", "95% CI (bootstrap)", "95% CI (DeLong)", "sensitivity",
                   "specificity", "PPV", "NPV", "accuracy"], rows)


def _calibration(metrics: dict, cal: dict) -> list[str]:
    c = metrics.get("calibration", {})
    lines = [f"Temperature scaling fitted on validation: T = {_v(cal.get('temperature', c.get('temperature')), 4)}; "
             f"operating threshold {_v(cal.get('threshold', c.get('threshold')), 4)} "
             f"({cal.get('operating_point', c.get('operating_point', 'n/a'))}, fixed on validation and applied "
             "unchanged to test). Served probabilities are the calibrated ones.", ""]
    rows = [[s, m.get("ece"), m.get("ece_calibrated"), m.get("brier"), m.get("brier_calibrated"), m.get("nll"),
             m.get("nll_calibrated")] for s in ("val", "test") if (m := metrics.get(s))]
    return lines + _table(["split", "ECE before", "ECE after", "Brier before", "Brier after", "NLL before",
                           "NLL after"], rows)


def _subgroups(metrics: dict) -> list[str]:
    groups = metrics.get("subgroups", {}).get("test", {})
    if not groups:
        return ["No subgroup results.", ""]
    rows = []
    for key, values in groups.items():
        for value, m in values.items():
            if m.get("result"):
                rows.append([key, value, m.get("n"), m["result"], "", "", ""])
            else:
                rows.append([key, value, m.get("n"), m.get("auroc"), _ci(m), m.get("sensitivity"),
                             m.get("ece_calibrated")])
    return _table(["attribute", "group", "n", "AUROC", "95% CI", "sensitivity", "ECE (calibrated)"], rows)


def _sanity(path: Path) -> list[str]:
    if not path.exists():
        return [f"Not run (no `{path}`): saliency maps have not been checked for this model; do not rely on them.",
                ""]
    from pipeline.core.records import flatten

    data = _read_json(path)
    flat = flatten(data) if isinstance(data, dict) else {"result": json.dumps(data)}
    return ["Saliency sanity checks (explain stage):", ""] + _table(["check", "value"], sorted(flat.items()))


def _limitations(metrics: dict, rows: list[dict], plan: dict, params: Params) -> list[str]:
    test = metrics.get("test", {})
    out = []
    demo = Path(params.data.manifest) == Path(params.synthesize.manifest) and params.data.source == "manifest"
    if demo:
        out.append("Trained and tested on the **synthetic demo cohort** (phantoms): these numbers say nothing about "
                   "performance on patients.")
    n = test.get("n") or 0
    out.append(f"Test set of {n} studies: intervals are wide; small differences between models are not "
               "detectable.")
    small = [f"{k}={v}" for k, g in metrics.get("subgroups", {}).get("test", {}).items() for v, m in g.items()
             if m.get("result")]
    if small:
        out.append("Subgroups with too few cases to report: " + ", ".join(small) + ".")
    out.append("Single data source with a patient-level random split: internal validation only; no external, "
               "temporal or multi-site test.")
    out.append("Calibration and the operating threshold were fitted on the validation split; they may not transfer "
               "to another population or scanner.")
    mods = plan.get("fingerprint", {}).get("modalities")
    if mods:
        out.append(f"Trained on {', '.join(mods)} only; other modalities or protocols are out of scope.")
    out.append("Studies that the ingest checks reject (too few slices, inconsistent geometry, undecodable pixels, "
               "4D series) are rejected at prediction too, with the reason.")
    out.append("Not a medical device: research and decision support only, under review by a qualified reader.")
    return [f"- {x}" for x in out] + [""]


def build_model_card(params: Params, models_dir: Path | str | None = None, reports_dir: Path | str | None = None,
                     ingest_dir: Path | str | None = None, extra: dict | None = None) -> str:
    """The card as Markdown text."""
    models_dir = Path(models_dir or params.train.out_dir)
    reports_dir = Path(reports_dir or params.evaluate.out_dir)
    ingest_dir = Path(ingest_dir or params.ingest.out_dir)
    extra = extra or {}
    m, r = ModelDir(models_dir), ReportDir(reports_dir)
    info, plan, train = _read_json(m.spec), _read_json(m.plan), _read_json(m.train_metrics)
    metrics, cal = _read_json(r.metrics), _read_json(r.calibration)
    rows = _index_rows(ingest_dir)
    spec = info.get("spec", {})
    class_names = cal.get("class_names") or info.get("class_names") or []
    name = extra.get("model_name", params.register.model_name)
    source = (f"manifest `{Path(params.data.manifest).name}`" if params.data.source == "manifest"
              else f"MedMNIST `{params.data.medmnist.flag}`")
    t = params.train
    lines = [
        f"# Model card: {name}",
        "",
        f"Generated {dt.datetime.now(dt.UTC).date().isoformat()} by `resdx register`. Git commit "
        f"`{extra.get('git_commit', 'n/a')}`, MLflow run `{extra.get('run_id', info.get('mlflow_run_id', 'n/a'))}`, "
        f"data hash `{info.get('data_hash', 'n/a')}`, plan hash `{extra.get('plan_hash', 'n/a')}`.",
        "",
        "## 1. Intended use (CLAIM: title/abstract, introduction)",
        "",
        f"- Task: classify a {'/'.join(plan.get('fingerprint', {}).get('modalities') or ['CT/MR'])} study as one of "
        f"{', '.join(repr(c) for c in class_names) or 'n/a'} (study-level, {spec.get('spatial_dims', '?')}D).",
        "- Role: decision support that flags studies for a reader's attention, with a calibrated probability and a "
        "decision at a fixed operating threshold; it does not replace reading the study.",
        "- Input: a DICOM series folder, a NIfTI file, or a tensor already preprocessed with the bundled plan. "
        "Output: calibrated class probabilities, the decision, or a rejection reason.",
        "- Not intended for: other anatomy, modalities or tasks than those below; paediatric or post-surgical "
        "populations unless represented in the data; autonomous diagnosis.",
        "",
        "## 2. Data (CLAIM: data sources, eligibility, de-identification, data partitions)",
        "",
        f"- Source: {source}. Labels: the manifest's `label` column (reference standard as recorded there).",
        f"- Partitions: patient-level, label-stratified (val {params.split.val_fraction:g}, test "
        f"{params.split.test_fraction:g}, seed {params.seed}) unless the manifest fixes `split`; no patient is in "
        "two partitions. The test split was used once, for the final metrics.",
        "- De-identification: outputs carry case ids only; readers keep no names, UIDs or dates.",
        "",
        *_data_section(rows, class_names),
        "## 3. Preprocessing (CLAIM: data preprocessing)",
        "",
        *_plan_section(plan, extra.get("plan_hash")),
        "## 4. Model and training (CLAIM: model, training)",
        "",
        f"- Architecture: {spec.get('name', 'n/a')} (MONAI), {spec.get('spatial_dims', '?')}D, "
        f"{spec.get('in_channels', '?')} input channel(s), {spec.get('n_classes', '?')} outputs; stem stride "
        f"{spec.get('conv1_t_stride', 'n/a')}; output stride {spec.get('output_stride', 32)}; "
        f"{spec.get('padding', 'zeros')} padding; {spec.get('pool', 'avg')} pooling head; "
        f"dropout {spec.get('dropout', 'n/a')}. "
        f"Initialisation: {'MedicalNet weights (local file)' if params.model.pretrained_path else 'random'}.",
        f"- Training: {t.optimizer}, lr {t.lr:g}, weight decay {t.weight_decay:g}, {t.schedule} schedule, batch "
        f"{t.batch_size}, up to {t.epochs} epochs with patience {t.patience}; class imbalance: {t.imbalance}; "
        "augmentation: random flips, affine, intensity shift/scale.",
        f"- Model selection: best validation AUROC {_v(info.get('best_val_auroc'))} at epoch "
        f"{info.get('best_epoch', 'n/a')} ({train.get('epochs_run', 'n/a')} epochs run).",
        "",
        "## 5. Performance (CLAIM: evaluation metrics, statistical measures, results)",
        "",
        *_performance(metrics),
        "## 6. Calibration",
        "",
        *_calibration(metrics, cal),
        "## 7. Subgroups and failure analysis (CLAIM: robustness, failure analysis)",
        "",
        *_subgroups(metrics),
        "## 8. Explainability (CLAIM: methods for explainability)",
        "",
        *_sanity(ExplainDir(params.explain.out_dir).sanity),
        "## 9. Limitations (CLAIM: discussion)",
        "",
        *_limitations(metrics, rows, plan, params),
        "## 10. Reproducibility and availability (CLAIM: other information)",
        "",
        f"- Registered as `{name}` in the MLflow Model Registry; load with "
        f"`mlflow.pyfunc.load_model(\"models:/{name}@champion\")`.",
        "- Rebuild: `dvc repro` at the git commit above reproduces data, model and metrics (CPU training is "
        "deterministic for a given seed).",
        "",
    ]
    return "\n".join(lines)


def write_model_card(params: Params, path: Path | str, **kwargs) -> Path:
    from pipeline.io.artifacts import save_text

    return save_text(path, build_model_card(params, **kwargs))
