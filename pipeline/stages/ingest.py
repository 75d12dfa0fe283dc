"""Ingest stage: manifest -> normalized tensors + index.csv + plan.json.

Two passes, as nnU-Net does:
1. *prepare* (parallel, cached by source content): read each case (DICOM or NIfTI),
   check it, reorient it to RAS and keep a voxel sample for the dataset fingerprint; when the
   tensor grid does not depend on the fingerprint (ingest.spacing set: `fixed_geometry`), resample
   it here too, so the case's voxels are read once and only the small resampled volume is cached;
2. *plan*: fit every preprocessing decision once, on training cases only, into plan.json;
3. *finalize* (parallel, skipped when the tensor for the same source and plan exists):
   resample (unless done in 1), normalize, crop/pad, write one .npy (no pickle, memory-mappable) per case.
Every manifest row ends `ok` or `rejected` with a reason; no PHI reaches any output.
A ``dicomweb:`` row is retrieved from `pacs.url` into its own cache first (inside the case's worker,
so its time limit covers the transfer); a server that fails rejects that case only.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from pipeline.config import IngestConfig, Params
from pipeline.core.plan import PlanGeometry, ReaderSettings, fit_plan, fixed_geometry, reader_settings
from pipeline.core.preprocess import PREPROCESS_VERSION, canonicalize, finish_case, plan_resample
from pipeline.errors import IngestFailed, RejectedCase, unexpected_reason
from pipeline.io.artifacts import load_npy, save_json, save_npy, source_hash
from pipeline.io.folder_lock import folder_lock, remove_temp_files
from pipeline.io.index import IngestSummary, label_text, remove_stale, write_index, write_splits
from pipeline.layout import IngestDir
from pipeline.progress import progress_map
from pipeline.sources.dicomweb import is_remote, parse_ref, retrieve
from pipeline.sources.manifest import CaseRow, read_manifest, split_rows

READER_VERSION = "2"  # bump when reading/canonicalisation changes, to invalidate caches
SAMPLE_SIZE = 10_000


# ----------------------------------------------------------------------------- pass 1: prepare
def fits_int16(data: np.ndarray) -> bool:
    """Every voxel an integer in int16's range (checked slab by slab: no full-size temporaries)."""
    for slab in data:
        if slab.min() < -32768 or slab.max() > 32767 or not np.array_equal(slab, np.round(slab)):
            return False
    return True


def foreground_sample(data: np.ndarray, above: float, rng: np.random.Generator, n: int = SAMPLE_SIZE) -> np.ndarray:
    """`rng.choice(v[v > above], n, replace=False)` for the C-order voxels v, one slab at a time.

    The same draw as on the flattened array (Generator.choice picks indices, then takes them), without
    a full-size copy and mask of the volume.
    """
    slabs = [np.count_nonzero(data[i] > above) for i in range(data.shape[0])]
    total = int(sum(slabs))
    if not total:
        return np.empty(0, dtype=np.float32)
    idx = rng.choice(total, size=min(n, total), replace=False)
    order = np.argsort(idx, kind="stable")
    out = np.empty(idx.size, dtype=np.float32)
    starts = np.concatenate([[0], np.cumsum(slabs)])
    pos = np.searchsorted(starts, idx[order], side="right") - 1
    for i in np.unique(pos):
        chosen = order[pos == i]
        slab = data[i].ravel()
        out[chosen] = slab[slab > above][idx[chosen] - starts[i]]
    return out


def grid_key(canon_key: str, geometry: PlanGeometry) -> str:
    """Cache key of a case resampled onto `geometry` (its canonical volume's key, the grid, the code)."""
    return hashlib.blake2b(f"{canon_key}:{geometry.hash()}:{PREPROCESS_VERSION}".encode(), digest_size=16).hexdigest()


def _cached(cache: Path, key: str) -> dict | None:
    """The cached result of `key`: a rejection, or an ok case whose array is still there; else None."""
    meta_path = cache / f"{key}.json"
    if not meta_path.exists():
        return None
    cached = json.loads(meta_path.read_text())
    if cached["status"] == "ok" and not (cache / f"{key}.npy").exists():
        return None
    return cached


def _resample(canon: dict, data: np.ndarray, affine: np.ndarray, cache: Path, key: str,
              geometry: PlanGeometry) -> dict:
    """The first pass's resampling onto a grid fixed in advance: cached under `key`, finalize normalizes it."""
    try:
        resampled, grid_affine, resampling = plan_resample(data, affine, geometry)
    except RejectedCase as err:
        out = {k: canon[k] for k in ("case_id", "source_hash") if k in canon} | {
            "status": "rejected", "reason_code": err.code, "reason": err.reason, "key": key}
        save_json(cache / f"{key}.json", out)
        return out
    save_npy(cache / f"{key}.npy", resampled)
    out = dict(canon, key=key, sample_key=canon.get("sample_key", canon["key"]),
               grid={"affine": grid_affine.tolist(), "resampling": resampling, "geometry": geometry.hash()})
    save_json(cache / f"{key}.json", out)
    return out


def _prepare(task: dict) -> dict:
    """Worker: read + canonicalise one case (and resample it when the grid is fixed in advance), caching the
    result by content and reader settings (and grid)."""
    from pipeline.io.reader import read_case

    row: CaseRow = task["row"]
    reader: ReaderSettings = task["reader"]
    cache: Path = task["cache"]
    geometry: PlanGeometry | None = task.get("geometry")
    result = {"case_id": row.case_id, "status": "rejected", "reason_code": "", "reason": ""}
    try:
        if row.problem:
            raise RejectedCase("bad_manifest_row", row.problem)
        if is_remote(row.path):  # a study on the DICOMweb server: retrieved (or found) in its cache first
            got = retrieve(parse_ref(row.path, row.series_uid), task["pacs"], row.modality, reader.max_case_bytes,
                           task["time_limit_s"])
            row = replace(row, path=got.folder)
        if not row.path.exists():
            raise RejectedCase("missing_path", "the manifest path does not exist")
        if not os.access(row.path, os.R_OK):
            raise RejectedCase("unreadable_path", "the manifest path cannot be read (permissions)")
        try:
            digest = source_hash(row.path)
        except OSError as err:
            why = err.strerror or type(err).__name__
            raise RejectedCase("unreadable_path", f"cannot read the input ({why})") from None
        canon_key = hashlib.blake2b(json.dumps([digest, READER_VERSION, row.modality, row.series_uid,
                                                reader.take_volume, reader.min_slices, reader.ct_foreground_hu,
                                                reader.max_case_bytes]).encode(), digest_size=16).hexdigest()
        result["source_hash"] = digest
        key = canon_key if geometry is None else grid_key(canon_key, geometry)
        cached = _cached(cache, key)
        if cached is None and geometry is not None and (canon := _cached(cache, canon_key)) is not None:
            # Read before, for another grid: resample the cached canonical volume, not the source.
            cached = canon if canon["status"] != "ok" else _resample(
                canon, load_npy(cache / f"{canon_key}.npy", mmap=True), np.array(canon["canonical_affine"]), cache,
                key, geometry)
        if cached:
            cached.update(case_id=row.case_id, cached=True)
            return cached
        try:
            volume = read_case(row.path, row.modality, reader, row.series_uid, integers=True)
            data, affine = canonicalize(volume, row.modality, reader.max_case_bytes)
            # One contiguous copy: the canonical view (flipped, transposed) is read three times below, and
            # np.save of a strided array goes element-block by element-block (10x slower on a large CT). The
            # native array is let go, so the copy does not add a volume to the worker's peak.
            native_shape = list(volume.data.shape[:3])
            data = np.ascontiguousarray(data)
            volume.data = None
        except RejectedCase as err:
            out = dict(result, reason_code=err.code, reason=err.reason, key=canon_key)
            save_json(cache / f"{canon_key}.json", out)
            return out
        rng = np.random.default_rng(int(digest[:8], 16))
        sample = foreground_sample(data, reader.ct_foreground_hu if row.modality == "CT" else -np.inf, rng)
        # Integer-valued volumes (CT with an integral rescale, read as int16) are cached as int16: half the
        # disk and half the memory when finalize maps them; the values are exactly the same.
        save_npy(cache / f"{canon_key}.npy", data if data.dtype == np.int16 or not fits_int16(data)
                 else data.astype(np.int16))
        save_npy(cache / f"{canon_key}.sample.npy", sample.astype(np.float32))
        out = dict(
            result, status="ok", key=canon_key, sample_key=canon_key,
            native_shape=native_shape, native_spacing=[round(s, 4) for s in volume.spacing],
            native_affine=volume.affine.tolist(), canonical_affine=affine.tolist(), canonical_shape=list(data.shape),
            source_format=volume.meta.get("source_format", ""), manufacturer=volume.meta.get("manufacturer", ""),
            notes=volume.meta.get("notes", []),
        )
        save_json(cache / f"{canon_key}.json", out)
        return out if geometry is None else _resample(out, data, affine, cache, key, geometry)
    except RejectedCase as err:
        return dict(result, reason_code=err.code, reason=err.reason)
    except MemoryError:
        return dict(result, reason_code="too_large", reason="reading the case ran out of memory")
    except Exception as err:  # noqa: BLE001 - one broken scan must never kill the run
        why = unexpected_reason(err, "reading the case", row.case_id)
        return dict(result, reason_code="unexpected_error", reason=why)


# ----------------------------------------------------------------------------- pass 3: finalize
def _finalize(task: dict) -> dict:
    """Worker: apply the plan to one cached canonical volume; record its lesion mask on the native grid."""
    from pipeline.io.reader import read_mask

    prep, plan, phash, out_dir, cache = task["prep"], task["plan"], task["plan_hash"], task["out"], task["cache"]
    mask_path: Path | None = task.get("mask_path")
    case_id = prep["case_id"]
    layout = IngestDir(out_dir)
    tensor_path, side_path, mask_out = layout.tensor(case_id), layout.sidecar(case_id), layout.mask(case_id)
    mask_digest = source_hash(mask_path) if mask_path is not None and mask_path.is_file() else ""
    key = hashlib.blake2b(f"{prep['key']}:{phash}:{mask_digest}:{PREPROCESS_VERSION}".encode(),
                          digest_size=16).hexdigest()
    try:
        if tensor_path.exists() and side_path.exists() and json.loads(side_path.read_text()).get("key") == key \
                and (not mask_digest or mask_out.exists()):
            shape = list(load_npy(tensor_path).shape)
            return {"case_id": case_id, "status": "ok", "reused": True, "tensor_shape": shape}
        # Memory-mapped: the resampling reads it once, so it is never a second anonymous copy.
        data = load_npy(cache / f"{prep['key']}.npy", mmap=True)
        grid = prep.get("grid")
        if grid is None:
            case = finish_case(data, np.array(prep["canonical_affine"]), prep["modality"], plan, prep["native_shape"],
                               np.array(prep["native_affine"]))
        else:  # resampled in the first pass, onto the grid this plan has (checked: the same geometry)
            geometry = plan.geometry()
            if geometry is None or geometry.hash() != grid["geometry"]:
                raise RuntimeError("the first pass resampled onto another grid than the plan's")
            case = finish_case(data, np.array(grid["affine"]), prep["modality"], plan, prep["native_shape"],
                               np.array(prep["native_affine"]), resampling=grid["resampling"])
        sidecar = {
            "case_id": case_id, "key": key, "plan_hash": phash, "modality": prep["modality"],
            "native_shape": prep["native_shape"], "native_affine": prep["native_affine"],
            "tensor_affine": case.tensor_affine.tolist(), "tensor_shape": list(plan.shape),
            "stats": case.stats, "layout": plan.layout, "has_mask": bool(mask_digest),
        }
        if case.slice_index is not None:
            sidecar["slice_index"] = case.slice_index
        if mask_digest:
            # Explain scores localisation on this copy: it reads nothing raw, and DVC sees a mask edit here.
            save_npy(mask_out, read_mask(mask_path, prep["native_shape"], np.array(prep["native_affine"]),
                                          plan.reader.max_case_bytes))
        else:
            mask_out.unlink(missing_ok=True)
        save_npy(tensor_path, case.tensor)
        save_json(side_path, sidecar)
        return {"case_id": case_id, "status": "ok", "reused": False, "tensor_shape": list(case.tensor.shape)}
    except RejectedCase as err:
        return {"case_id": case_id, "status": "rejected", "reason_code": err.code, "reason": err.reason}
    except MemoryError:
        return {"case_id": case_id, "status": "rejected", "reason_code": "too_large",
                "reason": "preprocessing the case ran out of memory"}
    except Exception as err:  # noqa: BLE001 - one broken case must never kill the run
        return {"case_id": case_id, "status": "rejected", "reason_code": "preprocess_failed",
                "reason": unexpected_reason(err, "preprocessing the case", case_id)}


# ----------------------------------------------------------------------------- the stage
def run_ingest(params: Params, manifest: Path | str | None = None, out_dir: Path | str | None = None,
               cache_dir: Path | str | None = None, progress: bool = True) -> IngestSummary:
    """Run the whole stage; writes OUT/index.csv, OUT/plan.json, OUT/tensors/<case_id>.{npy,json}.

    OUT is locked for the run: a second ingest into it fails at once with "another ingest holds OUT".
    """
    manifest = Path(manifest or params.data.manifest)
    out = Path(out_dir or params.ingest.out_dir)
    cache = Path(cache_dir or params.ingest.cache_dir) / "prepared"
    rows = split_rows(read_manifest(manifest), params)  # file-level manifest errors: before any work
    origin = [("manifest", label_text(r.label)) for r in rows]
    if params.data.use_review_labels:
        rows, origin = review_labels(rows, params)
    with folder_lock(out):
        return _run(params, rows, out, cache, progress, origin)


def review_labels(rows: list[CaseRow], params: Params) -> tuple[list[CaseRow], list[tuple[str, str]]]:
    """The rows with each valid case's label replaced by the corrected reference of every reader's verdicts
    in data.reviews_dir (`core.agreement.corrected_reference`; verdicts of every model: a corrected label
    is a fact about the case), and per row (label_source, manifest label): "manifest", or
    "review:<reader>[,<reader>]" where the readers decided it. Applied after the split is assigned, so a
    correction never moves a case between splits."""
    from pipeline.core.agreement import corrected_reference
    from pipeline.errors import ReviewError
    from pipeline.io.reviews import read_reviews
    from pipeline.sources.manifest import parse_label

    valid = [r for r in rows if not r.problem]
    ref = corrected_reference({r.case_id: label_text(r.label) for r in valid}, read_reviews(params.data.reviews_dir))
    widths = {len(r.label) for r in valid if isinstance(r.label, tuple)}
    names = params.data.class_names
    out, origin = [], []
    for r in rows:
        origin.append(("manifest", label_text(r.label)))
        if r.problem or r.case_id not in ref.readers:
            out.append(r)
            continue
        label, problem = parse_label(ref.labels[r.case_id], None if widths or not names else len(names))
        if not problem and (isinstance(label, tuple) != bool(widths) or widths and len(label) not in widths):
            problem = "it is not a label of this manifest's kind (one class index, or a 0/1 vector of its length)"
        if problem:
            raise ReviewError(f"the corrected label of case {r.case_id} (reader(s) {', '.join(ref.readers[r.case_id])}"
                              f") does not fit this cohort: {problem}", code="review_bad_label",
                              hint=f"fix or remove that row of {params.data.reviews_dir}/<reader>.csv, or set "
                                   "data.use_review_labels: false")
        origin[-1] = ("review:" + ",".join(ref.readers[r.case_id]), origin[-1][1])
        out.append(replace(r, label=label))
    return out, origin


def _failed(stage: str) -> Callable[[dict, str], dict]:
    """The result of a case whose worker was killed at the time limit, or died."""
    def result(task: dict, why: str) -> dict:
        case_id = task["row"].case_id if "row" in task else task["prep"]["case_id"]
        if why == "timeout":
            return {"case_id": case_id, "status": "rejected", "reason_code": "timeout",
                    "reason": f"{stage} the case took longer than ingest.case_timeout_s; it was stopped"}
        return {"case_id": case_id, "status": "rejected", "reason_code": "worker_died",
                "reason": f"the worker {stage} the case {why}: out of memory, or a crash in a decoder"}
    return result


def _import_readers() -> None:
    """Import the readers (pydicom, nibabel) here, once: each case runs in a child forked from this process
    (`progress_map`), which would otherwise import them itself. Measured on the demo's 312 cases with one
    worker: 65.8 s with a fork per case, 41.1 s with no fork at all."""
    import pipeline.io.dicom  # noqa: F401
    import pipeline.io.reader  # noqa: F401


def _map(cfg: IngestConfig, fn: Callable[[dict], dict], tasks: list[dict], label: str, progress: bool) -> list:
    """The cases through `fn` on ingest.engine: this machine's supervised pool, or a Ray cluster."""
    if cfg.engine == "ray":
        from pipeline.ray_engine import ray_map

        return ray_map(fn, tasks, cfg.ray_address, label, progress, cfg.case_timeout_s, _failed(label), cfg.workers)
    _import_readers()
    return progress_map(fn, tasks, cfg.workers, label, progress, cfg.case_timeout_s, _failed(label))


def _run(params: Params, rows: list[CaseRow], out: Path, cache: Path, progress: bool,
         origin: list[tuple[str, str]]) -> IngestSummary:
    t0 = time.perf_counter()
    cfg = params.ingest
    remove_temp_files(cache, out, IngestDir(out).tensors, IngestDir(out).masks)
    reader = reader_settings(params)
    geometry = fixed_geometry(params)
    tasks = [{"row": r, "reader": reader, "cache": cache, "pacs": params.pacs, "time_limit_s": cfg.case_timeout_s,
              "geometry": geometry} for r in rows]
    prepared = _map(cfg, _prepare, tasks, "reading", progress)
    for n, (p, r) in enumerate(zip(prepared, rows)):
        # Rows are tracked by position: a duplicated case_id must not overwrite its first row.
        p.update(row=n, modality=r.modality, split=r.split, label=r.label)

    ok = [p for p in prepared if p["status"] == "ok"]
    def sample(p: dict) -> np.ndarray:
        return np.load(cache / f"{p.get('sample_key', p['key'])}.sample.npy", allow_pickle=False)

    samples = [sample(p) for p in ok if p["split"] == "train" and p["modality"] == "CT"]
    if not samples and not any(p["split"] == "train" for p in ok):  # no training cases: fit on all, as the plan does
        samples = [sample(p) for p in ok if p["modality"] == "CT"]
    plan = fit_plan(ok, samples, params)
    phash = plan.hash()
    masks = {n: r.mask_path for n, r in enumerate(rows)}
    tasks = [{"prep": p, "plan": plan, "plan_hash": phash, "out": out, "cache": cache,
              "mask_path": masks.get(p["row"])} for p in ok]
    IngestDir(out).masks.mkdir(parents=True, exist_ok=True)  # a DVC output even when no case has a mask
    done = _map(cfg, _finalize, tasks, "preprocessing", progress)
    finals = {p["row"]: f for p, f in zip(ok, done)}
    remove_stale(IngestDir(out).tensors, {p["case_id"] for p in ok})
    remove_stale(IngestDir(out).masks, {p["case_id"] for p in ok})

    records = []
    for p, r, (label_source, manifest_label) in zip(prepared, rows, origin):
        f = finals.get(p["row"], {})
        status = f.get("status", p["status"])
        records.append({
            "case_id": r.case_id, "patient_id": r.patient_id, "split": r.split,
            "label": label_text(r.label), "modality": r.modality, "status": status,
            "reason_code": f.get("reason_code", p.get("reason_code", "")),
            "reason": f.get("reason", p.get("reason", "")),
            "source_format": p.get("source_format", ""), "manufacturer": p.get("manufacturer", ""),
            "native_shape": "x".join(map(str, p.get("native_shape", []))),
            "native_spacing": "x".join(f"{s:g}" for s in p.get("native_spacing", [])),
            "tensor": f"tensors/{r.case_id}.npy" if status == "ok" else "",
            "tensor_shape": "x".join(map(str, f.get("tensor_shape", []))), "source_hash": p.get("source_hash", ""),
            "label_source": label_source, "manifest_label": manifest_label,
        })
    if cfg.splits_file:
        write_splits(Path(cfg.splits_file), [r.__dict__ for r in rows if not r.problem])
    plan.counts = dict(Counter(f"{x['split']}/{x['status']}" for x in records))
    save_json(IngestDir(out).plan, plan.to_json())
    write_index(IngestDir(out).index, records)
    reasons = Counter(x["reason_code"] for x in records if x["status"] != "ok")
    summary = IngestSummary(
        n_rows=len(rows), n_ok=sum(x["status"] == "ok" for x in records),
        n_rejected=sum(x["status"] != "ok" for x in records), reasons=dict(reasons),
        n_cached=sum(bool(p.get("cached")) for p in prepared),
        n_reused=sum(bool(f.get("reused")) for f in finals.values()),
        seconds=time.perf_counter() - t0,
        by_modality=dict(Counter(f"{x['modality'] or '?'}:{x['status']}" for x in records)),
        splits=dict(Counter(x["split"] for x in records if x["status"] == "ok")),
    )
    save_json(IngestDir(out).summary, asdict(summary) | {"seconds": round(summary.seconds, 2)})
    if summary.n_rows and summary.n_rejected / summary.n_rows > cfg.max_rejected_fraction:
        raise IngestFailed(
            f"{summary.n_rejected} of {summary.n_rows} cases rejected, above ingest.max_rejected_fraction="
            f"{cfg.max_rejected_fraction}; see the reasons in {out / 'index.csv'} "
            "and fix the inputs or raise the limit")
    return summary


__all__ = ["run_ingest", "IngestSummary", "IngestFailed"]
