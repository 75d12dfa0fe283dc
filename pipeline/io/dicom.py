"""Public DICOM reader: a folder (or file) of DICOM to one PHI-free `Volume`."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.volume import Volume
from pipeline.errors import RejectedCase
from pipeline.io.dicom_scan import scan
from pipeline.io.dicom_stack import choose_stack, group_stacks, stack_to_volume


def read_dicom_series(
    path: Path | str,
    series_uid: str | None = None,
    min_slices: int = 1,
    take_volume: int | None = None,
) -> Volume:
    """Read the series under `path` into a volume in its native grid.

    Voxel axes: i along the row direction (columns), j along the column direction (rows),
    k along the slice normal in ascending position; values rescaled by each slice's
    slope/intercept. Raises `RejectedCase` with a specific reason when the series
    cannot form a trustworthy volume. `meta` carries no PHI (no names, UIDs, dates).
    """
    found = scan(Path(path))
    stack = choose_stack(group_stacks(found.frames), series_uid=series_uid)
    lost = sum(1 for uid, number in found.broken if uid == stack.series_uid and number == stack.series_number)
    if lost:
        raise RejectedCase("missing_pixel_data", f"{lost} image file(s) of the chosen series have no pixel data")
    vol = stack_to_volume(stack, min_slices=min_slices, take_volume=take_volume)
    vol.meta.update(
        source_format="dicom",
        modality=found.modality,
        manufacturer=found.manufacturer,
        n_files=found.n_files,
        skipped=dict(found.skipped),
    )
    return vol
