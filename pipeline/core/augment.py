"""Training-time sampling and augmentation: pure functions of (seed, epoch, step), on the batch's device."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import AugmentConfig


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
    """Random flips, affine (rotation + scaling) and intensity scale/shift for a whole batch at once.

    Why not MONAI's RandFlip/RandAffine per sample: they are array transforms, one Python call per
    sample and transform; on a GPU that overhead cost 60% of the step (benchmarks/README.md). Here
    the random parameters are drawn per sample, then the batch is warped in one call of MONAI's
    `AffineTransform` layer (trilinear/bilinear, border padding) on the batch's own device. The
    parameters come from a CPU generator seeded per step, so runs are reproducible.
    """

    def __init__(self, cfg: AugmentConfig, spatial_dims: int):
        from monai.networks.layers import AffineTransform

        self.cfg = cfg
        self.dims = spatial_dims
        self.warp = AffineTransform(normalized=True, mode="bilinear", padding_mode="border", align_corners=False)
        self.enabled = cfg.flip_prob > 0 or cfg.affine_prob > 0 or cfg.intensity_prob > 0

    def _rotation(self, angles: torch.Tensor) -> torch.Tensor:
        """(B, d, d) rotation matrices from per-sample angles (B,) in 2D or (B, 3) in 3D."""
        if self.dims == 2:
            c, s = torch.cos(angles), torch.sin(angles)
            return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
        out = torch.eye(3).repeat(len(angles), 1, 1)
        for axis in range(3):
            c, s = torch.cos(angles[:, axis]), torch.sin(angles[:, axis])
            r = torch.eye(3).repeat(len(angles), 1, 1)
            i, j = [a for a in range(3) if a != axis]
            r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
            out = r @ out
        return out

    def __call__(self, batch: torch.Tensor, seed: int) -> torch.Tensor:
        if not self.enabled:
            return batch
        cfg, b = self.cfg, batch.shape[0]
        g = torch.Generator().manual_seed(seed % (2**63))
        batch = batch.clone()
        # Only the samples drawn for a transform go through it: flipping sample by sample, and warping the drawn
        # subset, cost a sixth of indexing and warping the whole batch (whose identity warp also blurred the
        # others by float rounding).
        for axis in range(self.dims):
            flip = torch.rand(b, generator=g) < cfg.flip_prob
            for i in flip.nonzero()[:, 0].tolist():
                batch[i] = batch[i].flip(1 + axis)
        warp = torch.rand(b, generator=g) < cfg.affine_prob
        n_angles = 1 if self.dims == 2 else 3
        angles = (torch.rand(b, n_angles, generator=g) * 2 - 1) * np.deg2rad(cfg.rotate_deg)
        scales = 1 + (torch.rand(b, generator=g) * 2 - 1) * cfg.scale
        if warp.any():
            theta = torch.zeros(b, self.dims, self.dims + 1)
            theta[:, :, :self.dims] = self._rotation(angles[:, 0] if self.dims == 2 else angles) / scales.view(-1, 1, 1)
            picked = warp.nonzero()[:, 0]
            idx = picked.to(batch.device)
            batch[idx] = self.warp(batch[idx], theta[picked].to(batch.device, batch.dtype))
        jitter = torch.rand(b, generator=g) < cfg.intensity_prob
        factor = 1 + (torch.rand(b, generator=g) * 2 - 1) * cfg.intensity_scale
        offset = (torch.rand(b, generator=g) * 2 - 1) * cfg.intensity_shift
        factor = torch.where(jitter, factor, torch.ones(b)).to(batch.device, batch.dtype)
        offset = torch.where(jitter, offset, torch.zeros(b)).to(batch.device, batch.dtype)
        shape = (-1,) + (1,) * (batch.ndim - 1)
        return batch * factor.view(shape) + offset.view(shape)
