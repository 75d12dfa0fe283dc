"""Writers of the synthetic demo cohort's files: CT DICOM series (plus localizers), MR and mask NIfTI volumes.

`pipeline.stages.synthesize` plans each study and draws its phantom; the functions here sample it with
`pipeline.core.phantom` and write the study folder. They live in `pipeline.io` because they do the file
work (pydicom headers and pixel encoding, nibabel headers), while the geometry and intensities stay pure
in core. The fake-PHI tables are here because they fill the DICOM headers; the planner draws patient
names from them too. Random draws happen in a fixed order from the generator passed in and UIDs are
hash-derived, so one seed gives byte-identical files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from copy import copy, deepcopy
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    PYDICOM_ROOT_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from pipeline.core.phantom import (
    CT_PLANES,
    TISSUE_HU,
    CTGeometry,
    Phantom,
    ct_hu_volume,
    grid_points,
    hu_to_stored,
    lesion_mask,
    make_ct_geometry,
    make_mr_geometry,
    mr_volume,
    phantom_labels,
)

_UID_NAMESPACE = "resdx-demo-cohort"

# CT pixel storage variants: (pixel representation, bits stored, rescale intercept, rescale slope).
CT_ENCODINGS = [
    (1, 16, -1024.0, 1.0),
    (1, 12, -1024.0, 1.0),
    (1, 16, 0.0, 1.0),
    (0, 16, -1024.0, 1.0),
    (0, 12, -1024.0, 1.0),
    (1, 16, -1024.0, 0.5),
]
CT_SCANNERS = [
    ("SIEMENS", ("SOMATOM Definition AS", "SOMATOM Force")),
    ("GE MEDICAL SYSTEMS", ("LightSpeed VCT", "Revolution CT")),
    ("Philips", ("Brilliance 64", "IQon Spectral CT")),
    ("TOSHIBA", ("Aquilion ONE", "Aquilion PRIME")),
]
FIRST_NAMES_F = ["Anna", "Maria", "Sofia", "Emma", "Olivia", "Chloe", "Hana", "Ingrid", "Lucia", "Mei"]
FIRST_NAMES_M = ["James", "Lukas", "Mateo", "Noah", "Omar", "Pavel", "Kenji", "David", "Ethan", "Rahul"]
LAST_NAMES = ["Smith", "Garcia", "Muller", "Rossi", "Tanaka", "Nowak", "Johansson", "Dubois", "Silva", "Khan",
              "Brown", "Lopez", "Schmidt", "Okafor", "Haddad"]
INSTITUTIONS = ["St. Elsewhere General Hospital", "Riverside Medical Center", "Northfield University Clinic",
                "Lakeside Imaging Institute"]


@dataclass(frozen=True)
class PatientPHI:
    """Fake identifiers, written into DICOM headers only (never into keys, manifest or truth.json)."""

    name: str
    mrn: str
    birth_date: dt.date
    sex: str


@dataclass(frozen=True)
class CasePlan:
    index: int
    case_id: str
    patient_id: str  # pseudonym, e.g. demo-p001
    patient_key: str
    study_key: str
    modality: str
    label: int
    lesion_radius: float
    # CT: HU above soft tissue; MR: relative signal gain. Negative: a hypodense/hypointense lesion.
    lesion_contrast: float
    compressed: bool
    localizer: bool
    phi: PatientPHI
    # Image quality (SynthesizeConfig's knobs after its preset): noise sigma ranges, MR bias, CT drift.
    ct_noise_hu: tuple[float, float] = (10.0, 20.0)
    mr_noise: tuple[float, float] = (0.015, 0.05)
    mr_bias_field: float = 0.3
    ct_drift_hu: float = 0.0
    # synthesize.task two_findings: the 0/1 label vector, and the co-occurring second lesion (radius 0: none).
    findings: tuple[int, ...] = ()
    second_radius: float = 0.0
    second_contrast: float = 0.0


def _uid(seed: int, *parts: object) -> str:
    # Hash of the entropy string under pydicom's root (prefix=None would ignore entropy_srcs and be random).
    entropy = "/".join([_UID_NAMESPACE, str(seed), *map(str, parts)])
    return generate_uid(PYDICOM_ROOT_UID, entropy_srcs=[entropy])


def _ds(v: float) -> str:
    # DICOM DS: at most 16 characters; 4 decimals is exact for our 0.01 mm grids. "+ 0.0" drops "-0".
    return f"{round(float(v), 4) + 0.0:.4f}".rstrip("0").rstrip(".")


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path, code: int) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(data.dtype)
    img.set_qform(affine, code=code)
    img.set_sform(affine, code=code)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)

def _ct_series_dataset(plan: CasePlan, seed: int, rng: np.random.Generator) -> Dataset:
    """Patient/study/equipment attributes shared by every image of one CT study."""
    maker, models = CT_SCANNERS[int(rng.integers(len(CT_SCANNERS)))]
    study_day = dt.date(2016, 1, 1) + dt.timedelta(days=int(rng.integers(0, 8 * 365)))
    study_time = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(60)):02d}{int(rng.integers(60)):02d}"
    age = (study_day - plan.phi.birth_date).days // 365
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_day.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study_time
    ds.AccessionNumber = f"ACC{int(rng.integers(10**7, 10**8))}"
    ds.Modality = "CT"
    ds.Manufacturer = maker
    ds.InstitutionName = str(rng.choice(INSTITUTIONS))
    ds.ReferringPhysicianName = f"{rng.choice(LAST_NAMES)}^{rng.choice(FIRST_NAMES_F + FIRST_NAMES_M)}^^Dr"
    ds.StudyDescription = "CT CHEST ABDOMEN"
    ds.ManufacturerModelName = str(rng.choice(models))
    ds.PatientName = plan.phi.name
    ds.PatientID = plan.phi.mrn
    ds.PatientBirthDate = plan.phi.birth_date.strftime("%Y%m%d")
    ds.PatientSex = plan.phi.sex
    ds.PatientAge = f"{age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.KVP = str(int(rng.choice([100, 120, 140])))
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = _uid(seed, plan.case_id, "study")
    ds.StudyID = str(int(rng.integers(1000, 99999)))
    ds.FrameOfReferenceUID = _uid(seed, plan.case_id, "frame")
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    return ds


def _ct_image(base: Dataset, seed: int, series_uid: str, instance: int, ipp: np.ndarray, geo: CTGeometry,
              stored: np.ndarray, encoding: tuple, compressed: bool, image_type: list[str]) -> Dataset:
    """One CT Image Storage instance; `stored` is (rows, columns)."""
    pixel_rep, bits, intercept, slope = encoding
    # A new dict of copied elements: setting an attribute that exists changes its element in place, so the
    # elements must not be shared with `base`; their values are only ever replaced. A deepcopy of the whole
    # dataset per slice took 16% of the cohort's time.
    ds = Dataset({tag: copy(elem) for tag, elem in base.items()})
    ds.ImageType = image_type
    ds.SOPInstanceUID = _uid(seed, series_uid, instance)
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.AcquisitionNumber = 1
    ds.ImagePositionPatient = [_ds(v) for v in ipp]
    ds.ImageOrientationPatient = [_ds(v) for v in (*geo.row_cos, *geo.col_cos)]
    ds.SliceLocation = _ds(float(np.dot(ipp, geo.normal)))
    ds.SliceThickness = _ds(geo.slice_thickness)
    ds.PixelSpacing = [_ds(v) for v in geo.pixel_spacing]
    ds.Rows, ds.Columns = stored.shape
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = pixel_rep
    ds.RescaleIntercept = _ds(intercept)
    ds.RescaleSlope = _ds(slope)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "RESDX_SYNTH_1"
    ds.file_meta = meta
    arr = np.ascontiguousarray(stored, dtype=stored.dtype.newbyteorder("<"))
    if compressed:
        # Pin the encoder: RLE plugins may emit different (equally valid) bytes. pylibjpeg-rle's gives the same
        # bytes as pydicom's own on these slices (tested) at 8x its speed.
        ds.compress(RLELossless, arr, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    else:
        ds.PixelData = arr.tobytes()
    return ds


def _dicom_name(sop_uid: str, with_ext: bool) -> str:
    # Hash-derived names, so directory order says nothing about slice order.
    return "IM_" + hashlib.sha1(sop_uid.encode()).hexdigest()[:8].upper() + (".dcm" if with_ext else "")


def _second_lesion(plan: CasePlan, digits: int) -> dict:
    """truth.json fields of the second lesion (none unless the study has one)."""
    if not plan.second_radius:
        return {}
    return {"second_lesion_radius_mm": plan.second_radius, "second_lesion_contrast": round(plan.second_contrast,
                                                                                            digits)}


def write_ct_study(plan: CasePlan, ph: Phantom, seed: int, rng: np.random.Generator, study_dir: Path) -> dict:
    """Write one CT study into `study_dir` (series in dicom/, mask.nii.gz); return its truth.json geometry."""
    geo = make_ct_geometry(rng)
    encoding = CT_ENCODINGS[int(rng.integers(len(CT_ENCODINGS)))]
    lesion_hu = plan.lesion_contrast
    pts = grid_points(geo.affine, geo.shape)  # once: the volume and the mask sample the same points
    hu = ct_hu_volume(ph, geo, rng, lesion_hu, noise_hu=float(rng.uniform(*plan.ct_noise_hu)),
                      drift_hu=plan.ct_drift_hu, second_hu=plan.second_contrast, pts=pts)
    stored = hu_to_stored(hu, *encoding)
    base = _ct_series_dataset(plan, seed, rng)
    with_ext = bool(rng.random() < 0.5)
    dicom_dir = study_dir / "dicom"
    dicom_dir.mkdir(parents=True)

    base.SeriesNumber = 2
    base.SeriesDescription = f"{geo.plane.upper()} {geo.slice_thickness:g}mm"
    base.ConvolutionKernel = str(rng.choice(["B30f", "STANDARD", "FC13"]))
    base.SpacingBetweenSlices = _ds(geo.slice_spacing)
    series_uid = _uid(seed, plan.case_id, "series", 2)
    for k in range(geo.n_slices):
        instance = geo.n_slices - k if geo.descending else k + 1  # numbering follows acquisition order
        ds = _ct_image(base, seed, series_uid, instance, geo.ipp(k), geo, stored[:, :, k].T, encoding,
                       plan.compressed, ["ORIGINAL", "PRIMARY", "AXIAL"])
        ds.save_as(dicom_dir / _dicom_name(ds.SOPInstanceUID, with_ext), enforce_file_format=True)

    if plan.localizer:
        _write_localizer(plan, ph, seed, rng, base, geo, encoding, dicom_dir, with_ext)

    mask = lesion_mask(ph, pts).astype(np.uint8)
    _save_nifti(mask, geo.affine, study_dir / "mask.nii.gz", code=1)
    return _second_lesion(plan, 2) | {
        "plane": geo.plane,
        "slice_order": "descending" if geo.descending else "ascending",
        "spacing": [geo.pixel_spacing[1], geo.pixel_spacing[0], geo.slice_spacing],
        "shape": list(geo.shape),
        "affine": np.round(geo.affine, 6).tolist(),
        "lesion_contrast": round(lesion_hu, 2) if plan.label else None,
        "storage": {
            "transfer_syntax": "RLELossless" if plan.compressed else "ExplicitVRLittleEndian",
            "pixel_representation": encoding[0], "bits_stored": encoding[1],
            "rescale_intercept": encoding[2], "rescale_slope": encoding[3],
            "manufacturer": base.Manufacturer, "file_extension": with_ext, "localizer": plan.localizer,
        },
    }


def _write_localizer(plan: CasePlan, ph: Phantom, seed: int, rng: np.random.Generator, base: Dataset,
                     geo: CTGeometry, encoding: tuple, dicom_dir: Path, with_ext: bool) -> None:
    """A single localizer slice across the main plane, plus a non-DICOM note, in the series folder."""
    plane = "coronal" if geo.plane == "axial" else "axial"
    r, c = (np.asarray(v) for v in CT_PLANES[plane])
    n, d = 128, 2.0
    first = -(n - 1) / 2 * d * (r + c)
    scout = CTGeometry(plane, CT_PLANES[plane][0], CT_PLANES[plane][1], (d, d), n, n, 1, d, d,
                       tuple(round(float(v), 2) for v in first), False)
    pts = grid_points(scout.affine, scout.shape)
    hu = TISSUE_HU[phantom_labels(ph, pts)] + rng.normal(0.0, 10.0, pts.shape[:-1])
    scout_base = deepcopy(base)
    scout_base.SeriesNumber = 1
    scout_base.SeriesDescription = "TOPOGRAM"
    del scout_base.SpacingBetweenSlices
    series_uid = _uid(seed, plan.case_id, "series", 1)
    stored = hu_to_stored(hu, *encoding)[:, :, 0].T
    ds = _ct_image(scout_base, seed, series_uid, 1, scout.ipp(0), scout, stored, encoding, False,
                   ["ORIGINAL", "PRIMARY", "LOCALIZER"])
    ds.save_as(dicom_dir / _dicom_name(ds.SOPInstanceUID, with_ext), enforce_file_format=True)
    (dicom_dir / "notes.txt").write_text("Technologist notes: exam tolerated well. Contrast: none.\n")


def write_mr_study(plan: CasePlan, ph: Phantom, rng: np.random.Generator, study_dir: Path) -> dict:
    """Write one MR study into `study_dir` (image.nii.gz, mask.nii.gz); return its truth.json geometry."""
    geo = make_mr_geometry(rng)
    lesion_gain = plan.lesion_contrast
    scale = float(10 ** rng.uniform(1.0, np.log10(3000.0)))
    pts = grid_points(geo.affine, geo.shape)
    signal = mr_volume(ph, geo, rng, lesion_gain, plan.mr_noise, plan.mr_bias_field, plan.second_contrast,
                       pts=pts) * scale
    as_int = bool(rng.random() < 0.5)
    data = np.clip(np.rint(signal), 0, 32767).astype(np.int16) if as_int else signal.astype(np.float32)
    code = int(rng.choice([1, 2]))
    study_dir.mkdir(parents=True)
    _save_nifti(data, geo.affine, study_dir / "image.nii.gz", code=code)
    mask = lesion_mask(ph, pts).astype(np.uint8)
    _save_nifti(mask, geo.affine, study_dir / "mask.nii.gz", code=code)
    return _second_lesion(plan, 4) | {
        "orientation": "".join(nib.aff2axcodes(geo.affine)),
        "axis_permutation": list(geo.perm),
        "flipped_axes": [a for a in range(3) if geo.flips[a]],
        "oblique_deg": round(geo.oblique_deg, 3),
        "spacing": list(geo.spacing),
        "shape": list(geo.shape),
        "affine": np.round(geo.affine, 6).tolist(),
        "lesion_contrast": round(lesion_gain, 4) if plan.label else None,
        "storage": {"dtype": "int16" if as_int else "float32", "qform_code": code, "sform_code": code,
                    "intensity_scale": round(scale, 3)},
    }

