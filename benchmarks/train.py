"""Benchmark training throughput: ResDx's in-RAM data path against the model alone and a MONAI-tutorial loader.

Three paths train the SAME network (MONAI ResNet built by ``pipeline.models.build_model``) with the
SAME batch size and the SAME step as ``pipeline.stages.train`` (autocast bf16 on CUDA with ``--amp``,
class-weighted cross-entropy, AdamW, grad-norm clip 1.0, cosine schedule, ``float(loss)`` each step):

  (a) ceiling   one random batch already on the device; the step alone.
  (b) resdx     ``pipeline.data.load_split`` of an "ingested" folder (``index.csv`` + ``plan.json`` +
                one ``.npy`` per case, written here from synthetic volumes): all cases stacked in RAM
                (pinned on CUDA), batches gathered with ``index_select``, copied with ``non_blocking``,
                augmented on the device by ``pipeline.data.Augmenter(AugmentConfig())``.
  (c) monai     the tutorial pattern: one NIfTI file per case on disk, ``monai.data.Dataset`` (not
                cached) with ``LoadImaged`` + ``EnsureChannelFirstd`` + ``ScaleIntensityd`` + the same
                random flips / affine / intensity transforms as dict transforms, and a
                ``torch.utils.data.DataLoader`` (``--workers``, shuffled, pinned on CUDA): every epoch
                re-reads and re-decodes every file. The batch goes to the model as the MetaTensor the
                loader yields, as in the tutorials.

Configurations: 3D resnet18 on 64^3 volumes (batch 4) and 2D resnet18 on 224^2 images (batch 16).
A throw-away model first runs ``--warmup`` steps per configuration (one-time costs: oneDNN primitives,
allocator growth, cuDNN autotuning). Each path then builds a fresh model from the same seed, runs
``--warmup`` untimed steps (optimizer state, DataLoader worker start-up), then ``--steps`` timed
steps; on CUDA the device is synchronized before the clock starts and stops. samples/s = steps x
batch / wall seconds. Timed steps of (c) cross epoch boundaries whenever ``--steps x batch > --cases``
(worker restarts included, as in a tutorial loop without ``persistent_workers``).

Also reported: "data ms/sample", the data path alone over ``--steps`` batches (b: gather + copy +
augment; c: iterating the DataLoader and copying to the device), which shows where (b) spends its
time beyond (a) and whether (c) is bound by its loader; and "other load", the CPU cores used by other
processes on the machine while the path was timed (from /proc/stat; our own process and its
DataLoader workers excluded): the numbers only mean something when it is near 0.

Run: ``.venv/bin/python benchmarks/train.py`` (CPU, ~4-6 min on 2 idle cores) or
``.venv/bin/python benchmarks/train.py --device cuda --amp``; ``--help`` for options.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model  # benchmarks/machine.py (the script's folder is on sys.path)
from torch import nn

from pipeline.config import AugmentConfig
from pipeline.core.augment import Augmenter, class_weights, epoch_order
from pipeline.core.models import ModelSpec, build_model
from pipeline.io.tensors import load_split, to_device_if_fits

SEED = 42
CONFIGS = {  # name: (network spatial dims, input shape per case, network options); run by default: DEFAULT
    "3d": (3, (64, 64, 64), {"name": "resnet18"}),
    "2d": (2, (224, 224), {"name": "resnet18"}),
    # The network the plan picks for the shipped 48^3 demo (README "Network plan"), the 64-wide one it picked
    # before, and two cheaper variants: where its training time goes (issue 16: width, padding, dilation, pooling).
    "demo": (3, (48, 48, 48), {"name": "resnet10", "pool": "lse", "output_stride": 8, "padding": "replicate",
                               "width": 32, "max_channels": 128}),
    "demo_w64": (3, (48, 48, 48), {"name": "resnet10", "pool": "lse", "output_stride": 8, "padding": "replicate"}),
    "demo_zeros": (3, (48, 48, 48), {"name": "resnet10", "pool": "lse", "output_stride": 8, "padding": "zeros",
                                     "width": 32, "max_channels": 128}),
    "demo_classic": (3, (48, 48, 48), {"name": "resnet10"}),
}
DEFAULT = ("3d", "2d")
PATHS = {"a": "(a) ceiling: model on device tensors", "b": "(b) ResDx: RAM tensors + Augmenter",
         "c": "(c) MONAI tutorial: NIfTI + Dataset + DataLoader"}
SHORT = {"a": "(a) ceiling", "b": "(b) ResDx", "c": "(c) MONAI tutorial"}
BUSY_CORES = 0.2  # other processes' load above which --wait-idle redoes a path
RETRIES = 3
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class PathResult:
    config: str
    path: str
    batch: int
    steps: int
    seconds: float
    samples_per_s: float
    s_per_step: float
    step_median_s: float
    data_ms_per_sample: float | None
    other_load_cores: float
    setup_s: float


# ----------------------------------------------------------------------------- CPU accounting
def _machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (/proc/stat); 0 where unavailable."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _live_children_cpu() -> dict[int, float]:
    """CPU seconds of our live child processes (DataLoader workers), by pid, from /proc/<pid>/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    me, out = os.getpid(), {}
    try:
        entries = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in entries:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # fields[1] = ppid, [11] utime, [12] stime
            if int(fields[1]) == me:
                out[int(pid)] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return out


class CpuMeter:
    """CPU used by other processes during an interval: machine busy - (us + our children), in cores."""

    def __enter__(self) -> CpuMeter:
        self.t0, self.busy0, self.times0 = time.perf_counter(), _machine_busy_s(), os.times()
        self.kids0 = _live_children_cpu()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        t1, kids1 = os.times(), _live_children_cpu()
        own = (t1.user - self.times0.user) + (t1.system - self.times0.system)
        # Reaped children (workers of finished epochs) are in os.times().children_*; subtract what
        # they had used before the interval, and add the live ones' progress.
        own += (t1.children_user - self.times0.children_user) + (t1.children_system - self.times0.children_system)
        own += sum(kids1.values()) - sum(self.kids0.values())
        tick = 1 / os.sysconf("SC_CLK_TCK")
        others = _machine_busy_s() - self.busy0 - own - 2 * tick * (os.cpu_count() or 1)
        self.other_cores = max(0.0, others) / max(wall, 1e-9)


def wait_for_idle(limit_s: float, threshold_cores: float = BUSY_CORES) -> None:
    """Wait (up to `limit_s`) for a 1 s window in which the machine uses < `threshold_cores`."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        b0 = _machine_busy_s()
        time.sleep(1.0)
        if _machine_busy_s() - b0 < threshold_cores:
            return


# ----------------------------------------------------------------------------- synthetic data
def synthetic_volumes(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """(n, *shape) float32: smooth low-frequency structure plus noise (compresses like real scans)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn((n, 1, *[max(2, s // 8) for s in shape]), generator=g)
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    smooth = nn.functional.interpolate(coarse, size=shape, mode=mode, align_corners=False)[:, 0]
    return (smooth + 0.1 * torch.randn((n, *shape), generator=g)).numpy().astype(np.float32)


def write_ingested(folder: Path, volumes: np.ndarray, labels: np.ndarray) -> None:
    """An ingest-stage output folder as `pipeline.data.load_split` reads it: index.csv, plan.json, tensors/."""
    from pipeline.core.plan import PLAN_VERSION
    from pipeline.io.index import INDEX_COLUMNS

    (folder / "tensors").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (vol, label) in enumerate(zip(volumes, labels)):
        case = f"bench-c{i:04d}"
        z = ((vol - vol.mean()) / (vol.std() + 1e-6))[None].astype(np.float32)  # (C, *spatial), z-scored
        np.save(folder / "tensors" / f"{case}.npy", z, allow_pickle=False)
        row = dict.fromkeys(INDEX_COLUMNS, "")
        row.update(case_id=case, patient_id=f"bench-p{i:04d}", split="train", label=str(int(label)), modality="CT",
                   status="ok", source_format="nifti", manufacturer="", tensor=f"tensors/{case}.npy",
                   tensor_shape="x".join(str(s) for s in z.shape))
        rows.append(row)
    with (folder / "index.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=INDEX_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    shape = list(volumes.shape[1:])
    plan = {"version": PLAN_VERSION, "orientation": "RAS", "mode": "3d" if len(shape) == 3 else "2d",
            "slices_per_case": 0, "shape": shape, "fit": "crop_pad", "n_classes": 2, "class_names": ["0", "1"],
            "source": "benchmark", "counts": {"train/ok": len(rows)}}
    (folder / "plan.json").write_text(json.dumps(plan, indent=2))


def write_nifti(folder: Path, volumes: np.ndarray) -> list[Path]:
    """One gzipped int16 NIfTI per case (CT-like stored values), as a public data set ships them."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, vol in enumerate(volumes):
        p = folder / f"case{i:04d}.nii.gz"
        img = nib.Nifti1Image(np.round(vol * 300.0).astype(np.int16), np.diag([1.0] * 3 + [1.0]))
        nib.save(img, str(p))
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- the training step
def make_step(spec: ModelSpec, device: torch.device, amp: bool, labels: torch.Tensor
              ) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """Fresh model + optimizer from SEED; returns the step of `pipeline.train.run_train`."""
    torch.manual_seed(SEED)
    model = build_model(spec).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10_000)
    criterion = nn.CrossEntropyLoss(weight=class_weights(labels, spec.n_classes).to(device))

    def step(xb: torch.Tensor, yb: torch.Tensor) -> float:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(xb)
        loss = criterion(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        return float(loss.detach())

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_training(step, batches: Iterator[Batch], device: torch.device, warmup: int, steps: int
                   ) -> tuple[float, list[float], float]:
    """(wall seconds of `steps` steps, per-step seconds, other processes' load in cores)."""
    for _ in range(warmup):
        step(*next(batches))
    sync(device)
    per_step = []
    with CpuMeter() as meter:
        t0 = time.perf_counter()
        for _ in range(steps):
            ts = time.perf_counter()
            step(*next(batches))  # float(loss) synchronizes on CUDA, as in pipeline.stages.train
            per_step.append(time.perf_counter() - ts)
        sync(device)
        wall = time.perf_counter() - t0
    return wall, per_step, meter.other_cores


def timed_data(batches: Iterator[Batch], device: torch.device, steps: int, batch: int) -> float:
    """ms per sample of the data path alone (no model), after one untimed batch."""
    next(batches)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        xb, _ = next(batches)
    sync(device)
    return 1000 * (time.perf_counter() - t0) / (steps * batch)


# ----------------------------------------------------------------------------- the three data paths
def ceiling_batches(shape: tuple[int, ...], batch: int, device: torch.device) -> Iterator[Batch]:
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn((batch, 1, *shape), generator=g).to(device)
    y = (torch.arange(batch) % 2).to(device)
    while True:
        yield x, y


def resdx_batches(ingest_dir: Path, batch: int, device: torch.device, spatial_dims: int) -> Iterator[Batch]:
    """`pipeline.train.run_train`'s loop: epoch order, index_select, non_blocking copy, Augmenter."""
    train = to_device_if_fits(load_split(ingest_dir, "train", pin=device.type == "cuda"), device)
    augment = Augmenter(AugmentConfig(), spatial_dims=spatial_dims)
    steps = max(1, len(train) // batch)
    epoch = 0
    while True:
        order = epoch_order(len(train), epoch, SEED).to(train.images.device)
        for step in range(steps):
            idx = order[step * batch:(step + 1) * batch]
            xb = train.images.index_select(0, idx).to(device, non_blocking=True)
            yb = train.labels.index_select(0, idx).to(device, non_blocking=True)
            yield augment(xb, seed=SEED * 1_000_003 + epoch * 10_007 + step), yb
        epoch += 1


def _worker_init(worker_id: int) -> None:
    from monai.data import set_track_meta
    from monai.data.utils import worker_init_fn

    set_track_meta(True)  # tutorial default (MetaTensor); also under the spawn start method
    worker_init_fn(worker_id)  # distinct random states per worker, as monai.data.DataLoader does


def monai_loader(files: list[Path], labels: np.ndarray, batch: int, spatial_dims: int, workers: int,
                 device: torch.device, persistent: bool):
    from monai.data import Dataset, set_track_meta
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        RandAffined,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        ScaleIntensityd,
    )

    set_track_meta(True)  # the tutorials' default; Augmenter turned it off for (b)
    cfg, k = AugmentConfig(), ["image"]
    rot = np.deg2rad(cfg.rotate_deg)
    transforms = [LoadImaged(keys=k), EnsureChannelFirstd(keys=k), ScaleIntensityd(keys=k)]
    transforms += [RandFlipd(keys=k, prob=cfg.flip_prob, spatial_axis=a) for a in range(spatial_dims)]
    transforms += [
        RandAffined(keys=k, prob=cfg.affine_prob, rotate_range=[rot] * (1 if spatial_dims == 2 else 3),
                    scale_range=[cfg.scale] * spatial_dims, padding_mode="border"),
        RandScaleIntensityd(keys=k, factors=cfg.intensity_scale, prob=cfg.intensity_prob),
        RandShiftIntensityd(keys=k, offsets=cfg.intensity_shift, prob=cfg.intensity_prob),
    ]
    transform = Compose(transforms)
    transform.set_random_state(seed=SEED)  # used as is with --workers 0
    data = [{"image": str(f), "label": int(y)} for f, y in zip(files, labels)]
    return torch.utils.data.DataLoader(
        Dataset(data=data, transform=transform), batch_size=batch, shuffle=True, drop_last=True,
        num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=_worker_init if workers else None,
        persistent_workers=persistent and workers > 0, generator=torch.Generator().manual_seed(SEED))


def monai_batches(loader, device: torch.device) -> Iterator[Batch]:
    while True:  # a new epoch: new iterator (workers restart unless persistent), every file read again
        for b in loader:
            yield b["image"].to(device, non_blocking=True), b["label"].to(device, non_blocking=True)


# ----------------------------------------------------------------------------- driver
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def run_config(name: str, batch: int, args, device: torch.device, amp: bool, work: Path) -> list[PathResult]:
    spatial_dims, shape, network = CONFIGS[name]
    spec = ModelSpec(spatial_dims=spatial_dims, in_channels=1, n_classes=2, input_ndim=spatial_dims, conv1_t_stride=2,
                     **network)
    vols = synthetic_volumes(args.cases, shape, SEED)
    labels = (np.arange(args.cases) % 2).astype(np.int64)
    ingest_dir, nifti_dir = work / name / "ingested", work / name / "nifti"
    shutil.rmtree(work / name, ignore_errors=True)
    write_ingested(ingest_dir, vols, labels)
    files = write_nifti(nifti_dir, vols)
    del vols
    print(f"\n## {name}: {network} {spatial_dims}D, input {'x'.join(map(str, shape))}, batch {batch}, "
          f"{args.cases} cases ({args.cases // batch} steps/epoch)", flush=True)

    # Prime: one-time costs (oneDNN primitive creation, allocator growth, cuDNN autotuning of every layer
    # shape) land on a throw-away model here, not on whichever path runs first.
    prime = make_step(spec, device, amp, torch.as_tensor(labels))
    batches = ceiling_batches(shape, batch, device)
    for _ in range(max(1, args.warmup)):
        prime(*next(batches))
    del prime, batches

    results = []
    for key in args.paths:
        best: PathResult | None = None
        for _ in range(RETRIES if args.wait_idle else 1):
            r = run_path(key, name, spec, shape, batch, args, device, amp, ingest_dir, files, labels)
            if best is None or r.other_load_cores < best.other_load_cores:
                best = r
            if r.other_load_cores <= BUSY_CORES:
                break
            print(f"   (other processes used {r.other_load_cores:.2f} cores: redone)", flush=True)
        results.append(best)
    return results


def run_path(key: str, name: str, spec: ModelSpec, shape: tuple[int, ...], batch: int, args, device: torch.device,
             amp: bool, ingest_dir: Path, files: list[Path], labels: np.ndarray) -> PathResult:
    """Set up one data path, time its data alone (b, c), then time training on it."""
    spatial_dims = spec.spatial_dims
    if args.wait_idle:
        wait_for_idle(args.wait_idle)
    t0 = time.perf_counter()
    data_ms = None
    if key == "a":
        batches = ceiling_batches(shape, batch, device)
        setup = time.perf_counter() - t0
    elif key == "b":
        batches = resdx_batches(ingest_dir, batch, device, spatial_dims)
        next(batches)  # load_split happens here (once per run: setup, not training)
        setup = time.perf_counter() - t0
        data_ms = timed_data(resdx_batches(ingest_dir, batch, device, spatial_dims), device, args.steps, batch)
    else:
        loader = monai_loader(files, labels, batch, spatial_dims, args.workers, device, args.persistent_workers)
        batches = monai_batches(loader, device)
        setup = time.perf_counter() - t0
        data_ms = timed_data(monai_batches(loader, device), device, args.steps, batch)
    step = make_step(spec, device, amp, torch.as_tensor(labels))
    wall, per_step, other = timed_training(step, batches, device, args.warmup, args.steps)
    del batches  # DataLoader workers of (c) end here
    r = PathResult(config=name, path=key, batch=batch, steps=args.steps, seconds=round(wall, 3),
                   samples_per_s=args.steps * batch / wall, s_per_step=wall / args.steps,
                   step_median_s=statistics.median(per_step),
                   data_ms_per_sample=None if data_ms is None else round(data_ms, 2),
                   other_load_cores=round(other, 2), setup_s=round(setup, 2))
    extra = f", data alone {data_ms:.1f} ms/sample" if data_ms is not None else ""
    print(f"   {PATHS[key]}: {r.samples_per_s:.2f} samples/s ({r.s_per_step:.3f} s/step{extra}; "
          f"other load {other:.2f} cores)", flush=True)
    return r


def fmt_ratio(num: PathResult | None, den: PathResult | None) -> str:
    if num is None or den is None or den.samples_per_s <= 0:
        return ""
    return f"{num.samples_per_s / den.samples_per_s:.2f}"


def table(results: list[PathResult]) -> str:
    lines = ["| config | path | samples/s | s/step (median) | data alone ms/sample | other load (cores) "
             "| (b)/(a) | (b)/(c) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for cfg in dict.fromkeys(r.config for r in results):
        rows = {r.path: r for r in results if r.config == cfg}
        for key, r in rows.items():
            ba = fmt_ratio(rows.get("b"), rows.get("a")) if key == "b" else ""
            bc = fmt_ratio(rows.get("b"), rows.get("c")) if key == "b" else ""
            data = "" if r.data_ms_per_sample is None else f"{r.data_ms_per_sample:.1f}"
            lines.append(f"| {cfg} b{r.batch} | {SHORT[key]} | {r.samples_per_s:.2f} "
                         f"| {r.step_median_s:.3f} | {data} | {r.other_load_cores:.2f} | {ba} | {bc} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default: cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only; CPU trains in fp32 as ResDx does)")
    p.add_argument("--cases", type=int, default=32, help="synthetic cases per configuration (default: 32)")
    p.add_argument("--steps", type=int, help="timed steps per path (default: 20 on CPU, 50 on CUDA)")
    p.add_argument("--warmup", type=int, help="untimed steps per path before timing (default: 3 on CPU, 10 on CUDA)")
    p.add_argument("--only", nargs="+", choices=sorted(CONFIGS), help=f"configurations to run (default: {DEFAULT})")
    p.add_argument("--paths", default="abc", help="which paths to run, e.g. 'ab' (default: abc)")
    p.add_argument("--batch-3d", type=int, default=4, help="3D batch size (default: 4)")
    p.add_argument("--batch-2d", type=int, default=16, help="2D batch size (default: 16)")
    for demo in ("demo", "demo_w64", "demo_zeros", "demo_classic"):
        p.add_argument(f"--batch-{demo.replace('_', '-')}", type=int, default=8, help=f"{demo} batch size (default: 8, "
                       "the plan's for the demo)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of path (c) (default: 2)")
    p.add_argument("--persistent-workers", action="store_true",
                   help="(c): keep workers across epochs (tutorials do not)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--workdir", type=Path, help="where the synthetic data is written (default: a temp dir, removed)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before each path, wait up to S seconds for a quiet machine")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON")
    args = p.parse_args(argv)
    if not set(args.paths) <= set(PATHS) or not args.paths:
        p.error("--paths takes letters from 'abc'")
    args.paths = [k for k in PATHS if k in args.paths]
    cuda = args.device == "cuda"
    args.steps = args.steps if args.steps is not None else (50 if cuda else 20)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 3)
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    for k in ("cases", "steps", "batch_3d", "batch_2d"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    for name in args.only or DEFAULT:
        b = getattr(args, f"batch_{name}")
        if b < 2 or args.cases < b:
            p.error(f"{name}: need 2 <= batch ({b}) <= --cases ({args.cases}) (BatchNorm; drop_last)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")  # MONAI's optional DICOM decoder: not used here
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    amp = args.amp and device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)  # as pipeline.stages.train does on CPU

    import monai

    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    env = {"torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__,
           "python": platform.python_version(), "device": device_name(device), "device_type": device.type,
           "cuda": torch.version.cuda if device.type == "cuda" else None, "amp_bf16": amp,
           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "workers_c": args.workers,
           "persistent_workers_c": args.persistent_workers, "command": command}
    print(f"command: {command}")
    print(f"torch {env['torch']}, monai {env['monai']}, numpy {env['numpy']}, python {env['python']}")
    print(f"device: {device.type} ({env['device']}){', CUDA ' + str(env['cuda']) if env['cuda'] else ''}; "
          f"amp bf16: {'on' if amp else 'off'}; torch threads {env['torch_threads']} of {env['cpu_count']} CPUs; "
          f"(c) DataLoader workers {args.workers}{' (persistent)' if args.persistent_workers else ''}")
    print(f"timing: {args.warmup} warm-up + {args.steps} timed steps per path, {args.cases} cases per config")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still removes its temp data
    own_tmp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="resdx-bench-train-")) if own_tmp else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    results: list[PathResult] = []
    t_start = time.perf_counter()
    try:
        for name in args.only or DEFAULT:
            results += run_config(name, getattr(args, f"batch_{name}"), args, device, amp, work)
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t_start

    print(f"\n{table(results)}\n")
    print(f"total {total:.0f} s. samples/s = timed steps x batch / wall; s/step is the median step; "
          "data alone = the data path without the model; other load = CPU cores used by other processes "
          "while timed (should be ~0).")
    for cfg in dict.fromkeys(r.config for r in results):
        rows = {r.path: r for r in results if r.config == cfg}
        if "a" in rows and "b" in rows:
            extra = 1000 / rows["b"].samples_per_s - 1000 / rows["a"].samples_per_s
            print(f"{cfg}: 1/(b) - 1/(a) = {extra:+.1f} ms/sample; (b)'s data path alone takes "
                  f"{rows['b'].data_ms_per_sample:.1f} ms/sample (gather + copy + Augmenter).")
    if any(r.other_load_cores > 0.2 for r in results):
        print("WARNING: other processes used CPU during timing; rerun on an idle machine (or with --wait-idle).")
    if args.json:
        payload = {"env": env, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "total_s": round(total, 1), "results": [asdict(r) for r in results],
                   "ratios": {cfg: {"b/a": _ratio(results, cfg, "b", "a"), "b/c": _ratio(results, cfg, "b", "c")}
                              for cfg in dict.fromkeys(r.config for r in results)}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _ratio(results: list[PathResult], cfg: str, num: str, den: str) -> float | None:
    rows = {r.path: r for r in results if r.config == cfg}
    if num not in rows or den not in rows:
        return None
    v = rows[num].samples_per_s / rows[den].samples_per_s
    return round(v, 3) if math.isfinite(v) else None


if __name__ == "__main__":
    sys.exit(main())
