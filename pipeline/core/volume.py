"""The in-memory image every reader returns: voxels, voxel-to-RAS affine, PHI-free facts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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
