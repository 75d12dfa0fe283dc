"""The burned-in saliency overlay as a DICOM Secondary Capture series (highdicom), for viewers of the source series.

Two identities, chosen by the caller:
- research side (`write_overlay_series`): the source study and series are referenced through salted-hash UIDs
  (consistent within a run, unlinkable across runs), and patient identity is the manifest's pseudonyms,
  never the source headers' values;
- PACS side (`write_overlay_for_pacs`): the real StudyInstanceUID, the real source SeriesInstanceUID in
  ReferencedSeriesSequence, the patient module copied from each source slice, and a new series, so the
  overlay files next to the series it was computed on.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset

SC_SERIES_NUMBER = 9001
SC_DESCRIPTION = "ResDx saliency overlay (not for diagnosis)"
_LPS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, -x; +y, -y; +z, -z in DICOM patient (LPS) axes


def deid_uid(salt: bytes, uid: str) -> str:
    """A new UID derived from a salted hash: consistent within a run, not reversible."""
    digest = hashlib.sha256(salt + uid.encode()).hexdigest()
    return "2.25." + str(int(digest[:30], 16))


def _overlay_slices(grey_volume: np.ndarray, native: np.ndarray) -> Iterator[np.ndarray]:
    """RGB uint8 (rows, cols, 3) per slice k: saliency (inferno, alpha 0.45 x value) over the windowed volume.

    `grey_volume` and `native` are (i, j, k) on the reader's grid; each output is the [:, :, k].T frame.
    The window is the volume's 1st to 99th percentile.
    """
    import matplotlib

    cmap = matplotlib.colormaps["inferno"]
    lo, hi = np.percentile(grey_volume, [1, 99])
    for k in range(native.shape[2]):
        grey = np.clip((grey_volume[:, :, k] - lo) / max(hi - lo, 1e-6), 0, 1).T  # rows x cols
        heat = cmap(native[:, :, k].T)[..., :3]
        alpha = 0.45 * native[:, :, k].T[..., None]
        yield (255 * ((1 - alpha) * grey[..., None] + alpha * heat)).astype(np.uint8)


def _referenced_series(series_uid: str) -> list[Dataset]:
    item = Dataset()
    item.SeriesInstanceUID = series_uid
    return [item]


def write_overlay_series(source: Path, series_uid: str, native: np.ndarray, case_dir: Path, patient_id: str,
                         case_id: str, salt: bytes, volume=None) -> bool:
    """Research side: one SC image per source slice (overlay burned into the windowed source).

    Study and referenced series UIDs are salted hashes of the source's, patient id/name the pseudonyms
    (`patient_id`, `case_id`). Files are `case_dir`/0001.dcm...; False (nothing written) when the grids differ.
    `volume`: the series as `read_dicom_series` gives it, when the caller has read it already.
    """
    import highdicom as hd

    from pipeline.io.dicom import read_dicom_series
    from pipeline.io.dicom_files import iter_candidate_files, read_header

    vol = volume if volume is not None else read_dicom_series(source, series_uid=series_uid or None)
    if vol.data.shape[:3] != native.shape:
        return False
    first = next((ds for f in iter_candidate_files(source) if (ds := read_header(f)) is not None
                  and "PixelData" in ds), None)
    study = deid_uid(salt, str(first.StudyInstanceUID)) if first is not None else hd.UID()
    ref_series = deid_uid(salt, str(first.SeriesInstanceUID)) if first is not None else hd.UID()
    series = hd.UID()
    case_dir.mkdir(parents=True, exist_ok=True)
    first_sc = None
    for k, rgb in enumerate(_overlay_slices(vol.data, native)):
        if first_sc is None:
            first_sc = sc = hd.sc.SCImage(
                pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
                study_instance_uid=study, series_instance_uid=series, series_number=SC_SERIES_NUMBER,
                sop_instance_uid=hd.UID(), instance_number=k + 1, manufacturer="ResDx", patient_id=patient_id,
                patient_name=f"{case_id}^", patient_orientation=("L", "P"), series_description=SC_DESCRIPTION,
            )
            sc.ReferencedSeriesSequence = _referenced_series(ref_series)
        else:
            sc = _next_instance(first_sc, rgb, k + 1)
        sc.save_as(case_dir / f"{k + 1:04d}.dcm", enforce_file_format=True)
    return True


def _next_instance(first: Dataset, rgb: np.ndarray, number: int) -> Dataset:
    """Slice `number` of a series whose first image highdicom built: the same object with its own instance UID,
    number and pixels. Every slice of a research-side overlay shares every other attribute, and highdicom's
    constructor, which checks the whole object each time, took nine tenths of the series' time."""
    import highdicom as hd

    sc = Dataset({tag: copy.copy(elem) for tag, elem in first.items()})
    sc.file_meta = FileMetaDataset({tag: copy.copy(elem) for tag, elem in first.file_meta.items()})
    uid = hd.UID()
    sc.SOPInstanceUID = sc.file_meta.MediaStorageSOPInstanceUID = uid
    sc.InstanceNumber = number
    if rgb.shape != (first.Rows, first.Columns, 3) or rgb.dtype != np.uint8:
        raise ValueError(f"overlay slice {number} is {rgb.shape} {rgb.dtype}, the series {first.Rows}x{first.Columns}")
    sc.PixelData = np.ascontiguousarray(rgb).tobytes()
    return sc


def patient_orientation(iop: Sequence[float]) -> tuple[str, str]:
    """PatientOrientation (row direction, column direction) letters from ImageOrientationPatient (LPS cosines).

    Each direction is spelt by its components over 0.1 in falling order of size, e.g. "L", "PF" (oblique),
    as the standard's General Image module describes; at most three letters.
    """
    out = []
    for vec in (np.asarray(iop[:3], dtype=float), np.asarray(iop[3:6], dtype=float)):
        axes = [a for a in np.argsort(-np.abs(vec)) if abs(vec[a]) > 0.1]
        out.append("".join(_LPS_LETTERS[a][0 if vec[a] > 0 else 1] for a in axes[:3]))
    return out[0], out[1]


def build_overlay_for_pacs(sources: Sequence[Dataset], volume_or_path, native: np.ndarray,
                           series_number: int = SC_SERIES_NUMBER) -> list[Dataset]:
    """PACS side: one SC image per source slice, in the source study, patient module copied from each slice.

    `sources`: the series' headers in the reader's k order (`dicom_results.source_instances`);
    `volume_or_path`: the source `Volume` (as `read_dicom_series` gives it) or the folder to read it from;
    `native`: saliency (i, j, k) in [0, 1] on that grid. Slice k references source k (SourceImageSequence) and
    the source series (ReferencedSeriesSequence); a new series. Returns the images in k order.
    Raises ValueError when the volume, the saliency and the sources disagree in shape.
    """
    import highdicom as hd

    from pipeline.io.dicom import read_dicom_series

    if not sources:
        raise ValueError("a PACS overlay needs the source series' headers")
    first = sources[0]
    vol = volume_or_path
    if isinstance(vol, (str, Path)):
        vol = read_dicom_series(vol, series_uid=str(first.SeriesInstanceUID))
    want = (int(first.Columns), int(first.Rows), len(sources))
    if tuple(vol.data.shape[:3]) != want or tuple(native.shape) != want:
        raise ValueError(f"volume {tuple(vol.data.shape)} and saliency {tuple(native.shape)} must both be "
                         f"{want} (Columns, Rows, slices of the source series)")
    series = hd.UID()
    images = []
    for k, rgb in enumerate(_overlay_slices(vol.data[..., 0] if vol.data.ndim == 4 else vol.data, native)):
        src = sources[k]
        orientation = patient_orientation([float(v) for v in src.ImageOrientationPatient])
        sc = hd.sc.SCImage.from_ref_dataset(
            src, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
            series_instance_uid=series, series_number=series_number, sop_instance_uid=hd.UID(),
            instance_number=k + 1, manufacturer="ResDx", transfer_syntax_uid="1.2.840.10008.1.2.1",
            patient_orientation=(orientation[0][0], orientation[1][0]), series_description=SC_DESCRIPTION,
        )
        sc.PatientOrientation = list(orientation)  # highdicom takes one letter per axis; obliques need more
        ref = Dataset()
        ref.ReferencedSOPClassUID = src.SOPClassUID
        ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        # Common Instance Reference: the series item must list the instances it refers to (type 1).
        sc.ReferencedSeriesSequence = _referenced_series(str(src.SeriesInstanceUID))
        sc.ReferencedSeriesSequence[0].ReferencedInstanceSequence = [ref]
        sc.SourceImageSequence = [Dataset(ref)]
        # General Series Laterality (type 2C): the source's, else empty ("unknown"), never absent.
        sc.Laterality = src.get("Laterality", "") or ""
        sc.DerivationDescription = "saliency overlay burned into the windowed source slice"
        images.append(sc)
    return images


def save_images(images: Sequence[Dataset], folder: Path) -> list[Path]:
    """`images` saved as `folder`/0001.dcm... in their order (atomic writes); the paths."""
    from pipeline.io.artifacts import atomic_write

    folder = Path(folder)
    return [atomic_write(folder / f"{k + 1:04d}.dcm", lambda tmp, im=im: im.save_as(tmp, enforce_file_format=True))
            for k, im in enumerate(images)]


def write_overlay_for_pacs(sources: Sequence[Dataset], volume_or_path, native: np.ndarray, folder: Path,
                           series_number: int = SC_SERIES_NUMBER) -> list[Path]:
    """`build_overlay_for_pacs` saved as `folder`/0001.dcm... in k order (atomic writes)."""
    return save_images(build_overlay_for_pacs(sources, volume_or_path, native, series_number), folder)
