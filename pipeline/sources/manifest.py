"""The case table that ingest reads: one row per case.

Required columns: case_id, patient_id, modality (CT or MR), path, label.
Optional: split (train/val/test), series_uid (pick one series in a folder), mask_path.
Relative paths resolve against the manifest file's own folder; a path ``dicomweb:<StudyInstanceUID>``
(optionally ``/<SeriesInstanceUID>``) names a study on the `pacs.url` DICOMweb server.
The file is UTF-8 text (a BOM is allowed).

`case_id` and `patient_id` are safe ids (`pipeline.layout.SAFE_ID`): 1 to 128 characters from
A-Z a-z 0-9 . _ -, starting with a letter or a digit; the case_id names the case's files.

`label` is a class index (single-label): a whole number below the number of `data.class_names`
("2" or "2.0"; not "1.7", "-1", "1e12" or "inf"). For a multi-label manifest it is the 0/1 value of every
label joined by ';' ("1;0": the first label present, the second absent; `data.class_names` names
the labels in this order). A manifest holding any ';' label is multi-label: then every row needs a
vector of the same length, and a row that has none (or a value other than 0/1) is rejected with why.

A bad row is never dropped and never stops the run: it comes back with `problem` set, and ingest
rejects it (`bad_manifest_row`) with that reason. A bad file (not UTF-8, not CSV, a missing column,
no rows; a single-label cohort with one class that sends cases to training) is one ManifestError
before any work. Reasons never quote an id and quote other cells only when short and plain: they
reach index.csv, which holds no PHI.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.config import Params
from pipeline.core.splits import assign_splits
from pipeline.errors import ManifestError
from pipeline.io.index import LABEL_SEPARATOR
from pipeline.layout import SAFE_ID_RULE, is_safe_id
from pipeline.sources.dicomweb import is_remote, parse_ref

REQUIRED = ("case_id", "patient_id", "modality", "path", "label")
OPTIONAL = ("split", "series_uid", "mask_path")
SPLITS = ("train", "val", "test")
_MODALITY_ALIASES = {"CT": "CT", "MR": "MR", "MRI": "MR"}
# The class index ceiling when no class count is given (data.class_names null): a 1e12 label must not
# make a plan with 10^12 classes.
MAX_CLASSES = 1000
# A class index as text: digits, optionally ".0" ("1.0" from a spreadsheet). Not 1.7, -1, 1e12, inf, nan.
_CLASS_INDEX = re.compile(r"[0-9]{1,9}(?:\.0+)?")
# A bad cell a reason may quote back: short and plain, so no name or sentence reaches index.csv.
_QUOTABLE = re.compile(r"[A-Za-z0-9._;+-]{0,16}")


@dataclass(frozen=True)
class CaseRow:
    case_id: str
    patient_id: str
    modality: str
    path: Path
    label: int | tuple[int, ...] | None  # a tuple of 0/1 per label in a multi-label manifest
    split: str = ""
    series_uid: str = ""
    mask_path: Path | None = None
    problem: str = ""  # set when the row itself is invalid; ingest rejects it with this reason


def _resolve(base: Path, value: str) -> Path:
    if is_remote(value):  # a study on the DICOMweb server (pipeline.sources.dicomweb), not a file
        return Path(value)
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _quoted(value: str) -> str:
    """A bad cell as a reason shows it: as itself when short and plain, else only by its length."""
    return repr(value) if _QUOTABLE.fullmatch(value) else f"({len(value)} characters)"


def _class_problem(k: int, n_classes: int | None) -> str:
    """Why class index `k` is out of range ("" if it is not), for a cohort of `n_classes` (None: not known)."""
    if n_classes is None:
        return "" if k < MAX_CLASSES else f"label {k} is not a class index (at most {MAX_CLASSES - 1})"
    if k < n_classes:
        return ""
    return (f"label {k} is not a class index: data.class_names names {n_classes} classes "
            f"(labels 0 to {n_classes - 1})")


def _parse_label(text: str, n_classes: int | None = None) -> tuple[int | tuple[int, ...] | None, str]:
    """(label, problem): a class index below `n_classes`, or a ';'-joined 0/1 vector (multi-label)."""
    if LABEL_SEPARATOR not in text:
        if not _CLASS_INDEX.fullmatch(text):
            return None, f"label {_quoted(text)} is not a class index (a whole number: 0, 1, 2, ...)"
        k = int(text.partition(".")[0])
        problem = _class_problem(k, n_classes)
        return (None, problem) if problem else (k, "")
    parts = [p.strip() for p in text.split(LABEL_SEPARATOR)]
    if any(p not in ("0", "1") for p in parts):
        return None, (f"label {_quoted(text)}: a multi-label value must be 0 or 1 per label, joined by ';' "
                      "(e.g. '1;0')")
    return tuple(int(p) for p in parts), ""


def parse_label(text: str, n_classes: int | None = None) -> tuple[int | tuple[int, ...] | None, str]:
    """(label, problem) of a label cell by the manifest's rules, for other tables that hold labels (a review's
    corrected label): a class index below `n_classes`, or a ';'-joined 0/1 vector."""
    return _parse_label(text.strip(), n_classes)


def _check_label_vectors(rows: list[CaseRow]) -> list[CaseRow]:
    """In a multi-label manifest, every row needs a vector of the most common length."""
    lengths = Counter(len(r.label) for r in rows if isinstance(r.label, tuple) and not r.problem)
    if not lengths:
        return rows
    n = lengths.most_common(1)[0][0]
    out = []
    for r in rows:
        if not r.problem and not isinstance(r.label, tuple):
            r = replace(r, problem=f"label {r.label!r} is one class index, but this manifest is multi-label: "
                                   f"give {n} 0/1 values joined by ';' (e.g. {';'.join(['0'] * n)!r})")
        elif not r.problem and len(r.label) != n:
            r = replace(r, problem=f"label {LABEL_SEPARATOR.join(map(str, r.label))!r} has {len(r.label)} values; "
                                   f"the other rows of this multi-label manifest have {n}")
        out.append(r)
    return out


def _decode(path: Path) -> str:
    """The manifest's text; a byte that is not UTF-8 (a Latin-1 export, say) is a ManifestError naming its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ManifestError(f"{path}: line {line} is not UTF-8 text (byte 0x{data[err.start]:02x})",
                            hint="save the manifest as UTF-8 (in a spreadsheet: Save As > CSV UTF-8)") from None


def _raw_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header columns, [(line the row starts on, its cells)]), stripped; blank lines are no rows."""
    reader = csv.reader(io.StringIO(_decode(path), newline=""))
    try:
        columns = [c.strip() for c in next(reader, [])]
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}; required: {', '.join(REQUIRED)}")
        twice = sorted(c for c, k in Counter(columns).items() if k > 1 and c)
        if twice:  # which of them would a row's value come from?
            raise ManifestError(f"{path}: column(s) {', '.join(twice)} appear more than once in the header")
        rows, start = [], reader.line_num + 1
        for cells in reader:
            if cells:
                rows.append((start, [c.strip() for c in cells]))
            start = reader.line_num + 1
    except csv.Error as err:  # e.g. a cell over the csv module's size limit
        raise ManifestError(f"{path}: line {reader.line_num} is not valid CSV ({err})",
                            hint="export the manifest again as plain CSV") from None
    if not rows:
        raise ManifestError(f"{path}: the manifest has a header but no rows", hint="add one row per case")
    return columns, rows


def _shape_problem(cells: list[str], n_columns: int) -> str:
    """Why a row does not fit the header ("" if it does): its cells would be read under the wrong columns.
    Empty cells past the header are padding (spreadsheets write them), not a problem."""
    extra = sum(bool(c) for c in cells[n_columns:])
    if extra:
        return f"the row has {extra} more field(s) than the header's {n_columns} (an unquoted comma?)"
    if len(cells) < n_columns:
        return f"the row has {len(cells)} field(s); the header has {n_columns}"
    return ""


def _id_problem(column: str, value: str) -> str:
    if not value:
        return f"empty {column}" + (" (needed for patient-level splits)" if column == "patient_id" else "")
    return "" if is_safe_id(value) else f"{column} is not a safe id ({SAFE_ID_RULE})"


def _remote_problem(path: str, series_uid: str) -> str:
    """Why a ``dicomweb:`` path is not a study reference ("" when it is, or is a local path)."""
    if not is_remote(path):
        return ""
    try:
        parse_ref(path, series_uid)
    except ValueError as err:
        return str(err)
    return ""


def _row_problems(r: dict, n: int, seen: set[str], label_problem: str) -> Iterator[str]:
    """What may be wrong with row `r` (manifest line `n`), most important first ("" where a check passes).
    `seen`: the ids of earlier rows, lowercased: ids that differ only in letter case are one file on a
    case-insensitive disk."""
    if problem := _id_problem("case_id", r["case_id"]):
        yield f"manifest line {n}: {problem}"
    if r["case_id"].lower() in seen:
        yield f"duplicate case_id (manifest line {n}; ids are compared ignoring letter case)"
    yield _id_problem("patient_id", r["patient_id"])
    if r["modality"].upper() not in _MODALITY_ALIASES:
        yield f"modality {_quoted(r['modality'])} is not CT or MR"
    if not r["path"]:
        yield "empty path"
    if "\0" in r["path"] + r.get("mask_path", ""):
        yield "a path holds a NUL character"
    yield _remote_problem(r["path"], r.get("series_uid", ""))
    yield label_problem
    split = r.get("split", "").lower()
    if split and split not in SPLITS:
        yield f"split {_quoted(split)} is not one of {', '.join(SPLITS)}"


def _case_row(cells: list[str], columns: list[str], n: int, base: Path, seen: set[str],
              n_classes: int | None) -> CaseRow:
    r = dict(zip(columns, cells + [""] * (len(columns) - len(cells))))
    label, label_problem = _parse_label(r["label"], n_classes)
    problem = (_shape_problem(cells, len(columns))
               or next((p for p in _row_problems(r, n, seen, label_problem) if p), ""))
    if is_safe_id(r["case_id"]):
        seen.add(r["case_id"].lower())
    split = r.get("split", "").lower()
    return CaseRow(
        # An unsafe id goes no further: it could name a file outside tensors/, run as a formula in a
        # spreadsheet or carry PHI. Its row keeps a placeholder, one per line.
        case_id=r["case_id"] if is_safe_id(r["case_id"]) else f"row{n}",
        patient_id=r["patient_id"] if is_safe_id(r["patient_id"]) else "",
        modality=_MODALITY_ALIASES.get(r["modality"].upper(), ""),
        path=_resolve(base, r["path"]) if r["path"] else base, label=label,
        split=split if split in SPLITS else "", series_uid=r.get("series_uid", ""),
        mask_path=_resolve(base, r["mask_path"]) if r.get("mask_path") else None,
        problem=problem,
    )


def read_manifest(path: Path | str, n_classes: int | None = None) -> list[CaseRow]:
    """Parse and check every row; bad rows come back with `problem` set, never dropped.

    `n_classes`: labels must be below it (None: below MAX_CLASSES; `split_rows` checks data.class_names)."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest not found: {path}",
                            hint="check data.manifest in the params (or pass --manifest CSV)")
    columns, raw = _raw_rows(path)
    seen: set[str] = set()
    rows = [_case_row(cells, columns, n, path.parent, seen, n_classes) for n, cells in raw]
    return _check_label_vectors(rows)


def _check_class_range(rows: list[CaseRow], class_names: list[str] | None) -> list[CaseRow]:
    """Single-label: a row whose class index has no name in data.class_names is rejected (not the run)."""
    if class_names is None or any(isinstance(r.label, tuple) for r in rows if not r.problem):
        return rows
    return [replace(r, label=None, problem=_class_problem(r.label, len(class_names)))
            if not r.problem and isinstance(r.label, int) and _class_problem(r.label, len(class_names)) else r
            for r in rows]


def _require_two_classes(rows: list[CaseRow]) -> None:
    """A single-label cohort that sends cases to training needs two classes among its valid rows: one class
    only is a file-level mistake (the wrong export, a label column of zeros), refused before any work.
    A cohort with no training row (a test-only one) may hold one class."""
    valid = [r for r in rows if not r.problem]
    labels = {r.label for r in valid}
    if not any(r.split == "train" for r in valid) or any(isinstance(k, tuple) for k in labels) or len(labels) > 1:
        return
    raise ManifestError(f"every valid manifest row has label {next(iter(labels))!r}: training needs at least two "
                        "classes", hint="add cases of the other class(es), or fix the label column; a test-only "
                        "cohort sets split=test on every row")


def split_rows(rows: list[CaseRow], params: Params) -> list[CaseRow]:
    """Give valid rows without a split a patient-level, label-stratified one (manifest splits win;
    a patient with a split in one row keeps it in all). First rejects rows whose class index has no
    name in data.class_names; then a single-label cohort that trains must hold two classes."""
    rows = _check_class_range(rows, params.data.class_names)
    out = _assign_splits(rows, params)
    _require_two_classes(out)
    return out


def _assign_splits(rows: list[CaseRow], params: Params) -> list[CaseRow]:
    valid = [r for r in rows if not r.problem]
    todo = [r for r in valid if not r.split]
    if not todo:
        return rows
    given = {r.patient_id: r.split for r in valid if r.split}
    free = [r for r in todo if r.patient_id not in given]
    names = assign_splits([r.patient_id for r in free], [r.label or 0 for r in free],
                          params.split.val_fraction, params.split.test_fraction, params.seed)
    chosen = {r.case_id: s for r, s in zip(free, names)}
    out = []
    for r in rows:
        if r in todo:
            r = CaseRow(**{**r.__dict__, "split": given.get(r.patient_id) or chosen[r.case_id]})
        out.append(r)
    return out


__all__ = ["CaseRow", "ManifestError", "parse_label", "read_manifest", "split_rows"]
