"""Build a hostile corpus of tiny files and ingest it: every case must end with its own specific reason.

    ulimit -v 3000000; .venv/bin/python benchmarks/hostile_corpus.py --out /tmp/hostile
    .venv/bin/python benchmarks/hostile_corpus.py --out /tmp/hostile --large   # + a 600 x 512^2 CT

The corpus is built here, from nothing (pydicom, nibabel, zlib): files of a few KB that claim
gigabytes (65535^2 matrices, a 1024^3 NIfTI, a deflate bomb), invalid geometry (mirrored, sheared,
non-unit, zero or NaN), damaged and truncated slices, FIFOs, colour secondary captures, duplicated
SOP instances, non-finite rescales, PHI in file names, and hostile manifest rows (path-escaping and
formula ids, impossible labels). It then runs the real ingest stage on it (default settings but one
worker, no rejection ceiling) and prints one line per case: expected and actual reason code, and the
time; then the peak RSS of the worker processes. It exits 1 if any case ends other than expected.
`tests/test_hostile_corpus.py` runs it under `ulimit -v`.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import os
import resource
import sys
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


# ----------------------------------------------------------------------------- DICOM builders
def _meta(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    return meta


def ct_slice(series_uid: str, k: int, n: int = 32, *, ipp=None, iop=AXIAL, spacing=("0.8", "0.8"),
             pixels: np.ndarray | None = None, **tags) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(k)])
    ds.SeriesInstanceUID = series_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[series_uid, "study"])
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 2, k + 1
    ds.PatientName = "Doe^Jane"
    ds.ImagePositionPatient = list(ipp) if ipp is not None else [-12.0, -12.0, 2.5 * k]
    ds.ImageOrientationPatient = list(iop)
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = "2.5"
    ds.Rows = ds.Columns = n
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    if pixels is None:
        pixels = np.random.default_rng(k).integers(0, 2000, (n, n))
    ds.PixelData = pixels.astype("<i2").tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.file_meta = _meta(ds)
    return ds


def ct_series(folder: Path, n_slices: int = 8, n: int = 32, edit=None, syntax: str = ExplicitVRLittleEndian,
              **tags) -> list[Path]:
    """A CT series; `edit(k, ds)` may change slice k's header before it is written."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid(entropy_srcs=[str(folder.name), "series"])
    out = []
    for k in range(n_slices):
        ds = ct_slice(uid, k, n, **tags)
        if edit is not None:
            edit(k, ds)
        ds.file_meta.TransferSyntaxUID = syntax
        path = folder / f"IM{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def deflate_bomb(path: Path, inflated_bytes: int) -> None:
    """A deflated CT file whose pixel data of zeros inflates to `inflated_bytes` (written in streaming)."""
    ds = ct_slice(generate_uid(entropy_srcs=["bomb"]), 0, 32)
    del ds.PixelData
    side = int((inflated_bytes // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    body = io.BytesIO()
    from pydicom.filebase import DicomFileLike

    fp = DicomFileLike(body)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    n = side * side * 2
    body.write(b"\xe0\x7f\x10\x00OW\x00\x00" + n.to_bytes(4, "little"))
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    meta = io.BytesIO()
    ds.file_meta = _meta(ds, DeflatedExplicitVRLittleEndian)
    from pydicom.filewriter import write_file_meta_info

    mfp = DicomFileLike(meta)
    mfp.is_little_endian, mfp.is_implicit_VR = True, False
    write_file_meta_info(mfp, ds.file_meta, enforce_standard=True)
    with path.open("wb") as fh:
        fh.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        fh.write(deflater.compress(body.getvalue()))
        zeros = b"\0" * (1 << 20)
        for _ in range(n // len(zeros)):
            fh.write(deflater.compress(zeros))
        fh.write(deflater.compress(b"\0" * (n % len(zeros))))
        fh.write(deflater.flush())


def rgb_secondary_capture(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["rgb"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["rgb", "series"])
    ds.Modality = "OT"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.random.default_rng(0).integers(0, 255, (16, 16, 3)).astype(np.uint8).tobytes()
    ds.file_meta = _meta(ds)
    ds.save_as(folder / "SC.dcm", enforce_file_format=True)


# ----------------------------------------------------------------------------- NIfTI builders
def nifti(path: Path, affine) -> None:
    """An uncompressed .nii whose sform (code 1, qform code 0) is `affine`, written into the header bytes
    (nibabel rewrites the sform from the image's affine on save, and will not compute with NaN)."""
    data = np.random.default_rng(1).uniform(0, 100, (12, 12, 12)).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_qform(None, code=0)
    nib.save(img, path)
    hdr = nib.Nifti1Header.from_fileobj(path.open("rb"))
    affine = np.asarray(affine, dtype=np.float32)
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = affine[0], affine[1], affine[2]
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    with path.open("r+b") as fh:
        fh.write(hdr.binaryblock)


def nifti_header_only(path: Path, shape, dtype=np.float32, zeros: int = 0) -> None:
    """A .nii.gz whose header claims `shape` but holds only `zeros` bytes of data."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_sform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    hdr["vox_offset"] = 352  # data would start right after the header and its 4 extension bytes
    blob = hdr.binaryblock + b"\0" * 4
    with gzip.open(path, "wb") as fh:
        fh.write(blob)
        chunk = b"\0" * (1 << 20)
        for _ in range(zeros // len(chunk)):
            fh.write(chunk)


# ----------------------------------------------------------------------------- the corpus
def _set(**values):
    def edit(k, ds):
        for key, value in values.items():
            setattr(ds, key, value)
    return edit


def build(root: Path, large: bool = False) -> list[dict]:
    """Write the corpus under `root`; returns manifest rows, each with the reason code it must end with."""
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    cases: list[tuple[str, str, str, str]] = []  # (case_id, path, expected code, modality)

    def dicom(case_id: str, code: str, **kw) -> Path:
        ct_series(d / case_id, **kw)
        cases.append((case_id, str(d / case_id), code, "CT"))
        return d / case_id

    dicom("good_ct", "")
    dicom("good_ct_2", "")
    # 1. size claims
    dicom("huge_matrix", "too_large", edit=_set(Rows=65535, Columns=65535))
    dicom("spacing_2000mm", "too_large", spacing=("2000", "2000"))
    (d / "deflate_bomb").mkdir()
    deflate_bomb(d / "deflate_bomb" / "IM0000.dcm", 2 * 2**30)
    cases.append(("deflate_bomb", str(d / "deflate_bomb"), "too_large", "CT"))
    nifti_header_only(d / "claims_1024cubed.nii.gz", (1024, 1024, 1024))
    cases.append(("nifti_claims_1024", str(d / "claims_1024cubed.nii.gz"), "too_large", "MR"))
    nifti_header_only(d / "zeros_bomb.nii.gz", (2048, 2048, 512), np.float32, zeros=256 << 20)
    cases.append(("nifti_gzip_of_zeros", str(d / "zeros_bomb.nii.gz"), "too_large", "MR"))
    # 2-3. geometry
    dicom("near_parallel_iop", "bad_orientation", iop=[1, 0, 0, 0.9999, 0.0141, 0])
    dicom("non_unit_iop", "bad_orientation", iop=[10, 0, 0, 0, 10, 0])
    dicom("zero_iop", "bad_orientation", iop=[0, 0, 0, 0, 0, 0])
    dicom("nan_position", "bad_position", edit=lambda k, ds: k == 3 and setattr(
        ds, "ImagePositionPatient", ["NaN", "0", "0"]))
    dicom("negative_spacing", "bad_pixel_spacing", spacing=("-0.8", "-0.8"))
    dicom("zero_spacing", "bad_pixel_spacing", spacing=("0", "0"))
    dicom("nan_spacing", "bad_pixel_spacing", spacing=("NaN", "NaN"))
    dicom("one_bit", "unsupported_bits", edit=_set(BitsAllocated=1, BitsStored=1, HighBit=0))
    nifti(d / "nan_affine.nii", affine=np.full((4, 4), np.nan))
    cases.append(("nifti_nan_affine", str(d / "nan_affine.nii"), "bad_affine", "MR"))
    nifti(d / "zero_affine.nii", affine=np.zeros((4, 4)))
    cases.append(("nifti_zero_affine", str(d / "zero_affine.nii"), "bad_affine", "MR"))
    # 4. damaged slices
    files = ct_series(d / "last_file_cut_300", 8)
    files[-1].write_bytes(files[-1].read_bytes()[:300])
    cases.append(("last_file_cut_300", str(d / "last_file_cut_300"), "damaged_file", "CT"))
    files = ct_series(d / "pixels_cut", 8)
    files[4].write_bytes(files[4].read_bytes()[:-600])
    cases.append(("pixels_cut", str(d / "pixels_cut"), "truncated", "CT"))
    (d / "garbled").mkdir()
    (d / "garbled" / "IM0000.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(2000))
    cases.append(("garbled", str(d / "garbled"), "damaged_file", "CT"))
    # 5. special files
    ct_series(d / "fifo_in_series", 8)
    os.mkfifo(d / "fifo_in_series" / "pipe")
    cases.append(("fifo_in_series", str(d / "fifo_in_series"), "", "CT"))
    os.mkfifo(d / "a_fifo.nii")
    cases.append(("fifo_as_path", str(d / "a_fifo.nii"), "not_a_file", "MR"))
    # 9. PHI in a file name
    (d / "ZZ_Doe_Jane_19010203.nii.gz").write_bytes(b"not gzip at all")
    cases.append(("phi_named_garbage", str(d / "ZZ_Doe_Jane_19010203.nii.gz"), "bad_nifti", "MR"))
    # 10. non-finite rescale
    dicom("nan_slope", "non_finite", edit=_set(RescaleSlope="NaN"))
    dicom("huge_slope", "non_finite", edit=_set(RescaleSlope="1e38"))
    # 13. real-export quirks
    folder = dicom("duplicate_sop", "")
    (folder / "copy_of_IM0003.dcm").write_bytes((folder / "IM0003.dcm").read_bytes())
    import pydicom

    copy = pydicom.dcmread(folder / "IM0005.dcm")
    copy.compress(RLELossless, generate_instance_uid=False)  # the same instance again, in another transfer syntax
    copy.save_as(folder / "IM0005_rle.dcm", enforce_file_format=True)
    folder = dicom("conflicting_duplicate", "conflicting_duplicates")
    other = pydicom.dcmread(folder / "IM0002.dcm")
    other.PixelData = np.zeros((32, 32), "<i2").tobytes()
    other.save_as(folder / "IM0002_other.dcm", enforce_file_format=True)
    rgb_secondary_capture(d / "rgb_secondary_capture")
    cases.append(("rgb_secondary_capture", str(d / "rgb_secondary_capture"), "colour_image", "CT"))
    if large:
        ct_series(d / "large_ct_600x512", 600, 512)
        cases.append(("large_ct_600x512", str(d / "large_ct_600x512"), "", "CT"))

    rows = [{"case_id": c, "patient_id": f"P{i:03d}", "modality": m, "path": p, "label": str(i % 2),
             "split": "train", "expected": code} for i, (c, p, code, m) in enumerate(cases)]
    # 6-8. hostile manifest rows
    good = str(d / "good_ct")
    for i, (case_id, label) in enumerate([("../../escape", "0"), ("/abs/path", "1"), ("a/b", "0"),
                                          ("=1+2*cmd", "1"), ("@SUM(1)", "0"), ("ok_id_bad_label", "7"),
                                          ("inf_label", "inf"), ("fraction_label", "1.7"), ("neg_label", "-1")]):
        rows.append({"case_id": case_id, "patient_id": f"M{i:03d}", "modality": "CT", "path": good, "label": label,
                     "split": "train", "expected": "bad_manifest_row"})
    with (root / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["case_id", "patient_id", "modality", "path", "label", "split"],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return rows


def run(root: Path, large: bool = False) -> dict:
    from pipeline.config import params_from_dict
    from pipeline.io.index import read_index
    from pipeline.stages.ingest import run_ingest

    t0 = time.perf_counter()
    rows = build(root, large)
    built = time.perf_counter() - t0
    params = params_from_dict({"seed": 0, "ingest": {
        "out_dir": str(root / "out"), "cache_dir": str(root / "cache"), "splits_file": None, "workers": 1,
        "max_rejected_fraction": 1.0, "spacing": [3.0, 3.0, 3.0], "shape": [16, 16, 16]}})
    t1 = time.perf_counter()
    summary = run_ingest(params, manifest=root / "manifest.csv", progress=False)
    seconds = time.perf_counter() - t1
    index = read_index(root / "out")
    outcomes = []
    for want, got in zip(rows, index):
        outcomes.append({"case_id": got["case_id"], "expected": want["expected"], "status": got["status"],
                         "reason_code": got["reason_code"], "reason": got["reason"],
                         "match": got["reason_code"] == want["expected"]})
    escaped = [p for p in root.rglob("*") if "escape" in p.name or p.name == "b.npy"]
    return {"cases": outcomes, "n": len(rows), "n_index_rows": len(index), "build_s": round(built, 2),
            "ingest_s": round(seconds, 2), "summary_reasons": summary.reasons,
            "peak_worker_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            "peak_self_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "address_space_limit": resource.getrlimit(resource.RLIMIT_AS)[0],
            "escaped_files": [str(p) for p in escaped]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="an empty folder for the corpus and the ingest output")
    ap.add_argument("--large", action="store_true", help="add a legitimate 600 x 512^2 CT (300 MB on disk)")
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args.out, args.large)
    for c in result["cases"]:
        mark = "ok  " if c["match"] else "FAIL"
        print(f"{mark} {c['case_id'][:26]:<26} expected {c['expected'] or 'ok':<22} got "
              f"{c['reason_code'] or c['status']:<22} {c['reason'][:90]}")
    limit = result["address_space_limit"]
    print(f"{result['n']} cases ({result['n_index_rows']} index rows), ingest {result['ingest_s']} s; peak worker "
          f"RSS {result['peak_worker_rss_mib']} MiB, parent {result['peak_self_rss_mib']} MiB; ulimit -v "
          f"{'unlimited' if limit < 0 else f'{limit / 2**20:.0f} MiB'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    ok = all(c["match"] for c in result["cases"]) and result["n"] == result["n_index_rows"] \
        and not result["escaped_files"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
