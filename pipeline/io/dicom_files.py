"""Which files under a path are read, and how one DICOM header is parsed.

Only regular files are candidates; a file that starts as DICOM but does not parse whole is a
damaged slice (`RejectedCase("damaged_file")`), never "not DICOM": skipping it would drop a slice.
"""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pipeline.core.limits import DEFAULT_MAX_CASE_BYTES
from pipeline.errors import RejectedCase
from pipeline.io.dicom_checks import check_inflated_size, is_regular_file, read_head, starts_as_dicom


def walk_files(path: Path) -> tuple[list[Path], int]:
    """(regular files under `path` (or `path` itself) in a stable order, count of special files skipped).

    Only regular files: opening a FIFO blocks forever, a device never ends.
    """
    if is_regular_file(path):
        return [path], 0
    out, special = [], 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            f = Path(root) / name
            if is_regular_file(f):
                out.append(f)
            else:
                special += 1
    return sorted(out), special


def iter_candidate_files(path: Path) -> list[Path]:
    """The regular files under `path` (or `path` itself), sorted for a stable order."""
    return walk_files(path)[0]


def read_header(path: Path, max_bytes: int = DEFAULT_MAX_CASE_BYTES) -> Dataset | None:
    """Parse a file's header (pixel data deferred); None when it is not DICOM.

    A file that starts as DICOM (the "DICM" preamble) and then fails to parse is a damaged slice,
    not "not DICOM": skipping it would silently drop a slice of the series.
    """
    try:
        head = read_head(path)
    except OSError:
        raise RejectedCase("unreadable_path", "a file under the path cannot be read (permissions?)") from None
    dicom = starts_as_dicom(head)
    if dicom:
        check_inflated_size(path, head, max_bytes)
    try:
        # defer_size keeps large values (PixelData) on disk until asked for.
        ds = pydicom.dcmread(path, defer_size="4 KB")
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError, IndexError,
            OverflowError, MemoryError):
        ds = None
    if dicom and ds is None:
        raise RejectedCase("damaged_file", "a file starts as DICOM but cannot be parsed (truncated or corrupt "
                           "copy); the series is not converted with a slice missing")
    if dicom and _cut_short(ds):
        raise RejectedCase("damaged_file", "a file starts as DICOM but holds no complete object (no SOP Class "
                           "UID, or an image class without its image: cut short?); the series is not converted "
                           "with a slice missing")
    return ds


def _cut_short(ds: Dataset) -> bool:
    """Parsed, but not an object: no SOP class anywhere, or an image class that holds no image.

    pydicom stops quietly at the end of a file cut between elements, so a slice cut after its
    first few hundred bytes parses as a header fragment.
    """
    meta = getattr(ds, "file_meta", None) or {}
    sop_class = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
    if not sop_class:
        return True
    name = getattr(sop_class, "name", "") or ""
    return name.endswith("Image Storage") and not is_image(ds) and "Rows" not in ds


def is_image(ds: Dataset) -> bool:
    return "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds


def no_pixels_reason(ds: Dataset) -> str:
    if "Rows" in ds and "Columns" in ds:
        return "image without pixel data"
    name = getattr(ds.get("SOPClassUID"), "name", "") or "unknown SOP class"
    return f"non-image object with no pixel data ({name})"
