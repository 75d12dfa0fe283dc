"""Train stage: a MONAI ResNet (or the plain CNN) on the ingested tensors, tracked in MLflow.

Single process on CPU or one GPU, or under `torchrun --nproc_per_node N` (DDP; rank 0 alone
logs and writes). Deterministic on CPU: every epoch's sample order, augmentation and dropout
are pure functions of (seed, epoch), so a resumed run equals an uninterrupted one.
Multi-label plans (labels (N, L)): BCE with logits (pos_weight per label with train.imbalance=weights;
the sampler is refused), the epoch kept by the macro AUROC over labels, K folds stratified on the
label combination (`pipeline.core.splits.strata`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import Params
from pipeline.core.augment import Augmenter
from pipeline.core.classifier import predict_logits, resolve_device
from pipeline.core.models import ModelSpec, build_model, load_medicalnet
from pipeline.core.plan import NetworkPlan, Plan
from pipeline.core.training import (
    auroc_of,
    check_imbalance,
    local_order,
    make_criterion,
    make_optimizer,
    seed_everything,
    val_loss_of,
)
from pipeline.errors import ResDxError
from pipeline.io.artifacts import save_csv, save_json
from pipeline.io.checkpoint import load_train_state, save_checkpoint, save_train_state, save_weights
from pipeline.io.index import read_index
from pipeline.io.tensors import CaseSet, load_split, read_plan, to_device_if_fits
from pipeline.layout import IngestDir, ModelDir
from pipeline.progress import EpochBar


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
    members_trained: list = field(default_factory=list)  # members that ran epochs in this call (not cached)
    network: dict = field(default_factory=dict)  # the network plan's choices (models/plan.json has the reasons)


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


def model_spec(params: Params, train: CaseSet, plan: Plan) -> ModelSpec:
    input_ndim = train.images.ndim - 2
    spatial = params.model.spatial_dims if input_ndim == 3 else 2  # 2D images always take a 2D network
    n_classes = int(plan.n_classes or (int(train.labels.max()) + 1))
    m = params.model
    return ModelSpec(name=m.name, spatial_dims=spatial, in_channels=int(train.images.shape[1]),
                     n_classes=max(2, n_classes), input_ndim=input_ndim, conv1_t_stride=m.conv1_t_stride,
                     conv1_t_size=m.conv1_t_size, slices_2d=m.slices_2d, dropout=m.dropout, pool=m.pool,
                     output_stride=m.output_stride, padding=m.padding, width=m.width, max_channels=m.max_channels)


def run_key(params: Params, data_id: str) -> str:
    """Identity of a training run for resuming: the settings that change its result, and the data."""
    cfg = {"seed": params.seed, "model": params.model.model_dump(mode="json"),
           "train": params.train.model_dump(mode="json", exclude={"resume", "state_dir", "out_dir", "threads"}),
           "data": data_id}
    return hashlib.blake2b(json.dumps(cfg, sort_keys=True).encode(), digest_size=12).hexdigest()


# ----------------------------------------------------------------------------- the stage
@dataclass
class Member:
    """One network to train: the whole train split (K = 1) or one fold's complement (K > 1)."""

    name: str  # "" for the single model, "fold<k>" for a fold member
    train: CaseSet
    val: CaseSet


def members_for(train: CaseSet, val: CaseSet, folds: int, seed: int) -> tuple[list[Member], np.ndarray | None]:
    """K = 1: train on train, select on val. K > 1: folds over train + val (test is never in the pool);
    member k trains on the other folds and selects its epoch on fold k. Returns the pool's fold ids too."""
    if folds <= 1:
        return [Member("", train, val)], None
    from pipeline.core.splits import assign_folds
    from pipeline.io.tensors import concat, subset

    pool = concat(train, val)
    fold_of = assign_folds(pool.patient_ids, pool.labels.tolist(), folds, seed)
    members = [Member(f"fold{k}", subset(pool, np.flatnonzero(fold_of != k)),
                      subset(pool, np.flatnonzero(fold_of == k))) for k in range(folds)]
    return members, fold_of


def run_train(params: Params, ingest_dir: Path | str | None = None, out_dir: Path | str | None = None,
              progress: bool = True) -> TrainSummary:
    """Train (one model, or K fold members), keep each member's best epoch by validation AUROC,
    write OUT/{model.safetensors, model.json, plan.json, folds.csv, ...}."""
    from pipeline.core.recipe import plan_network, with_plan_choices
    from pipeline.tracking.runs import data_hash

    t0 = time.perf_counter()
    ingest_dir = Path(ingest_dir or params.ingest.out_dir)
    out = Path(out_dir or params.train.out_dir)
    rank, world, local_rank = init_distributed()
    device = resolve_device(params.train.device, local_rank)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        if params.train.threads:
            torch.set_num_threads(params.train.threads)
    else:
        torch.backends.cudnn.benchmark = True

    plan = read_plan(ingest_dir)
    check_imbalance(params.train.imbalance, plan.multi_label)
    train, val = load_split(ingest_dir, "train", pin=device.type == "cuda"), load_split(ingest_dir, "val")
    if len(train) == 0 or (len(val) == 0 and params.split.folds <= 1):
        raise ResDxError(f"{ingest_dir}: need ok cases in both train ({len(train)}) and val ({len(val)}) splits",
                         code="no_training_data", hint="check the splits in index.csv (split.* or the manifest's "
                         "split column) and the rejection reasons")
    try:
        members, fold_of = members_for(train, val, params.split.folds, params.seed)
    except ValueError as err:
        raise ResDxError(str(err), code="no_training_data", hint="lower split.folds") from None
    first = members[0].train
    has_masks = any(IngestDir(ingest_dir).mask(c).exists() for c in train.case_ids)
    network = plan_network(list(train.images.shape[2:]), len(first), _class_counts(first), has_masks, params.model,
                           params.train, val_counts=_class_counts(members[0].val))
    params = with_plan_choices(params, network)
    spec = model_spec(params, train, plan)
    dhash = data_hash(ingest_dir)
    # The tensors' own bytes, not only their sources': a change in preprocessing code (same sources, same
    # plan) must not resume a finished run trained on the old tensors.
    case_hash = {r["case_id"]: f"{r.get('source_hash', '')}:{_file_digest(IngestDir(ingest_dir).tensor(r['case_id']))}"
                 for r in read_index(ingest_dir) if r.get("status") == "ok"}
    model_plan = plan.model_copy(update={"network": NetworkPlan(**network)})

    fits: list[dict] = []
    for m in members:  # the members of one stage log into one MLflow run (metrics prefixed `fold<k>/`)
        shared = next((f["run_id"] for f in fits if f["run_id"]), None)
        fits.append(_fit_member(params, spec, _to_device(m, device), model_plan, dhash, case_hash, device, rank,
                                world, local_rank, progress, shared))
    run_id = next((f["run_id"] for f in fits if f["run_id"]), "")
    hist = [dict(h, fold=i) for i, f in enumerate(fits) for h in f["history"]]
    summary = TrainSummary(
        best_val_auroc=float(np.mean([f["best"] for f in fits])), best_epoch=fits[0]["best_epoch"],
        epochs_run=max(len(f["history"]) for f in fits), stopped_early=any(f["stopped_early"] for f in fits),
        seconds=time.perf_counter() - t0, device=str(device), n_train=len(first), n_val=len(members[0].val),
        run_id=run_id, history=hist, members_trained=[f["name"] or "model" for f in fits if f["trained"]],
        network=dict(network["choices"]))
    if rank == 0:
        _export(out, fits, spec, model_plan, params, summary, dhash, members, fold_of)
    if run_id and rank == 0 and params.mlflow.enabled:
        import mlflow

        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics({"best_val_auroc": summary.best_val_auroc, "best_epoch": summary.best_epoch})
            mlflow.log_dict(model_plan.to_json(), "plan.json")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=12)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def member_data_id(member: Member, plan: Plan, case_hash: dict[str, str]) -> str:
    """What a member's result depends on besides params: its own train and val cases (id, label and the
    content hash ingest recorded) and the plan. Another fold's change leaves it, so it is not retrained."""
    rows = [f"{s}:{c}:{';'.join(map(str, y)) if isinstance(y, list) else int(y)}:{case_hash.get(c, '')}"
            for s, cs in (("t", member.train), ("v", member.val)) for c, y in zip(cs.case_ids, cs.labels.tolist())]
    return hashlib.blake2b(("\n".join([plan.hash(), *rows])).encode(), digest_size=12).hexdigest()


def _class_counts(cases: CaseSet) -> list[int]:
    """Cases per class (single-label) or positives per label (multi-label)."""
    y = cases.labels.cpu()
    return [int(v) for v in (y.sum(dim=0) if y.ndim == 2 else torch.bincount(y))]


def _to_device(m: Member, device: torch.device) -> Member:
    return Member(m.name, to_device_if_fits(m.train, device), m.val)


def _fit_member(params: Params, spec: ModelSpec, member: Member, plan: Plan, dhash: str, case_hash: dict,
                device: torch.device, rank: int, world: int, local_rank: int, progress: bool,
                shared_run_id: str | None) -> dict:
    """Train one network; resumes its last completed epoch, and a finished member (same key: settings,
    network, data and the member's own cases) is not trained again."""
    from pipeline.core.records import flatten
    from pipeline.tracking.runs import git_commit, start_run

    t = params.train
    amp = t.amp and device.type == "cuda"
    train, val = member.train, member.val
    key = run_key(params, member_data_id(member, plan, case_hash))
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
    progress_state = load_train_state(state, model, opt, sched) if t.resume else None
    net = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None) \
        if world > 1 else model
    multi = train.labels.ndim == 2  # multi-label: BCE with logits, one sigmoid per label
    criterion = make_criterion(train.labels, spec.n_classes, t.imbalance, multi, device)
    augment = Augmenter(t.augment, spatial_dims=spec.input_ndim)

    ps = progress_state or {}
    hist, best = ps.get("history", []), ps.get("best", -math.inf)
    best_epoch, since = ps.get("best_epoch", -1), ps.get("since_best", 0)
    start = ps["epoch"] + 1 if progress_state else 0
    finished, run_id = bool(ps.get("finished")), ps.get("run_id")
    prefix = f"{member.name}/" if member.name else ""

    log = rank == 0 and params.mlflow.enabled
    if log:
        mlrun = start_run(params, run_id or shared_run_id, run_name=f"{spec.name}-{spec.spatial_dims}d"
                          + (f"-{params.split.folds}fold" if params.split.folds > 1 else ""))
        run_id = mlrun.info.run_id
        if not mlrun.data.params:
            import mlflow

            mlflow.log_params(flatten(params.model_dump(mode="json")))
            mlflow.set_tags({"git_commit": git_commit(), "dvc_data_hash": dhash, "device": str(device),
                             "world_size": world, "model": spec.name, "spatial_dims": spec.spatial_dims,
                             "plan_version": plan.version, "folds": params.split.folds})
            mlflow.log_dict(plan.to_json(), "plan.json")

    bar = EpochBar(progress and rank == 0 and not finished, t.epochs - start, steps,
                   f"{member.name} epochs" if member.name else "epochs")
    try:
        for epoch in range(start, t.epochs):
            if finished:
                break
            te = time.perf_counter()
            net.train()
            torch.manual_seed(params.seed * 7919 + epoch)  # dropout etc.: a function of (seed, epoch)
            order = local_order(len(train), epoch, params.seed, train.labels.cpu(), t.imbalance == "sampler", rank,
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
                bar.step()
            # Every rank evaluates the (small) validation set the same way: no broadcast needed. Skipping a pass
            # draws no random numbers, so the weights do not depend on val_interval.
            val_loss = val_auroc = score = math.nan
            if (epoch + 1) % (t.val_interval or 1) == 0 or epoch == t.epochs - 1:
                val_logits = predict_logits(model, val.images, device, t.batch_size, amp)
                val_loss, val_auroc = val_loss_of(val.labels, val_logits, multi), auroc_of(val.labels, val_logits)
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
            if t.select == "last":  # the annealed last epoch is kept: a small val set would only add its noise
                improved, best_epoch = True, epoch
                finished = epoch == t.epochs - 1
            else:
                finished = since >= t.patience or epoch == t.epochs - 1
            if log:
                import mlflow

                mlflow.log_metrics({prefix + k: v for k, v in row.items() if k != "epoch" and not math.isnan(v)},
                                   step=epoch)
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
    if log:
        import mlflow

        mlflow.end_run()
    return {"name": member.name, "state": state, "best": float(best), "best_epoch": best_epoch, "history": hist,
            "stopped_early": len(hist) < t.epochs, "run_id": run_id or "", "trained": not bool(ps.get("finished"))}


def _cell(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.5f}"  # empty: an epoch that was not validated


def _save_state(state: Path, model, opt, sched, progress: dict) -> None:
    save_train_state(state, model, opt, sched, progress)


def _export(out: Path, fits: list[dict], spec: ModelSpec, plan: Plan, params: Params, s: TrainSummary, dhash: str,
            members: list[Member], fold_of: np.ndarray | None) -> None:
    """The best epoch of every member as one network (a fold ensemble when K > 1), its spec, the plan
    with the chosen network, folds.csv (the validation cases of each member), metrics and history."""
    from safetensors.torch import load_file

    from pipeline.core.models import EnsembleNet

    out.mkdir(parents=True, exist_ok=True)
    nets = []
    for f in fits:
        net = build_model(spec)
        net.load_state_dict(load_file(str(f["state"] / "best.safetensors")))
        nets.append(net)
    final = nets[0] if len(nets) == 1 else EnsembleNet(nets)
    final_spec = replace(spec, n_members=len(nets))
    class_names = plan.class_names or [str(i) for i in range(spec.n_classes)]
    folds = [{"fold": i, "best_epoch": f["best_epoch"], "best_val_auroc": round(f["best"], 4),
              "n_train": len(m.train), "n_val": len(m.val)} for i, (f, m) in enumerate(zip(fits, members))]
    save_checkpoint(final, final_spec, out, {
        "class_names": class_names, "input_shape": list(plan.shape), "best_epoch": s.best_epoch,
        "best_val_auroc": s.best_val_auroc, "seed": params.seed, "data_hash": dhash, "mlflow_run_id": s.run_id,
        "source": plan.source, "folds": folds, "task": plan.task,
    })
    layout = ModelDir(out)
    save_json(layout.plan, plan.to_json())
    save_csv(layout.folds, ["case_id", "fold"], [[c, i] for i, m in enumerate(members) for c in m.val.case_ids])
    metrics = {"best_val_auroc": round(s.best_val_auroc, 4), "best_epoch": s.best_epoch, "epochs_run": s.epochs_run,
               "seconds": round(s.seconds, 1), "n_train": s.n_train, "n_val": s.n_val}
    if len(fits) > 1:
        metrics |= {"folds": len(fits), "fold_best_val_auroc": [f["best_val_auroc"] for f in folds]}
    save_json(layout.train_metrics, metrics)
    if params.mlflow.enabled:
        save_json(layout.run, {"run_id": s.run_id, "tracking_uri": params.mlflow.tracking_uri})
    rows = [(r["epoch"], *(_cell(r[k]) for k in ("train_loss", "val_loss", "val_auroc")), f"{r['lr']:.6g}", r["fold"])
            for r in s.history]
    save_csv(layout.history, ("epoch", "train_loss", "val_loss", "val_auroc", "lr", "fold"), rows)
