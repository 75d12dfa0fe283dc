"""Synthetic demo cohort: determinism, DICOM validity and geometry, NIfTI headers, manifest."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, RLELossless

from pipeline.config import SynthesizeConfig
from pipeline.core.phantom import (
    AIR,
    BONE,
    LUNG,
    SOFT,
    _sphere_directions,
    dicom_affine,
    grid_points,
    lesion_mask,
    lesion_weight,
    make_ct_geometry,
    make_phantom,
    phantom_labels,
)
from pipeline.stages.synthesize import plan_cohort, synthesize

PHI_TAGS = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
            "AccessionNumber", "InstitutionName", "ReferringPhysicianName", "StudyID"]


def _cfg(root: Path, **kw) -> SynthesizeConfig:
    return SynthesizeConfig(out_dir=root / "data" / "demo", manifest=root / "manifests" / "demo.csv", **kw)


def _digest(cfg: SynthesizeConfig) -> dict[str, str]:
    files = {f"data/{p.relative_to(cfg.out_dir)}": p for p in Path(cfg.out_dir).rglob("*") if p.is_file()}
    files["manifest"] = Path(cfg.manifest)
    return {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in sorted(files.items())}


def _truth(cfg: SynthesizeConfig) -> list[dict]:
    return json.loads((Path(cfg.out_dir) / "truth.json").read_text())["cases"]


def _read_series(folder: Path) -> list[pydicom.Dataset]:
    """The non-localizer CT images of a folder, sorted by position along the slice normal."""
    dss = []
    for p in folder.iterdir():
        try:
            ds = pydicom.dcmread(p)
        except InvalidDicomError:
            continue
        if ds.ImageType[2] != "LOCALIZER":
            dss.append(ds)
    assert len({ds.SeriesInstanceUID for ds in dss}) == 1
    iop = np.array(dss[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(dss, key=lambda ds: float(np.dot(np.array(ds.ImagePositionPatient, float), normal)))


def _affine_from_headers(dss: list[pydicom.Dataset]) -> np.ndarray:
    # Independent of pipeline.synthesize.dicom_affine on purpose.
    iop = np.array(dss[0].ImageOrientationPatient, float)
    row_sp, col_sp = (float(v) for v in dss[0].PixelSpacing)
    first, last = (np.array(ds.ImagePositionPatient, float) for ds in (dss[0], dss[-1]))
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * col_sp
    lps[:3, 1] = iop[3:] * row_sp
    lps[:3, 2] = (last - first) / (len(dss) - 1)
    lps[:3, 3] = first
    lps[:2] *= -1
    return lps


def _hu(dss: list[pydicom.Dataset]) -> np.ndarray:
    """HU volume indexed (column, row, slice)."""
    slices = [ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in dss]
    return np.stack(slices, axis=-1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("cohort"), n_patients=4)
    summary = synthesize(cfg, seed=7)
    cases = _truth(cfg)
    # The assertions below need every kind of case; this seed provides them.
    kinds = {(c["modality"], c["label"]) for c in cases}
    assert kinds == {("CT", 0), ("CT", 1), ("MR", 0), ("MR", 1)}
    assert summary.n_compressed >= 1 and summary.n_localizers >= 1
    return cfg, summary, cases


# ---- pure helpers ---------------------------------------------------------------------------------------


def test_phantom_labels_at_landmarks():
    ph = make_phantom(np.random.default_rng(0), lesion_radius=None)
    pts = np.array([ph.centre, [400.0, 0, 0], ph.lung_centres[0], [*ph.spine_xy, ph.centre[2]]])
    assert phantom_labels(ph, pts).tolist() == [SOFT, AIR, LUNG, BONE]
    assert not lesion_mask(ph, pts).any() and np.all(lesion_weight(ph, pts) == 0)


def test_lesion_sits_in_soft_tissue_near_the_centre():
    for seed in range(20):
        ph = make_phantom(np.random.default_rng(seed), lesion_radius=15.0)
        c = np.asarray(ph.lesion_centre)
        assert np.linalg.norm(c) <= 60.0
        shell = c + _sphere_directions(200) * (ph.lesion_radius + 2.0)
        assert np.all(phantom_labels(ph, shell) == SOFT)
        assert lesion_weight(ph, c[None] + [[ph.lesion_radius, 0, 0]])[0] == pytest.approx(0.5)


def test_dicom_affine_axial_maps_columns_rows_and_slices():
    aff = dicom_affine((1, 0, 0), (0, 1, 0), (2.0, 3.0), (-100.0, -50.0, 10.0), 5.0)
    # LPS (-100, -50, 10) is RAS (100, 50, 10); +column -> +L (-R), +row -> +P (-A), +slice -> +S.
    np.testing.assert_allclose(aff @ [0, 0, 0, 1], [100, 50, 10, 1])
    np.testing.assert_allclose(aff @ [1, 1, 1, 1], [97, 48, 15, 1])


def test_grid_points_follow_affine():
    geo = make_ct_geometry(np.random.default_rng(1), plane="sagittal")
    pts = grid_points(geo.affine, geo.shape)
    assert pts.shape == (*geo.shape, 3)
    np.testing.assert_allclose(pts[3, 5, 7], (geo.affine @ [3, 5, 7, 1])[:3])


def test_plan_has_exact_label_count_and_pseudonymous_keys():
    cfg = SynthesizeConfig(n_patients=30, lesion_fraction=0.3)
    plans = plan_cohort(cfg, seed=1)
    assert sum(p.label for p in plans) == round(0.3 * len(plans))
    assert all(1 <= sum(q.patient_key == p.patient_key for q in plans) <= 3 for p in plans)
    assert all(p.phi.mrn not in p.case_id + p.patient_id + p.patient_key for p in plans)
    with pytest.raises(ValueError):
        plan_cohort(SynthesizeConfig(studies_per_patient=(2, 1)), seed=1)


# ---- determinism ----------------------------------------------------------------------------------------


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    a, b, c = (_cfg(tmp_path / k, n_patients=2) for k in "abc")
    synthesize(a, seed=3)
    synthesize(b, seed=3)
    synthesize(c, seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_rerun_replaces_stale_output_and_refuses_foreign_folders(tmp_path):
    cfg = _cfg(tmp_path, n_patients=1, studies_per_patient=(1, 1))
    synthesize(cfg, seed=1)
    (Path(cfg.out_dir) / "stale.txt").write_text("old")
    synthesize(cfg, seed=1)
    assert not (Path(cfg.out_dir) / "stale.txt").exists()
    foreign = _cfg(tmp_path / "x", n_patients=1)
    Path(foreign.out_dir).mkdir(parents=True)
    (Path(foreign.out_dir) / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        synthesize(foreign, seed=1)
    assert (Path(foreign.out_dir) / "precious.txt").exists()


# ---- CT DICOM -------------------------------------------------------------------------------------------


def test_ct_files_are_valid_dicom_with_phi(cohort):
    cfg, _, cases = cohort
    n_files = 0
    for case in (c for c in cases if c["modality"] == "CT"):
        for path in (Path(cfg.out_dir) / case["image"]).iterdir():
            if path.name == "notes.txt":
                with pytest.raises(InvalidDicomError):
                    pydicom.dcmread(path)
                continue
            ds = pydicom.dcmread(path)
            n_files += 1
            meta = ds.file_meta
            assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == CTImageStorage
            assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert meta.TransferSyntaxUID and meta.ImplementationClassUID
            assert ds.Modality == "CT" and ds.RescaleType == "HU" and ds.HighBit == ds.BitsStored - 1
            assert all(str(ds.get(tag, "")) for tag in PHI_TAGS), path
            assert not path.stem.isdigit()
        hu = _hu(_read_series(Path(cfg.out_dir) / case["image"]))
        assert -1100 < hu.min() < -800 and 500 < hu.max() < 1200  # air around the body, bone inside
        assert 20 < np.median(hu[(hu > -50) & (hu < 150)]) < 60  # soft tissue
    assert n_files > 0


def test_localizer_and_junk_share_the_folder(cohort):
    cfg, _, cases = cohort
    case = next(c for c in cases if c["modality"] == "CT" and c["storage"]["localizer"])
    folder = Path(cfg.out_dir) / case["image"]
    assert (folder / "notes.txt").exists()
    types = [tuple(pydicom.dcmread(p, stop_before_pixels=True).ImageType) for p in folder.glob("IM_*")]
    assert types.count(("ORIGINAL", "PRIMARY", "LOCALIZER")) == 1
    assert types.count(("ORIGINAL", "PRIMARY", "AXIAL")) == case["shape"][2]


def test_rle_series_decode_to_the_same_hu_as_uncompressed(tmp_path):
    # The compression flag does not touch the random streams, so both cohorts hold the same pixels.
    raw, rle = (_cfg(tmp_path / k, n_patients=2, ct_fraction=1.0, compressed_fraction=f)
                for k, f in (("raw", 0.0), ("rle", 1.0)))
    synthesize(raw, seed=5)
    synthesize(rle, seed=5)
    compared = 0
    for case in _truth(rle):
        a, b = (_read_series(Path(cfg.out_dir) / case["image"]) for cfg in (raw, rle))
        assert b[0].file_meta.TransferSyntaxUID == RLELossless
        assert a[0].file_meta.TransferSyntaxUID != RLELossless
        assert [ds.SOPInstanceUID for ds in a] == [ds.SOPInstanceUID for ds in b]
        np.testing.assert_array_equal(_hu(a), _hu(b))
        compared += 1
    assert compared >= 2


def test_rle_plugins_agree_byte_for_byte_on_the_cohorts_slices(tmp_path):
    """synthesize encodes with pylibjpeg-rle for speed; the cohort's bytes stay those pydicom's own encoder
    gives (the cohort was pinned to it), on every kind of stored value the generator writes."""
    from pydicom.pixels.encoders import RLELosslessEncoder

    cfg = _cfg(tmp_path, n_patients=3, ct_fraction=1.0, compressed_fraction=1.0)
    synthesize(cfg, seed=11)
    checked = 0
    for case in _truth(cfg):
        for ds in _read_series(Path(cfg.out_dir) / case["image"])[::7]:
            kw = {"rows": ds.Rows, "columns": ds.Columns, "samples_per_pixel": 1, "bits_allocated": 16,
                  "bits_stored": ds.BitsStored, "pixel_representation": ds.PixelRepresentation,
                  "photometric_interpretation": "MONOCHROME2", "number_of_frames": 1}
            arr = ds.pixel_array
            ours = RLELosslessEncoder.encode(arr, encoding_plugin="pylibjpeg", **kw)
            assert ours == RLELosslessEncoder.encode(arr, encoding_plugin="pydicom", **kw)
            assert next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)) == ours  # in the file
            checked += 1
    assert checked >= 10


def test_ct_geometry_matches_mask_and_lesion(cohort):
    cfg, _, cases = cohort
    for case in (c for c in cases if c["modality"] == "CT"):
        dss = _read_series(Path(cfg.out_dir) / case["image"])
        mask_img = nib.load(Path(cfg.out_dir) / case["mask"])
        np.testing.assert_allclose(_affine_from_headers(dss), mask_img.affine, atol=1e-4)
        hu = _hu(dss)
        assert hu.shape == mask_img.shape
        numbers = [int(ds.InstanceNumber) for ds in dss]
        assert numbers == sorted(numbers, reverse=case["slice_order"] == "descending")
        mask = np.asarray(mask_img.dataobj) > 0
        if case["label"]:
            # The lesion (>= +40 HU over ~40 HU soft tissue) must be where the mask says.
            assert hu[mask].mean() > 65, case["case_id"]


# ---- masks, truth, manifest -----------------------------------------------------------------------------


def test_masks_agree_with_truth(cohort):
    cfg, _, cases = cohort
    for case in cases:
        img = nib.load(Path(cfg.out_dir) / case["mask"])
        mask = np.asarray(img.dataobj)
        assert mask.dtype == np.uint8
        if case["label"]:
            ijk = np.rint(np.linalg.solve(img.affine, [*case["lesion_centre_ras"], 1.0])[:3]).astype(int)
            assert mask[tuple(ijk)] == 1, case["case_id"]
            assert case["lesion_radius_mm"] >= 9.0
        else:
            assert mask.sum() == 0 and case["lesion_centre_ras"] is None
        if case["modality"] == "MR":
            image = nib.load(Path(cfg.out_dir) / case["image"])
            np.testing.assert_array_equal(image.affine, img.affine)
            assert image.shape == img.shape


def test_manifest_rows_resolve(cohort):
    cfg, summary, cases = cohort
    manifest = Path(cfg.manifest)
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["case_id", "patient_id", "modality", "path", "label", "mask_path"]
    assert [r["case_id"] for r in rows] == [c["case_id"] for c in cases] and len(rows) == summary.n_studies
    for r in rows:
        assert r["path"].startswith("../data/demo/") and r["patient_id"].startswith("demo-p")
        path, mask = manifest.parent / r["path"], manifest.parent / r["mask_path"]
        assert (path.is_dir() if r["modality"] == "CT" else path.name == "image.nii.gz") and path.exists()
        assert mask.is_file()
    labels = [int(r["label"]) for r in rows]
    assert abs(sum(labels) - cfg.lesion_fraction * len(labels)) <= 1


# ---- MR NIfTI -------------------------------------------------------------------------------------------


def test_mr_headers_and_orientation_variety(tmp_path):
    cfg = _cfg(tmp_path, n_patients=5, studies_per_patient=(2, 2), ct_fraction=0.0)
    synthesize(cfg, seed=11)
    oblique = flipped = 0
    dtypes, scales = set(), []
    for case in _truth(cfg):
        img = nib.load(Path(cfg.out_dir) / case["image"])
        hdr = img.header
        assert int(hdr["qform_code"]) == int(hdr["sform_code"]) in (1, 2)
        np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-4)
        direction = img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0)
        oblique += bool(np.any((np.abs(direction) > 1e-3) & (np.abs(direction) < 1 - 1e-3)))
        flipped += bool(set(nib.aff2axcodes(img.affine)) & {"L", "P", "I"})
        dtypes.add(img.get_data_dtype().name)
        scales.append(np.percentile(np.asarray(img.dataobj), 99))
    assert oblique >= 1 and flipped >= 1
    assert dtypes == {"int16", "float32"}
    assert max(scales) / min(scales) > 5  # global intensity scale varies
