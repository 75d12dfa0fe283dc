"""Typed configuration: `configs/params.yaml` validated by pydantic at load.

Every section forbids unknown keys, so a typo (``ingest.spacng``) fails with an
error that names the key instead of being silently ignored.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

DEFAULT_PARAMS = Path("configs/params.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SynthesizeConfig(_Strict):
    """Demo cohort generator (see `pipeline.stages.synthesize`)."""

    out_dir: Path = Path("data/demo")
    manifest: Path = Path("data_manifests/demo.csv")
    n_patients: int = Field(150, ge=1)
    studies_per_patient: tuple[int, int] = (1, 3)
    ct_fraction: float = Field(0.5, ge=0.0, le=1.0)
    lesion_fraction: float = Field(0.5, ge=0.0, le=1.0)
    compressed_fraction: float = Field(0.3, ge=0.0, le=1.0)
    # binary: 0 = no lesion, 1 = lesion. three_class: 1 = hyperdense/hyperintense, 2 = hypodense/
    # hypointense (the lesion_fraction cases with a lesion are split evenly between 1 and 2).
    # two_findings: multi-label, two independent findings per study (hyperdense, hypodense lesion), each
    # present with probability lesion_fraction, both may co-occur; the manifest label is "A;B", e.g. "1;0".
    task: Literal["binary", "three_class", "two_findings"] = "binary"
    # default: the knobs below as given. hard: the difficulty knobs (lesion size and contrast, noise,
    # bias field, CT drift) are REPLACED by pipeline.stages.synthesize.PRESETS["hard"]; explicit values
    # of those keys are then ignored.
    preset: Literal["default", "hard"] = "default"
    # Conspicuous enough that a 3D ResNet learns them from ~200 cases in minutes on 2 CPU cores.
    lesion_radius_mm: tuple[float, float] = (15.0, 25.0)
    # Lesion contrast ranges: CT in HU above soft tissue; MR as a relative signal gain (signal x (1 + gain)).
    lesion_contrast_hu: tuple[float, float] = (200.0, 400.0)
    lesion_gain_mr: tuple[float, float] = (1.5, 3.0)
    # Per-study noise sigma, drawn uniformly from the range: CT Gaussian, in HU; MR Rician, in the
    # phantom's relative signal units (fat 1.0, soft tissue ~0.45).
    ct_noise_hu: tuple[float, float] = (10.0, 20.0)
    mr_noise: tuple[float, float] = (0.015, 0.05)
    # MR smooth multiplicative bias field: at most +-this (clipped to 1 -+ it); 0 = none.
    mr_bias_field: float = Field(0.3, ge=0.0, lt=1.0)
    # CT low-frequency additive HU drift (cupping-like), at most +-this many HU; 0 = none.
    ct_drift_hu: float = Field(0.0, ge=0.0)
    workers: int = Field(2, ge=1)

    @field_validator("lesion_radius_mm", "lesion_contrast_hu", "lesion_gain_mr", "ct_noise_hu", "mr_noise")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] <= v[1]:
            raise ValueError("must be a range [low, high] with 0 <= low <= high")
        return v


class MedMNISTConfig(_Strict):
    flag: str = "pneumoniamnist"
    root: Path = Path("data/medmnist")
    size: Literal[28, 64, 128, 224] = 28
    download: bool = False


class DataConfig(_Strict):
    """Where cases come from: a manifest of DICOM/NIfTI files, or MedMNIST .npz."""

    source: Literal["manifest", "medmnist"] = "manifest"
    manifest: Path = Path("data_manifests/demo.csv")
    # Names of the label values 0..K-1 (manifest source); a multi-label manifest (labels "1;0;1") names its
    # labels here, in order. MedMNIST takes its own from INFO.
    class_names: list[str] | None = ["no lesion", "lesion"]
    medmnist: MedMNISTConfig = MedMNISTConfig()
    # Readers' verdicts from the review report (`resdx review import`): one CSV per reader.
    reviews_dir: Path = Path("data_manifests/reviews")
    # A reader's corrected label replaces the manifest's only when opted in; index.csv records its source.
    use_review_labels: bool = False


class SplitConfig(_Strict):
    """Patient-level split used when the manifest has no `split` column."""

    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    # K > 1: K-fold cross-validation over train + val (patient-level, label-stratified; test held out
    # of every fold), a fold ensemble, calibration on out-of-fold predictions. 1: one train/val split.
    folds: int = Field(1, ge=1, le=20)

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("split.val_fraction + split.test_fraction must be < 0.9")
        return self


class CTIntensity(_Strict):
    """CT: clip to a HU window (fixed, or dataset percentiles), then a global z-score."""

    window: tuple[float, float] | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    foreground_hu: float = -500.0

    @field_validator("percentiles")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] < v[1] <= 100.0:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")
        return v


class MRIntensity(_Strict):
    """MRI: optional per-image percentile clipping, then a per-image z-score."""

    clip_percentiles: tuple[float, float] | None = (0.5, 99.5)


class IngestConfig(_Strict):
    out_dir: Path = Path("data/ingested")
    # Where the patient-level split is also written (case_id, patient_id, label, split); null = only index.csv.
    splits_file: Path | None = Path("data_manifests/demo.splits.csv")
    # Content-addressed cache of decoded, reoriented volumes (git-ignored, survives `dvc repro`).
    cache_dir: Path = Path(".cache/ingest")
    workers: int = Field(2, ge=1)
    # local: a pool of `workers` processes on this machine (no Ray needed). ray: one Ray task per case on
    # the cluster at ray_address (host:port of the head; null = a private Ray instance of `workers` CPUs).
    engine: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    max_rejected_fraction: float = Field(0.2, ge=0.0, le=1.0)
    # Target voxel spacing in mm (x, y, z after reorientation to RAS); null = from the fingerprint.
    spacing: tuple[float, float, float] | None = (5.0, 5.0, 5.0)
    # Model input shape (x, y, z); the resampled volume is centre-cropped/padded to it.
    shape: tuple[int, int, int] = (48, 48, 48)
    fit: Literal["crop_pad", "resize"] = "crop_pad"
    anisotropy_threshold: float = Field(3.0, gt=1.0)
    mode: Literal["3d", "2d", "2.5d"] = "3d"
    # For 2D/2.5D: number of axial slices kept per case (evenly spaced); 0 = all.
    slices_per_case: int = Field(0, ge=0)
    # Multi-volume series (fMRI, DWI): reject (null) or keep this 0-based volume.
    take_volume: int | None = None
    min_slices: int = Field(3, ge=1)
    # Resource ceilings per case (README "What ingest guarantees"): the most bytes one float32 array of
    # a case may take (700 MiB = a 700-slice 512x512 CT), and the seconds one case may run.
    max_case_bytes: int = Field(734003200, ge=1 << 20)
    case_timeout_s: float = Field(300.0, gt=0)
    ct: CTIntensity = CTIntensity()
    mr: MRIntensity = MRIntensity()


class ModelConfig(_Strict):
    """MONAI ResNet (2D/3D) or the plain, non-residual CNN baseline."""

    # null (the default) for name, conv1_t_*, pool, output_stride, padding, width and max_channels: the plan
    # (pipeline/core/recipe.py, README "Network plan") picks them from the data; a value overrides it.
    name: Literal["resnet10", "resnet18", "resnet34", "resnet50", "plain_cnn"] | None = None
    spatial_dims: Literal[2, 3] = 3
    # MONAI's default stem stride is 1; 2 matches torchvision-style ResNets and is 4-8x cheaper in 3D.
    conv1_t_stride: int | None = Field(None, ge=1)
    conv1_t_size: int | None = Field(None, ge=1)
    # 2D models on 3D tensors: this many axial slices per case, features max-pooled over slices.
    slices_2d: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Global pooling of the last stage: avg (MONAI's default), max (of each feature), or lse: a
    # 1x1-conv class score per cell, log-sum-exp pooled (ChestX-ray8's head), which keeps a
    # finding's evidence where the finding is, so Grad-CAM can point at it.
    pool: Literal["avg", "max", "lse"] | None = None
    # Total downsampling of the last residual stage (ResNets): 32 is the classic network; 16 or 8
    # replace the stride of layer4 (and layer3) by dilation (Yu et al., "Dilated Residual Networks",
    # 2017) so the stage Grad-CAM reads has 2-4x the resolution per axis, same weights. On 48^3
    # inputs: 2^3 cells at 32, 6^3 at 8 (a 2^3 map cannot point at anything smaller than an octant).
    output_stride: Literal[8, 16, 32] | None = None
    padding: Literal["zeros", "replicate"] | None = None
    # ResNets: channels of the first residual stage, doubled per stage (64: MONAI's 64-128-256-512), and the
    # most any stage may have (nnU-Net's max_num_features; 512 leaves MONAI's channels as they are).
    width: int | None = Field(None, ge=4)
    max_channels: int | None = Field(None, ge=4)
    # Local MedicalNet-format weights (3D ResNets); never downloaded at run time.
    pretrained_path: Path | None = None


class AugmentConfig(_Strict):
    """MONAI random transforms, applied on the training device each step."""

    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    affine_prob: float = Field(0.3, ge=0.0, le=1.0)
    rotate_deg: float = Field(10.0, ge=0.0)
    scale: float = Field(0.1, ge=0.0)
    intensity_prob: float = Field(0.3, ge=0.0, le=1.0)
    intensity_shift: float = Field(0.1, ge=0.0)
    intensity_scale: float = Field(0.1, ge=0.0)


class TrainConfig(_Strict):
    out_dir: Path = Path("models")
    # Resumable state (last epoch) lives outside DVC outputs, keyed by config and data.
    state_dir: Path = Path(".cache/train")
    epochs: int | None = Field(None, ge=1)  # null: the network plan's budget rule
    batch_size: int | None = Field(None, ge=1)  # null: the network plan's rule
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float | None = Field(None, gt=0.0)  # null: the network plan's rule
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "onecycle", "none"] = "cosine"
    imbalance: Literal["weights", "sampler", "none"] = "weights"
    grad_clip: float | None = Field(1.0, gt=0.0)
    patience: int = Field(10, ge=1)
    # Which epoch is kept: best (by validation AUROC, with early stopping) or last (the annealed end of the
    # schedule); null = the plan's rule (last when the validation set has < 50 cases of its rarer class).
    select: Literal["best", "last"] | None = None
    # Validate every N epochs and after the last (MONAI's val_interval); null = the plan's rule: 1 when the epoch
    # is chosen by validation (select: best), else 5 (the validation pass only draws the curve then).
    val_interval: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # bf16 autocast on CUDA; CPU always trains in fp32
    resume: bool = True
    threads: int | None = Field(None, ge=1)
    augment: AugmentConfig = AugmentConfig()


class ReferralConfig(_Strict):
    """When a case goes to a human instead of an automatic decision (recorded with the model)."""

    # within this band of the threshold: its probability half-width at threshold 0.5, the same log-odds
    # width at any other threshold (0.1: 0.4-0.6 at 0.5, 0.885-0.945 at 0.92; DecisionRule.refer_margin)
    band: float = Field(0.1, ge=0.0, le=0.5)
    max_spread: float | None = Field(0.15, gt=0.0)  # views' std of the probability above this


class EvaluateConfig(_Strict):
    out_dir: Path = Path("reports")
    # The decision threshold is fixed on validation, then applied unchanged to test.
    operating_point: Literal["youden", "sensitivity"] = "youden"
    target_sensitivity: float = Field(0.9, gt=0.0, le=1.0)
    n_bootstrap: int = Field(1000, ge=100)
    min_subgroup_cases: int = Field(10, ge=2)
    # Calibration map fitted on the held-out predictions: temperature scaling, or temperature plus a
    # bias per class (removes the prior shift that class weights or a balanced sampler leave).
    calibration: Literal["temperature", "temperature_bias"] = "temperature_bias"
    # Test-time views averaged with the fold members (pipeline/core/views.py); also used by predict.
    tta: Literal["none", "flips", "flips_shifts"] = "flips"
    referral: ReferralConfig = ReferralConfig()


class ExplainConfig(_Strict):
    out_dir: Path = Path("reports/explain")
    method: Literal["gradcam", "gradcampp"] = "gradcam"
    target_layer: str = "layer4"  # module name in the network (the last residual stage)
    # Shifted re-runs per axis whose cells are interleaved (pipeline/core/saliency.py): 2 halves the
    # map's cell size at 2^3 = 8x the work; 1 = the plain map.
    shifts: int = Field(2, ge=1, le=4)
    # Also map the point-reflected copy (every axis flipped), flip it back and average: the side of a finding
    # a network's cells light up on is a convention of its training, which the reflection reverses.
    reflect: bool = True
    # Explain the class the calibrated decision chose (null), or always this class index.
    class_index: int | None = None
    splits: list[str] = ["test"]
    max_cases: int = Field(200, ge=1)
    write_dicom: bool = True
    # Samples per forward pass: a case's test-time views and its shifted copies share a batch.
    batch_size: int = Field(8, ge=1)
    # The report's per-case viewer embeds the native volume and map; above this many voxels both are
    # block-averaged by the smallest integer factor that fits (pipeline/reporting/viewer_data.py).
    viewer_max_voxels: int = Field(524_288, ge=4096)


class RegisterConfig(_Strict):
    model_name: str = "resdx-demo"
    # Promotion gate: lower 95% bound of test AUROC and calibrated ECE must pass, and the
    # candidate must not be worse than the current champion on the same test set.
    min_auroc_ci_low: float = Field(0.8, ge=0.0, le=1.0)
    max_ece_calibrated: float = Field(0.2, ge=0.0, le=1.0)
    champion_tolerance: float = Field(0.0, ge=0.0, le=1.0)
    # Explanation quality, from the explain stage's sanity.json: without it the gate fails unless
    # require_explanations is false; the model-parameter randomization check must have passed; where
    # lesion masks exist, the pointing game hit rate must beat its random baseline by this absolute
    # margin (negative: may fall short of it by that much; -1 never fails).
    require_explanations: bool = True
    require_randomization_check: bool = True
    min_pointing_margin: float = Field(0.05, ge=-1.0, le=1.0)


class PacsConfig(_Strict):
    """A DICOMweb server (QIDO-RS, WADO-RS, STOW-RS). Credentials never live here: they come from the
    environment (RESDX_PACS_TOKEN for a bearer token, else RESDX_PACS_USER + RESDX_PACS_PASSWORD)."""

    url: str = "http://127.0.0.1:8042/dicom-web"
    # Retrieved instances, content-addressed by SOP Instance UID and bytes (git-ignored; holds PHI).
    cache_dir: Path = Path(".cache/dicomweb")
    # Seconds to connect, and to wait for each chunk of an answer; a slower server rejects the case.
    timeout_s: float = Field(30.0, gt=0)
    # The most instances one STOW-RS request carries when pushing a folder.
    store_batch: int = Field(64, ge=1)


class MLflowConfig(_Strict):
    # Off only for smoke runs where MLflow is not installed (e.g. a bare GPU box); stages then skip logging.
    enabled: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str | None = None  # default: resdx-<data set name>
    system_metrics: bool = True


with warnings.catch_warnings():
    # `register` (the stage's section) shadows BaseModel.register, an ABC classmethod nobody calls on params.
    warnings.filterwarnings("ignore", message='Field name "register"')

    class Params(_Strict):
        seed: int = 42
        data: DataConfig = DataConfig()
        synthesize: SynthesizeConfig = SynthesizeConfig()
        split: SplitConfig = SplitConfig()
        ingest: IngestConfig = IngestConfig()
        model: ModelConfig = ModelConfig()
        train: TrainConfig = TrainConfig()
        evaluate: EvaluateConfig = EvaluateConfig()
        explain: ExplainConfig = ExplainConfig()
        register: RegisterConfig = RegisterConfig()
        mlflow: MLflowConfig = MLflowConfig()
        pacs: PacsConfig = PacsConfig()



def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (typo?)")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def params_from_dict(raw: dict, source: str = "<dict>") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate a params YAML file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path} (run from the repository root or pass --params)")
    with path.open() as fh:
        raw = yaml.safe_load(fh)
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return params_from_dict(raw, str(path))
