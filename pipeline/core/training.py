"""Training helpers (pure functions of their arguments): seeding, optimizer and schedule, the
sample order of an epoch on each rank, and the validation AUROC that selects the best epoch."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.config import Params
from pipeline.core.augment import epoch_order


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


def auroc_of(labels: torch.Tensor, logits: torch.Tensor) -> float:
    """Binary AUROC of class 1, or macro one-vs-rest for several classes; NaN if one class only."""
    from sklearn.metrics import roc_auc_score

    y = labels.numpy()
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
