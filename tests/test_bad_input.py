"""Bad inputs end as `rejected` rows of index.csv with a specific reason; good cases beside them stay `ok`.

One manifest mixes good cases with every kind of broken input built here from real files (pydicom CT
series, nibabel NIfTI). Each row's expected outcome is stated once, in EXPECTED.
"""

from __future__ import annotations

import csv
import json
import os
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import AXIAL, CORONAL, file_meta, ingest_params, read_index, write_ct_series
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pipeline.core.plan import ReaderSettings
from pipeline.errors import IngestFailed
from pipeline.io.index import INDEX_COLUMNS
from pipeline.io.reader import read_case
from pipeline.stages.ingest import run_ingest

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
MANIFEST_COLUMNS = ["case_id", "patient_id", "modality", "path", "label", "split"]
# Ingest params of these tests: helpers.ingest_params at 3 mm / 16^3, one worker, no rejection ceiling.
_params = partial(ingest_params, seed=0, workers=1, min_slices=3, spacing=[3.0, 3.0, 3.0], shape=[16, 16, 16],
                  max_rejected_fraction=1.0)


# ----------------------------------------------------------------------------- builders
def write_basic_text_sr(folder: Path) -> Path:
    """A Basic Text SR document: a valid DICOM object with no image in it."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(folder), "sr"])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(folder), "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(folder), "series"])
    ds.Modality = "SR"
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator = "18748-4", "LN"
    concept.CodeMeaning = "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = [concept]
    item = Dataset()
    item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", "No acute findings."
    ds.ContentSequence = [item]
    ds.file_meta = file_meta(ds)
    path = folder / "SR0001.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_nifti(path: Path, data: np.ndarray, spacing: float = 2.0) -> Path:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, path)
    return path


def _random_volume(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 100.0, shape).astype(np.float32)


def write_manifest(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({"label": "0", "split": "train", **r})
    return path


def _prepared_records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "cache" / "prepared").glob("*.json"))]


def _can_read_folder(folder: Path) -> bool:
    """Whether this process can really list and read `folder` (root ignores permission bits)."""
    try:
        return all(p.read_bytes() is not None for p in folder.iterdir())
    except PermissionError:
        return False


# ----------------------------------------------------------------------------- the mixed cohort
# case_id -> (status, reason_code, text the reason must contain). reason_code None: any specific code.
EXPECTED = {
    "good_ct_a": ("ok", "", ""),
    "good_ct_b": ("ok", "", ""),
    "good_mr": ("ok", "", ""),
    "truncated_file": ("rejected", "truncated", "pixel data"),
    "no_pixeldata_middle": ("rejected", "missing_pixel_data", "no pixel data"),
    "no_pixeldata_last": ("rejected", "missing_pixel_data", "no pixel data"),
    "sr_only": ("rejected", "no_images", "no pixel data"),
    "mixed_orientations": ("ok", "", ""),
    "mixed_orientations_small": ("rejected", "too_few_slices", "min_slices=3"),
    "nifti_nan": ("rejected", "non_finite", "NaN"),
    "nifti_4d": ("rejected", "multi_volume", "take_volume"),
    "empty_folder": ("rejected", "empty", "no files"),
    "nonexistent": ("rejected", "missing_path", "does not exist"),
    "missing_slice": ("rejected", "missing_slice", "missing"),
    "duplicate_positions": ("rejected", "duplicate_positions", "duplicate"),
    "gantry_tilt": ("ok", "", ""),
    "too_few_slices": ("rejected", "too_few_slices", "2 slice(s)"),
    "bad_label": ("rejected", "bad_manifest_row", "label"),
    "bad_modality": ("rejected", "bad_manifest_row", "modality"),
    "modality_mismatch": ("rejected", "modality_mismatch", "manifest says MR"),
    # "no_permission" and the duplicated "good_ct_a" row are checked in their own tests.
}


def _build_cohort(root: Path) -> list[dict]:
    d = root / "data"
    write_ct_series(d / "good_ct_a", n=6, seed=1)
    write_ct_series(d / "good_ct_b", n=5, seed=2, spacing=3.0)
    write_nifti(d / "good_mr.nii.gz", _random_volume((12, 12, 8), 3))

    files = write_ct_series(d / "truncated_file", n=6, seed=4)
    whole = files[2].read_bytes()
    files[2].write_bytes(whole[: len(whole) // 2])  # the cut lands inside PixelData

    for name, victim in (("no_pixeldata_middle", 2), ("no_pixeldata_last", -1)):
        files = write_ct_series(d / name, n=6, seed=5)
        ds = pydicom.dcmread(files[victim])
        del ds.PixelData
        ds.save_as(files[victim], enforce_file_format=True)

    write_basic_text_sr(d / "sr_only")

    write_ct_series(d / "mixed_orientations", n=6, iop=AXIAL, prefix="AX", seed=6)
    write_ct_series(d / "mixed_orientations", n=4, iop=CORONAL, prefix="COR", series_number=3, seed=7)
    write_ct_series(d / "mixed_orientations_small", n=2, iop=AXIAL, prefix="AX", seed=8)
    write_ct_series(d / "mixed_orientations_small", n=2, iop=CORONAL, prefix="COR", series_number=3, seed=9)

    nan = _random_volume((12, 12, 8), 10)
    nan[3, 4, 5] = np.nan
    write_nifti(d / "nifti_nan.nii.gz", nan)
    write_nifti(d / "nifti_4d.nii.gz", _random_volume((12, 12, 8, 3), 11))

    (d / "empty_folder").mkdir()
    files = write_ct_series(d / "missing_slice", n=7, seed=12)
    files[3].unlink()
    positions = [np.array([-30.0, -30.0, 2.5 * k]) for k in range(5)]
    positions.insert(3, positions[2])  # the same slice position twice
    write_ct_series(d / "duplicate_positions", positions=positions, seed=13)
    write_ct_series(d / "gantry_tilt", n=6, step=(0.0, 0.6, 2.5), seed=14)  # ~13.5 degrees of shear
    write_ct_series(d / "too_few_slices", n=2, seed=15)
    write_ct_series(d / "modality_mismatch", n=5, seed=16)
    write_ct_series(d / "no_permission", n=5, seed=17)
    os.chmod(d / "no_permission", 0)

    rows = [
        {"case_id": "good_ct_a", "patient_id": "P01", "modality": "CT", "path": "data/good_ct_a", "label": "0"},
        {"case_id": "good_ct_b", "patient_id": "P02", "modality": "CT", "path": "data/good_ct_b", "label": "1"},
        {"case_id": "good_mr", "patient_id": "P03", "modality": "MR", "path": "data/good_mr.nii.gz",
         "label": "1", "split": "val"},
        {"case_id": "truncated_file", "patient_id": "P04", "modality": "CT", "path": "data/truncated_file"},
        {"case_id": "no_pixeldata_middle", "patient_id": "P05", "modality": "CT", "path": "data/no_pixeldata_middle"},
        {"case_id": "no_pixeldata_last", "patient_id": "P06", "modality": "CT", "path": "data/no_pixeldata_last"},
        {"case_id": "sr_only", "patient_id": "P07", "modality": "CT", "path": "data/sr_only"},
        {"case_id": "mixed_orientations", "patient_id": "P08", "modality": "CT", "path": "data/mixed_orientations"},
        {"case_id": "mixed_orientations_small", "patient_id": "P09", "modality": "CT",
         "path": "data/mixed_orientations_small"},
        {"case_id": "nifti_nan", "patient_id": "P10", "modality": "MR", "path": "data/nifti_nan.nii.gz"},
        {"case_id": "nifti_4d", "patient_id": "P11", "modality": "MR", "path": "data/nifti_4d.nii.gz"},
        {"case_id": "empty_folder", "patient_id": "P12", "modality": "CT", "path": "data/empty_folder"},
        {"case_id": "nonexistent", "patient_id": "P13", "modality": "CT", "path": "data/does_not_exist"},
        {"case_id": "no_permission", "patient_id": "P14", "modality": "CT", "path": "data/no_permission"},
        {"case_id": "missing_slice", "patient_id": "P15", "modality": "CT", "path": "data/missing_slice"},
        {"case_id": "duplicate_positions", "patient_id": "P16", "modality": "CT", "path": "data/duplicate_positions"},
        {"case_id": "gantry_tilt", "patient_id": "P17", "modality": "CT", "path": "data/gantry_tilt"},
        {"case_id": "too_few_slices", "patient_id": "P18", "modality": "CT", "path": "data/too_few_slices"},
        {"case_id": "bad_label", "patient_id": "P19", "modality": "CT", "path": "data/good_ct_a", "label": "benign"},
        {"case_id": "bad_modality", "patient_id": "P20", "modality": "PET", "path": "data/good_ct_a"},
        # Same case_id as the first row, with another patient, label and scan: the row must be refused.
        {"case_id": "good_ct_a", "patient_id": "P21", "modality": "CT", "path": "data/good_ct_b", "label": "1"},
        {"case_id": "modality_mismatch", "patient_id": "P22", "modality": "MR", "path": "data/modality_mismatch"},
    ]
    return rows


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    rows = _build_cohort(root)
    manifest = write_manifest(root / "manifest.csv", rows)
    try:
        summary = run_ingest(_params(root), manifest=manifest, progress=False)
        yield {"root": root, "rows": rows, "index": read_index(root / "out", INDEX_COLUMNS), "summary": summary,
               "readable": _can_read_folder(root / "data" / "no_permission")}
    finally:
        os.chmod(root / "data" / "no_permission", 0o755)


def _row(cohort: dict, case_id: str, occurrence: int = 0) -> dict:
    matches = [r for r in cohort["index"] if r["case_id"] == case_id]
    assert len(matches) > occurrence, f"{case_id}: no row #{occurrence} in index.csv"
    return matches[occurrence]


def _assert_readable_reason(row: dict) -> None:
    reason = row["reason"]
    assert len(reason) >= 10 and "\n" not in reason and "Traceback" not in reason, row
    assert row["reason_code"] not in ("", "unexpected_error", "preprocess_failed"), row


@pytest.mark.parametrize("case_id", list(EXPECTED))
def test_each_input_ends_with_its_specific_outcome(cohort, case_id):
    status, code, text = EXPECTED[case_id]
    row = _row(cohort, case_id)
    assert row["status"] == status, row
    if status == "ok":
        assert row["reason_code"] == "" and row["reason"] == "", row
        assert row["tensor"] == f"tensors/{case_id}.npy"
        assert (cohort["root"] / "out" / row["tensor"]).is_file()
        return
    if code is not None:
        assert row["reason_code"] == code, row
    _assert_readable_reason(row)
    assert text.lower() in row["reason"].lower(), row
    assert row["tensor"] == "" and not (cohort["root"] / "out" / "tensors" / f"{case_id}.npy").exists()


def test_every_manifest_row_is_accounted_for(cohort):
    index, summary, rows = cohort["index"], cohort["summary"], cohort["rows"]
    assert [r["case_id"] for r in index] == [r["case_id"] for r in rows]  # one index row per manifest row
    assert [r["patient_id"] for r in index] == [r["patient_id"] for r in rows]
    assert {r["status"] for r in index} <= {"ok", "rejected"}
    n_ok = sum(r["status"] == "ok" for r in index)
    n_rejected = sum(r["status"] == "rejected" for r in index)
    assert len(rows) == len(index) == summary.n_rows == n_ok + n_rejected
    assert (summary.n_ok, summary.n_rejected) == (n_ok, n_rejected)
    expected_ok = {c for c, (s, _, _) in EXPECTED.items() if s == "ok"} | ({"no_permission"} if cohort["readable"]
                                                                           else set())
    assert n_ok == len(expected_ok)
    tensors = sorted(p.name for p in (cohort["root"] / "out" / "tensors").glob("*.npy"))
    assert tensors == sorted(f"{c}.npy" for c in expected_ok)
    on_disk = json.loads((cohort["root"] / "out" / "summary.json").read_text())
    assert (on_disk["n_rows"], on_disk["n_ok"], on_disk["n_rejected"]) == (len(rows), n_ok, n_rejected)


def test_duplicate_case_id_is_refused_without_touching_the_first_row(cohort):
    first, second = _row(cohort, "good_ct_a", 0), _row(cohort, "good_ct_a", 1)
    # The first occurrence is a good scan and keeps its own patient, label and tensor.
    assert (first["status"], first["patient_id"], first["label"]) == ("ok", "P01", "0"), first
    assert first["native_shape"] == "24x24x6", first
    # The second is a bad manifest row: rejected, no tensor, and it must not inherit the first row's result.
    assert (second["status"], second["reason_code"], second["patient_id"]) == ("rejected", "bad_manifest_row",
                                                                               "P21"), second
    assert "duplicate case_id" in second["reason"]
    assert second["tensor"] == "" and second["tensor_shape"] == ""


def test_unreadable_folder(cohort):
    row = _row(cohort, "no_permission")
    if cohort["readable"]:
        # Running as root: mode 000 does not stop this process from reading, so the scan is simply used.
        assert os.geteuid() == 0
        assert row["status"] == "ok", row
    else:
        assert (row["status"], row["reason_code"]) == ("rejected", "unreadable_path"), row
        _assert_readable_reason(row)


def test_mixed_orientations_keep_the_larger_stack_and_say_so(cohort):
    row = _row(cohort, "mixed_orientations")
    assert row["status"] == "ok" and row["native_shape"] == "24x24x6", row  # the 6-slice axial stack, not 4 coronal
    notes = [r["notes"] for r in _prepared_records(cohort["root"]) if r.get("case_id") == "mixed_orientations"]
    assert notes and any("mixes 2 orientations" in n for n in notes[0]), notes


def test_gantry_tilt_is_kept_with_a_note_and_a_sheared_affine(cohort):
    row = _row(cohort, "gantry_tilt")
    assert row["status"] == "ok" and row["native_shape"] == "24x24x6", row
    records = [r for r in _prepared_records(cohort["root"]) if r.get("case_id") == "gantry_tilt"]
    assert records and any("tilted" in n for n in records[0]["notes"]), records
    step = np.array(records[0]["native_affine"])[:3, 2]
    assert np.allclose(np.abs(step), [0.0, 0.6, 2.5], atol=1e-3)  # the shear stays in the affine, not resampled away
    vol = read_case(cohort["root"] / "data" / "gantry_tilt", "CT", ReaderSettings())
    assert vol.meta["gantry_tilt_deg"] == pytest.approx(np.degrees(np.arctan(0.6 / 2.5)), abs=0.01)


def test_4d_nifti_is_accepted_when_a_volume_is_chosen(cohort, tmp_path):
    d = cohort["root"] / "data"
    manifest = write_manifest(tmp_path / "manifest.csv", [
        {"case_id": "nifti_4d", "patient_id": "P11", "modality": "MR", "path": str(d / "nifti_4d.nii.gz")},
        # label 1: a training cohort needs two classes (manifest.split_rows)
        {"case_id": "good_ct_a", "patient_id": "P01", "modality": "CT", "path": str(d / "good_ct_a"), "label": "1"},
    ])
    summary = run_ingest(_params(tmp_path, take_volume=0), manifest=manifest, progress=False)
    rows = {r["case_id"]: r for r in read_index(tmp_path / "out", INDEX_COLUMNS)}
    assert summary.n_ok == 2, rows
    assert rows["nifti_4d"]["status"] == "ok" and rows["nifti_4d"]["native_shape"] == "12x12x8", rows
    tensor = np.load(tmp_path / "out" / "tensors" / "nifti_4d.npy", allow_pickle=False)
    assert tensor.shape == (1, 16, 16, 16)


def _small_manifest(root: Path) -> Path:
    write_ct_series(root / "data" / "good", n=5, seed=21)
    (root / "data" / "empty").mkdir()
    return write_manifest(root / "manifest.csv", [
        {"case_id": "good", "patient_id": "P1", "modality": "CT", "path": "data/good"},
        {"case_id": "gone", "patient_id": "P2", "modality": "CT", "path": "data/gone",
         "label": "1"},  # a training cohort needs two classes (manifest.split_rows)
        {"case_id": "empty", "patient_id": "P3", "modality": "CT", "path": "data/empty"},
    ])


@pytest.mark.parametrize("ceiling, fails", [(0.5, True), (0.7, False)])
def test_rejected_fraction_ceiling_fails_the_stage_but_writes_the_index(tmp_path, ceiling, fails):
    manifest = _small_manifest(tmp_path)  # 2 of 3 rows are bad: 0.67 rejected
    params = _params(tmp_path, max_rejected_fraction=ceiling)
    if fails:
        with pytest.raises(IngestFailed, match="2 of 3 cases rejected"):
            run_ingest(params, manifest=manifest, progress=False)
    else:
        run_ingest(params, manifest=manifest, progress=False)
    rows = read_index(tmp_path / "out", INDEX_COLUMNS)
    assert [(r["case_id"], r["status"], r["reason_code"]) for r in rows] == [
        ("good", "ok", ""), ("gone", "rejected", "missing_path"), ("empty", "rejected", "empty")]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["n_rows"], summary["n_ok"], summary["n_rejected"]) == (3, 1, 2)
    assert summary["reasons"] == {"missing_path": 1, "empty": 1}
    assert (tmp_path / "out" / "tensors" / "good.npy").is_file()


def test_tiny_manifest_without_split_column_still_ingests(tmp_path):
    """Two good cases, no `split` column: the automatic patient-level split must not crash the stage."""
    write_ct_series(tmp_path / "a", n=5, seed=31)
    write_ct_series(tmp_path / "b", n=5, seed=32)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("case_id,patient_id,modality,path,label\nA,PA,CT,a,0\nB,PB,CT,b,1\n")
    summary = run_ingest(_params(tmp_path), manifest=manifest, progress=False)
    rows = read_index(tmp_path / "out", INDEX_COLUMNS)
    assert summary.n_ok == 2 and [r["status"] for r in rows] == ["ok", "ok"], rows
    assert all(r["split"] in ("train", "val", "test") for r in rows)


def test_builders_write_valid_dicom(tmp_path):
    """The helper's files are what they claim: readable CT Image Storage with geometry, and a pixel-free SR."""
    files = write_ct_series(tmp_path / "s", n=3, iop=CORONAL, seed=41)
    ds = pydicom.dcmread(files[1])
    assert ds.SOPClassUID == CTImageStorage and ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.pixel_array.shape == (24, 24)
    assert [float(v) for v in ds.ImagePositionPatient] == [-30.0, -27.5, 0.0]  # row x column = +y
    sr = pydicom.dcmread(write_basic_text_sr(tmp_path / "sr"))
    assert sr.SOPClassUID == BASIC_TEXT_SR and "PixelData" not in sr
