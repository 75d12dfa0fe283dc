"""`resdx review import`: a reader's verdict file from the review report, checked, into `data.reviews_dir`.

The report (reports/explain/report.html) exports one CSV per reader (`core.review.CSV_COLUMNS`): every case
it shows, the reader's agree / disagree / unsure, comment and corrected label, and on every row the
model (`model_id`, a hash of the weights) and the case set (`case_set`) it was made for. Importing checks
the whole file first, against the current model (models/model.safetensors) and the current report's case
set (reports/explain/cases.csv; before explain has run, the cases it will show), and writes nothing when
anything is wrong: one ReviewError with a code of its own (review_*) and every bad line named. Then it
stores the reviewed rows as `<reviews_dir>/<reader>.csv` (`core.review.STORED_COLUMNS`), atomically.

Re-importing a reader's verdicts for the same model and case set replaces their earlier ones (the result
says how many); their verdicts on other models' reports stay in the table (corrected labels are facts
about a case, which ingest may use whatever the model: data.use_review_labels).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from pipeline.config import Params
from pipeline.core.review import REVIEW_CHOICES, case_set_id
from pipeline.errors import MissingInput, ReviewError
from pipeline.io.checkpoint import model_id
from pipeline.io.index import label_text
from pipeline.io.reviews import read_reader_table, read_review_export, reader_table, reader_tables, write_reader_table
from pipeline.io.tensors import report_case_ids
from pipeline.layout import SAFE_ID_RULE, ExplainDir, ModelDir, is_safe_id
from pipeline.sources.manifest import parse_label

MAX_LISTED = 10  # bad lines named in one refusal


def current_case_ids(params: Params) -> tuple[list[str], str]:
    """(the case ids of the current report, where they come from): reports/explain/cases.csv when explain has
    written it, else the cases it will show (`io.tensors.report_case_ids`)."""
    path = ExplainDir(params.explain.out_dir).cases
    if path.exists():
        with path.open(newline="", encoding="utf-8") as fh:
            return [r["case_id"] for r in csv.DictReader(fh)], str(path)
    return report_case_ids(params), f"{params.ingest.out_dir}/index.csv (explain.splits, explain.max_cases)"


def model_classes(params: Params) -> tuple[list[str], bool]:
    """(the model's class names, whether it is multi-label): model.json, else data.class_names."""
    spec = ModelDir(params.train.out_dir).spec
    info = json.loads(spec.read_text()) if spec.exists() else {}
    names = info.get("class_names") or params.data.class_names or ["0", "1"]
    return [str(n) for n in names], info.get("task") == "multi_label"


def corrected_label(text: str, names: list[str], multi: bool) -> tuple[str, str]:
    """(the label in index.csv's form, "" when none was given; why it is not a class of the model, or "")."""
    if not text:
        return "", ""
    k = len(names)
    classes = ", ".join(f"{i} = {n}" for i, n in enumerate(names))
    label, problem = parse_label(text, None if multi else k)
    if multi and not problem and (not isinstance(label, tuple) or len(label) != k):
        problem = f"this model has {k} labels ({', '.join(names)}): give {k} 0/1 values joined by ';'"
    elif not multi and isinstance(label, tuple):
        problem = f"this model gives one class per case: a class index ({classes})"
    elif not multi and problem:
        problem = f"not a class index of this model ({classes})"
    return ("", problem) if problem else (label_text(label), "")


def _refuse(problems: list[tuple[str, str]], file: Path, hint: str) -> None:
    """One ReviewError for all bad lines (the code of the first), when there are any."""
    if not problems:
        return
    listed = [text for _, text in problems[:MAX_LISTED]]
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise ReviewError(f"{file}: nothing imported, {len(problems)} problem(s):\n  " + "\n  ".join(listed) + more,
                      code=problems[0][0], hint=hint)


def _check_identity(rows: list[dict], file: Path, current_model: str, current_set: str, n_cases: int,
                    cases_from: str) -> None:
    """Every row names the current model and case set."""
    for key in ("model_id", "case_set"):
        values = sorted({r[key] for r in rows})
        if len(values) > 1:
            shown = ", ".join(map(repr, values[:4]))
            raise ReviewError(f"{file}: the rows name {len(values)} different {key} values ({shown}): one export "
                              "is one report", code="review_mixed_ids",
                              hint="export each report's verdicts on their own, from the report itself")
    model, cases = rows[0]["model_id"], rows[0]["case_set"]
    if model != current_model:
        given = f"model {model}" if model else "no model (a report from before verdicts named one)"
        raise ReviewError(f"these verdicts are for {given}, the current model is {current_model}: export them "
                          "again from the current report, or restore the model they were given on (the weights "
                          "of that version, e.g. `dvc checkout` at its commit) and import them then",
                          code="review_other_model",
                          hint="`dvc repro` makes the current report (reports/explain/report.html); review it")
    if cases != current_set:
        raise ReviewError(f"these verdicts are for case set {cases or '(none)'}, the current report shows case set "
                          f"{current_set} ({n_cases} cases, from {cases_from}): export them again from the current "
                          "report", code="review_other_case_set",
                          hint="the report's cases follow explain.splits and explain.max_cases (and `resdx explain "
                               "--case`); make the report again with the settings the verdicts were given on")


def _check_rows(rows: list[dict], file: Path, shown: set[str], names: list[str], multi: bool) -> list[dict]:
    """The stored rows (reviewed cases only), or a ReviewError naming every bad line."""
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    stored = []
    for r in rows:
        where, cid = f"line {r['line']}", r["case_id"]
        if cid not in shown:
            problems.append(("review_unknown_case", f"{where}: case {cid[:40]!r} is not in the current report"))
            continue
        if cid in seen:
            problems.append(("review_duplicate_case", f"{where}: case {cid} appears more than once"))
            continue
        seen.add(cid)
        review = r["review"].lower()
        if review and review not in REVIEW_CHOICES:
            problems.append(("review_bad_choice", f"{where} (case {cid}): review {r['review'][:40]!r} is not one of "
                             f"{', '.join(REVIEW_CHOICES)} (or empty: not reviewed)"))
            continue
        label, why = corrected_label(r["corrected_label"], names, multi)
        if why:
            problems.append(("review_bad_label", f"{where} (case {cid}): corrected label "
                             f"{r['corrected_label'][:40]!r}: {why}"))
            continue
        if not review and (label or r["comment"].strip()):
            problems.append(("review_incomplete", f"{where} (case {cid}): a comment or corrected label but no "
                             f"verdict: mark it {' / '.join(REVIEW_CHOICES)}"))
            continue
        if review:
            stored.append({**r, "review": review, "corrected_label": label})
    _refuse(problems, file, hint="fix these lines in the report and export again (or in the file, keeping its "
                                 "columns), then import it")
    return stored


def _full_report_set(params: Params) -> str | None:
    try:
        return case_set_id(report_case_ids(params))
    except MissingInput:
        return None


def import_review(params: Params, file: Path | str, reader: str) -> dict:
    """Check `file` (a review report's CSV export) and store its reviewed rows as `reader`'s verdicts.

    Returns {reader, file, path (the table written), model_id, case_set, n_rows, n_reviewed, n_agree,
    n_disagree, n_unsure, n_corrected, replaced (earlier verdicts of this reader on this report were
    replaced), n_replaced, n_kept (their verdicts on other reports, kept), note (or None)}."""
    file = Path(file)
    if not is_safe_id(reader):
        raise ReviewError(f"the reader id is not a safe id ({SAFE_ID_RULE}); it names the file "
                          "<reviews_dir>/<reader>.csv", code="review_bad_reader",
                          hint="use initials or a staff id, e.g. --reader jdoe")
    folder = Path(params.data.reviews_dir)
    clash = [r for r in reader_tables(folder) if r.lower() == reader.lower() and r != reader]
    if clash:
        raise ReviewError(f"reader {reader!r} differs from the stored reader {clash[0]!r} only in letter case",
                          code="review_bad_reader", hint=f"use --reader {clash[0]} (one table per reader)")
    rows = read_review_export(file)
    if not rows:
        raise ReviewError(f"{file} has a header but no rows", code="review_empty", hint="export it from the report")
    current_model = model_id(params.train.out_dir)
    shown, cases_from = current_case_ids(params)
    current_set = case_set_id(shown)
    _check_identity(rows, file, current_model, current_set, len(shown), cases_from)
    names, multi = model_classes(params)
    stored = _check_rows(rows, file, set(shown), names, multi)
    if not stored:
        raise ReviewError(f"{file}: no case has a verdict (agree, disagree or unsure); nothing to import",
                          code="review_empty", hint="mark cases in the report, then export again")
    table = reader_table(folder, reader)
    earlier = read_reader_table(table) if table.exists() else []
    kept = [r for r in earlier if (r["model_id"], r["case_set"]) != (current_model, current_set)]
    path = write_reader_table(folder, reader, kept + stored)
    note = None
    if ExplainDir(params.explain.out_dir).cases.exists() and _full_report_set(params) not in (None, current_set):
        note = ("the report shows other cases than explain.splits / explain.max_cases give (`resdx explain "
                "--case`?): evaluate counts verdicts on the full report only")
    counts = {f"n_{c}": sum(r["review"] == c for r in stored) for c in REVIEW_CHOICES}
    return {"reader": reader, "file": str(file), "path": str(path), "model_id": current_model,
            "case_set": current_set, "n_rows": len(rows), "n_reviewed": len(stored), **counts,
            "n_corrected": sum(bool(r["corrected_label"]) for r in stored), "replaced": len(earlier) > len(kept),
            "n_replaced": len(earlier) - len(kept), "n_kept": len(kept), "note": note}


def summary_rows(r: dict, params: Params) -> list[tuple[str, str]]:
    """The CLI's summary of an import result (`import_review`): (what, value) rows, the note and the next step."""
    stored = r["path"] + (f" (replaced {r['n_replaced']} earlier verdicts on this report)" if r["replaced"] else "")
    rows = [("model / case set", f"{r['model_id']} / {r['case_set']}"), ("cases in the file", str(r["n_rows"])),
            ("reviewed", f"{r['n_reviewed']} (agree {r['n_agree']}, disagree {r['n_disagree']}, "
                         f"unsure {r['n_unsure']})"),
            ("corrected labels", str(r["n_corrected"])),
            ("stored", stored + (f"; kept {r['n_kept']} on other reports" if r["n_kept"] else ""))]
    if r["note"]:
        rows.append(("note", r["note"]))
    ingest = " (and ingest, which takes the corrected labels: data.use_review_labels is true)"
    rows.append(("next", "`dvc repro` re-runs evaluate and explain with these verdicts"
                 + (ingest if params.data.use_review_labels else "")))
    return rows


__all__ = ["import_review", "current_case_ids", "model_classes", "corrected_label", "summary_rows"]
