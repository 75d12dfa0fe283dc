"""MedMNIST source: an official-layout MedMNIST .npz -> the same outputs as `pipeline.stages.ingest`.

Writes OUT/index.csv (ingest's columns), OUT/plan.json, OUT/summary.json and one float32
channel-first tensor per image, OUT/tensors/<case_id>.npy, so the train stage reads a
MedMNIST set exactly as it reads an ingested manifest:

* 2D flags: (C, H, W), C = 1 (grey) or 3 (RGB flags, stored (N, H, W, 3) in the file);
* 3D flags (names ending in ``3d``, stored (N, D, H, W)): (1, D, H, W).

Unlike a manifest-ingested 2D case (a stack of slices, (S, C, X, Y)), one MedMNIST image is
one case; plan.json says so in ``layout``.

Where the file comes from (``data.medmnist``):

* ``root`` a folder: ``ROOT/{flag}.npz`` for size 28 (``ROOT/{flag}_28.npz`` is accepted too),
  else ``ROOT/{flag}_{size}.npz`` -- the names the medmnist package uses;
* ``root`` a ``.npz`` file: that file, whatever its name (e.g. a subsampled copy);
  ``flag`` still says which MedMNIST set it is (task, classes, official split sizes);
* missing and ``download: true``: the medmnist package's own download (needs internet, and an
  importable torchvision, which the package uses for the download).

Normalization: scale by 1/255, then a per-channel z-score whose mean/std are fitted on the
train split only. The official splits are kept; MedMNIST has no patient ids, so
``patient_id`` is the case_id. Multi-label flags (chestmnist: 14 findings) keep their (N, L)
0/1 labels: index.csv's ``label`` is the vector joined by ';' and plan.json says ``task:
multi_label``, ``class_names`` the label names. Tensors are rewritten only when the file's md5, the flag,
the size or this reader's version change (``tensors/.key``).

The medmnist package is used only for its ``INFO`` table, loaded from ``medmnist/info.py``
by file: ``import medmnist`` itself imports torch, PIL, pandas and scikit-learn (about 2 s)
through its dataset and evaluator modules. Only ``download: true`` imports the package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pipeline.config import MedMNISTConfig, Params
from pipeline.core.plan import PLAN_VERSION, ArrayNormalization, Fingerprint, MedMNISTOrigin, Plan
from pipeline.errors import IngestFailed
from pipeline.io.artifacts import save_json, save_npy
from pipeline.io.index import IngestSummary, label_text, remove_stale, write_index, write_splits
from pipeline.layout import IngestDir

READER_VERSION = "1"  # bump when tensors would come out differently, to invalidate tensors/.key
SPLITS = ("train", "val", "test")
SCALE = 1.0 / 255.0
KEY_FILE = ".key"
CHUNK = 1024  # images per block when fitting statistics and writing tensors


class MedMNISTError(IngestFailed):
    """The MedMNIST source cannot run (missing file, wrong layout, unsupported task)."""

    code = "medmnist"
    hint = "point data.medmnist.root at an official MedMNIST .npz (or a folder holding {flag}_{size}.npz)"


class MedMNISTCountWarning(UserWarning):
    """A split's size differs from the official MedMNIST count (e.g. a subsampled file)."""


# ----------------------------------------------------------------------------- medmnist INFO
_INFO: dict | None = None


def medmnist_info() -> dict:
    """The medmnist package's ``INFO`` table, without importing the package (torch, pandas, ...)."""
    global _INFO
    if _INFO is not None:
        return _INFO
    loaded = sys.modules.get("medmnist.info")
    if loaded is not None:
        _INFO = loaded.INFO
        return _INFO
    spec = importlib.util.find_spec("medmnist")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise MedMNISTError("the medmnist package is not installed (pip install medmnist); "
                            "its INFO table gives the task, class names and official split sizes")
    path = Path(next(iter(spec.submodule_search_locations))) / "info.py"
    try:
        file_spec = importlib.util.spec_from_file_location("_resdx_medmnist_info", path)
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
        _INFO = module.INFO
    except (OSError, AttributeError, ImportError, SyntaxError):
        from medmnist.info import INFO  # layout changed: the ordinary (slower) import

        _INFO = INFO
    return _INFO


def flag_info(flag: str) -> dict:
    info = medmnist_info()
    if flag not in info:
        raise MedMNISTError(f"unknown MedMNIST flag {flag!r} (data.medmnist.flag); known: {', '.join(sorted(info))}")
    return info[flag]


def is_multi_label(info: dict) -> bool:
    """A multi-label flag (e.g. chestmnist): labels (N, L) of 0/1, one sigmoid per label."""
    return "multi-label" in info["task"]


def is_3d(flag: str) -> bool:
    return flag.endswith("3d")


# ----------------------------------------------------------------------------- locating the file
def expected_names(flag: str, size: int) -> list[str]:
    """File names the medmnist package uses, in lookup order."""
    return [f"{flag}.npz", f"{flag}_28.npz"] if size == 28 else [f"{flag}_{size}.npz"]


def find_npz(cfg: MedMNISTConfig) -> Path:
    """The .npz to read: ``root`` itself if it is a .npz file, else the official name under ``root``."""
    root = Path(cfg.root)
    if root.suffix == ".npz":
        if root.is_file():
            return root
        raise MedMNISTError(f"MedMNIST file not found: {root} (data.medmnist.root names a .npz file; "
                            "a folder there is searched for the official file names instead)")
    names = expected_names(cfg.flag, cfg.size)
    for name in names:
        if (root / name).is_file():
            return root / name
    if cfg.download:
        _download(cfg, root)
        for name in names:
            if (root / name).is_file():
                return root / name
    raise MedMNISTError(
        f"MedMNIST file not found: expected {' or '.join(str(root / n) for n in names)}. Put the official file "
        "there (or point data.medmnist.root at a .npz file), or set data.medmnist.download: true to fetch it "
        "with the medmnist package (needs internet).")


def _download(cfg: MedMNISTConfig, root: Path) -> None:
    """The medmnist package's own download (its dataset class with download=True)."""
    try:
        import medmnist  # imports torch, PIL, pandas, scikit-learn; the download itself uses torchvision

        dataset_class = getattr(medmnist, flag_info(cfg.flag)["python_class"])
        root.mkdir(parents=True, exist_ok=True)
        dataset_class(split="train", download=True, root=str(root), size=cfg.size)
    except MedMNISTError:
        raise
    except Exception as err:  # noqa: BLE001 - network, torchvision or package failures all end here
        detail = " ".join(str(err).split())[:1000]
        raise MedMNISTError(f"downloading {cfg.flag} (size {cfg.size}) with the medmnist package failed (it needs "
                            "internet and an importable torchvision, which it downloads with): "
                            f"{type(err).__name__}: {detail}") from None


# ----------------------------------------------------------------------------- reading and checking
def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _labels(npz, split: str, n_classes: int, name: str, multi: bool = False) -> np.ndarray:
    """(N,) class indices, or (N, L) 0/1 for a multi-label flag."""
    key = f"{split}_labels"
    if key not in npz.files:
        raise MedMNISTError(f"{name}: key {key!r} missing; an official MedMNIST file has "
                            f"{', '.join(f'{s}_images, {s}_labels' for s in SPLITS)}")
    raw = np.asarray(npz[key])
    if multi:
        if raw.ndim != 2 or raw.shape[1] != n_classes or (raw.size and not np.issubdtype(raw.dtype, np.integer)):
            raise MedMNISTError(f"{name}: {key} has shape {raw.shape} ({raw.dtype}); this multi-label flag needs "
                                f"(N, {n_classes}) integer 0/1 labels")
        if raw.size and not np.isin(raw, (0, 1)).all():
            raise MedMNISTError(f"{name}: {key} holds values {np.unique(raw).tolist()}; multi-label needs 0/1")
        return raw.astype(np.int64)
    if raw.ndim == 2 and raw.shape[1] != 1:
        raise MedMNISTError(f"{name}: {key} has {raw.shape[1]} labels per image (multi-label), but this flag is a "
                            "single-label task")
    labels = raw.reshape(-1)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise MedMNISTError(f"{name}: {key} are {labels.dtype}, expected integer class labels")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise MedMNISTError(f"{name}: {key} range {labels.min()}..{labels.max()}, outside 0..{n_classes - 1}")
    return labels


def _check_images(images: np.ndarray, key: str, flag: str, info: dict, size: int, name: str) -> tuple[int, list]:
    """(channels, spatial shape) of one split's images, or a clear error."""
    if is_3d(flag):
        if images.ndim != 4:
            raise MedMNISTError(f"{name}: {key} has shape {images.shape}; a 3D flag needs (N, D, H, W)")
        channels, spatial = 1, list(images.shape[1:])
    elif images.ndim == 3:
        channels, spatial = 1, list(images.shape[1:])
    elif images.ndim == 4 and images.shape[3] in (1, 3):
        channels, spatial = int(images.shape[3]), list(images.shape[1:3])
    else:
        raise MedMNISTError(f"{name}: {key} has shape {images.shape}; a 2D flag needs (N, H, W) or (N, H, W, 3)")
    if channels != info["n_channels"]:
        raise MedMNISTError(f"{name}: {key} has {channels} channel(s) but {flag} has {info['n_channels']}")
    if any(s != size for s in spatial):
        raise MedMNISTError(f"{name}: {key} images are {'x'.join(map(str, spatial))} but data.medmnist.size "
                            f"is {size}")
    return channels, spatial


def _channel_first(block: np.ndarray, channels: int, mode: str) -> np.ndarray:
    """(n, ...) block of file images -> (n, C, ...) float32 in [0, 1]."""
    x = block.astype(np.float32) * np.float32(SCALE)
    if mode == "3d" or block.ndim == 3:
        return x[:, None]
    return np.moveaxis(x, -1, 1)  # (n, H, W, C) -> (n, C, H, W)


def _fit_normalization(images: np.ndarray, channels: int, mode: str) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the scaled train images (float64 sums, block by block)."""
    total = np.zeros(channels)
    squares = np.zeros(channels)
    count = 0
    for start in range(0, len(images), CHUNK):
        x = _channel_first(images[start:start + CHUNK], channels, mode).astype(np.float64)
        axes = tuple(i for i in range(x.ndim) if i != 1)
        total += x.sum(axis=axes)
        squares += (x * x).sum(axis=axes)
        count += x.size // channels
    if not count:
        raise MedMNISTError("the train split is empty: nothing to fit the normalization on")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    return [float(m) for m in mean], [float(s) if s > 1e-8 else 1.0 for s in std]


# ----------------------------------------------------------------------------- the stage
def _progress(show: bool) -> Progress:
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    return Progress(*columns, disable=not show, transient=False)


def run_medmnist(params: Params, out_dir: Path | None = None, progress: bool = True) -> IngestSummary:
    """MedMNIST .npz -> OUT/index.csv, OUT/plan.json, OUT/summary.json, OUT/tensors/<case_id>.npy.

    Raises `MedMNISTError` (an `IngestFailed`) for a missing or malformed file or an unknown flag;
    warns (`MedMNISTCountWarning`) when split sizes differ from the official ones. Multi-label flags
    (chestmnist): (N, L) 0/1 labels, ';'-joined in index.csv, plan task multi_label.
    """
    t0 = time.perf_counter()
    if params.data.use_review_labels:
        from pipeline.errors import ConfigError

        raise ConfigError("data.use_review_labels takes readers' corrected labels into a manifest's cases; "
                          "MedMNIST keeps its official labels", hint="set data.use_review_labels: false")
    cfg = params.data.medmnist
    flag, size = cfg.flag, cfg.size
    out = Path(out_dir or params.ingest.out_dir)
    info = flag_info(flag)
    mode = "3d" if is_3d(flag) else "2d"
    if mode == "3d" and size not in (28, 64):
        raise MedMNISTError(f"{flag} is a 3D set, available in sizes 28 and 64 only (data.medmnist.size={size})")
    path = find_npz(cfg)
    class_names = [info["label"][k] for k in sorted(info["label"], key=int)]
    md5 = md5_file(path)

    with np.load(path, allow_pickle=False) as npz:
        multi = is_multi_label(info)
        labels = {s: _labels(npz, s, len(class_names), path.name, multi) for s in SPLITS}
        counts = {s: int(len(v)) for s, v in labels.items()}
        notes = []
        for s in SPLITS:
            official = info["n_samples"][s]
            if counts[s] != official:
                msg = (f"{path.name}: the {s} split has {counts[s]} images, the official {flag} {s} split has "
                       f"{official} (a subsampled or modified file?); results are not comparable to MedMNIST "
                       "benchmark numbers")
                warnings.warn(msg, MedMNISTCountWarning, stacklevel=2)
                notes.append(msg)

        case_ids = {s: [f"{flag}-{s}-{i:05d}" for i in range(counts[s])] for s in SPLITS}
        all_ids = [c for s in SPLITS for c in case_ids[s]]
        tensors = IngestDir(out).tensors
        key = hashlib.blake2b(json.dumps([md5, flag, size, mode, READER_VERSION, PLAN_VERSION]).encode(),
                              digest_size=16).hexdigest()
        stored = _read_key(tensors / KEY_FILE)
        reuse = stored.get("key") == key and all((tensors / f"{c}.npy").exists() for c in all_ids)
        if reuse:
            geometry = stored["geometry"]
        else:
            geometry = _write_tensors(npz, flag, info, size, mode, case_ids, tensors, path.name, progress)
            save_json(tensors / KEY_FILE, {"key": key, "geometry": geometry})
    remove_stale(tensors, set(all_ids), protect=(KEY_FILE,))

    channels, spatial = geometry["channels"], geometry["shape"]
    tensor_shape = "x".join(map(str, [channels, *spatial]))
    records = [{
        "case_id": c, "patient_id": c, "split": s, "label": label_text(labels[s][i].tolist()) if multi else
        int(labels[s][i]), "modality": flag, "status": "ok",
        "reason_code": "", "reason": "", "source_format": "medmnist", "manufacturer": "",
        "native_shape": "x".join(map(str, spatial)), "native_spacing": "", "tensor": f"tensors/{c}.npy",
        "tensor_shape": tensor_shape, "source_hash": md5, "label_source": "medmnist",
    } for s in SPLITS for i, c in enumerate(case_ids[s])]
    for r in records:
        r["manifest_label"] = r["label"]
    plan = Plan(
        source="medmnist", mode=mode, layout="C,D,H,W" if mode == "3d" else "C,H,W", shape=list(spatial),
        channels=channels, orientation=None, fit="resize", resampling="none (official MedMNIST arrays)",
        fitted_on="train", fingerprint=Fingerprint(n_cases=counts["train"], shape_median=list(spatial),
                                                   modalities=[flag]),
        arrays=ArrayNormalization(scale=SCALE, mean=geometry["mean"], std=geometry["std"]),
        medmnist=MedMNISTOrigin(flag=flag, size=size, task=info["task"], file=path.name, file_md5=md5,
                                license=info.get("license", ""), official_counts=dict(info["n_samples"])),
        task="multi_label" if multi else "single_label", n_classes=len(class_names), class_names=class_names,
        counts={f"{s}/ok": counts[s] for s in SPLITS}, warnings=notes,
    )
    save_json(IngestDir(out).plan, plan.to_json())
    write_index(IngestDir(out).index, records)
    if params.ingest.splits_file:
        write_splits(Path(params.ingest.splits_file), records)  # the official splits
    summary = IngestSummary(
        n_rows=len(records), n_ok=len(records), n_rejected=0, reasons={}, n_cached=0,
        n_reused=len(records) if reuse else 0, seconds=time.perf_counter() - t0,
        by_modality={f"{flag}:ok": len(records)} if records else {},
        splits={s: counts[s] for s in SPLITS if counts[s]},
    )
    save_json(IngestDir(out).summary, asdict(summary) | {"seconds": round(summary.seconds, 2)})
    return summary


def _read_key(path: Path) -> dict:
    try:
        stored = json.loads(path.read_text())
        return stored if isinstance(stored, dict) and "geometry" in stored else {}
    except (OSError, ValueError):
        return {}


def _write_tensors(npz, flag: str, info: dict, size: int, mode: str, case_ids: dict, tensors: Path, name: str,
                   progress: bool) -> dict:
    """Fit the train-split normalization, then write every tensor; returns channels/shape/mean/std."""
    (tensors / KEY_FILE).unlink(missing_ok=True)  # written last: an interrupted run redoes everything
    for s in SPLITS:
        if f"{s}_images" not in npz.files:
            raise MedMNISTError(f"{name}: key '{s}_images' missing; an official MedMNIST file has "
                                f"{', '.join(f'{t}_images, {t}_labels' for t in SPLITS)}")
    train = npz["train_images"]
    channels, spatial = _check_images(train, "train_images", flag, info, size, name)
    mean, std = _fit_normalization(train, channels, mode)
    shape = (1, channels) + (1,) * len(spatial)
    m = np.asarray(mean, dtype=np.float32).reshape(shape)
    sd = np.asarray(std, dtype=np.float32).reshape(shape)
    total = sum(len(v) for v in case_ids.values())
    with _progress(progress) as bar:
        job = bar.add_task(f"writing {flag} tensors", total=total)
        for s in SPLITS:
            imgs = train if s == "train" else npz[f"{s}_images"]
            if len(imgs) != len(case_ids[s]):
                raise MedMNISTError(f"{name}: {s}_images has {len(imgs)} images but {s}_labels has "
                                    f"{len(case_ids[s])} labels")
            if _check_images(imgs, f"{s}_images", flag, info, size, name) != (channels, spatial):
                raise MedMNISTError(f"{name}: {s}_images differ in shape from train_images")
            for start in range(0, len(imgs), CHUNK):
                block = (_channel_first(imgs[start:start + CHUNK], channels, mode) - m) / sd
                for j, tensor in enumerate(block):
                    save_npy(tensors / f"{case_ids[s][start + j]}.npy", np.ascontiguousarray(tensor))
                bar.advance(job, len(block))
            del imgs
        del train
    return {"channels": channels, "shape": spatial, "mean": mean, "std": std}


__all__ = ["run_medmnist", "find_npz", "expected_names", "medmnist_info", "MedMNISTError", "MedMNISTCountWarning"]
