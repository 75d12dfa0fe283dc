"""Train stage: a MONAI ResNet (or the plain CNN) on the ingested tensors, tracked in MLflow.

Single process on CPU or one GPU, or under `torchrun --nproc_per_node N` (DDP; rank 0 alone
logs and writes). Deterministic on CPU: every epoch's sample order, augmentation and dropout
are pure functions of (seed, epoch), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import Params
from pipeline.core.augment import Augmenter, class_weights, epoch_order
from pipeline.core.classifier import predict_logits, resolve_device
from pipeline.core.models import ModelSpec, build_model, load_medicalnet
from pipeline.core.plan import Plan
from pipeline.errors import ResDxError
from pipeline.io.artifacts import save_json
from pipeline.io.checkpoint import save_checkpoint, save_weights
from pipeline.io.tensors import CaseSet, load_split, read_plan, to_device_if_fits
from pipeline.layout import IngestDir, ModelDir


@dataclass
class TrainSummary:
    best_val_auroc: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    seconds: float
    device: str
    n_train: int
    n_val: int
    run_id: str = ""
    history: list = field(default_factory=list)


# ----------------------------------------------------------------------------- setup
def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def model_spec(params: Params, train: CaseSet, plan: Plan) -> ModelSpec:
    input_ndim = train.images.ndim - 2
    spatial = params.model.spatial_dims if input_ndim == 3 else 2  # 2D images always take a 2D network
    n_classes = int(plan.n_classes or (int(train.labels.max()) + 1))
    return ModelSpec(
        name=params.model.name, spatial_dims=spatial, in_channels=int(train.images.shape[1]),
        n_classes=max(2, n_classes),
        input_ndim=input_ndim, conv1_t_stride=params.model.conv1_t_stride, conv1_t_size=params.model.conv1_t_size,
        slices_2d=params.model.slices_2d, dropout=params.model.dropout, pool=params.model.pool,
        output_stride=params.model.output_stride, padding=params.model.padding,
    )


def run_key(params: Params, data_id: str) -> str:
    """Identity of a training run for resuming: the settings that change its result, and the data."""
    cfg = {"seed": params.seed, "model": params.model.model_dump(mode="json"),
           "train": params.train.model_dump(mode="json", exclude={"resume", "state_dir", "out_dir", "threads"}),
           "data": data_id}
    return hashlib.blake2b(json.dumps(cfg, sort_keys=True).encode(), digest_size=12).hexdigest()


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


# ----------------------------------------------------------------------------- evaluation
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


# ----------------------------------------------------------------------------- the stage
def run_train(params: Params, ingest_dir: Path | str | None = None, out_dir: Path | str | None = None,
              progress: bool = True) -> TrainSummary:
    """Train, keep the best checkpoint by validation AUROC, write OUT/{model.safetensors,model.json,...}."""
    from pipeline.core.records import flatten
    from pipeline.tracking.runs import data_hash, git_commit, start_run

    t0 = time.perf_counter()
    t = params.train
    ingest_dir = Path(ingest_dir or params.ingest.out_dir)
    out = Path(out_dir or t.out_dir)
    rank, world, local_rank = init_distributed()
    device = resolve_device(t.device, local_rank)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        if t.threads:
            torch.set_num_threads(t.threads)
    else:
        torch.backends.cudnn.benchmark = True
    amp = t.amp and device.type == "cuda"

    plan = read_plan(ingest_dir)
    train, val = load_split(ingest_dir, "train", pin=device.type == "cuda"), load_split(ingest_dir, "val")
    train = to_device_if_fits(train, device)
    if len(train) == 0 or len(val) == 0:
        raise ResDxError(f"{ingest_dir}: need ok cases in both train ({len(train)}) and val ({len(val)}) splits",
                         code="no_training_data", hint="check the splits in index.csv (split.* or the manifest's "
                         "split column) and the rejection reasons")
    spec = model_spec(params, train, plan)
    dhash = data_hash(ingest_dir)
    key = run_key(params, dhash)
    state = Path(t.state_dir) / key
    per_rank_batch = max(1, t.batch_size // world)
    n_local = math.ceil(len(train) / world)
    steps = max(1, n_local // per_rank_batch) if n_local >= 2 else 1

    seed_everything(params.seed)
    model = build_model(spec)
    if params.model.pretrained_path:
        load_medicalnet(model, params.model.pretrained_path)
    model.to(device)
    opt, sched = make_optimizer(params, model, steps)
    progress_state = _load_state(state, model, opt, sched) if t.resume else None
    net = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None) \
        if world > 1 else model
    weights = class_weights(train.labels.cpu(), spec.n_classes).to(device) if t.imbalance == "weights" else None
    criterion = nn.CrossEntropyLoss(weight=weights)
    augment = Augmenter(t.augment, spatial_dims=spec.input_ndim)

    hist = progress_state["history"] if progress_state else []
    best = progress_state["best"] if progress_state else -math.inf
    best_epoch = progress_state["best_epoch"] if progress_state else -1
    since = progress_state["since_best"] if progress_state else 0
    start = progress_state["epoch"] + 1 if progress_state else 0
    finished = bool(progress_state and progress_state.get("finished"))
    run_id = progress_state.get("run_id") if progress_state else None

    mlrun = None
    log = rank == 0 and params.mlflow.enabled
    if log:
        mlrun = start_run(params, run_id, run_name=f"{spec.name}-{spec.spatial_dims}d")
        run_id = mlrun.info.run_id
        if not progress_state:
            import mlflow

            mlflow.log_params(flatten(params.model_dump(mode="json")))
            mlflow.set_tags({"git_commit": git_commit(), "dvc_data_hash": dhash, "device": str(device),
                             "world_size": world, "model": spec.name, "spatial_dims": spec.spatial_dims,
                             "plan_version": plan.version})
            mlflow.log_dict(plan.to_json(), "plan.json")

    bar = _Bar(progress and rank == 0, t.epochs - start, steps)
    try:
        for epoch in range(start, t.epochs):
            if finished:
                break
            te = time.perf_counter()
            net.train()
            torch.manual_seed(params.seed * 7919 + epoch)  # dropout etc.: a function of (seed, epoch)
            order = _local_order(len(train), epoch, params.seed, train.labels.cpu(), t.imbalance == "sampler", rank,
                                 world).to(train.images.device)
            loss_sum, n_steps = torch.zeros((), device=device), 0
            for step in range(steps):
                idx = order[step * per_rank_batch:(step + 1) * per_rank_batch]
                if len(idx) < 2 and len(order) >= 2:
                    continue  # BatchNorm needs two samples
                xb = train.images.index_select(0, idx).to(device, non_blocking=True)
                yb = train.labels.index_select(0, idx).to(device, non_blocking=True)
                xb = augment(xb, seed=params.seed * 1_000_003 + epoch * 10_007 + step * world + rank)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = net(xb)
                loss = criterion(logits.float(), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if t.grad_clip:
                    nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip)
                opt.step()
                sched.step()
                loss_sum += loss.detach()  # summed on the device: no host sync per step
                n_steps += 1
                bar.step(epoch)
            # Every rank evaluates the (small) validation set the same way: no broadcast needed.
            val_logits = predict_logits(model, val.images, device, t.batch_size, amp)
            val_loss = float(nn.functional.cross_entropy(val_logits, val.labels))
            val_auroc = auroc_of(val.labels, val_logits)
            score = val_auroc if not math.isnan(val_auroc) else -val_loss
            row = {"epoch": epoch, "train_loss": float(loss_sum) / n_steps if n_steps else float("nan"),
                   "val_loss": val_loss, "val_auroc": val_auroc, "lr": opt.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - te}
            hist.append(row)
            improved = score > best
            if improved:
                best, best_epoch, since = score, epoch, 0
            else:
                since += 1
            finished = since >= t.patience or epoch == t.epochs - 1
            if log:
                import mlflow

                mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch" and not math.isnan(v)}, step=epoch)
            if rank == 0:
                if improved:
                    save_weights(model, state / "best.safetensors")
                _save_state(state, model, opt, sched, {"epoch": epoch, "best": best, "best_epoch": best_epoch,
                                                       "since_best": since, "history": hist, "run_id": run_id,
                                                       "finished": finished})
            bar.epoch_done(epoch, row, best)
            if world > 1:
                dist.barrier()
    finally:
        bar.close()

    summary = TrainSummary(best_val_auroc=float(best), best_epoch=best_epoch, epochs_run=len(hist),
                           stopped_early=len(hist) < t.epochs, seconds=time.perf_counter() - t0, device=str(device),
                           n_train=len(train), n_val=len(val), run_id=run_id or "", history=hist)
    if rank == 0:
        _export(out, state, spec, plan, params, summary, dhash, ingest_dir)
    if log:
        import mlflow

        mlflow.log_metrics({"best_val_auroc": summary.best_val_auroc, "best_epoch": best_epoch})
        mlflow.end_run()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _local_order(n: int, epoch: int, seed: int, labels: torch.Tensor, balanced: bool, rank: int, world: int
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


def _save_state(state: Path, model, opt, sched, progress: dict) -> None:
    save_weights(model, state / "last.safetensors")
    tmp = state / ".tmp-optim.pt"
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp)
    tmp.replace(state / "optim.pt")
    save_json(state / "progress.json", progress)  # written last: it marks the epoch complete


def _load_state(state: Path, model, opt, sched) -> dict | None:
    """Resume from the last completed epoch of the same run key, if any."""
    from safetensors.torch import load_file

    prog = state / "progress.json"
    if not prog.exists():
        return None
    progress = json.loads(prog.read_text())
    model.load_state_dict(load_file(str(state / "last.safetensors")))
    blob = torch.load(state / "optim.pt", map_location="cpu", weights_only=True)  # our own file, tensors only
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    return progress


def _export(out: Path, state: Path, spec: ModelSpec, plan: Plan, params: Params, s: TrainSummary, dhash: str,
            ingest_dir: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import load_file

    best = build_model(spec)
    best.load_state_dict(load_file(str(state / "best.safetensors")))
    class_names = plan.class_names or [str(i) for i in range(spec.n_classes)]
    save_checkpoint(best, spec, out, {
        "class_names": class_names, "input_shape": list(plan.shape), "best_epoch": s.best_epoch,
        "best_val_auroc": s.best_val_auroc, "seed": params.seed, "data_hash": dhash, "mlflow_run_id": s.run_id,
        "source": plan.source,
    })
    layout = ModelDir(out)
    shutil.copyfile(IngestDir(ingest_dir).plan, layout.plan)
    save_json(layout.train_metrics, {"best_val_auroc": round(s.best_val_auroc, 4), "best_epoch": s.best_epoch,
                                           "epochs_run": s.epochs_run, "seconds": round(s.seconds, 1),
                                           "n_train": s.n_train, "n_val": s.n_val})
    if params.mlflow.enabled:
        save_json(layout.run, {"run_id": s.run_id, "tracking_uri": params.mlflow.tracking_uri})
    with layout.history.open("w") as fh:
        fh.write("epoch,train_loss,val_loss,val_auroc,lr\n")
        for r in s.history:
            fh.write(f"{r['epoch']},{r['train_loss']:.5f},{r['val_loss']:.5f},{r['val_auroc']:.5f},{r['lr']:.6g}\n")


class _Bar:
    """Rich progress: one bar over epochs (with ETA) and one over the steps of the current epoch."""

    def __init__(self, show: bool, epochs: int, steps: int):
        self.show = show
        if not show:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("eta"),
                          TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
        self.p.start()
        self.e = self.p.add_task("epochs", total=epochs, info="")
        self.s = self.p.add_task("steps", total=steps, info="")

    def step(self, epoch: int) -> None:
        if self.show:
            self.p.update(self.s, advance=1)

    def epoch_done(self, epoch: int, row: dict, best: float) -> None:
        if self.show:
            self.p.update(self.e, advance=1, info=f"epoch {epoch}: train loss {row['train_loss']:.4f}, "
                          f"val AUROC {row['val_auroc']:.3f} (best {best:.3f})")
            self.p.reset(self.s)

    def close(self) -> None:
        if self.show:
            self.p.stop()
