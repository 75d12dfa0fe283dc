"""The network plan: the classifier's shape and training budget, chosen from the data (pure).

nnU-Net plans its U-Net from the dataset fingerprint; this does the same for the ResNet
classifier. Inputs: the model input's spatial size, the training case count and class balance,
and whether lesion masks exist. Every choice can be overridden in params (`model.*`,
`train.epochs`, `train.batch_size`: a value wins over the rule), and the plan records, per
choice, the value and why (models/plan.json, `network`). The rules and the measurements behind
them are in README "Network plan".
"""

from __future__ import annotations

import math

from pipeline.config import ModelConfig, Params, TrainConfig

MIN_STEM_GRID = 24  # voxels per axis the stem's output must keep for a stride-2 stem
MIN_EVIDENCE_CELLS = 4  # last-stage cells per axis the evidence head needs to point at a finding
BUDGET_PRESENTATIONS = 3000  # case presentations per training run on the CPU budget
EPOCH_RANGE = (8, 15)
MIN_STEPS_PER_EPOCH = 64
MIN_RARE_FOR_SELECTION = 50  # rarer-class validation cases below which epoch selection by AUROC is noise


def _stem(size: int) -> tuple[int, int, str]:
    if size // 2 >= MIN_STEM_GRID:
        return 2, 7, (f"input {size} per axis: a stride-2 stem still leaves {size // 2} >= {MIN_STEM_GRID}; "
                      "7-voxel kernel as in MONAI/torchvision ResNets")
    return 1, 3, (f"input {size} per axis: a stride-2 stem would leave {size // 2} < {MIN_STEM_GRID} "
                  "(7/8 of the voxels gone before the first block); stride 1 with a 3-voxel kernel "
                  "(a 7^3 kernel at full resolution costs 12.7x for a receptive field the stages give anyway)")


def _output_stride(size: int, stem_stride: int, pool: str) -> tuple[int, str]:
    if pool != "lse":
        return 32, "no dilation: the classic ResNet; an averaged head does not need a finer last stage"
    for os in (32, 16, 8):
        cells = math.ceil(size * 2 / (stem_stride * os))  # os counts a stride-2 stem; a stride-1 stem halves it
        if cells >= MIN_EVIDENCE_CELLS:
            return os, f"{cells} last-stage cells per axis (>= {MIN_EVIDENCE_CELLS}) for the evidence head"
    return 8, f"the finest available (layer3 and layer4 dilated): {math.ceil(size * 2 / (stem_stride * 8))} cells"


def plan_network(spatial: list[int], n_train: int, class_counts: list[int], has_masks: bool,
                 model: ModelConfig, train: TrainConfig, val_counts: list[int] | None = None) -> dict:
    """{"choices": {key: value}, "why": {key: reason}} for name, conv1_t_stride, conv1_t_size,
    pool, output_stride, padding, width, max_channels, lr, batch_size, epochs, select and val_interval;
    `model`/`train` values override."""
    size = int(min(spatial)) if spatial else 1
    choices: dict = {}
    why: dict = {}

    def pick(key: str, configured, value, reason: str) -> None:
        choices[key] = configured if configured is not None else value
        why[key] = "params" if configured is not None else reason

    pick("name", model.name, "resnet10", "one block per stage: the smallest MONAI ResNet (README: resnet18 "
         "measured no better on the small-3D proxy, at twice the cost)")
    stride, kernel, stem_why = _stem(size)
    pick("conv1_t_stride", model.conv1_t_stride, stride, stem_why)
    pick("conv1_t_size", model.conv1_t_size, 7 if choices["conv1_t_stride"] >= 2 else kernel, stem_why)
    if has_masks:
        pick("pool", model.pool, "lse", "lesion masks exist: the evidence head (log-sum-exp of per-cell scores) "
             "keeps evidence where the finding is, and the pointing game measures and gates it")
    else:
        pick("pool", model.pool, "avg", "no lesion masks: localisation cannot be measured here, so the classic "
             "average-pooled head (measured better calibrated on the small-3D proxy)")
    os, os_why = _output_stride(size, choices["conv1_t_stride"], choices["pool"])
    pick("output_stride", model.output_stride, os, os_why)
    pick("padding", model.padding, "replicate" if choices["pool"] == "lse" else "zeros",
         "replicate with the evidence head (zero padding lets a cell find the border and pool evidence there)"
         if choices["pool"] == "lse" else "zeros (MONAI's)")
    if model.pretrained_path is not None:
        why_width = "pretrained weights: MedicalNet's ResNets are 64-128-256-512 wide"
        pick("width", model.width, 64, why_width)
        pick("max_channels", model.max_channels, 512, why_width)
    elif choices["output_stride"] < 32:
        why_width = ("dilated last stages: a cell of theirs costs what 8-64 cells of a strided stage do, and with "
                     "replicate padding every tap of a dilated kernel is computed; 32-64-128-128 (nnU-Net's 3D base "
                     "width, the last stage capped) trains 4.6x faster a step than 64-128-256-512 and localised on "
                     "3 of 3 seeds (README \"Network plan\")")
        pick("width", model.width, 32, why_width)
        pick("max_channels", model.max_channels, 128, why_width)
    else:
        pick("width", model.width, 64, "MONAI's ResNet channels (64-128-256-512)")
        pick("max_channels", model.max_channels, 512, "MONAI's ResNet channels (64-128-256-512)")
    if choices["pool"] == "lse":
        pick("lr", train.lr, 1e-3, "evidence head: AdamW at 1e-3 (its default) found the lesions within 3-5 epochs "
             "and localised on 3 of 3 seeds; at 3e-4 the validation AUROC stayed at chance for up to 7 epochs and "
             "one seed of 3 parked its evidence at the border (README \"Network plan\")")
    else:
        pick("lr", train.lr, 3e-4, "AdamW at 3e-4 (the recipe measured on the 28^3 proxy and PneumoniaMNIST)")
    batch = 8
    for b in (16, 32):
        if n_train / b >= MIN_STEPS_PER_EPOCH:
            batch = b
    pick("batch_size", train.batch_size, batch, f"{n_train} training cases: the largest of 8/16/32 that still "
         f"gives >= {MIN_STEPS_PER_EPOCH} steps per epoch (8 at least, for BatchNorm statistics)")
    lo, hi = EPOCH_RANGE
    epochs = int(min(hi, max(lo, round(BUDGET_PRESENTATIONS / max(1, n_train)))))
    pick("epochs", train.epochs, epochs, f"about {BUDGET_PRESENTATIONS} case presentations ({n_train} cases), "
         f"within {lo}-{hi} epochs; the best epoch by validation AUROC is kept")
    rare = min(val_counts) if val_counts else 0
    if rare < MIN_RARE_FOR_SELECTION:
        pick("select", train.select, "last", f"the validation set has {rare} case(s) of its rarer class "
             f"(< {MIN_RARE_FOR_SELECTION}): its AUROC moves by ~0.05 between epochs by chance, so the best epoch "
             "by it is noise; the last epoch of the cosine schedule is kept")
    else:
        pick("select", train.select, "best", f"{rare} validation cases of the rarer class: the best epoch by "
             "validation AUROC, with early stopping")
    if choices["select"] == "best":
        pick("val_interval", train.val_interval, 1, "the kept epoch is chosen by validation: every epoch")
    else:
        pick("val_interval", train.val_interval, 5, "the last epoch is kept, so validation only draws the curve: "
             "every 5th epoch and the last (a pass costs about 10% of an epoch on the demo)")
    balance = (f"class counts {class_counts}: imbalance handled by train.imbalance={train.imbalance}"
               if class_counts else "")
    return {"choices": choices, "why": why, "fingerprint": {"input_size": list(spatial), "n_train": n_train,
                                                             "class_counts": class_counts, "has_masks": has_masks,
                                                             "val_class_counts": val_counts or [],
                                                             "balance": balance}}


MODEL_CHOICES = ("name", "conv1_t_stride", "conv1_t_size", "pool", "output_stride", "padding", "width", "max_channels")
TRAIN_CHOICES = ("epochs", "batch_size", "select", "lr", "val_interval")


def with_plan_choices(params: Params, network: dict) -> Params:
    """Params with the network plan's choices (`plan_network(...)`, or plan.json's `network`) filled in: the
    settings a model was trained with. A choice an older plan lacks keeps the params' value."""
    c = network.get("choices", {})
    model = params.model.model_copy(update={k: c[k] for k in MODEL_CHOICES if c.get(k) is not None})
    train = params.train.model_copy(update={k: c[k] for k in TRAIN_CHOICES if c.get(k) is not None})
    return params.model_copy(update={"model": model, "train": train})


__all__ = ["plan_network", "with_plan_choices"]
