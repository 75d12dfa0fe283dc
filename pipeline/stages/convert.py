"""`resdx convert`: one DICOM series to NIfTI in its native grid (like dcm2niix).

No resampling, no normalization: voxels keep their stored order (i along columns,
j along rows, k along the slice normal) and values (after rescale slope/intercept).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.limits import DEFAULT_MAX_CASE_BYTES
from pipeline.core.volume import Volume, check_voxels
from pipeline.io.dicom import read_dicom_series
from pipeline.io.nifti import write_nifti


def convert(src: Path | str, out: Path | str, series_uid: str | None = None,
            max_bytes: int = DEFAULT_MAX_CASE_BYTES) -> Volume:
    """Convert and write; returns the volume. Raises `RejectedCase` with the reason.

    The same voxel rule as ingest (`check_voxels`): a NaN or infinite volume is refused, not written.
    """
    volume = read_dicom_series(src, series_uid=series_uid, max_bytes=max_bytes, integers=True)
    check_voxels(volume.data)
    write_nifti(volume, out)
    return volume
