"""Header checks a DICOM file passes before its frames are trusted or its pixels read.

Each failure has its own reason code, as dcm2niix distinguishes them: a file that starts as
DICOM but does not parse (`damaged_file`), a deflated file that would inflate past the ceiling,
pixel data shorter than the header says (`truncated`), bit depths that are not a grey-scale image
(`unsupported_bits`), and plane geometry that is not a real position, orthonormal orientation
and positive spacing (`bad_position`, `bad_orientation`, `bad_pixel_spacing`).
"""

from __future__ import annotations

import stat
import zlib
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from pipeline.core.limits import require_fits
from pipeline.errors import RejectedCase

DEFLATED = "1.2.840.10008.1.2.1.99"
NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
UNIT_TOL = 1e-2  # |row|, |col| within 1 +- this (headers round to 4-6 decimals)
ORTHO_TOL = 1e-2  # |row . col| below this (about 0.6 degrees off perpendicular)
_HEAD = 2048  # the file meta group (with the transfer syntax) sits in the first bytes


def is_regular_file(path: Path) -> bool:
    """True for a regular file (after symlinks): FIFOs, sockets and devices would block or never end."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def read_head(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(_HEAD)


def starts_as_dicom(head: bytes) -> bool:
    """A Part 10 file: "DICM" after the 128-byte preamble (bare datasets are not read at all, as
    pydicom without `force`)."""
    return head[128:132] == b"DICM"


def check_inflated_size(path: Path, head: bytes, limit: int) -> None:
    """A deflated file is inflated whole by pydicom: inflate it here first, in bounded steps.

    Only the size is kept (a zip bomb of a few hundred KB can claim gigabytes).
    """
    if DEFLATED.encode() not in head or head[128:132] != b"DICM":
        return
    if head[132:136] != b"\x02\x00\x00\x00":  # (0002,0000) group length, required by Part 10
        raise RejectedCase("damaged_file", "a deflated DICOM file has no file meta group length")
    start = 144 + int.from_bytes(head[140:144], "little")
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            for block in iter(lambda: fh.read(1 << 16), b""):
                data = block
                while data:
                    total += len(inflater.decompress(data, 1 << 20))
                    data = inflater.unconsumed_tail
                    if total > limit:
                        require_fits((total,), 1, limit, "a deflated DICOM file, inflated,")
    except zlib.error:
        raise RejectedCase("damaged_file", "a deflated DICOM file cannot be inflated (corrupt stream)") from None


def pixel_bytes(ds: Dataset) -> tuple[int, int]:
    """(frames, bytes of the decoded pixel data) from the header alone."""
    rows, cols = as_int(ds.get("Rows")), as_int(ds.get("Columns"))
    frames = max(1, as_int(ds.get("NumberOfFrames"), 1))
    samples = max(1, as_int(ds.get("SamplesPerPixel"), 1))
    bits = as_int(ds.get("BitsAllocated"))
    return frames, rows * cols * frames * samples * max(1, bits // 8)


def check_pixels(ds: Dataset, limit: int) -> None:
    """Bits, matrix and pixel-data length make sense, and decoding fits the ceiling (before any read)."""
    rows, cols = as_int(ds.get("Rows")), as_int(ds.get("Columns"))
    if rows < 1 or cols < 1:
        raise RejectedCase("bad_dimensions", f"an image with Rows={rows}, Columns={cols}")
    if "PixelData" in ds:
        bits, stored = as_int(ds.get("BitsAllocated")), as_int(ds.get("BitsStored"), 0)
        if bits not in (8, 16, 32):
            what = "a bit plane (e.g. a segmentation or overlay)" if bits == 1 else "not 8, 16 or 32"
            raise RejectedCase("unsupported_bits", f"BitsAllocated {bits}: {what}, not a grey-scale image")
        if stored and not 1 < stored <= bits:
            raise RejectedCase("unsupported_bits", f"BitsStored {stored} with BitsAllocated {bits}")
    frames, need = pixel_bytes(ds)
    require_fits((rows, cols, frames, 4), 1, limit, f"one file's {frames} frame(s) of {rows}x{cols} as float32")
    ts = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
    # keep_deferred: get_item would otherwise read the whole pixel data into the header, for every file.
    elem = ds.get_item("PixelData", keep_deferred=True) if "PixelData" in ds else None
    length = getattr(elem, "length", None) if elem is not None else None
    if ts in NATIVE and length is not None and length != 0xFFFFFFFF and length < need:
        raise RejectedCase("truncated", "a slice file's pixel data is shorter than its header says "
                           "(incomplete copy or transfer?)")


def check_plane(ipp: np.ndarray, iop: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate one frame's plane; returns the unit row and column direction cosines."""
    if not np.all(np.isfinite(ipp)):
        raise RejectedCase("bad_position", "ImagePositionPatient is not a finite position")
    if not np.all(np.isfinite(iop)):
        raise RejectedCase("bad_orientation", "ImageOrientationPatient is not finite")
    row, col = iop[:3], iop[3:]
    norms = np.linalg.norm(row), np.linalg.norm(col)
    if max(abs(n - 1.0) for n in norms) > UNIT_TOL:
        raise RejectedCase("bad_orientation", f"ImageOrientationPatient vectors are not unit length "
                           f"(|row| {norms[0]:.3g}, |column| {norms[1]:.3g})")
    row, col = row / norms[0], col / norms[1]
    if abs(float(np.dot(row, col))) > ORTHO_TOL:
        angle = float(np.degrees(np.arccos(np.clip(np.dot(row, col), -1, 1))))
        raise RejectedCase("bad_orientation", f"ImageOrientationPatient row and column are not perpendicular "
                           f"({angle:.1f} degrees apart)")
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise RejectedCase("bad_pixel_spacing", "PixelSpacing is not two finite, positive values")
    return row, col


def as_int(value, default: int = 0) -> int:
    """An integer header value, or `default` when it is absent or not a number."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return default
