"""The burned-in saliency overlay as a DICOM Secondary Capture series (highdicom), for viewers of the source series.

The research-side copy: the source study and series are referenced through salted-hash UIDs
(consistent within a run, unlinkable across runs), and patient identity is the manifest's
pseudonyms, never the source headers' values.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def deid_uid(salt: bytes, uid: str) -> str:
    """A new UID derived from a salted hash: consistent within a run, not reversible."""
    digest = hashlib.sha256(salt + uid.encode()).hexdigest()
    return "2.25." + str(int(digest[:30], 16))


def write_overlay_series(source: Path, series_uid: str, native: np.ndarray, case_dir: Path, patient_id: str,
                         case_id: str, salt: bytes) -> bool:
    """One SC image per source slice (overlay burned into the windowed source); False when the grids differ."""
    import highdicom as hd
    import matplotlib
    from pydicom.dataset import Dataset

    from pipeline.io.dicom import read_dicom_series
    from pipeline.io.dicom_files import iter_candidate_files, read_header

    vol = read_dicom_series(source, series_uid=series_uid or None)
    if vol.data.shape[:3] != native.shape:
        return False
    cmap = matplotlib.colormaps["inferno"]
    first = next((ds for f in iter_candidate_files(source) if (ds := read_header(f)) is not None
                  and "PixelData" in ds), None)
    study = deid_uid(salt, str(first.StudyInstanceUID)) if first is not None else hd.UID()
    ref_series = deid_uid(salt, str(first.SeriesInstanceUID)) if first is not None else hd.UID()
    series = hd.UID()
    lo, hi = np.percentile(vol.data, [1, 99])
    case_dir.mkdir(parents=True, exist_ok=True)
    for k in range(native.shape[2]):
        grey = np.clip((vol.data[:, :, k] - lo) / max(hi - lo, 1e-6), 0, 1).T  # rows x cols
        heat = cmap(native[:, :, k].T)[..., :3]
        alpha = 0.45 * native[:, :, k].T[..., None]
        rgb = (255 * ((1 - alpha) * grey[..., None] + alpha * heat)).astype(np.uint8)
        sc = hd.sc.SCImage(
            pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
            study_instance_uid=study, series_instance_uid=series, series_number=9001, sop_instance_uid=hd.UID(),
            instance_number=k + 1, manufacturer="ResDx", patient_id=patient_id, patient_name=f"{case_id}^",
            patient_orientation=("L", "P"), series_description="ResDx saliency overlay (not for diagnosis)",
        )
        item = Dataset()
        item.SeriesInstanceUID = ref_series
        sc.ReferencedSeriesSequence = [item]
        sc.save_as(case_dir / f"{k + 1:04d}.dcm")
    return True
