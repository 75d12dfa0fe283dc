"""Public DICOM reader: a folder (or file) of DICOM to one PHI-free `Volume`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.limits import DEFAULT_MAX_CASE_BYTES
from pipeline.core.volume import Volume
from pipeline.errors import RejectedCase
from pipeline.io.dicom_pixels import decode_pixels
from pipeline.io.dicom_scan import scan
from pipeline.io.dicom_stack import Stack, choose_stack, group_stacks, stack_to_volume


def read_dicom_series(
    path: Path | str,
    series_uid: str | None = None,
    min_slices: int = 1,
    take_volume: int | None = None,
    max_bytes: int = DEFAULT_MAX_CASE_BYTES,
    integers: bool = False,
) -> Volume:
    """Read the series under `path` into a volume in its native grid.

    Voxel axes: i along the row direction (columns), j along the column direction (rows),
    k along the slice normal in ascending position; values rescaled by each slice's
    slope/intercept. Raises `RejectedCase` with a specific reason when the series
    cannot form a trustworthy volume. `meta` carries no PHI (no names, UIDs, dates). Voxels are float32,
    or int16 with `integers` when the rescale is integral and every value fits (what `resdx convert` writes).
    """
    found = scan(Path(path), max_bytes)
    stack = choose_stack(group_stacks(found.frames), series_uid=series_uid)
    lost = [err for uid, number, err in found.broken if uid == stack.series_uid and number == stack.series_number]
    if lost:  # an unusable file of this series is a slice we would silently lose
        raise RejectedCase(lost[0].code, f"{len(lost)} file(s) of the chosen series: {lost[0].reason}")
    _drop_duplicates(stack, found.duplicates, max_bytes)
    vol = stack_to_volume(stack, min_slices=min_slices, take_volume=take_volume, max_bytes=max_bytes,
                          integers=integers)
    vol.meta.update(
        source_format="dicom",
        modality=found.modality,
        manufacturer=found.manufacturer,
        n_files=found.n_files,
        skipped=dict(found.skipped),
    )
    return vol


def _drop_duplicates(stack: Stack, duplicates: list, max_bytes: int) -> None:
    """Second copies of this stack's SOP instances: kept out when their pixels agree, else reject.

    A study exported twice, or once per transfer syntax, holds each instance several times;
    dcm2niix keeps one copy. Pixels are compared decoded, so a copy in another syntax agrees.
    """
    files = {f.file: f.dataset for f in stack.frames}
    mine = [(first, dup, ds) for first, dup, ds in duplicates if first in files]
    for first, dup, ds in mine:
        if not np.array_equal(decode_pixels(first, files[first], max_bytes), decode_pixels(dup, ds, max_bytes)):
            raise RejectedCase("conflicting_duplicates", "one SOP Instance UID appears in several files with "
                               "different pixel data: which copy is right cannot be decided")
    if mine:
        stack.notes.append(f"kept one copy of {len(mine)} SOP instance(s) present more than once")
