"""index.csv (one row per source case: ok / rejected + reason), the splits file and the ingest summary.

Written by every source (manifest, MedMNIST) in the same columns, read by every later stage.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.io.artifacts import save_csv, save_dict_csv
from pipeline.layout import IngestDir

INDEX_COLUMNS = [
    "case_id", "patient_id", "split", "label", "modality", "status", "reason_code", "reason",
    "source_format", "manufacturer", "native_shape", "native_spacing", "tensor", "tensor_shape", "source_hash",
    # Where `label` comes from: "manifest" (the source's own: the manifest row, or "medmnist"), or
    # "review:<reader>[,<reader>]" (readers' corrected labels, data.use_review_labels); and the source's label.
    "label_source", "manifest_label",
]
SPLITS_COLUMNS = ["case_id", "patient_id", "label", "split"]
# Multi-label cases keep one `label` column: their 0/1 label vector joined by this, e.g. "1;0".
LABEL_SEPARATOR = ";"


def label_text(label) -> str:
    """The `label` cell of a case: "" (none), the class index, or a multi-label vector joined by ';'."""
    if label is None:
        return ""
    if isinstance(label, (list, tuple)):
        return LABEL_SEPARATOR.join(str(int(v)) for v in label)
    return str(label)


def is_multi_label(text: str) -> bool:
    return LABEL_SEPARATOR in str(text)


def label_vector(text: str) -> list[int]:
    """The 0/1 vector of a multi-label cell ("1;0" -> [1, 0])."""
    return [int(v) for v in str(text).split(LABEL_SEPARATOR)]


@dataclass
class IngestSummary:
    n_rows: int
    n_ok: int
    n_rejected: int
    reasons: dict = field(default_factory=dict)
    n_cached: int = 0
    n_reused: int = 0
    seconds: float = 0.0
    by_modality: dict = field(default_factory=dict)
    splits: dict = field(default_factory=dict)


def write_index(path: Path, records: list[dict]) -> None:
    save_dict_csv(path, INDEX_COLUMNS, records)


def read_index(ingest_dir: Path | str) -> list[dict]:
    with IngestDir(ingest_dir).index.open(newline="") as fh:
        return list(csv.DictReader(fh))


def write_splits(path: Path, rows: list[dict]) -> None:
    """The split of every valid row, for review and reuse (put it in the manifest's `split` to pin it)."""
    save_csv(path, SPLITS_COLUMNS, ([label_text(r[c]) if c == "label" else r[c] for c in SPLITS_COLUMNS]
                                    for r in rows))


def remove_stale(folder: Path, keep: set[str], suffixes: tuple[str, ...] = (".npy", ".json"),
                 protect: tuple[str, ...] = ()) -> None:
    """Delete files of cases this run does not produce, and temp files left by a killed run."""
    if not folder.exists():
        return
    for f in folder.iterdir():
        # A folder here is not a case's file (an old run's id with a '/' in it made one): leave it rather
        # than fail every later run on unlink().
        if f.name in protect or (f.is_dir() and not f.is_symlink()):
            continue
        stem = f.name
        for s in suffixes:
            stem = stem.removesuffix(s)
        if f.name.startswith(".tmp-") or stem not in keep:
            f.unlink(missing_ok=True)
