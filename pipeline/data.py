"""Training data path: ingested tensors cached once in RAM, augmented on the training device.

No per-epoch file reading: all `ok` tensors of a split are stacked into one contiguous
tensor (pinned when a GPU is used) and batches are gathered with `index_select`, which
is cheaper than a DataLoader collating per-item samples. Augmentation uses MONAI's
random transforms on the device (GPU-side when training on CUDA).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import AugmentConfig


@dataclass
class CaseSet:
    """The ok cases of one split: ids, labels, and their tensors stacked (N, C, *spatial)."""

    case_ids: list[str]
    patient_ids: list[str]
    labels: torch.Tensor
    images: torch.Tensor
    meta: list[dict]

    def __len__(self) -> int:
        return len(self.case_ids)


def read_index(ingest_dir: Path) -> list[dict]:
    with (Path(ingest_dir) / "index.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def read_plan(ingest_dir: Path) -> dict:
    return json.loads((Path(ingest_dir) / "plan.json").read_text())


def load_split(ingest_dir: Path | str, split: str, pin: bool = False) -> CaseSet:
    """Stack the tensors of every `ok` case in `split` (loaded once, pickle-free)."""
    ingest_dir = Path(ingest_dir)
    rows = [r for r in read_index(ingest_dir) if r["status"] == "ok" and r["split"] == split]
    arrays = [np.load(ingest_dir / r["tensor"], mmap_mode="r", allow_pickle=False) for r in rows]
    if arrays:
        images = torch.from_numpy(np.stack(arrays).astype(np.float32, copy=False))
    else:
        images = torch.zeros((0,))
    if pin and torch.cuda.is_available():
        images = images.pin_memory()
    labels = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
    meta = [{k: r.get(k, "") for k in ("modality", "manufacturer")} for r in rows]
    return CaseSet([r["case_id"] for r in rows], [r["patient_id"] for r in rows], labels, images, meta)


def class_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1) for the loss; absent classes get weight 0."""
    counts = torch.bincount(labels, minlength=n_classes).float()
    w = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return w


def epoch_order(n: int, epoch: int, seed: int, labels: torch.Tensor | None = None, balanced: bool = False
                ) -> torch.Tensor:
    """Sample order for one epoch, a pure function of (seed, epoch): resumable and reproducible.

    `balanced` draws with replacement with probability inversely proportional to class
    frequency (the class-balanced sampler); otherwise a permutation.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if balanced and labels is not None:
        w = class_weights(labels, int(labels.max()) + 1)[labels]
        return torch.multinomial(w, n, replacement=True, generator=g)
    return torch.randperm(n, generator=g)


class Augmenter:
    """MONAI random flips, affine and intensity transforms, per sample, on the batch's device."""

    def __init__(self, cfg: AugmentConfig, spatial_dims: int):
        from monai.data import set_track_meta
        from monai.transforms import Compose, RandAffine, RandFlip, RandScaleIntensity, RandShiftIntensity

        set_track_meta(False)  # plain tensors: MetaTensor bookkeeping costs time in the hot loop
        rot = np.deg2rad(cfg.rotate_deg)
        transforms = [RandFlip(prob=cfg.flip_prob, spatial_axis=a) for a in range(spatial_dims)]
        if cfg.affine_prob > 0:
            transforms.append(RandAffine(prob=cfg.affine_prob, rotate_range=[rot] * (1 if spatial_dims == 2 else 3),
                                         scale_range=[cfg.scale] * spatial_dims, padding_mode="border"))
        if cfg.intensity_prob > 0:
            transforms += [RandScaleIntensity(factors=cfg.intensity_scale, prob=cfg.intensity_prob),
                           RandShiftIntensity(offsets=cfg.intensity_shift, prob=cfg.intensity_prob)]
        self.compose = Compose(transforms)
        self.enabled = bool(transforms)

    def __call__(self, batch: torch.Tensor, seed: int) -> torch.Tensor:
        if not self.enabled:
            return batch
        self.compose.set_random_state(seed=seed % (2**32))
        return torch.stack([torch.as_tensor(self.compose(x)) for x in batch])
