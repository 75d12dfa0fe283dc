"""Read one case (a DICOM series folder/file or a NIfTI file) into a checked native `Volume`.

The settings come from the plan (`ReaderSettings`), so ingest, predict and the served model
read a study the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.limits import DEFAULT_MAX_CASE_BYTES, require_fits
from pipeline.core.plan import ReaderSettings
from pipeline.core.volume import Volume, check_voxels
from pipeline.errors import RejectedCase
from pipeline.io.dicom_checks import is_regular_file


def read_case(path: Path, modality: str, reader: ReaderSettings, series_uid: str = "",
              integers: bool = False) -> Volume:
    """Read one case into a native `Volume` and check it is a usable 3D scan; raises `RejectedCase`.
    `integers`: a DICOM series whose rescale is integral and whose values fit comes as int16 (the same
    values as float32, half the memory; `read_dicom_series`)."""
    from pipeline.io.dicom import read_dicom_series
    from pipeline.io.nifti import is_nifti, read_nifti

    if not path.exists():
        raise RejectedCase("missing_path", "the manifest path does not exist")
    if not (path.is_dir() or is_regular_file(path)):
        raise RejectedCase("not_a_file", "the manifest path is neither a folder nor a regular file (a FIFO, socket "
                           "or device)")
    if path.is_file() and is_nifti(path):
        volume = read_nifti(path, reader.max_case_bytes)
    else:
        volume = read_dicom_series(path, series_uid=series_uid or None, min_slices=1,
                                   take_volume=reader.take_volume, max_bytes=reader.max_case_bytes, integers=integers)
        found = volume.meta.get("modality", "")
        if found in ("CT", "MR") and found != modality:
            raise RejectedCase("modality_mismatch", f"manifest says {modality} but the DICOM series is {found}")
    if volume.data.ndim == 4:
        if reader.take_volume is None:
            raise RejectedCase("multi_volume", f"{volume.data.shape[3]} volumes (4D, e.g. fMRI/DWI); a 3D classifier "
                               "needs one: set ingest.take_volume to pick it")
        if not 0 <= reader.take_volume < volume.data.shape[3]:
            raise RejectedCase("no_such_volume", f"ingest.take_volume={reader.take_volume} but the image has "
                               f"{volume.data.shape[3]} volumes")
        volume.data = volume.data[..., reader.take_volume]
    n_slices = min(volume.data.shape[:3])
    if n_slices < reader.min_slices:
        raise RejectedCase("too_few_slices", f"{n_slices} slice(s), fewer than ingest.min_slices={reader.min_slices}")
    check_voxels(volume.data)
    return volume


def read_mask(mask_path: Path, native_shape, native_affine: np.ndarray,
              max_bytes: int = DEFAULT_MAX_CASE_BYTES) -> np.ndarray:
    """A lesion mask (NIfTI) on the image's native grid, as bool; resampled if it lies on another grid."""
    import nibabel as nib

    from pipeline.core.preprocess import resample_to_grid
    from pipeline.io.nifti import check_affine

    img = nib.load(str(mask_path))
    # The mask is manifest input too: its header's claim is checked before its voxels are read.
    require_fits(img.header.get_data_shape(), 4 + img.header.get_data_dtype().itemsize, max_bytes, "the mask")
    check_affine(np.asarray(img.affine, dtype=np.float64))
    mask = np.asarray(img.dataobj) > 0
    if mask.shape != tuple(native_shape) or not np.allclose(img.affine, native_affine, atol=1e-3):
        mask = resample_to_grid(mask.astype(np.float32), img.affine, native_shape, np.asarray(native_affine),
                                order=1) > 0.5
    return mask
