"""The case table that ingest reads: one row per case.

Required columns: case_id, patient_id, modality (CT or MR), path, label.
Optional: split (train/val/test), series_uid (pick one series in a folder), mask_path.
Relative paths resolve against the manifest file's own folder.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Params
from pipeline.core.splits import assign_splits
from pipeline.errors import ManifestError

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
    label: int | None
    split: str = ""
    series_uid: str = ""
    mask_path: Path | None = None
    problem: str = ""  # set when the row itself is invalid; ingest rejects it with this reason


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


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
        label: int | None = None
        try:
            label = int(float(r["label"]))
        except ValueError:
            problem = f"label {r['label']!r} is not an integer class index"
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
    return rows


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
