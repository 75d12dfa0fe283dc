"""Model card (Markdown), organised along the CLAIM checklist (Checklist for Artificial Intelligence
in Medical Imaging, Mongan et al., Radiology: AI 2020; 2024 update) where its items apply.

Built only from pipeline outputs, never from raw inputs: models/{model.json, plan.json,
train_metrics.json}, reports/{metrics.json, calibration.json}, the ingested index.csv (counts
per split, label, modality, manufacturer, rejection reasons; no identifiers), and
reports/explain/sanity.json when the explain stage has written one. `pipeline.stages.register` writes
it to reports/model_card.md and bundles it with the registered model.

This module gathers the values (reads the JSON and CSV files, counts, picks the limitations that apply);
the Jinja2 template ``templates/model_card.md.j2`` holds the layout and the prose. Autoescape is off
(Markdown, not HTML); every table cell goes through the ``md`` filter (`md_cell`), so that a `|` or a
newline in a class name, case id or metric name cannot break a table.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from collections import Counter
from pathlib import Path

import jinja2

from pipeline.config import Params
from pipeline.core.recipe import with_plan_choices
from pipeline.io.index import read_index
from pipeline.layout import ExplainDir, IngestDir, ModelDir, ReportDir

TEMPLATES = Path(__file__).with_name("templates")
TEMPLATE = "model_card.md.j2"
_PIPE = re.compile(r"(\\*)\|")
_NEWLINE = re.compile(r"\r\n|\r|\n")


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


def md_cell(value) -> str:
    """`value` as text safe inside a Markdown table cell: newlines become spaces (a newline would end the
    row) and `|` becomes `\\|` (a bare one would end the cell); backslashes right before a `|` are doubled
    first, so that the `|` stays escaped (`a\\|b` -> `a\\\\\\|b`, shown as `a\\|b`)."""
    text = _NEWLINE.sub(" ", str(value))
    return _PIPE.sub(lambda m: m.group(1) * 2 + "\\|", text)


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown: table cells are escaped by the `md` filter instead
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(v=_v, md=md_cell, g=lambda x: format(x, "g"), repr=repr)
    return env


def _index_rows(ingest_dir: Path) -> list[dict]:
    return read_index(ingest_dir) if IngestDir(ingest_dir).index.exists() else []


def _data_section(rows: list[dict], class_names: list[str]) -> dict | None:
    """Counts of the ingest index for section 2; None without an index."""
    if not rows:
        return None
    ok = [r for r in rows if r["status"] == "ok"]
    splits = [s for s in ("train", "val", "test") if any(r["split"] == s for r in rows)]
    label_name = {str(i): n for i, n in enumerate(class_names)}
    labels = sorted({r["label"] for r in ok})
    modalities = sorted({r["modality"] or "unknown" for r in ok})
    makers = sorted({r["manufacturer"] or "unknown" for r in ok})
    kept = []
    for s in splits:
        sel = [r for r in ok if r["split"] == s]
        lab, mod = Counter(r["label"] for r in sel), Counter(r["modality"] or "unknown" for r in sel)
        kept.append([s, len(sel), len({r["patient_id"] for r in sel})] + [lab[x] for x in labels]
                    + [mod[m] for m in modalities])
    by_maker = [[m] + [sum(1 for r in ok if r["split"] == s and (r["manufacturer"] or "unknown") == m)
                       for s in splits] for m in makers]
    rejected = [r for r in rows if r["status"] != "ok"]
    reasons = Counter((r["split"] or "-", r["reason_code"]) for r in rejected)
    return {"splits": splits, "label_columns": [f"label: {label_name.get(x, x)}" for x in labels],
            "modalities": modalities, "kept": kept, "makers": by_maker, "n_studies": len(rows),
            "n_rejected": len(rejected), "reasons": [[s, c, n] for (s, c), n in sorted(reasons.items())]}


def _performance(metrics: dict) -> list[list]:
    rows = []
    for s in ("val", "test"):
        m = metrics.get(s)
        if not m:
            continue
        rows.append([s, m.get("n"), m.get("n_positive"), m.get("auroc"), _ci(m), _ci(m, "auroc_ci95_delong"),
                     m.get("sensitivity"), m.get("specificity"), m.get("ppv"), m.get("npv"), m.get("accuracy")])
    return rows


def _calibration(metrics: dict, cal: dict) -> dict:
    c = metrics.get("calibration", {})
    rows = [[s, m.get("ece"), m.get("ece_calibrated"), m.get("brier"), m.get("brier_calibrated"), m.get("nll"),
             m.get("nll_calibrated")] for s in ("val", "test") if (m := metrics.get(s))]
    return {"temperature": cal.get("temperature", c.get("temperature")),
            "threshold": cal.get("threshold", c.get("threshold")),
            "operating_point": cal.get("operating_point", c.get("operating_point", "n/a")), "calibration": rows}


def _subgroups(metrics: dict) -> list[list]:
    rows = []
    for key, values in metrics.get("subgroups", {}).get("test", {}).items():
        for value, m in values.items():
            if m.get("result"):
                rows.append([key, value, m.get("n"), m["result"], "", "", ""])
            else:
                rows.append([key, value, m.get("n"), m.get("auroc"), _ci(m), m.get("sensitivity"),
                             m.get("ece_calibrated")])
    return rows


def _sanity(path: Path) -> list | None:
    """(check, value) rows of the explain stage's sanity.json; None when it has not written one."""
    if not path.exists():
        return None
    from pipeline.core.records import flatten

    data = _read_json(path)
    flat = flatten(data) if isinstance(data, dict) else {"result": json.dumps(data)}
    return sorted(flat.items())


def _limitations(metrics: dict, plan: dict, params: Params) -> list[str]:
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
    return out


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
    class_names = cal.get("class_names") or info.get("class_names") or []
    source = (f"manifest `{Path(params.data.manifest).name}`" if params.data.source == "manifest"
              else f"MedMNIST `{params.data.medmnist.flag}`")
    sanity_path = ExplainDir(params.explain.out_dir).sanity
    # The training settings as run: the network plan's choices where params left them null.
    trained = with_plan_choices(params, plan.get("network") or {}).train
    context = {
        "params": params, "t": trained, "info": info, "spec": info.get("spec", {}), "train": train,
        "plan": plan, "fingerprint": plan.get("fingerprint", {}), "ct": plan.get("ct") or {},
        "mr": plan.get("mr") or {}, "medmnist": plan.get("medmnist") or {}, "arrays": plan.get("arrays") or {},
        "name": extra.get("model_name", params.register.model_name),
        "date": dt.datetime.now(dt.UTC).date().isoformat(),
        "git_commit": extra.get("git_commit", "n/a"),
        "run_id": extra.get("run_id", info.get("mlflow_run_id", "n/a")),
        "data_hash": info.get("data_hash", "n/a"), "plan_hash": extra.get("plan_hash", "n/a"),
        "modalities": plan.get("fingerprint", {}).get("modalities"), "class_names": class_names, "source": source,
        "data": _data_section(rows, class_names), "performance": _performance(metrics),
        **_calibration(metrics, cal), "subgroups": _subgroups(metrics),
        "sanity": _sanity(sanity_path), "sanity_path": sanity_path,
        "limitations": _limitations(metrics, plan, params),
    }
    return _environment().get_template(TEMPLATE).render(context)


def write_model_card(params: Params, path: Path | str, **kwargs) -> Path:
    from pipeline.io.artifacts import save_text

    return save_text(path, build_model_card(params, **kwargs))
