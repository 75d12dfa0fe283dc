"""The review contract: what a reader's verdict file holds and how it names the model and case set it is for.

The report exports one CSV per reader (report.js writes `CSV_COLUMNS` in this order); `resdx review import`
checks it against the current model and case set and stores it under `data.reviews_dir`; the next report
shows earlier verdicts, evaluate reports agreement, and ingest may take corrected labels (opt-in).

Identity: `model_id` is the first 16 hex digits of the SHA-256 of the weights file (a retrained model, even
from the same run, is another model); `case_set` is the first 16 hex digits of the SHA-256 of the sorted,
newline-joined case ids the report shows. Neither carries anything from the sources.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

REVIEW_CHOICES = ("agree", "disagree", "unsure")
# The exported verdict file, in column order (report.js writes it; the importer reads it).
CSV_COLUMNS = ("case_id", "label", "probability", "decision", "review", "comment", "corrected_label",
               "model_id", "case_set")
# The stored table under data.reviews_dir/<reader>.csv, one row per reviewed case.
STORED_COLUMNS = ("case_id", "reader", "review", "comment", "corrected_label", "label", "decision",
                  "probability", "model_id", "case_set")


def case_set_id(case_ids: Iterable[str]) -> str:
    """16 hex digits naming a set of case ids (order-free)."""
    return hashlib.sha256("\n".join(sorted(str(c) for c in case_ids)).encode("utf-8")).hexdigest()[:16]


def model_id_of(weights: bytes) -> str:
    """16 hex digits naming a model by its weights file's bytes."""
    return hashlib.sha256(weights).hexdigest()[:16]


@dataclass(frozen=True)
class Verdict:
    """One reader's verdict on one case; `corrected_label` is the class index (or ';'-joined vector) the
    reader says is true, '' when none was given."""

    case_id: str
    reader: str
    review: str
    comment: str = ""
    corrected_label: str = ""
