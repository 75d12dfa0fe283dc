"""The case table that ingest reads: one row per case.

Required columns: case_id, patient_id, modality (CT or MR), path, label.
Optional: split (train/val/test), series_uid (pick one series in a folder), mask_path.
Relative paths resolve against the manifest file's own folder.

`label` is a class index (single-label), or for a multi-label manifest the 0/1 value of every
label joined by ';' ("1;0": the first label present, the second absent; `data.class_names` names
the labels in this order). A manifest holding any ';' label is multi-label: then every row needs a
vector of the same length, and a row that has none (or a value other than 0/1) is rejected with why.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.config import Params
from pipeline.core.splits import assign_splits
from pipeline.errors import ManifestError
from pipeline.io.index import LABEL_SEPARATOR

REQUIRED = ("case_id", "patient_id", "modality", "path", "label")
OPTIONAL = ("split", "series_uid", "mask_path")
SPLITS = ("train", "val", "test")
_MODALITY_ALIASES = {"CT": "CT", "MR": "MR", "MRI": "MR"}



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
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _parse_label(text: str) -> tuple[int | tuple[int, ...] | None, str]:
    """(label, problem): a class index, or a ';'-joined 0/1 vector (multi-label)."""
    if LABEL_SEPARATOR not in text:
        try:
            return int(float(text)), ""
        except ValueError:
            return None, f"label {text!r} is not an integer class index"
    parts = [p.strip() for p in text.split(LABEL_SEPARATOR)]
    if any(p not in ("0", "1") for p in parts):
        return None, (f"label {text!r}: a multi-label value must be 0 or 1 per label, joined by ';' "
                      "(e.g. '1;0')")
    return tuple(int(p) for p in parts), ""


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


def read_manifest(path: Path | str) -> list[CaseRow]:
    """Parse and check every row; bad rows come back with `problem` set, never dropped."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest not found: {path}",
                            hint="check data.manifest in the params (or pass --manifest CSV)")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}; required: {', '.join(REQUIRED)}")
        raw_rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    base = path.parent
    rows: list[CaseRow] = []
    seen: set[str] = set()
    for n, r in enumerate(raw_rows, start=2):
        problem = ""
        case_id = r["case_id"] or f"row{n}"
        modality = _MODALITY_ALIASES.get(r["modality"].upper(), "")
        label, problem = _parse_label(r["label"])
        if not r["case_id"]:
            problem = f"manifest line {n}: empty case_id"
        elif case_id in seen:
            problem = f"duplicate case_id (manifest line {n})"
        elif not r["patient_id"]:
            problem = "empty patient_id (needed for patient-level splits)"
        elif not modality:
            problem = f"modality {r['modality']!r} is not CT or MR"
        elif not r["path"]:
            problem = "empty path"
        split = r.get("split", "").lower()
        if split and split not in SPLITS and not problem:
            problem = f"split {split!r} is not one of {', '.join(SPLITS)}"
        seen.add(case_id)
        rows.append(CaseRow(
            case_id=case_id, patient_id=r["patient_id"], modality=modality,
            path=_resolve(base, r["path"]) if r["path"] else base, label=label, split=split,
            series_uid=r.get("series_uid", ""),
            mask_path=_resolve(base, r["mask_path"]) if r.get("mask_path") else None,
            problem=problem,
        ))
    return _check_label_vectors(rows)


def split_rows(rows: list[CaseRow], params: Params) -> list[CaseRow]:
    """Give valid rows without a split a patient-level, label-stratified one (manifest splits win;
    a patient with a split in one row keeps it in all)."""
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


__all__ = ["CaseRow", "ManifestError", "read_manifest", "split_rows"]
