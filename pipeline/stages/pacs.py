"""PACS commands: load a folder of DICOM into a DICOMweb server (STOW-RS), and point a manifest at it.

`resdx pacs push data/demo` stores every DICOM file under the folder (in batches of `pacs.store_batch`);
other files (the demo's NIfTI MR studies, CSVs) are counted and left alone: a PACS stores DICOM.
With a manifest, it also writes a copy whose DICOM-folder rows read ``dicomweb:<StudyInstanceUID>``,
so `resdx ingest` takes the same cohort from the server (NIfTI rows keep their local paths).
The summary holds counts only; the rewritten manifest holds the UIDs, like any manifest holds paths.
"""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path

from pipeline.config import PacsConfig
from pipeline.errors import ManifestError, RejectedCase
from pipeline.io.artifacts import save_dict_csv
from pipeline.io.dicom_checks import read_head, starts_as_dicom
from pipeline.io.dicom_files import iter_candidate_files, read_header

BATCH_BYTES = 256 << 20  # a STOW-RS request's payload at most (besides pacs.store_batch instances)


def _dicom_files(folder: Path) -> tuple[list[Path], int]:
    files, other = [], 0
    for f in iter_candidate_files(folder):
        try:
            dicom = starts_as_dicom(read_head(f))
        except OSError:
            dicom = False
        if dicom:
            files.append(f)
        else:
            other += 1
    return files, other


def push_folder(folder: Path | str, cfg: PacsConfig, progress: bool = True) -> dict:
    """STOW-RS every DICOM file under `folder`; {n_files, n_stored, n_failed, n_other, n_studies, seconds}.

    A refused batch is counted as failed with its reason and the push goes on with the next batch.
    """
    from pydicom import dcmread
    from rich.progress import Progress

    from pipeline.sources.dicomweb import store

    t0 = time.perf_counter()
    files, other = _dicom_files(Path(folder))
    stored, failed, reasons, studies = 0, 0, {}, set()
    batch, size = [], 0
    with Progress(disable=not progress) as bar:
        job = bar.add_task("[bold]storing", total=len(files))

        def flush():
            nonlocal stored, failed, batch, size
            if batch:
                try:
                    stored += store(batch, cfg)
                except RejectedCase as err:
                    failed += len(batch)
                    reasons[err.code] = reasons.get(err.code, 0) + len(batch)
                bar.update(job, advance=len(batch))
            batch, size = [], 0

        for f in files:
            ds = dcmread(f)
            studies.add(str(ds.get("StudyInstanceUID", "")))
            batch.append(ds)
            size += f.stat().st_size
            if len(batch) >= cfg.store_batch or size >= BATCH_BYTES:
                flush()
        flush()
    return {"n_files": len(files), "n_stored": stored, "n_failed": failed, "failed_reasons": reasons,
            "n_other": other, "n_studies": len(studies - {""}), "seconds": round(time.perf_counter() - t0, 2)}


def list_studies(cfg: PacsConfig, limit: int = 1000) -> list[dict]:
    """The server's studies: StudyInstanceUID, modalities, number of instances (no patient attributes)."""
    from pipeline.sources.dicomweb import client, rejected_for

    fields = ["StudyInstanceUID", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"]
    try:
        found = client(cfg).search_for_studies(fields=fields, limit=limit)
    except Exception as err:  # noqa: BLE001 - mapped to a specific reason
        raise rejected_for(err) from None

    def value(item: dict, tag: str) -> list:
        return (item.get(tag) or {}).get("Value") or []

    return [{"study_uid": str((value(s, "0020000D") or [""])[0]), "modalities": [str(m) for m in value(s, "00080061")],
             "n_instances": int((value(s, "00201208") or [0])[0])} for s in found]


def _study_uid(path: Path) -> str | None:
    """The StudyInstanceUID of the first DICOM file under a folder; None for NIfTI files or empty folders."""
    if not path.is_dir():
        return None
    for f in iter_candidate_files(path):
        ds = read_header(f)
        if ds is not None and "StudyInstanceUID" in ds:
            return str(ds.StudyInstanceUID)
    return None


def remote_manifest(manifest: Path | str, out: Path | str) -> dict:
    """Write `out`: `manifest` with each DICOM-folder row's path as ``dicomweb:<StudyInstanceUID>``.

    Other columns stay as they are; local paths are rewritten relative to `out`'s folder.
    """
    manifest, out = Path(manifest), Path(out)
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"cannot read {manifest}: {type(err).__name__}") from None
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    if not rows or "path" not in rows[0]:
        raise ManifestError(f"{manifest}: no rows, or no 'path' column")
    remote = 0
    for r in rows:
        p = Path(r["path"]) if os.path.isabs(r["path"]) else manifest.parent / r["path"]
        uid = _study_uid(p)
        if uid:
            r["path"], remote = f"dicomweb:{uid}", remote + 1
        else:
            r["path"] = os.path.relpath(p.resolve(), out.parent.resolve())
        for col in ("mask_path",):
            if r.get(col):
                m = Path(r[col]) if os.path.isabs(r[col]) else manifest.parent / r[col]
                r[col] = os.path.relpath(m.resolve(), out.parent.resolve())
    out.parent.mkdir(parents=True, exist_ok=True)
    save_dict_csv(out, list(rows[0]), rows)
    return {"n_rows": len(rows), "n_remote": remote, "manifest": str(out)}


__all__ = ["push_folder", "remote_manifest", "list_studies"]
