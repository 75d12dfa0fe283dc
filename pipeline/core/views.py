"""Inference views: test-time augmentation and fold-ensemble members, and the spread between them.

A view is one (member, transform) pair. The served logits are the mean over every view; the
standard deviation of the calibrated probability over the views is the per-case uncertainty
(deep-ensemble and TTA spread, Lakshminarayanan et al. 2017; Wang et al. 2019). Transforms are
only those the network saw in training (`train.augment` flips every axis; shifts are within its
affine jitter), so each view is a plausible copy of the case, not a new input distribution.
"""

from __future__ import annotations

import itertools
from typing import Literal

import numpy as np
import torch
from torch import nn

TTA = Literal["none", "flips", "flips_shifts"]
SHIFT_VOXELS = 2  # small against 28^3-48^3 inputs (4-7% of the field), well inside training's affine jitter


def transforms(tta: str, spatial_dims: int) -> list[tuple[tuple[int, ...], tuple[int, int] | None]]:
    """(flip axes, (shift axis, offset) or None) per view; the identity first."""
    if tta == "none":
        return [((), None)]
    axes = range(spatial_dims)
    flips = [tuple(a for a, on in zip(axes, mask) if on) for mask in itertools.product((0, 1), repeat=spatial_dims)]
    views: list = [(f, None) for f in flips]
    if tta == "flips_shifts":
        views += [((), (a, s)) for a in axes for s in (-SHIFT_VOXELS, SHIFT_VOXELS)]
    return views


def apply_view(x: torch.Tensor, view) -> torch.Tensor:
    """One transform of a batch (B, C, *spatial): axis flips, then an edge-replicating shift."""
    flips, shift = view
    if flips:
        x = x.flip([2 + a for a in flips])
    if shift is not None:
        axis, d = shift
        n = x.shape[2 + axis]
        idx = torch.clamp(torch.arange(n, device=x.device) - d, 0, n - 1)
        x = x.index_select(2 + axis, idx)
    return x


def members_of(model: nn.Module) -> list[nn.Module]:
    return list(model.members) if hasattr(model, "member_logits") else [model]


@torch.no_grad()
def view_logits(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int, tta: str = "none",
                amp: bool = False) -> torch.Tensor:
    """Logits of every view, (T, M, N, K) on the CPU: T test-time transforms x M members, input order.

    At most `batch_size` samples go through the network at once; when fewer cases than that are left
    (one study in explain or predict), several of their views share the forward pass: the network is in
    eval mode, so every sample's logits are its own, and one batch of 8 costs far less than 8 of one.
    """
    model.eval()
    members = members_of(model)
    views = transforms(tta, images.ndim - 2)
    out = []
    for i in range(0, len(images), batch_size):
        xb = images[i:i + batch_size].to(device, non_blocking=True).float()
        group = max(1, batch_size // len(xb))  # views per forward pass
        per_batch = []
        for j in range(0, len(views), group):
            xv = torch.cat([apply_view(xb, view) for view in views[j:j + group]])
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                logits = torch.stack([m(xv).float().cpu() for m in members])  # (M, views x B, K)
            per_batch += list(logits.unflatten(1, (-1, len(xb))).transpose(0, 1))  # per view: (M, B, K)
        out.append(torch.stack(per_batch))
    if not out:
        return torch.zeros((len(views), len(members), 0, 2))
    return torch.cat(out, dim=2)


def spread(view_probs: np.ndarray, column: np.ndarray | int) -> np.ndarray:
    """Per-case standard deviation over views of the probability in `column` (per case or one class);
    0 where there is only one view."""
    v = np.asarray(view_probs)
    if v.shape[0] < 2:
        return np.zeros(v.shape[1])
    cols = np.broadcast_to(np.asarray(column), (v.shape[1],))
    picked = v[:, np.arange(v.shape[1]), cols]
    return picked.std(axis=0)


__all__ = ["TTA", "apply_view", "members_of", "spread", "transforms", "view_logits"]
