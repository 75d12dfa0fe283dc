"""Ingest stage: manifest -> normalized tensors + index.csv + plan.json.

Two passes, as nnU-Net does:
1. *prepare* (parallel, cached by source content): read each case (DICOM or NIfTI),
   check it, reorient it to RAS and keep a voxel sample for the dataset fingerprint;
2. *plan*: fit every preprocessing decision once, on training cases only, into plan.json;
3. *finalize* (parallel, skipped when the tensor for the same source and plan exists):
   resample, normalize, crop/pad, write one .npy (no pickle, memory-mappable) per case.
Every manifest row ends `ok` or `rejected` with a reason; no PHI reaches any output.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import IngestConfig, Params
from pipeline.errors import RejectedCase
from pipeline.manifest import CaseRow, read_manifest
from pipeline.plan import PLAN_VERSION, fit_plan, plan_hash
from pipeline.progress import progress_map
from pipeline.splits import assign_splits

READER_VERSION = "1"  # bump when reading/canonicalisation changes, to invalidate caches
SAMPLE_SIZE = 10_000
INDEX_COLUMNS = [
    "case_id", "patient_id", "split", "label", "modality", "status", "reason_code", "reason",
    "source_format", "manufacturer", "native_shape", "native_spacing", "tensor", "tensor_shape", "source_hash",
]


class IngestFailed(RuntimeError):
    """The stage as a whole failed (e.g. too many rejections); the index is still written."""


# ----------------------------------------------------------------------------- small helpers
def source_hash(path: Path) -> str:
    """Content hash of a file or of every file under a folder (names relative, sorted)."""
    h = hashlib.blake2b(digest_size=16)
    if path.is_file():
        files = [path]
        base = path.parent
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file())
        base = path
    for f in files:
        h.update(str(f.relative_to(base)).encode())
        h.update(b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-" + path.name)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)

    _atomic_write(path, write)


def save_json(path: Path, obj) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


# ----------------------------------------------------------------------------- pass 1: prepare
def read_case(path: Path, modality: str, cfg: IngestConfig, series_uid: str = ""):
    """Read one case into a native `Volume` and check it is a usable 3D scan."""
    from pipeline.io.dicom import read_dicom_series
    from pipeline.io.nifti import is_nifti, read_nifti

    if not path.exists():
        raise RejectedCase("missing_path", "the manifest path does not exist")
    if path.is_file() and is_nifti(path):
        volume = read_nifti(path)
    else:
        volume = read_dicom_series(path, series_uid=series_uid or None, min_slices=1,
                                   take_volume=cfg.take_volume)
        found = volume.meta.get("modality", "")
        if found in ("CT", "MR") and found != modality:
            raise RejectedCase("modality_mismatch", f"manifest says {modality} but the DICOM series is {found}")
    if volume.data.ndim == 4:
        if cfg.take_volume is None:
            raise RejectedCase("multi_volume", f"{volume.data.shape[3]} volumes (4D, e.g. fMRI/DWI); a 3D classifier "
                               "needs one: set ingest.take_volume to pick it")
        if not 0 <= cfg.take_volume < volume.data.shape[3]:
            raise RejectedCase("no_such_volume", f"ingest.take_volume={cfg.take_volume} but the image has "
                               f"{volume.data.shape[3]} volumes")
        volume.data = volume.data[..., cfg.take_volume]
    n_slices = min(volume.data.shape[:3])
    if n_slices < cfg.min_slices:
        raise RejectedCase("too_few_slices", f"{n_slices} slice(s), fewer than ingest.min_slices={cfg.min_slices}")
    bad = int(np.size(volume.data) - np.count_nonzero(np.isfinite(volume.data)))
    if bad:
        raise RejectedCase("non_finite", f"{bad} voxel(s) are NaN or infinite")
    if float(volume.data.max()) == float(volume.data.min()):
        raise RejectedCase("constant_image", "every voxel has the same value")
    return volume


def _prepare(task: dict) -> dict:
    """Worker: read + canonicalise one case, caching the result by content and reader settings."""
    from pipeline.preprocess import volume_to_canonical

    row: CaseRow = task["row"]
    cfg: IngestConfig = task["cfg"]
    cache: Path = task["cache"]
    result = {"case_id": row.case_id, "status": "rejected", "reason_code": "", "reason": ""}
    try:
        if row.problem:
            raise RejectedCase("bad_manifest_row", row.problem)
        if not row.path.exists():
            raise RejectedCase("missing_path", "the manifest path does not exist")
        if not os.access(row.path, os.R_OK):
            raise RejectedCase("unreadable_path", "the manifest path cannot be read (permissions)")
        try:
            digest = source_hash(row.path)
        except OSError as err:
            why = err.strerror or type(err).__name__
            raise RejectedCase("unreadable_path", f"cannot read the input ({why})") from None
        key = hashlib.blake2b(
            json.dumps([digest, READER_VERSION, row.modality, row.series_uid, cfg.take_volume, cfg.min_slices,
                        cfg.ct.foreground_hu]).encode(), digest_size=16).hexdigest()
        result["source_hash"] = digest
        meta_path = cache / f"{key}.json"
        if meta_path.exists():
            cached = json.loads(meta_path.read_text())
            if cached["status"] == "ok" and not (cache / f"{key}.npy").exists():
                cached = None
            if cached:
                cached.update(case_id=row.case_id, cached=True)
                return cached
        try:
            volume = read_case(row.path, row.modality, cfg, row.series_uid)
            fill = -1024.0 if row.modality == "CT" else float(volume.data.min())
            data, affine = volume_to_canonical(volume, fill=fill)
        except RejectedCase as err:
            out = dict(result, reason_code=err.code, reason=err.reason, key=key)
            save_json(meta_path, out)
            return out
        rng = np.random.default_rng(int(digest[:8], 16))
        flat = data.ravel()
        fg = flat[flat > cfg.ct.foreground_hu] if row.modality == "CT" else flat
        sample = rng.choice(fg, size=min(SAMPLE_SIZE, fg.size), replace=False) if fg.size else flat[:0]
        save_npy(cache / f"{key}.npy", data)
        save_npy(cache / f"{key}.sample.npy", sample.astype(np.float32))
        out = dict(
            result, status="ok", key=key,
            native_shape=list(volume.data.shape[:3]), native_spacing=[round(s, 4) for s in volume.spacing],
            native_affine=volume.affine.tolist(), canonical_affine=affine.tolist(), canonical_shape=list(data.shape),
            source_format=volume.meta.get("source_format", ""), manufacturer=volume.meta.get("manufacturer", ""),
            notes=volume.meta.get("notes", []),
        )
        save_json(meta_path, out)
        return out
    except RejectedCase as err:
        return dict(result, reason_code=err.code, reason=err.reason)
    except Exception as err:  # noqa: BLE001 - one broken scan must never kill the run
        return dict(result, reason_code="unexpected_error", reason=f"{type(err).__name__}: {str(err)[:200]}")


# ----------------------------------------------------------------------------- pass 3: finalize
def preprocess_canonical(data: np.ndarray, affine: np.ndarray, modality: str, plan: dict
                         ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Apply a plan to one RAS-canonical volume: resample, normalize, crop/pad (or resize).

    Pure: the same inputs give the same tensor. `resdx predict` calls this with the
    registered model's plan, so inference sees exactly the training preprocessing.
    """
    from pipeline import preprocess as pp

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    shape = tuple(plan["shape"])
    if plan["fit"] == "resize":
        new_shape = shape
    else:
        new_shape = pp.target_shape(data.shape, spacing, plan["target_spacing"])
    out, aff, rinfo = pp.resample(data, affine, new_shape, plan["anisotropy_threshold"])
    stats: dict = {"resampling": rinfo}
    if modality == "CT":
        ct = plan["ct"]
        out = pp.ct_normalize(out, ct["window"], ct["mean"], ct["std"])
        fill = float(pp.ct_normalize(np.array([-1024.0]), ct["window"], ct["mean"], ct["std"])[0])
    else:
        out, mstats = pp.mr_normalize(out, plan["mr"]["clip_percentiles"])
        stats["mr"] = mstats
        fill = float(out.min())
    if out.shape != shape:
        out, aff = pp.crop_or_pad(out, aff, shape, fill)
    return out, aff, stats


def to_slices(volume: np.ndarray, mode: str, n: int) -> tuple[np.ndarray, list[int]]:
    """2D/2.5D: axial slices (k axis) as (S, C, X, Y); C = 1 (2d) or 3 neighbours (2.5d)."""
    depth = volume.shape[2]
    idx = list(range(depth)) if n <= 0 or n >= depth else [int(round(v)) for v in np.linspace(0, depth - 1, n)]
    if mode == "2d":
        stack = np.stack([volume[:, :, k][None] for k in idx])
    else:
        stack = np.stack([np.stack([volume[:, :, min(max(k + d, 0), depth - 1)] for d in (-1, 0, 1)]) for k in idx])
    return stack.astype(np.float32), idx


def _finalize(task: dict) -> dict:
    prep, plan, phash, out_dir, cache = task["prep"], task["plan"], task["plan_hash"], task["out"], task["cache"]
    case_id = prep["case_id"]
    tensor_path = out_dir / "tensors" / f"{case_id}.npy"
    side_path = out_dir / "tensors" / f"{case_id}.json"
    key = hashlib.blake2b(f"{prep['key']}:{phash}".encode(), digest_size=16).hexdigest()
    try:
        if tensor_path.exists() and side_path.exists() and json.loads(side_path.read_text()).get("key") == key:
            shape = list(load_npy(tensor_path).shape)
            return {"case_id": case_id, "status": "ok", "reused": True, "tensor_shape": shape}
        data = load_npy(cache / f"{prep['key']}.npy", mmap=False)
        affine = np.array(prep["canonical_affine"])
        tensor, t_aff, stats = preprocess_canonical(data, affine, prep["modality"], plan)
        sidecar = {
            "case_id": case_id, "key": key, "plan_hash": phash, "modality": prep["modality"],
            "native_shape": prep["native_shape"], "native_affine": prep["native_affine"],
            "tensor_affine": t_aff.tolist(), "tensor_shape": list(tensor.shape), "stats": stats,
        }
        if plan["mode"] != "3d":
            tensor, idx = to_slices(tensor, plan["mode"], plan["slices_per_case"])
            sidecar.update(slice_index=idx, layout="S,C,X,Y")
        else:
            tensor = tensor[None]  # channel first: (1, X, Y, Z)
            sidecar["layout"] = "C,X,Y,Z"
        save_npy(tensor_path, tensor)
        save_json(side_path, sidecar)
        return {"case_id": case_id, "status": "ok", "reused": False, "tensor_shape": list(tensor.shape)}
    except Exception as err:  # noqa: BLE001 - one broken case must never kill the run
        return {"case_id": case_id, "status": "rejected", "reason_code": "preprocess_failed",
                "reason": f"{type(err).__name__}: {str(err)[:200]}"}


# ----------------------------------------------------------------------------- the stage
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


def run_ingest(params: Params, manifest: Path | str | None = None, out_dir: Path | str | None = None,
               cache_dir: Path | str | None = None, progress: bool = True) -> IngestSummary:
    """Run the whole stage; writes OUT/index.csv, OUT/plan.json, OUT/tensors/<case_id>.{npy,json}."""
    t0 = time.perf_counter()
    cfg = params.ingest
    manifest = Path(manifest or params.data.manifest)
    out = Path(out_dir or cfg.out_dir)
    cache = Path(cache_dir or cfg.cache_dir) / "prepared"
    rows = read_manifest(manifest)
    valid = [r for r in rows if not r.problem]
    _fill_splits(rows, valid, params)
    tasks = [{"row": r, "cfg": cfg, "cache": cache} for r in rows]
    prepared = progress_map(_prepare, tasks, cfg.workers, "reading", progress)
    for n, (p, r) in enumerate(zip(prepared, rows)):
        # Rows are tracked by position: a duplicated case_id must not overwrite its first row.
        p.update(row=n, modality=r.modality, split=r.split, label=r.label)

    ok = [p for p in prepared if p["status"] == "ok"]
    plan = fit_plan(ok, cache, params)
    phash = plan_hash(plan)
    tasks = [{"prep": p, "plan": plan, "plan_hash": phash, "out": out, "cache": cache} for p in ok]
    done = progress_map(_finalize, tasks, cfg.workers, "preprocessing", progress)
    finals = {p["row"]: f for p, f in zip(ok, done)}
    _remove_stale(out, {p["case_id"] for p in ok})

    records = []
    for p, r in zip(prepared, rows):
        f = finals.get(p["row"], {})
        status = f.get("status", p["status"])
        records.append({
            "case_id": r.case_id, "patient_id": r.patient_id, "split": r.split,
            "label": "" if r.label is None else r.label, "modality": r.modality, "status": status,
            "reason_code": f.get("reason_code", p.get("reason_code", "")),
            "reason": f.get("reason", p.get("reason", "")),
            "source_format": p.get("source_format", ""), "manufacturer": p.get("manufacturer", ""),
            "native_shape": "x".join(map(str, p.get("native_shape", []))),
            "native_spacing": "x".join(f"{s:g}" for s in p.get("native_spacing", [])),
            "tensor": f"tensors/{r.case_id}.npy" if status == "ok" else "",
            "tensor_shape": "x".join(map(str, f.get("tensor_shape", []))), "source_hash": p.get("source_hash", ""),
        })
    if cfg.splits_file:
        write_splits(Path(cfg.splits_file), [r.__dict__ for r in rows if not r.problem])
    plan["counts"] = dict(Counter(f"{x['split']}/{x['status']}" for x in records))
    save_json(out / "plan.json", plan)
    _write_index(out / "index.csv", records)
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
    save_json(out / "summary.json", asdict(summary) | {"seconds": round(summary.seconds, 2)})
    if summary.n_rows and summary.n_rejected / summary.n_rows > cfg.max_rejected_fraction:
        raise IngestFailed(
            f"{summary.n_rejected} of {summary.n_rows} cases rejected, above ingest.max_rejected_fraction="
            f"{cfg.max_rejected_fraction}; see the reasons in {out / 'index.csv'} "
            "and fix the inputs or raise the limit")
    return summary


def _fill_splits(rows: list[CaseRow], valid: list[CaseRow], params: Params) -> None:
    """Give rows without a split a patient-level, label-stratified one (manifest splits win)."""
    todo = [r for r in valid if not r.split]
    if not todo:
        return
    given = {r.patient_id: r.split for r in valid if r.split}
    free = [r for r in todo if r.patient_id not in given]
    names = assign_splits([r.patient_id for r in free], [r.label or 0 for r in free],
                          params.split.val_fraction, params.split.test_fraction, params.seed)
    chosen = {r.case_id: s for r, s in zip(free, names)}
    for i, r in enumerate(rows):
        if r in todo:
            split = given.get(r.patient_id) or chosen[r.case_id]
            rows[i] = CaseRow(**{**r.__dict__, "split": split})
    valid[:] = [r for r in rows if not r.problem]


def write_splits(path: Path, rows: list[dict]) -> None:
    """The split of every valid row, for review and reuse (put it in the manifest's `split` to pin it)."""
    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["case_id", "patient_id", "label", "split"])
            for r in rows:
                w.writerow([r["case_id"], r["patient_id"], r["label"], r["split"]])

    _atomic_write(path, write)


def _remove_stale(out: Path, keep: set[str]) -> None:
    folder = out / "tensors"
    if not folder.exists():
        return
    for f in folder.iterdir():
        stem = f.name.removesuffix(".npy").removesuffix(".json")
        if f.name.startswith(".tmp-") or stem not in keep:
            f.unlink(missing_ok=True)


def _write_index(path: Path, records: list[dict]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=INDEX_COLUMNS)
            w.writeheader()
            w.writerows(records)

    _atomic_write(path, write)


__all__ = ["run_ingest", "preprocess_canonical", "read_case", "IngestSummary", "IngestFailed", "PLAN_VERSION"]
