"""Builders shared by the tests: CT series written with pydicom, index.csv reading, params for ingest and training.

Import from a test as `from helpers import ...` (tests/ is on sys.path, as for `from conftest import ...`).
"""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path

import numpy as np
from conftest import tiny_params
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pipeline.config import params_from_dict
from pipeline.io.index import read_index as _read_index

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


# ----------------------------------------------------------------------------- DICOM
def file_meta(ds: Dataset) -> FileMetaDataset:
    """The file meta information of `ds` (Explicit VR Little Endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def write_ct_slice(path: Path, pixels: np.ndarray, *, sop_uid: str, series_uid: str, instance_number: int, ipp, iop,
                   pixel_spacing, slice_thickness, rescale=("-1024", "1"), modality: str = "CT", **tags) -> Path:
    """Write one CT Image Storage slice of 16-bit signed `pixels` (rows x columns) and return its path.

    The geometry values (`ipp`, `iop`, `pixel_spacing`, `slice_thickness`) and `rescale` (intercept, slope) are
    stored as given; `tags` are further header elements (keyword=value), set last.
    """
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = ipp
    ds.ImageOrientationPatient = iop
    ds.PixelSpacing = pixel_spacing
    ds.SliceThickness = slice_thickness
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = rescale
    ds.PixelData = pixels.astype("<i2").tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.file_meta = file_meta(ds)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ct_series(folder: Path, n: int = 6, *, size: int = 24, spacing: float = 2.5, iop=AXIAL, step=None,
                    origin=(-30.0, -30.0, 0.0), positions=None, modality: str = "CT", series_number: int = 2,
                    prefix: str = "IM", seed: int = 0, pixel_spacing: str = "1.5",
                    image_type=("ORIGINAL", "PRIMARY", "AXIAL"), uid_root: str | None = None, tag: int = 1,
                    tags: dict | None = None) -> list[Path]:
    """Write a CT Image Storage series (one file per slice, random pixels) and return the files in slice order.

    Slices sit at `origin + k * step` (default: `spacing` mm along row x column), or at `positions`.
    UIDs derive from the folder, `prefix` and `seed` (with a StudyInstanceUID), or with `uid_root` are
    `uid_root.2.tag` (series) and `uid_root.3.tag.<k+1>` (slices), with no StudyInstanceUID.
    `image_type=None` leaves ImageType out; `tags` are further header elements (keyword: value) on every slice.
    """
    folder.mkdir(parents=True, exist_ok=True)
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    step = np.cross(row, col) * spacing if step is None else np.asarray(step, dtype=float)
    if positions is None:
        positions = [np.asarray(origin) + k * step for k in range(n)]
    if uid_root is None:
        series_uid = generate_uid(entropy_srcs=[str(folder), prefix, str(seed)])
        series_tags = {"StudyInstanceUID": generate_uid(entropy_srcs=[series_uid, "study"])}
    else:
        series_uid, series_tags = f"{uid_root}.2.{tag}", {}
    series_tags.update(Manufacturer="ACME", SeriesNumber=series_number)
    if image_type is not None:
        series_tags["ImageType"] = list(image_type)
    rng = np.random.default_rng(seed)
    paths = []
    for k, ipp in enumerate(positions):
        sop_uid = generate_uid(entropy_srcs=[series_uid, str(k)]) if uid_root is None else f"{uid_root}.3.{tag}.{k + 1}"
        pixels = rng.integers(0, 2000, (size, size)).astype("<i2")
        paths.append(write_ct_slice(
            folder / f"{prefix}{k:03d}.dcm", pixels, sop_uid=sop_uid, series_uid=series_uid, instance_number=k + 1,
            ipp=[f"{v:.4f}" for v in ipp], iop=[f"{v:.6f}" for v in iop], pixel_spacing=[pixel_spacing] * 2,
            slice_thickness=f"{spacing:g}", modality=modality, **{**series_tags, **(tags or {})}))
    return paths


# ----------------------------------------------------------------------------- ingest
def read_index(out: Path, columns: list[str] | None = None) -> list[dict]:
    """The rows of `out`/index.csv (the package's reader); with `columns`, assert its header is exactly those."""
    rows = _read_index(out)
    if columns is not None:
        with (out / "index.csv").open(newline="") as fh:
            assert next(csv.reader(fh)) == columns
    return rows


def ingest_config(root: Path, **ingest) -> dict:
    """An ingest section writing to `root`/out and `root`/cache, and no splits file (the shipped default writes
    data_manifests/demo.splits.csv); `ingest` adds keys (or overrides these)."""
    return {"out_dir": str(root / "out"), "cache_dir": str(root / "cache"), "splits_file": None, **ingest}


def ingest_params(root: Path, seed: int | None = 0, **ingest):
    """Params with only `seed` (None: the default seed) and an ingest section, `ingest_config(root, **ingest)`."""
    raw = {} if seed is None else {"seed": seed}
    raw["ingest"] = ingest_config(root, **ingest)
    return params_from_dict(raw)


def synthetic_task_cohort(tmp: Path, task: str, names: list[str], lesion_fraction: float):
    """12 synthetic patients x 2-3 studies of `task` (seed 7), ingested at 24^3 / 10 mm (seed 3) into
    `tmp`/ing: (synthesis summary, its config, the ingest folder, the data section naming `names`)."""
    from pipeline.config import SynthesizeConfig
    from pipeline.stages.ingest import run_ingest
    from pipeline.stages.synthesize import synthesize

    cfg = SynthesizeConfig(out_dir=tmp / "data", manifest=tmp / "manifests" / "demo.csv", n_patients=12,
                           studies_per_patient=(2, 3), lesion_fraction=lesion_fraction, task=task)
    summary = synthesize(cfg, seed=7)
    ing, data = tmp / "ing", {"manifest": str(cfg.manifest), "class_names": names}
    run_ingest(params_from_dict({
        "seed": 3, "data": data,
        "ingest": {"out_dir": str(ing), "cache_dir": str(tmp / "cache"), "splits_file": None,
                   "spacing": [10.0, 10.0, 10.0], "shape": [24, 24, 24], "workers": 2}}), progress=False)
    return summary, cfg, ing, data


# ----------------------------------------------------------------------------- training
def train_params(tmp: Path, ingest_dir: Path, *, train: dict | None = None, **sections):
    """Params of `conftest.tiny_params` (a fast CPU run), `train` overriding its train keys and `sections`
    adding (or replacing) whole top-level sections, e.g. `register={...}`."""
    return params_from_dict({**tiny_params(tmp, ingest_dir, **(train or {})), **sections})


def register_tiny_champion(tmp: Path, ingest_dir: Path, name: str):
    """Train, evaluate and register a tiny model (`tiny_params`) as `name`@champion in `tmp`'s own MLflow store;
    the Params (their mlflow.tracking_uri names the store). The gate is open: this is about serving, not quality."""
    import mlflow

    from pipeline.core import sanity as S
    from pipeline.io.artifacts import save_json
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.register import run_register
    from pipeline.stages.train import run_train
    from pipeline.tracking.runs import experiment_name

    raw = tiny_params(tmp, ingest_dir)
    raw["register"] = {"model_name": name, "min_auroc_ci_low": 0.0, "max_ece_calibrated": 1.0}
    raw["explain"] = {"out_dir": str(tmp / "explain")}  # the gate reads this run's sanity.json, not the repo's
    save_json(tmp / "explain" / "sanity.json", S.summarize([(0.1, 0.3)] * 4, []))  # randomization passed, no masks
    params = params_from_dict(raw)
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    mlflow.create_experiment(experiment_name(params), artifact_location=(tmp / "artifacts").as_uri())
    run_train(params, progress=False)
    run_evaluate(params)
    reg = run_register(params)
    assert reg["champion"] == reg["version"] == "1"
    return params


# ----------------------------------------------------------------------------- DICOM conformance
def dciodvfy_errors(path: Path) -> list[str]:
    """The lines dciodvfy (dicom3tools) prints for `path` that start with "Error"; fails under CI=true without it."""
    import os
    import shutil
    import subprocess

    import pytest

    exe = shutil.which("dciodvfy")
    if exe is None:
        msg = "dciodvfy (dicom3tools) is not installed (make setup-pacs)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


# ----------------------------------------------------------------------------- servers
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(cmd: list[str], ready_url: str, log_path: Path, env: dict | None = None, timeout_s: float = 120):
    """Run a server `cmd` in its own process group until `ready_url` answers 200; stop it by that group's PID at
    exit (SIGTERM, then SIGKILL). Yields the PID."""
    import os
    import signal
    import subprocess
    import time
    import urllib.request

    log = log_path.open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, up = time.monotonic() + timeout_s, False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as r:
                    up = r.status == 200
                    break
            except OSError:
                time.sleep(0.5)
        assert up, f"{cmd[:3]} did not answer {ready_url} within {timeout_s:g} s:\n" + log_path.read_text()[-3000:]
        yield proc.pid
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


@contextlib.contextmanager
def mlflow_serve(model_uri: str, tracking_uri: str, log_path: Path, env_extra: dict | None = None,
                 drop_env: tuple[str, ...] = (), timeout_s: float = 120):
    """`mlflow models serve` of `model_uri` on a free port of 127.0.0.1, up once /ping answers; stopped by its
    process group at exit. Yields (base URL, port, pid)."""
    import os
    import sys

    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # uvicorn lives beside the interpreter
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    env.update(env_extra or {})
    for key in drop_env:
        env.pop(key, None)
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "--host", "127.0.0.1", "-p", str(port)]
    with serve(cmd, f"{base}/ping", log_path, env, timeout_s) as pid:
        yield base, port, pid


S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server(log_path: Path, bucket: str, timeout_s: float = 60):
    """moto's S3 API server (a real HTTP server, in-memory buckets) on a free port of 127.0.0.1, with `bucket`
    created. Yields its endpoint URL; stopped by PID at exit. Clients need `S3_TEST_ENV`'s credentials."""
    import os
    import sys

    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with serve(cmd, f"{endpoint}/moto-api/", log_path, dict(os.environ), timeout_s):
        boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in S3_TEST_ENV.items()
                                                     if k != "AWS_DEFAULT_REGION"},
                     region_name=S3_TEST_ENV["AWS_DEFAULT_REGION"]).create_bucket(Bucket=bucket)
        yield endpoint
