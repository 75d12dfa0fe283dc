"""Pure geometry and intensities of the synthetic demo cohort: the torso phantom, scanner grids, voxel values.

`pipeline.stages.synthesize` draws one `Phantom` per study and samples it on a random CT (`CTGeometry`) or
MR (`MRGeometry`) grid; `pipeline.io.synthetic_dicom` turns the resulting arrays into DICOM and NIfTI files.
Kept here, apart from the file writers, because it is numpy/scipy only: no file I/O, so it can be tested
and reused (e.g. by ground-truth checks) without touching the disk. Every random value comes from the
`numpy.random.Generator` passed in, in a fixed order, so one generator state gives identical arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

# Tissue labels returned by `phantom_labels`.
AIR, SOFT, FAT, LUNG, BONE = 0, 1, 2, 3, 4
TISSUE_HU = np.array([-1000.0, 40.0, -100.0, -850.0, 700.0])
# T1-like relative signal: fat bright, soft tissue mid, lung/air ~0, cortical bone dark.
TISSUE_T1 = np.array([0.0, 0.45, 1.0, 0.03, 0.12])

# DICOM planes as (row direction, column direction) in LPS; the normal is row x column.
CT_PLANES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}


# --------------------------------------------------------------------------------------------------------
# Phantom
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phantom:
    """Torso phantom in world RAS mm; `lesion_centre` is None for label-0 cases. A second lesion
    (`second_centre`, the multi-label cohort's co-occurring finding) is None unless asked for."""

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
    second_centre: tuple[float, float, float] | None = None
    second_radius: float = 0.0
    second_edge_mm: float = 1.5


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


def second_weight(ph: Phantom, pts: np.ndarray) -> np.ndarray:
    """`lesion_weight` of the second lesion (0 everywhere when there is none)."""
    return lesion_weight(_second(ph), pts)


def _second(ph: Phantom) -> Phantom:
    return replace(ph, lesion_centre=ph.second_centre, lesion_radius=ph.second_radius,
                   lesion_edge_mm=ph.second_edge_mm)


def lesion_mask(ph: Phantom, pts: np.ndarray) -> np.ndarray:
    """Binary lesion mask: points within the nominal radius (of either lesion: their union)."""
    inside = lesion_distance(ph, pts) <= ph.lesion_radius
    if ph.second_centre is not None:
        inside |= lesion_distance(_second(ph), pts) <= ph.second_radius
    return inside


def _sphere_directions(n: int = 64) -> np.ndarray:
    # Fibonacci sphere: evenly spread probe directions for the lesion clearance check.
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=-1)


def _place(ph: Phantom, rng: np.random.Generator, radius: float, max_offset_mm: float,
           away: tuple[tuple[float, float, float], float] | None = None) -> tuple[tuple[float, ...], float]:
    """(centre, edge) of a lesion in soft tissue; `away` = (centre, radius) of a lesion to keep 4 mm from."""
    # Rejection sampling: centre within `max_offset_mm` of the origin (survives a centre crop) and a
    # 4 mm clearance shell that is soft tissue only (no lung, spine, fat or air).
    probes = _sphere_directions() * (radius + 4.0)
    for _ in range(10_000):
        c = rng.uniform(-max_offset_mm, max_offset_mm, 3)
        if np.linalg.norm(c) > max_offset_mm:
            continue
        if away is not None and np.linalg.norm(c - np.asarray(away[0])) < radius + away[1] + 4.0:
            continue
        if np.all(phantom_labels(ph, np.vstack([c, c + probes])) == SOFT):
            edge = float(rng.uniform(1.0, 2.0))
            return tuple(float(v) for v in c), edge
    raise RuntimeError("could not place a lesion in soft tissue")  # pragma: no cover


def make_phantom(rng: np.random.Generator, lesion_radius: float | None,
                 max_offset_mm: float = 60.0, second_radius: float | None = None) -> Phantom:
    """Draw a patient-specific phantom; place a lesion of `lesion_radius` mm in soft tissue if given,
    and a second one of `second_radius` mm apart from it if given (drawn after the first)."""
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
    centre, edge = _place(ph, rng, lesion_radius, max_offset_mm)
    ph = replace(ph, lesion_centre=centre, lesion_radius=float(lesion_radius), lesion_edge_mm=edge)
    if second_radius is None:
        return ph
    centre, edge = _place(ph, rng, second_radius, max_offset_mm, away=(ph.lesion_centre, ph.lesion_radius))
    return replace(ph, second_centre=centre, second_radius=float(second_radius), second_edge_mm=edge)


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


def _smooth_field(u: np.ndarray, linear: np.ndarray, quadratic: np.ndarray, offset: float = 0.0) -> np.ndarray:
    """offset + a low-order polynomial of body coordinates `u` (mm / 150 from the phantom centre).

    Summed left to right (offset first), the order the MR bias field has always used: same bytes.
    """
    return offset + u @ linear + (u * u) @ quadratic


def ct_hu_volume(ph: Phantom, geo: CTGeometry, rng: np.random.Generator, lesion_hu: float,
                 noise_hu: float, drift_hu: float = 0.0, second_hu: float = 0.0,
                 pts: np.ndarray | None = None) -> np.ndarray:
    """HU on the CT grid (i, j, k): tissue HU + lesion contrast, partial volume by smoothing, noise.

    `lesion_hu` < 0 makes a hypodense lesion; `second_hu` is the second lesion's (if the phantom has one).
    `drift_hu` > 0 adds a smooth low-frequency HU drift of at most +-drift_hu (cupping-like); its
    coefficients are drawn only then, after the noise. `pts`: the grid's `grid_points`, if already computed.
    """
    pts = grid_points(geo.affine, geo.shape) if pts is None else pts
    hu = TISSUE_HU[phantom_labels(ph, pts)] + lesion_hu * lesion_weight(ph, pts)
    if ph.second_centre is not None:
        hu = hu + second_hu * second_weight(ph, pts)
    # Light blur stands in for partial volume; wider along k when slices are thicker than their spacing.
    hu = ndimage.gaussian_filter(hu, sigma=(0.5, 0.5, 0.4 * geo.slice_thickness / geo.slice_spacing))
    hu = hu + rng.normal(0.0, noise_hu, hu.shape)
    if drift_hu > 0:
        u = (pts - np.asarray(ph.centre)) / 150.0
        field = _smooth_field(u, rng.uniform(-0.5, 0.5, 3), rng.uniform(-1 / 3, 1 / 3, 3))
        hu = hu + drift_hu * np.clip(field, -1.0, 1.0)
    return hu


def _gain(s: np.ndarray, gain: float, weight: np.ndarray) -> np.ndarray:
    return s * (1.0 + gain * weight) if gain >= 0 else s / (1.0 + -gain * weight)


def mr_volume(ph: Phantom, geo: MRGeometry, rng: np.random.Generator, lesion_gain: float,
              noise: tuple[float, float] = (0.015, 0.05), bias_field: float = 0.3,
              second_gain: float = 0.0, pts: np.ndarray | None = None) -> np.ndarray:
    """T1-like signal on the MR grid with a smooth bias field and Rician noise (relative units).

    The lesion multiplies the signal by 1 + gain (hyperintense); a negative gain divides it by
    1 + |gain| (hypointense), so +g and -g are the same contrast on a log scale. `bias_field` is the
    largest deviation of the multiplicative bias field from 1; the noise sigma is drawn from `noise`.
    `pts`: the grid's `grid_points`, if already computed.
    """
    pts = grid_points(geo.affine, geo.shape) if pts is None else pts
    tissue = TISSUE_T1 * rng.uniform(0.9, 1.1, TISSUE_T1.size)
    s = tissue[phantom_labels(ph, pts)]
    s = _gain(s, lesion_gain, lesion_weight(ph, pts))
    if ph.second_centre is not None:  # the second lesion's gain (`second_gain`), the same way
        s = _gain(s, second_gain, second_weight(ph, pts))
    s = ndimage.gaussian_filter(s, sigma=0.5)
    # Low-order multiplicative bias field over the body, clipped to 1 -+ bias_field (0.7-1.3 by default).
    k = bias_field / 0.3
    u = (pts - np.asarray(ph.centre)) / 150.0
    bias = _smooth_field(u, rng.uniform(-0.15, 0.15, 3) * k, rng.uniform(-0.1, 0.1, 3) * k, offset=1.0)
    s = s * np.clip(bias, 1.0 - bias_field, 1.0 + bias_field)
    sigma = rng.uniform(*noise)
    return np.hypot(s + rng.normal(0.0, sigma, s.shape), rng.normal(0.0, sigma, s.shape))


# --------------------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------------------


def hu_to_stored(hu: np.ndarray, pixel_representation: int, bits_stored: int, intercept: float,
                 slope: float) -> np.ndarray:
    """Invert the DICOM rescale and clip to the representable range of the stored bits."""
    if pixel_representation:
        lo, hi, dtype = -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1, np.int16
    else:
        lo, hi, dtype = 0, 2**bits_stored - 1, np.uint16
    return np.clip(np.rint((hu - intercept) / slope), lo, hi).astype(dtype)
