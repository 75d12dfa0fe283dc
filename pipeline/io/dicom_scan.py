"""Find DICOM files under a path and describe every 2D image frame they hold.

Three layouts become the same `Frame` records, so one stacker handles them all:
classic single-frame files, enhanced multi-frame objects (per-frame functional groups),
and Siemens mosaics (one file per volume, slices tiled in a grid).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from pipeline.core.limits import DEFAULT_MAX_CASE_BYTES
from pipeline.errors import RejectedCase
from pipeline.io.dicom_checks import as_int, check_pixels, check_plane
from pipeline.io.dicom_files import is_image, no_pixels_reason, read_header, walk_files

DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
# Tags with no image (SR, presentation states, KOS, RT structures...) carry no PixelData.
_MOSAIC_COUNT_TAG = (0x0019, 0x100A)  # Siemens NumberOfImagesInMosaic


@dataclass
class Frame:
    """One 2D image: where it sits in the patient (LPS, mm) and how to fetch its pixels."""

    file: Path
    index: int  # frame number in a multi-frame file, tile number in a mosaic, 0 otherwise
    layout: str  # "single" | "multiframe" | "mosaic"
    ipp: np.ndarray  # ImagePositionPatient of the first transmitted pixel
    row_cos: np.ndarray  # direction of increasing column index
    col_cos: np.ndarray  # direction of increasing row index
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    rows: int
    cols: int
    slope: float
    intercept: float
    stack_key: tuple  # frames with equal keys may form one stack
    volume_key: tuple  # orders frames that share a position (time points, b-values)
    slice_thickness: float | None = None
    series_number: int = 0
    localizer: bool = False
    tile_grid: tuple[int, int] = (1, 1)  # mosaic grid (tiles per row, per column)
    dataset: Dataset | None = field(default=None, repr=False)  # the parsed header, pixel data deferred


@dataclass
class ScanResult:
    """Every image frame found, plus counts of what was skipped and why."""

    frames: list[Frame] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    broken: list = field(default_factory=list)  # (series uid, series number, RejectedCase) per unusable image
    duplicates: list = field(default_factory=list)  # (first file, second file, its header): one SOP instance twice
    n_files: int = 0
    modality: str = ""
    manufacturer: str = ""


def _floats(value, n: int | None = None) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if n is not None and arr.shape != (n,):
        return None
    return arr


def _num(value, default: float) -> float:
    try:
        return float(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default


def _orientation_key(row: np.ndarray, col: np.ndarray) -> tuple:
    # Rounded to ~0.06 degrees so scanner jitter in the last digits stays one stack.
    return tuple(np.round(np.concatenate([row, col]), 3) + 0.0)


def _is_localizer(ds: Dataset) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return "LOCALIZER" in image_type


def _mosaic_tiles(ds: Dataset) -> int:
    """Number of slices in a Siemens mosaic, 0 when the file is not one."""
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "MOSAIC" not in image_type:
        return 0
    elem = ds.get(_MOSAIC_COUNT_TAG)
    if elem is not None:
        value = elem.value
        if isinstance(value, bytes):  # implicit VR private tag: raw little-endian US
            value = int.from_bytes(value[:2], "little")
        return as_int(value)
    csa = _csa_image(ds)
    return as_int(csa.get("NumberOfImagesInMosaic"), 0) if csa else 0


def _csa_image(ds: Dataset) -> dict:
    # nibabel parses the Siemens CSA header; we only read scalar fields from it.
    from nibabel.nicom import csareader

    try:
        header = csareader.get_csa_header(ds, "image")
    except Exception:  # noqa: BLE001 - a malformed private header just means "no CSA"
        return {}
    if not header:
        return {}
    out = {}
    for name, tag in header["tags"].items():
        items = tag.get("items") or []
        out[name] = items[0] if len(items) == 1 else items
    return out


def _frames_single(path: Path, ds: Dataset) -> list[Frame]:
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    spacing = _floats(ds.get("PixelSpacing"), 2)
    if ipp is None or iop is None:
        raise RejectedCase("no_geometry", "image without ImagePositionPatient or ImageOrientationPatient")
    if spacing is None:
        raise RejectedCase("no_spacing", "image without PixelSpacing; cannot establish voxel size")
    row, col = check_plane(ipp, iop, spacing)
    rows, cols = as_int(ds.get("Rows")), as_int(ds.get("Columns"))
    series_number = as_int(ds.get("SeriesNumber"))
    echo = _num(ds.get("EchoNumbers"), 0.0)
    localizer = _is_localizer(ds)
    common = dict(
        row_cos=row, col_cos=col, pixel_spacing=(float(spacing[0]), float(spacing[1])),
        slope=_num(ds.get("RescaleSlope"), 1.0), intercept=_num(ds.get("RescaleIntercept"), 0.0),
        slice_thickness=_num(ds.get("SliceThickness"), 0.0) or None,
        series_number=series_number, localizer=localizer,
    )
    instance = as_int(ds.get("InstanceNumber"))
    vol_base = (
        as_int(ds.get("TemporalPositionIdentifier")), _num(ds.get("TriggerTime"), 0.0),
        as_int(ds.get("AcquisitionNumber")),
    )
    key = (str(ds.get("SeriesInstanceUID", "")), series_number, echo, localizer)

    n_tiles = _mosaic_tiles(ds)
    if n_tiles > 1:
        grid = math.ceil(math.sqrt(n_tiles))
        if rows % grid or cols % grid:
            raise RejectedCase("bad_mosaic", f"mosaic of {rows}x{cols} pixels cannot hold a {grid}x{grid} grid")
        tr, tc = rows // grid, cols // grid
        normal = np.cross(row, col)
        csa = _csa_image(ds)
        csa_normal = _floats(csa.get("SliceNormalVector"), 3) if csa else None
        if csa_normal is not None and float(np.dot(csa_normal, normal)) < 0:
            normal = -normal  # tiles run against row x col: Siemens stores slices in that order
        dz = _num(ds.get("SpacingBetweenSlices"), 0.0) or _num(ds.get("SliceThickness"), 1.0)
        # ImagePositionPatient of a mosaic refers to the whole mosaic's corner; move it to
        # the first tile's corner (same correction as nibabel's MosaicWrapper and dcm2niix).
        shift = col * spacing[0] * (rows - tr) / 2 + row * spacing[1] * (cols - tc) / 2
        first = ipp + shift
        return [
            Frame(file=path, index=t, layout="mosaic", ipp=first + t * dz * normal, rows=tr, cols=tc,
                  stack_key=key + (_orientation_key(row, col), tr, tc), volume_key=vol_base + (instance, str(path)),
                  tile_grid=(grid, grid), **common)
            for t in range(n_tiles)
        ]
    return [
        Frame(file=path, index=0, layout="single", ipp=ipp, rows=rows, cols=cols,
              stack_key=key + (_orientation_key(row, col), rows, cols),
              volume_key=vol_base + (instance, str(path)), **common)
    ]


def _fg(group: Dataset | None, seq: str) -> Dataset | None:
    if group is None or seq not in group or not group[seq].value:
        return None
    return group[seq].value[0]


def _frames_multiframe(path: Path, ds: Dataset) -> list[Frame]:
    shared = _fg(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    n = as_int(ds.get("NumberOfFrames"), 1)
    if not per_frame:
        raise RejectedCase("legacy_multiframe", f"multi-frame object ({n} frames) without per-frame functional "
                           "groups (e.g. ultrasound, NM or cine): no per-frame geometry to build a volume from")
    if len(per_frame) != n:
        raise RejectedCase("bad_multiframe", f"{n} frames but {len(per_frame)} per-frame functional groups")
    rows, cols = as_int(ds.get("Rows")), as_int(ds.get("Columns"))
    series_number = as_int(ds.get("SeriesNumber"))
    localizer = _is_localizer(ds)
    frames = []
    for i, pf in enumerate(per_frame):
        def item(seq: str, pf=pf) -> Dataset | None:
            return _fg(pf, seq) or _fg(shared, seq)

        pos, ori, meas = item("PlanePositionSequence"), item("PlaneOrientationSequence"), item("PixelMeasuresSequence")
        ipp = _floats(pos.get("ImagePositionPatient"), 3) if pos else None
        iop = _floats(ori.get("ImageOrientationPatient"), 6) if ori else None
        spacing = _floats(meas.get("PixelSpacing"), 2) if meas else None
        if ipp is None or iop is None:
            raise RejectedCase("no_geometry", f"multi-frame object: frame {i + 1} has no plane position or orientation")
        if spacing is None:
            raise RejectedCase("no_spacing", f"multi-frame object: frame {i + 1} has no PixelSpacing")
        row, col = check_plane(ipp, iop, spacing)
        pvt = item("PixelValueTransformationSequence")
        content = _fg(pf, "FrameContentSequence")
        mr_echo = item("MREchoSequence")
        stack_id = str(content.get("StackID", "")) if content else ""
        temporal = as_int(content.get("TemporalPositionIndex")) if content else 0
        dims = content.get("DimensionIndexValues") if content else None
        # One value (VM 1, e.g. a Parametric Map's) comes back from pydicom as an int, not a list.
        dim_index = (int(dims),) if isinstance(dims, int) else tuple(int(v) for v in (dims or []))
        echo = _num(mr_echo.get("EffectiveEchoTime"), 0.0) if mr_echo else 0.0
        frames.append(Frame(
            file=path, index=i, layout="multiframe", ipp=ipp, row_cos=row, col_cos=col,
            pixel_spacing=(float(spacing[0]), float(spacing[1])), rows=rows, cols=cols,
            slope=_num(pvt.get("RescaleSlope") if pvt else ds.get("RescaleSlope"), 1.0),
            intercept=_num(pvt.get("RescaleIntercept") if pvt else ds.get("RescaleIntercept"), 0.0),
            stack_key=(str(ds.get("SeriesInstanceUID", "")), series_number, echo, localizer, stack_id,
                       _orientation_key(row, col), rows, cols),
            volume_key=(temporal, dim_index, i),
            slice_thickness=_num(meas.get("SliceThickness"), 0.0) or None,
            series_number=series_number, localizer=localizer,
        ))
    return frames


def scan(path: Path, max_bytes: int = DEFAULT_MAX_CASE_BYTES) -> ScanResult:
    """Describe every image frame under `path` (a folder or one file).

    Per-file problems of a parsed image are kept with its series (`broken`): the caller rejects
    the case when the series it picks has one, so no slice is ever dropped silently. A second
    copy of a SOP instance (the same study exported twice) is set aside in `duplicates`.
    """
    path = Path(path)
    if not path.exists():
        raise RejectedCase("missing_path", "path does not exist")
    if not os.access(path, os.R_OK):
        raise RejectedCase("unreadable_path", "no permission to read the path")
    result = ScanResult()
    files, special = walk_files(path)
    if special:
        result.skipped["not a regular file (FIFO, socket or device)"] += special
    result.n_files = len(files)
    if not files:
        raise RejectedCase("empty", "no files under the path that can be read (only regular files are)")
    first_error: RejectedCase | None = None
    modalities: Counter = Counter()
    manufacturers: Counter = Counter()
    colours: Counter = Counter()
    seen_sop: dict[str, Path] = {}
    for f in files:
        ds = read_header(f, max_bytes)
        if ds is None:
            result.skipped["not DICOM"] += 1
            continue
        meta = getattr(ds, "file_meta", None) or {}
        sop_class = str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", ""))
        if sop_class == DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
            result.skipped["DICOMDIR"] += 1
            continue
        series = (str(ds.get("SeriesInstanceUID", "")), as_int(ds.get("SeriesNumber")))
        if not is_image(ds):
            why = no_pixels_reason(ds)
            result.skipped[why] += 1
            if why == "image without pixel data":  # an image object that lost its pixels
                result.broken.append(series + (RejectedCase("missing_pixel_data", "image file(s) of the chosen "
                                                            "series have no pixel data"),))
            continue
        if as_int(ds.get("SamplesPerPixel"), 1) != 1:
            colours[str(ds.get("PhotometricInterpretation", "?"))] += 1
            result.skipped["colour image (not a grey-scale scan)"] += 1
            continue
        sop = str(ds.get("SOPInstanceUID", ""))
        if sop and sop in seen_sop:
            result.duplicates.append((seen_sop[sop], f, ds))
            continue
        try:
            check_pixels(ds, max_bytes)
            if as_int(ds.get("NumberOfFrames"), 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
                frames = _frames_multiframe(f, ds)
            else:
                frames = _frames_single(f, ds)
            for fr in frames:
                fr.dataset = ds  # shared per file: pixels are read from it later, no second parse
        except RejectedCase as err:
            result.skipped[err.reason] += 1
            result.broken.append(series + (err,))
            first_error = first_error or err
            continue
        if sop:
            seen_sop[sop] = f
        result.frames.extend(frames)
        modalities[str(ds.get("Modality", ""))] += 1
        manufacturers[str(ds.get("Manufacturer", "")).strip()] += 1
    if not result.frames:
        if first_error is not None and len(result.skipped) == 1:
            raise first_error
        if colours and sum(colours.values()) == sum(result.skipped.values()):
            kinds = ", ".join(sorted(colours))
            raise RejectedCase("colour_image", f"the only images are colour (PhotometricInterpretation {kinds}: "
                               "a secondary capture or screenshot), not a grey-scale scan")
        raise RejectedCase("no_images", f"no usable DICOM image ({_describe_skips(result)})")
    result.modality = modalities.most_common(1)[0][0]
    result.manufacturer = manufacturers.most_common(1)[0][0]
    return result


def _describe_skips(result: ScanResult) -> str:
    if not result.skipped:
        return f"{result.n_files} files"
    parts = [f"{n} {why}" for why, n in result.skipped.most_common()]
    return f"{result.n_files} files: " + ", ".join(parts)
