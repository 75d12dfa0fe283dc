"""PACS-side DICOM results on real synthetic series: the TID 1500 SR, the saliency Parametric Map, the SC overlay.

Each object is checked against its source (study, patient, references, geometry, pixel values in the reader's
[:, :, k].T convention) and by dciodvfy (dicom3tools), which must report no "Error" line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import dciodvfy_errors, write_ct_series, write_ct_slice
from pydicom.uid import generate_uid

from pipeline.io.dicom import read_dicom_series
from pipeline.io.dicom_overlay import patient_orientation, write_overlay_for_pacs, write_overlay_series
from pipeline.io.dicom_results import (
    LabelResult,
    ModelIdentity,
    build_parametric_map,
    build_sr,
    read_parametric_map,
    read_sr_probabilities,
    software_version,
    source_instances,
    write_results,
)

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
OBLIQUE = (1.0, 0.0, 0.0, 0.0, 0.866025, -0.5)  # axial tilted 30 degrees about x
MODEL = ModelIdentity(uri="models:/resdx@champion", name="resdx", version="7", alias="champion",
                      software_version=software_version())
RESULTS = [
    LabelResult("lesion", 0.12345678901234568, False, 0.5, "present when p >= 0.5", True),
    LabelResult("calcification", 1 / 3, True, 0.25, "present when p >= 0.25", False),
]


def phi_tags(seed: str) -> dict:
    """Patient/study values a PACS object must copy (and a research object must never carry)."""
    return dict(PatientName="Doe^Jane", PatientID="MRN-0042", PatientBirthDate="19700101", PatientSex="F",
                StudyDate="20240102", StudyTime="101500", AccessionNumber="ACC77", StudyID="S1",
                ReferringPhysicianName="Who^Doctor", FrameOfReferenceUID=generate_uid(entropy_srcs=[seed, "for"]))


def saliency_for(shape: tuple[int, int, int]) -> np.ndarray:
    """A float32 map in [0, 1] that differs under any transposition or slice reversal."""
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    value = (i + 3 * j * j + 7 * k + 0.5) / (shape[0] + 3 * shape[1] ** 2 + 7 * shape[2])
    return value.astype(np.float32)


@pytest.fixture
def series(tmp_path) -> Path:
    """Six axial CT slices whose file order runs against the slice normal (IM000 is the top slice)."""
    folder = tmp_path / "ct"
    positions = [np.array([-30.0, -30.0, 0.0]) + k * np.array([0.0, 0.0, 2.5]) for k in range(6)][::-1]
    write_ct_series(folder, n=6, size=24, positions=positions, tags=phi_tags(str(folder)))
    return folder


def write_oblong_series(folder: Path, rows: int = 20, cols: int = 28, n: int = 5, iop=SAGITTAL) -> Path:
    """A series with Rows != Columns, so a swap of the two axes changes the shape."""
    folder.mkdir(parents=True, exist_ok=True)
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    normal = np.cross(row, col)
    series_uid = generate_uid(entropy_srcs=[str(folder)])
    tags = {**phi_tags(str(folder)), "StudyInstanceUID": generate_uid(entropy_srcs=[str(folder), "study"])}
    rng = np.random.default_rng(1)
    for k in range(n):
        ipp = np.array([10.0, -20.0, 5.0]) + 3.0 * k * normal
        write_ct_slice(folder / f"S{k:02d}.dcm", rng.integers(0, 2000, (rows, cols)).astype("<i2"),
                       sop_uid=generate_uid(entropy_srcs=[series_uid, str(k)]), series_uid=series_uid,
                       instance_number=n - k, ipp=[f"{v:.4f}" for v in ipp], iop=[f"{v:.6f}" for v in iop],
                       pixel_spacing=["0.8", "1.2"], slice_thickness="3", **tags)
    return folder


def _files_by_sop(folder: Path) -> dict[str, Path]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in folder.iterdir()}


# ----------------------------------------------------------------------------- sources
def test_sources_come_in_the_readers_k_order(series):
    sources = source_instances(series)
    vol = read_dicom_series(series)
    assert len(sources) == vol.data.shape[2] == 6
    z = [float(ds.ImagePositionPatient[2]) for ds in sources]
    assert z == sorted(z)  # ascending along the normal, not file order
    files = _files_by_sop(series)
    for k, ds in enumerate(sources):
        assert "PixelData" not in ds
        full = pydicom.dcmread(files[str(ds.SOPInstanceUID)])
        np.testing.assert_array_equal(vol.data[:, :, k].T, full.pixel_array * 1.0 - 1024.0)


# ----------------------------------------------------------------------------- SR
def test_sr_references_the_source_study_and_round_trips_probabilities(series, tmp_path):
    sources = source_instances(series)
    sr_path, = write_results(tmp_path / "out", build_sr(sources, RESULTS, MODEL))
    assert sr_path.name == "sr.dcm"
    sr = pydicom.dcmread(sr_path)
    src = sources[0]
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID and sr.SOPInstanceUID not in {s.SOPInstanceUID
                                                                                     for s in sources}
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        assert sr[key].value == src[key].value
    evidence = {str(ref.ReferencedSOPInstanceUID)
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for ser in study.ReferencedSeriesSequence for ref in ser.ReferencedSOPSequence}
    assert evidence == {str(s.SOPInstanceUID) for s in sources}
    assert read_sr_probabilities(sr) == {r.name: r.probability for r in RESULTS}  # exact floats
    assert dciodvfy_errors(sr_path) == []


def test_sr_states_decision_threshold_and_referral(series):
    sr = build_sr(source_instances(series), RESULTS, MODEL)
    groups = sr.ContentSequence[-1].ContentSequence  # Imaging Measurements -> Measurement Groups
    assert len(groups) == len(RESULTS)
    for group, result in zip(groups, RESULTS):
        items = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in group.ContentSequence}
        assert items["Finding"].ConceptCodeSequence[0].CodeMeaning == result.name
        assert items["Presence of property"].ConceptCodeSequence[0].CodeMeaning == (
            "Present" if result.present else "Absent")
        assert items["Human read requested"].ConceptCodeSequence[0].CodeMeaning == (
            "Yes" if result.referred else "No")
        assert items["Threshold Value"].MeasuredValueSequence[0].FloatingPointValue == result.threshold
        params = [i.TextValue for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning
                  == "Algorithm Parameters"]
        assert f"model_uri={MODEL.uri}" in params and f"rule={result.rule}" in params
        assert f"threshold={result.threshold!r}" in params and "alias=champion" in params
        images = [i for i in group.ContentSequence if i.ValueType == "IMAGE"]
        assert len(images) == 6


def test_sr_rejects_empty_inputs(series):
    sources = source_instances(series)
    with pytest.raises(ValueError):
        build_sr(sources, [], MODEL)
    with pytest.raises(ValueError, match="not in"):
        build_sr(sources, [LabelResult("lesion", float("nan"), True, None, "argmax", False)], MODEL)
    with pytest.raises(ValueError, match="64 characters"):
        build_sr(sources, [LabelResult("x" * 65, 0.5, True, None, "argmax", False)], MODEL)


# ----------------------------------------------------------------------------- parametric map
def _check_pmap(path: Path, sources: list, saliency: np.ndarray) -> None:
    pm = pydicom.dcmread(path)
    src = sources[0]
    assert pm.StudyInstanceUID == src.StudyInstanceUID and pm.SeriesInstanceUID != src.SeriesInstanceUID
    assert pm.FrameOfReferenceUID == src.FrameOfReferenceUID and pm.PatientID == src.PatientID
    assert pm.RecognizableVisualFeatures == "NO"
    shared = pm.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                               [float(v) for v in src.ImageOrientationPatient], atol=1e-6)
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
                               [float(v) for v in src.PixelSpacing])
    mapping = shared.RealWorldValueMappingSequence[0]
    assert mapping.LUTLabel == "SALIENCY" and mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    assert (mapping.RealWorldValueSlope, mapping.RealWorldValueIntercept) == (1.0, 0.0)
    frames = pm.PerFrameFunctionalGroupsSequence
    assert len(frames) == len(sources) == int(pm.NumberOfFrames)
    # highdicom sorts frames along its own normal: pair each frame with the source slice at its position.
    ipp = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in sources])
    pixels = pm.pixel_array
    assert pixels.dtype == np.float32 and pixels.shape == (len(sources), int(src.Rows), int(src.Columns))
    seen = []
    for f, frame in enumerate(frames):
        pos = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
        k = int(np.argmin(np.linalg.norm(ipp - pos, axis=1)))
        np.testing.assert_allclose(pos, ipp[k], atol=1e-4)
        derived = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert derived == sources[k].SOPInstanceUID
        np.testing.assert_array_equal(pixels[f], saliency[:, :, k].T)
        seen.append(k)
    assert sorted(seen) == list(range(len(sources)))
    np.testing.assert_array_equal(read_parametric_map(pm, sources), saliency)
    assert dciodvfy_errors(path) == []


def test_parametric_map_matches_the_source_grid(series, tmp_path):
    sources = source_instances(series)
    saliency = saliency_for(read_dicom_series(series).data.shape)
    path, = write_results(tmp_path / "out", build_parametric_map(sources, saliency, MODEL, "lesion"))
    assert path.name == "pmap.dcm"
    _check_pmap(path, sources, saliency)
    assert "lesion" in pydicom.dcmread(path).SharedFunctionalGroupsSequence[0] \
        .RealWorldValueMappingSequence[0].LUTExplanation


@pytest.mark.parametrize("iop", [SAGITTAL, OBLIQUE], ids=["sagittal", "oblique"])
def test_parametric_map_on_non_square_non_axial_series(tmp_path, iop):
    folder = write_oblong_series(tmp_path / "ct", iop=iop)
    sources = source_instances(folder)
    vol = read_dicom_series(folder)
    assert vol.data.shape == (28, 20, 5)  # (Columns, Rows, slices)
    saliency = saliency_for(vol.data.shape)
    path, = write_results(tmp_path / "out", build_parametric_map(sources, saliency, MODEL, "lesion"))
    _check_pmap(path, sources, saliency)


def test_parametric_map_rejects_a_wrong_shape(series):
    sources = source_instances(series)
    good = saliency_for((24, 24, 6))
    for bad in (good[:, :, :5], good[:, :23], good[None]):
        with pytest.raises(ValueError, match="Columns, Rows, slices"):
            build_parametric_map(sources, bad, MODEL, "lesion")


# ----------------------------------------------------------------------------- secondary capture
@pytest.mark.parametrize("iop", [SAGITTAL, OBLIQUE], ids=["sagittal", "oblique"])
def test_pacs_overlay_belongs_to_the_source_study(tmp_path, iop):
    folder = write_oblong_series(tmp_path / "ct", iop=iop)
    sources = source_instances(folder)
    saliency = saliency_for((28, 20, 5))
    paths = write_overlay_for_pacs(sources, folder, saliency, tmp_path / "sc")
    assert [p.name for p in paths] == [f"{k + 1:04d}.dcm" for k in range(5)]
    series_uids = set()
    for path, src in zip(paths, sources):
        sc = pydicom.dcmread(path)
        assert sc.StudyInstanceUID == src.StudyInstanceUID
        assert (sc.PatientName, sc.PatientID, sc.PatientBirthDate) == (src.PatientName, src.PatientID,
                                                                      src.PatientBirthDate)
        assert sc.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert tuple(sc.PatientOrientation) == patient_orientation([float(v) for v in src.ImageOrientationPatient])
        assert sc.pixel_array.shape == (20, 28, 3)
        series_uids.add(sc.SeriesInstanceUID)
        assert dciodvfy_errors(path) == []
    assert len(series_uids) == 1 and src.SeriesInstanceUID not in series_uids
    with pytest.raises(ValueError, match="Columns, Rows, slices"):
        write_overlay_for_pacs(sources, folder, saliency[:, :, :4], tmp_path / "bad")


def test_patient_orientation_letters():
    assert patient_orientation((1, 0, 0, 0, 1, 0)) == ("L", "P")
    assert patient_orientation(SAGITTAL) == ("P", "F")
    assert patient_orientation(OBLIQUE) == ("L", "PF")


def test_research_overlay_keeps_pseudonyms_and_hashed_uids(series, tmp_path):
    src = source_instances(series)[0]
    assert write_overlay_series(series, "", saliency_for((24, 24, 6)), tmp_path / "sc", "PSEUDO-1", "case-1",
                                b"salt")
    files = sorted((tmp_path / "sc").iterdir())
    assert len(files) == 6
    sc = pydicom.dcmread(files[0])
    assert (sc.PatientID, str(sc.PatientName)) == ("PSEUDO-1", "case-1^")
    assert sc.StudyInstanceUID != src.StudyInstanceUID
    assert sc.ReferencedSeriesSequence[0].SeriesInstanceUID != src.SeriesInstanceUID
    for value in ("Doe", "MRN-0042", "19700101", "ACC77"):
        assert value not in sc.to_json()
    assert not write_overlay_series(series, "", saliency_for((24, 24, 5)), tmp_path / "x", "P", "c", b"s")
