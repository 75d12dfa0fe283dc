"""The in-memory image every reader returns: voxels, voxel-to-RAS affine, PHI-free facts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import RejectedCase

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3D (or 4D: x, y, z, volume) image in physical units (HU for CT).

    `affine` maps voxel indices (i, j, k) to RAS+ millimetres, as in NIfTI.
    `meta` holds only facts safe to publish: modality, manufacturer, counts, notes.
    """

    data: np.ndarray
    affine: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def n_volumes(self) -> int:
        return 1 if self.data.ndim == 3 else int(self.data.shape[3])


def check_voxels(data: np.ndarray) -> None:
    """The voxel rule every reader output passes (ingest, predict and `resdx convert` alike)."""
    lo, hi = float(data.min()), float(data.max())  # NaN propagates through min/max, and inf shows there
    if not (np.isfinite(lo) and np.isfinite(hi)):
        bad = sum(int(data[:, :, k].size - np.count_nonzero(np.isfinite(data[:, :, k])))  # per slice: no
                  for k in range(data.shape[2]))                                          # full-size mask
        raise RejectedCase("non_finite", f"{bad} voxel(s) are NaN or infinite (e.g. a NaN or huge rescale slope)")
    if lo == hi:
        raise RejectedCase("constant_image", "every voxel has the same value")
