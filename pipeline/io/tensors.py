"""The ingested tensors of a split, loaded once (pickle-free) and stacked, plus what ingest recorded per case.

No per-epoch file reading: all `ok` tensors of a split are stacked into one contiguous
tensor (pinned when a GPU is used) and batches are gathered with `index_select`, which
is cheaper than a DataLoader collating per-item samples.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Params
from pipeline.core.plan import Plan, load_plan
from pipeline.errors import MissingInput, PlanError
from pipeline.io.index import is_multi_label, label_vector, read_index
from pipeline.layout import IngestDir


@dataclass
class CaseSet:
    """The ok cases of one split: ids, labels, and their tensors stacked (N, C, *spatial).

    `labels` is (N,) long class indices (single-label) or (N, L) long 0/1 (multi-label)."""

    case_ids: list[str]
    patient_ids: list[str]
    labels: torch.Tensor
    images: torch.Tensor
    meta: list[dict]

    def __len__(self) -> int:
        return len(self.case_ids)


def read_plan(ingest_dir: Path | str) -> Plan:
    return load_plan(IngestDir(ingest_dir).plan)


def read_sidecar(ingest_dir: Path | str, case_id: str) -> dict:
    """What ingest recorded about a case's geometry (native grid, tensor affine); {} for array sources."""
    path = IngestDir(ingest_dir).sidecar(case_id)
    return json.loads(path.read_text()) if path.exists() else {}


def read_native_mask(ingest_dir: Path | str, case_id: str) -> np.ndarray | None:
    """The case's lesion mask on its native grid, as ingest recorded it; None when it has none."""
    path = IngestDir(ingest_dir).mask(case_id)
    return np.load(path, allow_pickle=False) if path.exists() else None


def _index(ingest_dir: Path) -> list[dict]:
    if not IngestDir(ingest_dir).index.exists():
        raise MissingInput(f"{IngestDir(ingest_dir).index} is missing", hint="run the ingest stage first")
    return read_index(ingest_dir)


def _split_rows(ingest_dir: Path, split: str, index: list[dict] | None = None) -> list[dict]:
    """The index rows of every `ok` case in `split`, in index order: the cases and order of `load_split`."""
    return [r for r in (index if index is not None else _index(ingest_dir)) if r["status"] == "ok"
            and r["split"] == split]


def report_case_ids(params: Params, ingest_dir: Path | str | None = None,
                    only: Collection[str] | None = None) -> list[str]:
    """The case ids the explain report shows, in its order, without loading a tensor: the ok cases of each
    of `explain.splits` in turn (index order, as `load_split` stacks them), at most `explain.max_cases`;
    with `only` (`resdx explain --case`), just those among them. Evaluate (which runs before explain)
    names the report's case set with it (`core.review.case_set_id`), explain the set it shows."""
    ingest_dir = Path(ingest_dir or params.ingest.out_dir)
    index = _index(ingest_dir)
    out: list[str] = []
    for split in params.explain.splits:
        for r in _split_rows(ingest_dir, split, index):
            if only and r["case_id"] not in only:
                continue
            if len(out) >= params.explain.max_cases:
                break
            out.append(r["case_id"])
    return out


def load_split(ingest_dir: Path | str, split: str, pin: bool = False) -> CaseSet:
    """Stack the tensors of every `ok` case in `split` (loaded once, pickle-free)."""
    ingest_dir = Path(ingest_dir)
    rows = _split_rows(ingest_dir, split)
    arrays = [np.load(ingest_dir / r["tensor"], mmap_mode="r", allow_pickle=False) for r in rows]
    if arrays:
        images = torch.from_numpy(np.stack(arrays).astype(np.float32, copy=False))
    else:
        images = torch.zeros((0,))
    if pin and torch.cuda.is_available():
        images = images.pin_memory()
    labels = _labels(ingest_dir, rows)
    meta = [{k: r.get(k, "") for k in ("modality", "manufacturer")} for r in rows]
    return CaseSet([r["case_id"] for r in rows], [r["patient_id"] for r in rows], labels, images, meta)


def _labels(ingest_dir: Path, rows: list[dict]) -> torch.Tensor:
    """(N,) class indices, or (N, L) 0/1 for multi-label cells ("1;0"); an empty split of a multi-label
    plan is (0, L)."""
    if any(is_multi_label(r["label"]) for r in rows):
        return torch.tensor([label_vector(r["label"]) for r in rows], dtype=torch.long)
    if not rows and IngestDir(ingest_dir).plan.exists():
        try:
            plan = load_plan(IngestDir(ingest_dir).plan)
        except PlanError:
            plan = None
        if plan is not None and plan.multi_label:
            return torch.zeros((0, plan.n_classes), dtype=torch.long)
    return torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)


def to_device_if_fits(cases: CaseSet, device: torch.device, fraction: float = 0.25) -> CaseSet:
    """Move the cached tensors to the GPU when they take under `fraction` of its free memory.

    Then batches are gathered on the device: no host-to-device copy per step (a copy from the
    pageable result of `index_select` would also be synchronous). Otherwise they stay in RAM.
    """
    if device.type != "cuda" or not len(cases):
        return cases
    free, _total = torch.cuda.mem_get_info(device)
    if cases.images.element_size() * cases.images.nelement() < fraction * free:
        cases.images = cases.images.to(device)
        cases.labels = cases.labels.to(device)
    return cases


def subset(cases: CaseSet, index) -> CaseSet:
    """The cases at `index` (a list or array of positions), in that order."""
    idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
    return CaseSet([cases.case_ids[i] for i in idx.tolist()], [cases.patient_ids[i] for i in idx.tolist()],
                   cases.labels.index_select(0, idx), cases.images.index_select(0, idx),
                   [cases.meta[i] for i in idx.tolist()])


def concat(a: CaseSet, b: CaseSet) -> CaseSet:
    if not len(b):
        return a
    if not len(a):
        return b
    return CaseSet(a.case_ids + b.case_ids, a.patient_ids + b.patient_ids, torch.cat([a.labels, b.labels]),
                   torch.cat([a.images, b.images]), a.meta + b.meta)
