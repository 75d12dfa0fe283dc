"""Deterministic demo cohort: real DICOM CT series and NIfTI MR volumes of one phantom family.

Every study samples the same kind of anatomy (a torso phantom defined in world RAS millimetres) on its own
voxel grid, so the files exercise what real readers must get right: DICOM slice sorting, LPS->RAS,
PixelSpacing order, rescale, RLE decoding, stray files and localizers; NIfTI permuted, flipped and oblique
affines, int16/float32 storage, arbitrary intensity scales. Label 1 means a lesion blob is present; its
binary mask is saved on the image's own grid for every study.

Everything derives from ``seed`` (numpy Generators, hash-derived UIDs, dates drawn from the generator), so
one seed gives byte-identical files.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import os
import shutil
from copy import deepcopy
from dataclasses import dataclass, replace
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
from scipy import ndimage

from pipeline.config import SynthesizeConfig
from pipeline.progress import progress_map

# Tissue labels returned by `phantom_labels`.
AIR, SOFT, FAT, LUNG, BONE = 0, 1, 2, 3, 4
TISSUE_HU = np.array([-1000.0, 40.0, -100.0, -850.0, 700.0])
# T1-like relative signal: fat bright, soft tissue mid, lung/air ~0, cortical bone dark.
TISSUE_T1 = np.array([0.0, 0.45, 1.0, 0.03, 0.12])

# Files in out_dir that mark it as ours, so a stale cohort may be deleted but nothing else.
_MARKER = ".resdx-synthetic"
_UID_NAMESPACE = "resdx-demo-cohort"

# DICOM planes as (row direction, column direction) in LPS; the normal is row x column.
CT_PLANES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}
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
_FIRST_F = ["Anna", "Maria", "Sofia", "Emma", "Olivia", "Chloe", "Hana", "Ingrid", "Lucia", "Mei"]
_FIRST_M = ["James", "Lukas", "Mateo", "Noah", "Omar", "Pavel", "Kenji", "David", "Ethan", "Rahul"]
_LAST = ["Smith", "Garcia", "Muller", "Rossi", "Tanaka", "Nowak", "Johansson", "Dubois", "Silva", "Khan",
         "Brown", "Lopez", "Schmidt", "Okafor", "Haddad"]
_INSTITUTIONS = ["St. Elsewhere General Hospital", "Riverside Medical Center", "Northfield University Clinic",
                 "Lakeside Imaging Institute"]


# --------------------------------------------------------------------------------------------------------
# Phantom
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phantom:
    """Torso phantom in world RAS mm; `lesion_centre` is None for label-0 cases."""

    centre: tuple[float, float, float]
    body_axes: tuple[float, float, float]
    fat_mm: float
    lung_centres: tuple[tuple[float, float, float], tuple[float, float, float]]
    lung_axes: tuple[float, float, float]
    spine_xy: tuple[float, float]
    spine_radius: float
    lesion_centre: tuple[float, float, float] | None = None
    lesion_radius: float = 0.0
    lesion_edge_mm: float = 1.5


def _inside_ellipsoid(p: np.ndarray, centre, axes) -> np.ndarray:
    q = (p - np.asarray(centre)) / np.asarray(axes)
    return np.einsum("...i,...i->...", q, q) <= 1.0


def phantom_labels(ph: Phantom, pts: np.ndarray) -> np.ndarray:
    """Tissue label (AIR/SOFT/FAT/LUNG/BONE) at world points `pts` (..., 3), lesion ignored."""
    pts = np.asarray(pts, dtype=float)
    labels = np.full(pts.shape[:-1], AIR, dtype=np.uint8)
    labels[_inside_ellipsoid(pts, ph.centre, ph.body_axes)] = FAT
    inner = _inside_ellipsoid(pts, ph.centre, np.asarray(ph.body_axes) - ph.fat_mm)
    labels[inner] = SOFT
    for c in ph.lung_centres:
        labels[inner & _inside_ellipsoid(pts, c, ph.lung_axes)] = LUNG
    dx, dy = pts[..., 0] - ph.spine_xy[0], pts[..., 1] - ph.spine_xy[1]
    labels[inner & (dx * dx + dy * dy <= ph.spine_radius**2)] = BONE
    return labels


def lesion_distance(ph: Phantom, pts: np.ndarray) -> np.ndarray:
    """Distance (mm) from the lesion centre; +inf everywhere when there is no lesion."""
    pts = np.asarray(pts, dtype=float)
    if ph.lesion_centre is None:
        return np.full(pts.shape[:-1], np.inf)
    return np.linalg.norm(pts - np.asarray(ph.lesion_centre), axis=-1)


def lesion_weight(ph: Phantom, pts: np.ndarray) -> np.ndarray:
    """Soft lesion membership in [0, 1]: 0.5 at the nominal radius, logistic edge of `lesion_edge_mm`."""
    d = lesion_distance(ph, pts)
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp((d - ph.lesion_radius) / ph.lesion_edge_mm))


def lesion_mask(ph: Phantom, pts: np.ndarray) -> np.ndarray:
    """Binary lesion mask: points within the nominal radius."""
    return lesion_distance(ph, pts) <= ph.lesion_radius


def _sphere_directions(n: int = 64) -> np.ndarray:
    # Fibonacci sphere: evenly spread probe directions for the lesion clearance check.
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=-1)


def make_phantom(rng: np.random.Generator, lesion_radius: float | None,
                 max_offset_mm: float = 60.0) -> Phantom:
    """Draw a patient-specific phantom; place a lesion of `lesion_radius` mm in soft tissue if given."""
    ax, ay, az = np.array([110.0, 85.0, 110.0]) * rng.uniform(0.9, 1.1, 3)
    cx, cy, cz = rng.uniform(-5.0, 5.0, 3)
    lung_y = cy + 0.05 * ay
    lung_z = cz + 0.40 * az
    ph = Phantom(
        centre=(cx, cy, cz),
        body_axes=(ax, ay, az),
        fat_mm=float(rng.uniform(6.0, 10.0)),
        lung_centres=((cx - 0.42 * ax, lung_y, lung_z), (cx + 0.42 * ax, lung_y, lung_z)),
        lung_axes=(0.30 * ax, 0.55 * ay, 0.38 * az),
        spine_xy=(cx, cy - 0.62 * ay),
        spine_radius=float(rng.uniform(11.0, 14.0)),
    )
    if lesion_radius is None:
        return ph
    # Rejection sampling: centre within `max_offset_mm` of the origin (survives a centre crop) and a
    # 4 mm clearance shell that is soft tissue only (no lung, spine, fat or air).
    probes = _sphere_directions() * (lesion_radius + 4.0)
    for _ in range(10_000):
        c = rng.uniform(-max_offset_mm, max_offset_mm, 3)
        if np.linalg.norm(c) > max_offset_mm:
            continue
        if np.all(phantom_labels(ph, np.vstack([c, c + probes])) == SOFT):
            edge = float(rng.uniform(1.0, 2.0))
            return replace(ph, lesion_centre=tuple(float(v) for v in c), lesion_radius=float(lesion_radius),
                           lesion_edge_mm=edge)
    raise RuntimeError("could not place a lesion in soft tissue")  # pragma: no cover


# --------------------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------------------


def grid_points(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """World coordinates (shape + (3,)) of every voxel centre of a grid."""
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    pts = affine[:3, :3] @ idx + affine[:3, 3:4]
    return pts.T.reshape(*shape, 3)


def dicom_affine(row_cos, col_cos, pixel_spacing, first_ipp, slice_spacing: float) -> np.ndarray:
    """RAS affine of a DICOM series: i = column, j = row, k = slice ascending along row x column.

    `pixel_spacing` is DICOM's [row spacing, column spacing]; `first_ipp` is the LPS position of the
    lowest slice along the normal.
    """
    r, c = np.asarray(row_cos, float), np.asarray(col_cos, float)
    lps = np.eye(4)
    lps[:3, 0] = r * float(pixel_spacing[1])
    lps[:3, 1] = c * float(pixel_spacing[0])
    lps[:3, 2] = np.cross(r, c) * float(slice_spacing)
    lps[:3, 3] = np.asarray(first_ipp, float)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


@dataclass(frozen=True)
class CTGeometry:
    """A DICOM series grid; slice 0 is the lowest along the normal, `descending` is acquisition order."""

    plane: str
    row_cos: tuple[float, float, float]
    col_cos: tuple[float, float, float]
    pixel_spacing: tuple[float, float]  # [row spacing, column spacing] as in DICOM
    rows: int
    cols: int
    n_slices: int
    slice_spacing: float
    slice_thickness: float
    first_ipp: tuple[float, float, float]
    descending: bool

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cos, self.col_cos)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.cols, self.rows, self.n_slices)

    @property
    def affine(self) -> np.ndarray:
        return dicom_affine(self.row_cos, self.col_cos, self.pixel_spacing, self.first_ipp,
                            self.slice_spacing)

    def ipp(self, k: int) -> np.ndarray:
        """LPS ImagePositionPatient of slice k (k in ascending position order)."""
        return np.asarray(self.first_ipp) + k * self.slice_spacing * self.normal


def make_ct_geometry(rng: np.random.Generator, plane: str | None = None) -> CTGeometry:
    """Random CT grid covering a 240-280 mm field of view around the origin.

    Values are rounded to 0.01 mm so the decimal strings in the DICOM header reproduce the grid exactly.
    """
    plane = plane or str(rng.choice(list(CT_PLANES), p=[0.6, 0.2, 0.2]))
    row_cos, col_cos = CT_PLANES[plane]
    dc = round(float(rng.uniform(2.5, 4.0)), 2)
    # A quarter of the series get non-square pixels so that a swapped PixelSpacing shows.
    dr = round(float(np.clip(dc * rng.uniform(0.8, 1.25), 2.5, 5.0)), 2) if rng.random() < 0.25 else dc
    cols = int(np.clip(np.ceil(rng.uniform(240, 280) / dc), 64, 112))
    rows = int(np.clip(np.ceil(rng.uniform(240, 280) / dr), 64, 112))
    dz = round(float(rng.uniform(2.5, 6.0)), 2)
    n = int(np.clip(round(rng.uniform(160, 240) / dz), 24, 80))
    thickness = round(dz * float(rng.choice([1.0, 1.0, 1.25])), 2)
    r, c = np.asarray(row_cos), np.asarray(col_cos)
    centre_lps = rng.uniform(-10.0, 10.0, 3)
    first = centre_lps - (cols - 1) / 2 * dc * r - (rows - 1) / 2 * dr * c - (n - 1) / 2 * dz * np.cross(r, c)
    return CTGeometry(
        plane=plane, row_cos=row_cos, col_cos=col_cos, pixel_spacing=(dr, dc), rows=rows, cols=cols,
        n_slices=n, slice_spacing=dz, slice_thickness=thickness,
        first_ipp=tuple(round(float(v), 2) for v in first), descending=bool(rng.random() < 0.5),
    )


def rotation_matrix(axis, angle_deg: float) -> np.ndarray:
    """Rotation by `angle_deg` about `axis` (Rodrigues)."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.deg2rad(angle_deg)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * kx @ kx


@dataclass(frozen=True)
class MRGeometry:
    """A NIfTI grid: voxel axis a runs along world axis perm[a] with sign flips[a], then rotated."""

    affine: np.ndarray
    shape: tuple[int, int, int]
    perm: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    oblique_deg: float
    spacing: tuple[float, float, float]


def make_mr_geometry(rng: np.random.Generator) -> MRGeometry:
    """Random MR grid: permuted/flipped axes, sometimes oblique (<= 25 deg), anisotropic spacing."""
    perm = tuple(int(v) for v in rng.permutation(3))
    flips = tuple(bool(v) for v in rng.random(3) < 0.4)
    slice_axis = int(rng.integers(3))
    inplane = float(rng.uniform(1.6, 3.5))
    spacing = [round(inplane, 3)] * 3
    spacing[slice_axis] = round(float(rng.uniform(2.5, 5.0)), 3)
    # At most 112 voxels in-plane and 80 through-plane; >= 180 mm always covered, so lesions stay inside.
    caps = [80 if a == slice_axis else 112 for a in range(3)]
    shape = tuple(int(min(caps[a], np.ceil(rng.uniform(240, 280) / spacing[a]))) for a in range(3))
    direction = np.zeros((3, 3))
    for a in range(3):
        direction[perm[a], a] = -1.0 if flips[a] else 1.0
    oblique = float(rng.uniform(5.0, 25.0)) if rng.random() < 0.4 else 0.0
    if oblique:
        direction = rotation_matrix(rng.normal(size=3), oblique) @ direction
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing)
    centre = rng.uniform(-10.0, 10.0, 3)
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return MRGeometry(affine, shape, perm, flips, oblique, tuple(spacing))


# --------------------------------------------------------------------------------------------------------
# Intensities
# --------------------------------------------------------------------------------------------------------


def ct_hu_volume(ph: Phantom, geo: CTGeometry, rng: np.random.Generator, lesion_hu: float,
                 noise_hu: float) -> np.ndarray:
    """HU on the CT grid (i, j, k): tissue HU + lesion contrast, partial volume by smoothing, noise."""
    pts = grid_points(geo.affine, geo.shape)
    hu = TISSUE_HU[phantom_labels(ph, pts)] + lesion_hu * lesion_weight(ph, pts)
    # Light blur stands in for partial volume; wider along k when slices are thicker than their spacing.
    hu = ndimage.gaussian_filter(hu, sigma=(0.5, 0.5, 0.4 * geo.slice_thickness / geo.slice_spacing))
    return hu + rng.normal(0.0, noise_hu, hu.shape)


def mr_volume(ph: Phantom, geo: MRGeometry, rng: np.random.Generator, lesion_gain: float) -> np.ndarray:
    """T1-like signal on the MR grid with a smooth bias field and Rician noise (relative units)."""
    pts = grid_points(geo.affine, geo.shape)
    tissue = TISSUE_T1 * rng.uniform(0.9, 1.1, TISSUE_T1.size)
    s = tissue[phantom_labels(ph, pts)]
    s = s * (1.0 + lesion_gain * lesion_weight(ph, pts))
    s = ndimage.gaussian_filter(s, sigma=0.5)
    # Low-order multiplicative bias field over the body, clipped to 0.7-1.3.
    u = (pts - np.asarray(ph.centre)) / 150.0
    bias = 1.0 + u @ rng.uniform(-0.15, 0.15, 3) + (u * u) @ rng.uniform(-0.1, 0.1, 3)
    s = s * np.clip(bias, 0.7, 1.3)
    sigma = rng.uniform(0.015, 0.05)
    return np.hypot(s + rng.normal(0.0, sigma, s.shape), rng.normal(0.0, sigma, s.shape))


# --------------------------------------------------------------------------------------------------------
# Cohort plan
# --------------------------------------------------------------------------------------------------------


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
    lesion_contrast: float  # CT: HU above soft tissue; MR: relative signal gain
    compressed: bool
    localizer: bool
    phi: PatientPHI


@dataclass(frozen=True)
class SynthesisSummary:
    out_dir: Path
    manifest: Path
    n_patients: int
    n_studies: int
    n_ct: int
    n_mr: int
    n_positive: int
    n_compressed: int
    n_localizers: int
    n_files: int
    n_bytes: int


def _rng(seed: int, *key: int) -> np.random.Generator:
    # Independent, order-free streams per (seed, key): a case's pixels don't depend on other cases.
    return np.random.default_rng(np.random.SeedSequence(seed % 2**64, spawn_key=key))


def plan_cohort(cfg: SynthesizeConfig, seed: int) -> list[CasePlan]:
    """Patients, studies, modalities and labels; exact positive count = round(lesion_fraction * studies)."""
    lo, hi = cfg.studies_per_patient
    if not 1 <= lo <= hi:
        raise ValueError(f"studies_per_patient must satisfy 1 <= low <= high, got {cfg.studies_per_patient}")
    rng = _rng(seed, 0)
    width = max(3, len(str(cfg.n_patients)))
    rows: list[tuple[int, int, str, PatientPHI]] = []
    for p in range(cfg.n_patients):
        sex = str(rng.choice(["F", "M"]))
        first = str(rng.choice(_FIRST_F if sex == "F" else _FIRST_M))
        phi = PatientPHI(
            name=f"{rng.choice(_LAST)}^{first}",
            mrn=f"MRN{int(rng.integers(10**6, 10**7)):07d}",
            birth_date=dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 60 * 365))),
            sex=sex,
        )
        for s in range(int(rng.integers(lo, hi + 1))):
            rows.append((p, s, "CT" if rng.random() < cfg.ct_fraction else "MR", phi))
    n = len(rows)
    labels = np.zeros(n, dtype=int)
    labels[: int(round(cfg.lesion_fraction * n))] = 1
    labels = rng.permutation(labels)
    radii = rng.uniform(*cfg.lesion_radius_mm, n)
    unit = rng.uniform(0.0, 1.0, n)  # contrast within each modality's configured range
    ct_idx = [i for i, r in enumerate(rows) if r[2] == "CT"]
    # Drawn whatever the fraction, so changing compressed_fraction leaves every pixel unchanged.
    order = rng.permutation(len(ct_idx))
    n_comp = int(round(cfg.compressed_fraction * len(ct_idx)))
    if cfg.compressed_fraction > 0 and ct_idx:
        n_comp = max(1, n_comp)
    compressed = {ct_idx[i] for i in order[:n_comp]}
    localizer = set(ct_idx[::7])  # every 7th CT study, starting with the first
    return [
        CasePlan(
            index=i, case_id=f"demo-c{i + 1:04d}", patient_id=f"demo-p{p + 1:0{width}d}",
            patient_key=f"p{p + 1:0{width}d}", study_key=f"s{s + 1:02d}", modality=mod, label=int(labels[i]),
            lesion_radius=round(float(radii[i]), 2), compressed=i in compressed, localizer=i in localizer,
            lesion_contrast=float(np.interp(unit[i], [0, 1], cfg.lesion_contrast_hu if mod == "CT"
                                            else cfg.lesion_gain_mr)),
            phi=phi,
        )
        for i, (p, s, mod, phi) in enumerate(rows)
    ]


# --------------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------------


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


def hu_to_stored(hu: np.ndarray, pixel_representation: int, bits_stored: int, intercept: float,
                 slope: float) -> np.ndarray:
    """Invert the DICOM rescale and clip to the representable range of the stored bits."""
    if pixel_representation:
        lo, hi, dtype = -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1, np.int16
    else:
        lo, hi, dtype = 0, 2**bits_stored - 1, np.uint16
    return np.clip(np.rint((hu - intercept) / slope), lo, hi).astype(dtype)


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
    ds.InstitutionName = str(rng.choice(_INSTITUTIONS))
    ds.ReferringPhysicianName = f"{rng.choice(_LAST)}^{rng.choice(_FIRST_F + _FIRST_M)}^^Dr"
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
    ds = deepcopy(base)
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
        # Pin the encoder: other RLE plugins may emit different (equally valid) bytes.
        ds.compress(RLELossless, arr, encoding_plugin="pydicom", generate_instance_uid=False)
    else:
        ds.PixelData = arr.tobytes()
    return ds


def _dicom_name(sop_uid: str, with_ext: bool) -> str:
    # Hash-derived names, so directory order says nothing about slice order.
    return "IM_" + hashlib.sha1(sop_uid.encode()).hexdigest()[:8].upper() + (".dcm" if with_ext else "")


def _write_ct(plan: CasePlan, ph: Phantom, seed: int, rng: np.random.Generator, study_dir: Path) -> dict:
    geo = make_ct_geometry(rng)
    encoding = CT_ENCODINGS[int(rng.integers(len(CT_ENCODINGS)))]
    lesion_hu = plan.lesion_contrast
    hu = ct_hu_volume(ph, geo, rng, lesion_hu, noise_hu=float(rng.uniform(10.0, 20.0)))
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

    mask = lesion_mask(ph, grid_points(geo.affine, geo.shape)).astype(np.uint8)
    _save_nifti(mask, geo.affine, study_dir / "mask.nii.gz", code=1)
    return {
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


def _write_mr(plan: CasePlan, ph: Phantom, rng: np.random.Generator, study_dir: Path) -> dict:
    geo = make_mr_geometry(rng)
    lesion_gain = plan.lesion_contrast
    scale = float(10 ** rng.uniform(1.0, np.log10(3000.0)))
    signal = mr_volume(ph, geo, rng, lesion_gain) * scale
    as_int = bool(rng.random() < 0.5)
    data = np.clip(np.rint(signal), 0, 32767).astype(np.int16) if as_int else signal.astype(np.float32)
    code = int(rng.choice([1, 2]))
    study_dir.mkdir(parents=True)
    _save_nifti(data, geo.affine, study_dir / "image.nii.gz", code=code)
    mask = lesion_mask(ph, grid_points(geo.affine, geo.shape)).astype(np.uint8)
    _save_nifti(mask, geo.affine, study_dir / "mask.nii.gz", code=code)
    return {
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


def _write_case(plan: CasePlan, seed: int, out_dir: Path) -> dict:
    """Write one study into a hidden temp folder, then rename it into place."""
    rng = _rng(seed, 1, plan.index)
    ph = make_phantom(rng, plan.lesion_radius if plan.label else None)
    final = out_dir / plan.patient_key / plan.study_key
    tmp = final.with_name(f".{plan.study_key}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if plan.modality == "CT":
        geometry = _write_ct(plan, ph, seed, rng, tmp)
        image = final / "dicom"
    else:
        geometry = _write_mr(plan, ph, rng, tmp)
        image = final / "image.nii.gz"
    os.replace(tmp, final)
    return {
        "case_id": plan.case_id,
        "patient_id": plan.patient_id,
        "modality": plan.modality,
        "label": plan.label,
        "lesion_centre_ras": [round(v, 4) for v in ph.lesion_centre] if ph.lesion_centre else None,
        "lesion_radius_mm": plan.lesion_radius if plan.label else None,
        "image": image.relative_to(out_dir).as_posix(),
        "mask": (final / "mask.nii.gz").relative_to(out_dir).as_posix(),
        **geometry,
    }


def _clear_out_dir(out_dir: Path) -> None:
    """Delete a previous cohort; refuse to delete a non-empty folder we did not create."""
    if out_dir.exists():
        if any(out_dir.iterdir()) and not (out_dir / _MARKER).exists():
            raise FileExistsError(f"{out_dir} is not empty and holds no synthetic cohort; not deleting it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / _MARKER).write_text("Generated by pipeline.synthesize; deleted on the next run.\n")


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, newline="")
    os.replace(tmp, path)


def _write_case_task(task: dict) -> dict:
    return _write_case(task["plan"], task["seed"], task["out_dir"])


def synthesize(cfg: SynthesizeConfig, seed: int, progress: bool = False) -> SynthesisSummary:
    """Write the demo cohort under cfg.out_dir, `truth.json` beside it and the manifest at cfg.manifest."""
    out_dir, manifest = Path(cfg.out_dir), Path(cfg.manifest)
    plans = plan_cohort(cfg, seed)
    _clear_out_dir(out_dir)
    # Every case draws from its own seeded generator, so parallel writing keeps the bytes identical.
    tasks = [{"plan": plan, "seed": seed, "out_dir": out_dir} for plan in plans]
    records = progress_map(_write_case_task, tasks, cfg.workers, "synthesizing", progress)
    # One case per line: greppable and diff-friendly.
    cases = ",\n".join("  " + json.dumps(rec) for rec in records)
    _atomic_write_text(out_dir / "truth.json", f'{{"seed": {seed},\n "cases": [\n{cases}\n ]}}\n')

    # Manifest paths are relative to the manifest's own folder, so the repository can move.
    base = manifest.parent.resolve()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case_id", "patient_id", "modality", "path", "label", "mask_path"])
    for rec in records:
        rel = [
            Path(os.path.relpath((out_dir / rec[k]).resolve(), base)).as_posix()
            for k in ("image", "mask")
        ]
        writer.writerow([rec["case_id"], rec["patient_id"], rec["modality"], rel[0], rec["label"], rel[1]])
    _atomic_write_text(manifest, buf.getvalue())

    files = [p for p in out_dir.rglob("*") if p.is_file()]
    return SynthesisSummary(
        out_dir=out_dir, manifest=manifest, n_patients=cfg.n_patients, n_studies=len(plans),
        n_ct=sum(p.modality == "CT" for p in plans), n_mr=sum(p.modality == "MR" for p in plans),
        n_positive=sum(p.label for p in plans), n_compressed=sum(p.compressed for p in plans),
        n_localizers=sum(p.localizer for p in plans), n_files=len(files),
        n_bytes=sum(p.stat().st_size for p in files),
    )
