"""Readers' verdicts on disk: the review report's CSV export, and the stored tables under `data.reviews_dir`.

The export (`core.review.CSV_COLUMNS`, one row per case of the report, `review` empty where the reader
gave none) is what report.js writes; it may have gone through a spreadsheet. `resdx review import`
(pipeline/stages/review.py) checks it and stores one table per reader, `<reviews_dir>/<reader>.csv`
(`core.review.STORED_COLUMNS`, one row per reviewed case). The folder is git-tracked and a DVC dependency
of ingest, evaluate and explain.

Both files are UTF-8 (a BOM is allowed) with RFC 4180 quoting. Text that a spreadsheet would run as a
formula carries OWASP's leading apostrophe in both (`artifacts.csv_cell`, report.js csvField): reading
strips exactly one apostrophe where the rest starts with = + - @ TAB or CR, so a comment comes back as
the reader typed it. (A text that itself starts with an apostrophe followed by one of those comes back
without that apostrophe: the guard cannot tell the two apart.)
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from pathlib import Path

from pipeline.config import Params
from pipeline.core.agreement import Reference
from pipeline.core.review import CSV_COLUMNS, STORED_COLUMNS, Verdict, case_set_id
from pipeline.errors import ReviewError
from pipeline.io.artifacts import FORMULA_START, save_dict_csv
from pipeline.layout import SAFE_ID_RULE, is_safe_id, safe_child

REEXPORT = "export the verdicts again from the report (its Export CSV button) and import that file unchanged"


def unguard(text: str) -> str:
    """A cell without the spreadsheet-formula guard: one leading ' dropped where the rest starts a formula."""
    if text.startswith("'") and text[1:].startswith(FORMULA_START):
        return text[1:]
    return text


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ReviewError(f"{path} does not exist", code="review_missing_file",
                          hint="give the CSV file the report's Export CSV button saved") from None
    except OSError as err:
        raise ReviewError(f"{path} cannot be read ({err.strerror or type(err).__name__})", code="review_bad_file",
                          hint="give the CSV file the report's Export CSV button saved") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ReviewError(f"{path}: line {line} is not UTF-8 text (byte 0x{data[err.start]:02x})",
                          code="review_bad_file", hint="save the file as UTF-8 (in a spreadsheet: Save As > CSV "
                          "UTF-8), or " + REEXPORT) from None


def _table(path: Path, columns: tuple[str, ...], what: str) -> list[dict]:
    """The rows of a CSV whose header is exactly `columns` (any order), as {column: unguarded cell, "line": n}."""
    reader = csv.reader(io.StringIO(_decode(path), newline=""))
    try:
        header = [unguard(c.strip()) for c in next(reader, [])]
        while header and not header[-1]:  # a spreadsheet's padding
            header.pop()
        missing = [c for c in columns if c not in header]
        unexpected = [c for c in header if c not in columns]
        twice = sorted({c for c in header if header.count(c) > 1})
        if missing or unexpected or twice:
            parts = ([f"missing column(s) {', '.join(missing)}"] if missing else []) + \
                    ([f"unexpected column(s) {', '.join(repr(c) for c in unexpected)}"] if unexpected else []) + \
                    ([f"column(s) {', '.join(twice)} more than once"] if twice else [])
            raise ReviewError(f"{path} is not {what}: {'; '.join(parts)}. Its header must be exactly: "
                              f"{','.join(columns)}", code="review_header", hint=REEXPORT)
        rows, start = [], reader.line_num + 1
        for cells in reader:
            if any(cells):
                if len(cells) < len(header) or any(cells[len(header):]):
                    raise ReviewError(f"{path}: line {start} has {len(cells)} fields; the header has {len(header)} "
                                      "(an unquoted comma?)", code="review_bad_file", hint=REEXPORT)
                rows.append({**{c: unguard(v) for c, v in zip(header, cells)}, "line": start})
            start = reader.line_num + 1
    except csv.Error as err:
        raise ReviewError(f"{path}: line {reader.line_num} is not valid CSV ({err})", code="review_bad_file",
                          hint=REEXPORT) from None
    return rows


def read_review_export(path: Path | str) -> list[dict]:
    """The rows of a review report's CSV export: one dict per case with every `CSV_COLUMNS` key (text, the
    formula guard undone; `comment` exactly as typed, the other cells stripped of surrounding spaces) and
    `line`, the line of the file the row starts on. A header that is not exactly CSV_COLUMNS (in any order),
    a row of another length, invalid CSV or non-UTF-8 text is a ReviewError naming what is wrong."""
    rows = _table(Path(path), CSV_COLUMNS, "a review export of the report")
    return [{k: (v if k in ("comment", "line") else v.strip()) for k, v in r.items()} for r in rows]


def reader_table(reviews_dir: Path | str, reader: str) -> Path:
    """`<reviews_dir>/<reader>.csv`; ValueError unless `reader` is a safe id."""
    return safe_child(Path(reviews_dir), reader, ".csv")


def write_reader_table(reviews_dir: Path | str, reader: str, rows: Iterable[dict]) -> Path:
    """Write (atomically, replacing it) the stored table of `reader`: `rows` are dicts with the
    STORED_COLUMNS keys (the `reader` key is set here). Returns its path."""
    path = reader_table(reviews_dir, reader)
    records = [{c: ("" if r.get(c) is None else r.get(c)) for c in STORED_COLUMNS} | {"reader": reader} for r in rows]
    return save_dict_csv(path, STORED_COLUMNS, records)


def read_reader_table(path: Path | str) -> list[dict]:
    """The rows of one stored table (STORED_COLUMNS keys, the formula guard undone, plus `line`)."""
    return _table(Path(path), STORED_COLUMNS, "a stored verdict table (resdx review import writes them)")


def reader_tables(reviews_dir: Path | str) -> dict[str, Path]:
    """reader -> stored table, for every *.csv in the folder (sorted; none when it does not exist). Hidden
    files (an editor's lock file, a write in progress) and other files (README.md) are not tables; a CSV
    whose name is not a safe id is a ReviewError."""
    folder = Path(reviews_dir)
    if not folder.is_dir():
        return {}
    out = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or f.suffix.lower() != ".csv" or not f.is_file():
            continue
        if not is_safe_id(f.stem):
            raise ReviewError(f"{folder}/ holds a CSV whose name is not a reader id ({len(f.name)} characters)",
                              code="review_bad_reader", hint=f"rename it to <reader>.csv ({SAFE_ID_RULE}) or "
                              "move it out of the folder")
        out[f.stem] = f
    return out


def _verdict(reader: str, r: dict) -> Verdict:
    return Verdict(case_id=r["case_id"].strip(), reader=reader, review=r["review"].strip(), comment=r["comment"],
                   corrected_label=r["corrected_label"].strip())


def read_reviews(reviews_dir: Path | str) -> dict[str, list[Verdict]]:
    """Every reader's verdicts, of every model and case set: {reader (the file stem): [Verdict, ...]} in
    file order; {} when the folder does not exist or holds no table."""
    return {reader: [_verdict(reader, r) for r in read_reader_table(path)]
            for reader, path in reader_tables(reviews_dir).items()}


def read_reviews_for(reviews_dir: Path | str, model_id: str, case_set: str | None = None) -> dict[str, list[Verdict]]:
    """The verdicts given on the report of model `model_id` (and, unless `case_set` is None, of that case
    set): {reader: [Verdict, ...]}, readers without one left out. What evaluate counts and the next report
    shows: a verdict is about the decision of one model, so another model's (even one retrained from the
    same run) are not the current model's. (Corrected labels are facts about the case: ingest takes them
    from `read_reviews`, of every model.)"""
    out = {}
    for reader, path in reader_tables(reviews_dir).items():
        mine = [_verdict(reader, r) for r in read_reader_table(path)
                if r["model_id"].strip() == model_id and (case_set is None or r["case_set"].strip() == case_set)]
        if mine:
            out[reader] = mine
    return out



def review_summary(params: Params, model: str, decisions: Mapping[str, str],
                   ingest_dir: Path | str | None = None) -> tuple[dict, Reference, dict[str, str]] | None:
    """What evaluate reports of the stored verdicts (None when there are none to report):

    (section, reference, original). `section` is metrics.json's `review` without the test metrics: the
    current model's id and report case set (`io.tensors.report_case_ids`), n_readers, per reader their
    agreement with the model (`core.agreement.reader_agreement` over `decisions`, case_id -> the model's
    decision as text), pairwise Cohen's kappa, and `corrected_reference` counts. The reference is of every
    ok case of the index, from the corrected labels of every reader and model (as ingest takes them);
    `original` is each case's source label (index.csv's manifest_label, or label in an older index)."""
    from pipeline.core.agreement import corrected_reference, pairwise_kappa, reader_agreement
    from pipeline.io.index import read_index
    from pipeline.io.tensors import report_case_ids

    ingest_dir = Path(ingest_dir or params.ingest.out_dir)
    every = read_reviews(params.data.reviews_dir)
    if not every:
        return None
    case_set = case_set_id(report_case_ids(params, ingest_dir))
    mine = read_reviews_for(params.data.reviews_dir, model, case_set)
    original = {r["case_id"]: r.get("manifest_label") or r["label"] for r in read_index(ingest_dir)
                if r["status"] == "ok"}
    ref = corrected_reference(original, every)
    if not mine and not ref.readers:
        return None
    section = {"model_id": model, "case_set": case_set, "n_readers": len(mine),
               "readers": reader_agreement(mine, decisions), "kappa": pairwise_kappa(mine),
               "corrected_reference": {"n_cases": len(ref.readers), "n_changed": ref.n_changed,
                                       "n_conflicts": ref.n_conflicts,
                                       "readers": sorted({r for rs in ref.readers.values() for r in rs})}}
    return section, ref, original


__all__ = ["read_review_export", "read_reader_table", "read_reviews", "read_reviews_for", "reader_table",
           "reader_tables", "review_summary", "unguard", "write_reader_table"]
