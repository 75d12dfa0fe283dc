"""Training helpers (pure functions of their arguments): seeding, optimizer and schedule, the
loss, the sample order of an epoch on each rank, and the validation AUROC that selects the best epoch.

Multi-label (labels (N, L) 0/1): BCE with logits, one sigmoid per label, `pos_weight` = negatives /
positives of each label in the training cases when `train.imbalance` is weights; the class-balanced
sampler is single-label only. The validation score is the macro AUROC over labels (NaN-safe).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.config import Params
from pipeline.core.augment import class_weights, epoch_order
from pipeline.errors import ConfigError


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def make_optimizer(params: Params, model: nn.Module, steps_per_epoch: int):
    t = params.train
    if t.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                              nesterov=True)
    total = max(1, t.epochs * steps_per_epoch)
    if t.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    elif t.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t.lr, total_steps=total)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def positive_weights(labels: torch.Tensor) -> torch.Tensor:
    """Multi-label `pos_weight`: negatives / positives per label (1 where a label has no positive)."""
    y = labels.float()
    pos = y.sum(dim=0)
    return torch.where(pos > 0, (len(y) - pos) / pos.clamp(min=1), torch.ones_like(pos))


def make_criterion(labels: torch.Tensor, n_classes: int, imbalance: str, multi_label: bool, device):
    """The training loss: cross-entropy (weighted by inverse class frequency with `weights`), or for
    multi-label BCE with logits (`pos_weight` per label with `weights`); called as loss(logits, labels)."""
    if not multi_label:
        weights = class_weights(labels.cpu(), n_classes).to(device) if imbalance == "weights" else None
        return nn.CrossEntropyLoss(weight=weights)
    check_imbalance(imbalance, multi_label)
    pos_weight = positive_weights(labels.cpu()).to(device) if imbalance == "weights" else None
    bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    return lambda logits, y: bce(logits, y.float())


def check_imbalance(imbalance: str, multi_label: bool) -> None:
    if multi_label and imbalance == "sampler":
        raise ConfigError("train.imbalance=sampler draws cases by their class, which a multi-label case does not "
                          "have; use weights (BCE pos_weight per label) or none for a multi-label task")


def val_loss_of(labels: torch.Tensor, logits: torch.Tensor, multi_label: bool) -> float:
    """Unweighted validation loss: cross-entropy, or BCE with logits for multi-label."""
    if multi_label:
        return float(nn.functional.binary_cross_entropy_with_logits(logits, labels.float()))
    return float(nn.functional.cross_entropy(logits, labels))


def auroc_of(labels: torch.Tensor, logits: torch.Tensor) -> float:
    """Binary AUROC of class 1, or macro one-vs-rest for several classes; NaN if one class only.
    Multi-label labels (N, L): the macro AUROC of the sigmoids over labels with both classes (NaN if none)."""
    from sklearn.metrics import roc_auc_score

    y = labels.numpy()
    if y.ndim == 2:
        from pipeline.core.multilabel import macro_auroc

        return macro_auroc(y, torch.sigmoid(logits).numpy()) if len(y) else float("nan")
    if len(np.unique(y)) < 2:
        return float("nan")
    probs = torch.softmax(logits, dim=1).numpy()
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    present = np.unique(y)
    sub = probs[:, present] / probs[:, present].sum(axis=1, keepdims=True)
    if len(present) == 2:
        return float(roc_auc_score(y == present[1], sub[:, 1]))
    return float(roc_auc_score(y, sub, multi_class="ovr", average="macro", labels=present))


def local_order(n: int, epoch: int, seed: int, labels: torch.Tensor, balanced: bool, rank: int, world: int
                 ) -> torch.Tensor:
    if world == 1:
        return epoch_order(n, epoch, seed, labels, balanced)
    if not balanced:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return torch.tensor(list(iter(sampler)), dtype=torch.long)
    order = epoch_order(n, epoch, seed, labels, balanced)
    pad = (-len(order)) % world
    order = torch.cat([order, order[:pad]])
    return order[rank::world]
