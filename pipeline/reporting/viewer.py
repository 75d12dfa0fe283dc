"""What the report's per-case viewer embeds: the case's volume and map as gzipped NIfTI, and the vendored Niivue.

The viewer is Niivue (github.com/niivue/niivue, BSD-2-Clause), bundled into one classic script by
tools/niivue/build.sh at the versions its package-lock.json pins, and committed in vendor/ with every
bundled package's licence (vendor/LICENSES.txt). A report inlines it once; each case's volume and map are
inlined as base64 text and only decoded when the reader opens that case.

Size rule (`explain.viewer_max_voxels`): a volume with more voxels than that is block-averaged by the smallest
integer factor f (the same on every axis, edges padded by repetition) that brings it under the limit; the
affine follows, so positions in millimetres stay exact at the block centres. The volume is stored as int16
(CT Hounsfield units are integers; other data get NIfTI's scl_slope/scl_inter, chosen by nibabel), the map
as uint8 with its own slope, so one case costs at most 3 bytes per voxel before gzip and base64.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np

VENDOR = Path(__file__).with_name("vendor")
NIIVUE_VERSION = "0.69.0"
# tools/niivue/build.sh prints this; a different file means a rebuilt or edited bundle.
NIIVUE_SHA256 = "fd2c005bf535178534b83730e05615aa12d97a012bb19fcb174fdde7de6dc9ff"


@cache
def niivue_script() -> str:
    """The vendored Niivue bundle's text, checked against its pinned hash."""
    data = (VENDOR / "niivue.min.js").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != NIIVUE_SHA256:
        raise RuntimeError(f"pipeline/reporting/vendor/niivue.min.js has SHA-256 {digest}, not the pinned "
                           f"{NIIVUE_SHA256}: rebuild it with tools/niivue/build.sh and update NIIVUE_SHA256")
    text = data.decode("utf-8")
    if "</script" in text.lower():  # would end the inline <script> element early
        raise RuntimeError("the Niivue bundle contains '</script'; it cannot be inlined")
    return text


def block_factor(shape: tuple[int, ...], max_voxels: int) -> int:
    """The smallest integer f >= 1 with prod(ceil(n / f)) <= max_voxels."""
    f = 1
    while int(np.prod([-(-n // f) for n in shape])) > max_voxels:
        f += 1
    return f


def block_mean(data: np.ndarray, f: int) -> np.ndarray:
    """Mean over f x f x f blocks (edges padded by repetition); f = 1 returns the data unchanged."""
    if f == 1:
        return data
    pad = [(0, (-n) % f) for n in data.shape]
    x = np.pad(data.astype(np.float32, copy=False), pad, mode="edge")
    a, b, c = (n // f for n in x.shape)
    return x.reshape(a, f, b, f, c, f).mean(axis=(1, 3, 5))


def block_affine(affine: np.ndarray, f: int) -> np.ndarray:
    """The affine of the block-averaged grid: voxel i' is the centre of old voxels f*i' .. f*i'+f-1."""
    scale = np.diag([f, f, f, 1.0])
    scale[:3, 3] = (f - 1) / 2.0
    return np.asarray(affine, dtype=np.float64) @ scale


def _nifti_b64(data: np.ndarray, affine: np.ndarray, dtype) -> str:
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    if np.issubdtype(dtype, np.integer) and np.issubdtype(np.asarray(data).dtype, np.integer):
        img.header.set_slope_inter(1.0, 0.0)
    # mtime=0: the same case gives the same bytes, so the report is reproducible.
    return base64.b64encode(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)).decode("ascii")


@dataclass(frozen=True)
class ViewerCase:
    """One case as the viewer gets it: base64 gzipped NIfTI of the volume and of the map, on one grid."""

    volume_b64: str
    map_b64: str
    factor: int          # the block-averaging factor (1 = the native grid)
    shape: tuple[int, int, int]
    grid: str            # "native" (the scanner's grid) or "model input" (the tensor's grid)
    modality: str        # "CT", "MR" or "" (decides the window presets)
    units: str           # of the volume's values: "HU", or "" when not calibrated
    peak: tuple[int, int, int]  # voxel of the map's maximum on this grid (from the float map, before uint8)
    affine: tuple[float, ...]   # this grid's voxel-to-RAS affine, row-major 4x4 (the viewer works in mm)

    @property
    def peak_mm(self) -> tuple[float, float, float]:
        a = np.asarray(self.affine).reshape(4, 4)
        return tuple(float(v) for v in (a @ np.array([*self.peak, 1.0]))[:3])

    @property
    def world_to_voxel(self) -> tuple[float, ...]:
        """RAS mm to this grid's voxel index, the first 3 rows of the inverse affine (row-major, 12 numbers)."""
        return tuple(float(v) for v in np.linalg.inv(np.asarray(self.affine).reshape(4, 4))[:3].ravel())

    @property
    def n_bytes(self) -> int:
        return len(self.volume_b64) + len(self.map_b64)


def viewer_case(volume: np.ndarray, cam: np.ndarray, affine: np.ndarray, modality: str, max_voxels: int,
                grid: str = "native") -> ViewerCase:
    """Volume and map (same shape, voxel-to-RAS `affine`) encoded for the viewer, downsampled if needed."""
    if volume.shape != cam.shape or volume.ndim != 3:
        raise ValueError(f"volume {volume.shape} and map {cam.shape} must be one 3D grid")
    f = block_factor(volume.shape, max_voxels)
    vol = block_mean(volume, f)
    m = np.clip(np.nan_to_num(block_mean(cam, f).astype(np.float32)), 0.0, None)
    aff = block_affine(affine, f)
    integer = np.issubdtype(vol.dtype, np.integer) or bool(np.all(np.mod(vol, 1) == 0))
    fits_int16 = float(vol.min()) >= -32768 and float(vol.max()) <= 32767
    vol_data = vol.astype(np.int16) if integer and fits_int16 else vol.astype(np.float32)
    ct = modality.upper() == "CT" and grid == "native"
    return ViewerCase(
        volume_b64=_nifti_b64(vol_data, aff, np.int16),
        map_b64=_nifti_b64(m, aff, np.uint8),
        factor=f, shape=tuple(int(n) for n in vol.shape), grid=grid, modality=modality.upper(),
        units="HU" if ct else "", peak=tuple(int(v) for v in np.unravel_index(int(np.argmax(m)), m.shape)),
        affine=tuple(float(v) for v in aff.ravel()),
    )
