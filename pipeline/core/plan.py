"""The plan: every preprocessing decision, fitted once on the training cases, typed and versioned.

One schema for every source (DICOM/NIfTI manifests, MedMNIST arrays), as nnU-Net's plans are the
contract between its steps. Ingest writes it (plan.json); train, evaluate, explain, register,
predict and the served model read it through `load_plan`, which checks the version and the
schema, and never re-derive anything. The reader settings (which volume of a 4D series, the
minimum slice count, the CT foreground threshold) are part of it, so a registered model reads a
new study exactly as its training data were read, whatever the current params say.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.config import Params
from pipeline.core.limits import DEFAULT_MAX_CASE_BYTES
from pipeline.errors import PlanError

PLAN_VERSION = 2
MEDMNIST_FORMULA = "(pixel * scale - mean[c]) / std[c]"


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReaderSettings(_Part):
    """How a source is read into a volume (part of the cache key and of the registered model)."""

    take_volume: int | None = None
    min_slices: int = 3
    ct_foreground_hu: float = -500.0
    # The most bytes one float32 array of a case may take (native volume, decoded file, resampled
    # grid); anything larger is refused before it is allocated (`too_large`). Not a tensor decision.
    max_case_bytes: int = DEFAULT_MAX_CASE_BYTES


class Fingerprint(_Part):
    n_cases: int = 0
    spacing_median: list[float] | None = None
    spacing_min: list[float] | None = None
    spacing_max: list[float] | None = None
    shape_median: list[int] | None = None
    modalities: list[str] = []


class CTNormalization(_Part):
    normalization: str = "clip to window, then global z-score"
    window: list[float]
    window_source: str
    mean: float
    std: float
    n_cases: int = 0
    n_voxels_sampled: int = 0


class MRNormalization(_Part):
    normalization: str = "per-image z-score"
    clip_percentiles: list[float] | None = None


class ArrayNormalization(_Part):
    """MedMNIST: per-channel z-score of pixel * scale, fitted on train."""

    scale: float
    mean: list[float]
    std: list[float]
    fitted_on: str = "train"
    formula: str = MEDMNIST_FORMULA


class MedMNISTOrigin(_Part):
    flag: str
    size: int
    task: str
    file: str
    file_md5: str
    license: str = ""
    official_counts: dict[str, int] = {}


class NetworkPlan(_Part):
    """The classifier the train stage built, chosen by `core.recipe.plan_network` from the data:
    per choice its value and why ("params" where a configured value overrode the rule)."""

    choices: dict[str, str | int | float]
    why: dict[str, str]
    fingerprint: dict = {}


class PlanGeometry(_Part):
    """The decisions that place a tensor's voxels (the grid resampling writes), a part of the plan. Fixed before
    any case is read when ingest.spacing is configured: ingest then resamples in its first pass
    (`fixed_geometry`)."""

    shape: list[int]
    target_spacing: list[float]
    fit: Literal["crop_pad", "resize"] = "crop_pad"
    anisotropy_threshold: float = 3.0
    reader: ReaderSettings = ReaderSettings()

    def hash(self) -> str:
        blob = json.dumps(self.model_dump(mode="json", exclude={"reader": {"max_case_bytes"}}), sort_keys=True)
        return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


class Plan(BaseModel):
    """The typed plan.json. `decisions()` are what shape tensors; the rest is provenance."""

    model_config = ConfigDict(extra="forbid")

    version: int = PLAN_VERSION
    source: Literal["manifest", "medmnist"]
    mode: Literal["3d", "2d", "2.5d"] = "3d"
    layout: str = "C,X,Y,Z"
    shape: list[int]
    channels: int = 1
    orientation: str | None = "RAS"
    target_spacing: list[float] | None = None
    target_spacing_source: str = ""
    fit: Literal["crop_pad", "resize"] = "crop_pad"
    anisotropy_threshold: float = 3.0
    resampling: str = ""
    slices_per_case: int = 0
    reader: ReaderSettings = ReaderSettings()
    fitted_on: str = "train"
    fingerprint: Fingerprint = Fingerprint()
    ct: CTNormalization | None = None
    mr: MRNormalization | None = None
    arrays: ArrayNormalization | None = None
    medmnist: MedMNISTOrigin | None = None
    # multi_label: n_classes independent 0/1 labels per case (a sigmoid each), named by class_names;
    # index.csv holds each case's vector joined by ';'. single_label: one class index per case (softmax).
    task: Literal["single_label", "multi_label"] = "single_label"
    n_classes: int
    class_names: list[str]
    counts: dict[str, int] = {}
    warnings: list[str] = []
    network: NetworkPlan | None = None  # filled by train in models/plan.json (not a tensor decision)

    @property
    def reads_studies(self) -> bool:
        """True when the model was trained on DICOM/NIfTI studies (False for MedMNIST arrays)."""
        return self.source == "manifest"

    @property
    def multi_label(self) -> bool:
        return self.task == "multi_label"

    @property
    def modalities(self) -> list[str]:
        return list(self.fingerprint.modalities)

    def decisions(self) -> dict:
        keep = ("version", "source", "mode", "shape", "channels", "orientation", "target_spacing", "fit",
                "anisotropy_threshold", "slices_per_case", "reader", "ct", "mr", "arrays")
        # A resource ceiling refuses cases; it never changes a tensor, so it stays out of the hash.
        return self.model_dump(mode="json", include=set(keep), exclude={"reader": {"max_case_bytes"}})

    def geometry(self) -> PlanGeometry | None:
        """The resampling part of the plan (None for array sources, which are not resampled)."""
        if self.target_spacing is None:
            return None
        return PlanGeometry(shape=self.shape, target_spacing=self.target_spacing, fit=self.fit,
                            anisotropy_threshold=self.anisotropy_threshold, reader=self.reader)

    def hash(self) -> str:
        """Hash of the decisions that shape tensors (not of counts or provenance)."""
        blob = json.dumps(self.decisions(), sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=16).hexdigest()

    def to_json(self) -> dict:
        return self.model_dump(mode="json")


def parse_plan(raw: dict, source: str = "plan.json") -> Plan:
    if not isinstance(raw, dict) or raw.get("version") != PLAN_VERSION:
        found = raw.get("version") if isinstance(raw, dict) else None
        raise PlanError(f"{source}: plan version {found} is not {PLAN_VERSION} (written by another ResDx version)")
    try:
        return Plan.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PlanError(f"{source}: {where}: {first['msg']}") from None


def load_plan(path: Path | str) -> Plan:
    """Read and validate plan.json (the one reader of plans)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"{path} is missing", code="missing_input",
                        hint="run the ingest stage first (dvc repro or resdx ingest)") from None
    except ValueError as err:
        raise PlanError(f"{path} is not JSON ({err})") from None
    return parse_plan(raw, str(path))


def reader_settings(params: Params) -> ReaderSettings:
    cfg = params.ingest
    return ReaderSettings(take_volume=cfg.take_volume, min_slices=cfg.min_slices,
                          ct_foreground_hu=cfg.ct.foreground_hu, max_case_bytes=cfg.max_case_bytes)


def fixed_geometry(params: Params) -> PlanGeometry | None:
    """The tensor grid `fit_plan` will choose, when it does not depend on the training cases (ingest.spacing
    configured); None when the spacing is fitted from the fingerprint."""
    cfg = params.ingest
    if not cfg.spacing:
        return None
    return PlanGeometry(shape=list(cfg.shape), target_spacing=list(cfg.spacing), fit=cfg.fit,
                        anisotropy_threshold=cfg.anisotropy_threshold, reader=reader_settings(params))


def _spacing(prep: dict) -> np.ndarray:
    return np.linalg.norm(np.array(prep["canonical_affine"])[:3, :3], axis=0)


def target_spacing(spacings: np.ndarray, anisotropy_threshold: float) -> list[float]:
    """nnU-Net's rule: median spacing per axis; if the median is anisotropic, the coarse axis
    takes the 10th percentile instead, so thin-slice cases are not over-smoothed."""
    target = np.median(spacings, axis=0)
    axis = int(np.argmax(target))
    if target[axis] / target.min() > anisotropy_threshold:
        target[axis] = np.percentile(spacings[:, axis], 10)
    return [round(float(t), 4) for t in target]


def class_names_for(labels: list[int], configured: list[str] | None) -> list[str]:
    n_classes = max(2, (max(labels) + 1) if labels else 2)
    names = configured or [str(i) for i in range(n_classes)]
    if len(names) < n_classes:
        raise PlanError(f"data.class_names has {len(names)} names but labels go up to {n_classes - 1}",
                        hint="list one name per class in data.class_names")
    return list(names[:n_classes])


def label_names_for(n_labels: int, configured: list[str] | None) -> list[str]:
    """Multi-label: one configured name per label (in the order of the label vector)."""
    if configured is None:
        return [str(i) for i in range(n_labels)]
    if len(configured) != n_labels:
        raise PlanError(f"data.class_names has {len(configured)} names but the multi-label manifest's labels have "
                        f"{n_labels} values each", hint="list one name per label, in order, in data.class_names")
    return list(configured)


def _task_and_names(prepared_ok: list[dict], params: Params) -> tuple[str, list[str]]:
    vectors = [p["label"] for p in prepared_ok if isinstance(p.get("label"), (list, tuple))]
    if vectors:
        return "multi_label", label_names_for(len(vectors[0]), params.data.class_names)
    labels = sorted({int(p["label"]) for p in prepared_ok if p.get("label") is not None})
    return "single_label", class_names_for(labels, params.data.class_names)


def fit_plan(prepared_ok: list[dict], ct_samples: list[np.ndarray], params: Params) -> Plan:
    """Plan from the `ok` results of the prepare pass (each with `split`, `modality`, `canonical_*`)
    and the foreground voxel samples of the training CT cases (pure: no files are read)."""
    cfg = params.ingest
    train = [p for p in prepared_ok if p["split"] == "train"] or prepared_ok
    spacings = np.array([_spacing(p) for p in train]) if train else np.ones((1, 3))
    shapes = np.array([p["canonical_shape"] for p in train]) if train else np.ones((1, 3))
    task, names = _task_and_names(prepared_ok, params)
    return Plan(
        source="manifest", mode=cfg.mode, layout="C,X,Y,Z" if cfg.mode == "3d" else "S,C,X,Y",
        channels=1 if cfg.mode != "2.5d" else 3, slices_per_case=cfg.slices_per_case,
        target_spacing=list(cfg.spacing) if cfg.spacing else target_spacing(spacings, cfg.anisotropy_threshold),
        target_spacing_source="configured" if cfg.spacing else "fingerprint (median, nnU-Net rule)",
        shape=list(cfg.shape), fit=cfg.fit, anisotropy_threshold=cfg.anisotropy_threshold,
        resampling="cubic spline; nearest along the coarse axis of anisotropic images",
        reader=reader_settings(params),
        fitted_on="train" if any(p["split"] == "train" for p in prepared_ok) else "all",
        fingerprint=Fingerprint(
            n_cases=len(train),
            spacing_median=[round(float(v), 4) for v in np.median(spacings, axis=0)],
            spacing_min=[round(float(v), 4) for v in spacings.min(axis=0)],
            spacing_max=[round(float(v), 4) for v in spacings.max(axis=0)],
            shape_median=[int(v) for v in np.median(shapes, axis=0)],
            modalities=sorted({p["modality"] for p in train})),
        ct=fit_ct(ct_samples, params),
        mr=MRNormalization(clip_percentiles=list(cfg.mr.clip_percentiles) if cfg.mr.clip_percentiles else None),
        task=task, n_classes=len(names), class_names=names,
    )


def fit_ct(samples: list[np.ndarray], params: Params) -> CTNormalization:
    """CT window (configured, or percentiles of the pooled training foreground) and z-score statistics."""
    cfg = params.ingest.ct
    pooled = np.concatenate(samples) if samples else np.array([-1000.0, 1000.0], dtype=np.float32)
    if cfg.window:
        window = [float(cfg.window[0]), float(cfg.window[1])]
        source = "configured"
    else:
        window = [float(v) for v in np.percentile(pooled, cfg.percentiles)]
        source = f"percentiles {list(cfg.percentiles)} of training foreground (HU > {cfg.foreground_hu:g})"
    clipped = np.clip(pooled, *window)
    return CTNormalization(window=[round(w, 3) for w in window], window_source=source,
                           mean=round(float(clipped.mean()), 4), std=round(float(clipped.std()), 4),
                           n_cases=len(samples), n_voxels_sampled=int(pooled.size) if samples else 0)


__all__ = ["NetworkPlan", "Plan", "PlanGeometry", "PLAN_VERSION", "ReaderSettings", "fit_plan", "fixed_geometry",
           "load_plan", "parse_plan", "reader_settings"]
