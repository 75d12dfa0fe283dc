"""NIfTI reading and writing via nibabel, honouring sform/qform as NIfTI specifies."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.core.limits import DEFAULT_MAX_CASE_BYTES, require_fits
from pipeline.core.volume import Volume
from pipeline.errors import RejectedCase

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path | str) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


MAX_AXIS_COS = 0.7  # voxel axes closer than ~45 degrees are not a scan's grid, even a tilted one


def read_nifti(path: Path | str, max_bytes: int = DEFAULT_MAX_CASE_BYTES) -> Volume:
    """Load a NIfTI file; the affine is the sform when its code is set, else the qform.

    (nibabel's `img.affine` applies exactly that precedence.) Voxels come back scaled by
    scl_slope/scl_inter as float32. The header's dims are checked against `max_bytes` before
    the data are read; nibabel then reads (and inflates) only that many bytes.
    """
    path = Path(path)
    if not path.exists():
        raise RejectedCase("missing_path", "path does not exist")
    try:
        img = nib.load(str(path))
        shape = img.header.get_data_shape()
        require_fits(shape, 4 + img.header.get_data_dtype().itemsize, max_bytes,
                     f"the NIfTI's {'x'.join(map(str, shape))} voxels (stored and as float32)")
        check_affine(np.asarray(img.affine, dtype=np.float64))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except RejectedCase:
        raise
    except PermissionError:
        raise RejectedCase("unreadable_path", "no permission to read the path") from None
    except MemoryError:
        raise RejectedCase("too_large", "reading the NIfTI ran out of memory") from None
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for broken files
        # nibabel's messages quote the file's path (PHI in names): keep only the error type.
        raise RejectedCase("bad_nifti", f"cannot read the NIfTI file ({type(err).__name__}: not a valid or "
                           "complete NIfTI file)") from None
    header = img.header
    sform_code = int(header["sform_code"]) if "sform_code" in header else 0
    qform_code = int(header["qform_code"]) if "qform_code" in header else 0
    if sform_code == 0 and qform_code == 0:
        raise RejectedCase("no_geometry", "NIfTI has neither sform nor qform set; orientation unknown")
    while data.ndim > 4 or (data.ndim == 4 and data.shape[3] == 1):
        if data.shape[-1] != 1:
            raise RejectedCase("bad_dimensions", f"NIfTI has shape {data.shape}; expected 3D or 4D")
        data = data[..., 0]
    if data.ndim < 3:
        data = data.reshape(data.shape + (1,) * (3 - data.ndim))
    meta = {"source_format": "nifti", "sform_code": sform_code, "qform_code": qform_code, "notes": []}
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), meta=meta)


def check_affine(affine: np.ndarray) -> None:
    """A voxel-to-world affine that can place voxels: finite, invertible, axes not near-parallel."""
    if not np.all(np.isfinite(affine)):
        raise RejectedCase("bad_affine", "the NIfTI affine (sform/qform) holds NaN or infinite values")
    axes = affine[:3, :3]
    norms = np.linalg.norm(axes, axis=0)
    if np.any(norms <= 1e-6) or abs(float(np.linalg.det(axes))) <= 1e-9:
        raise RejectedCase("bad_affine", "the NIfTI affine is singular (a zero voxel size or all-zero matrix)")
    cos = np.abs((axes / norms).T @ (axes / norms) - np.eye(3)).max()
    if cos > MAX_AXIS_COS:
        raise RejectedCase("bad_affine", f"the NIfTI affine's voxel axes are nearly parallel (|cos| {cos:.2f})")


def atomic_save(img: nib.Nifti1Image, path: Path | str) -> None:
    """Write through a temporary file in the same folder, then rename: never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if str(path).endswith(".gz") else ".nii"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{os.getpid()}-", suffix=suffix)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_nifti(volume: Volume, keep_integers: bool = True) -> nib.Nifti1Image:
    """A NIfTI image with sform and qform both set from the volume's affine (codes 1, scanner).

    Integer-valued data that fit int16 are stored as int16 (as dcm2niix does); others float32.
    DICOM volumes say from their headers whether they are integer-valued (integral rescale),
    which spares a pass over the voxels.
    """
    data = volume.data
    integral = volume.meta.get("integer_valued")
    if integral is None and keep_integers:
        integral = bool(np.all(np.isfinite(data)) and np.array_equal(data, np.round(data)))
    if data.dtype == np.int16:  # the DICOM reader placed it as int16 already (`integers=True`)
        pass
    elif keep_integers and integral and data.min(initial=0) >= -32768 and data.max(initial=0) <= 32767:
        data = data.astype(np.int16, order="K")
    elif data.dtype != np.float32:
        data = data.astype(np.float32, order="K")
    img = nib.Nifti1Image(data, volume.affine)
    img.set_sform(volume.affine, code=1)
    img.set_qform(volume.affine, code=1)  # nibabel stores the nearest rigid part for sheared stacks
    img.header.set_xyzt_units("mm", "sec")
    return img


def write_nifti(volume: Volume, path: Path | str) -> Path:
    atomic_save(to_nifti(volume), path)
    return Path(path)
