"""Shared fixtures: the conformance data in ../shared/data and a small demo cohort."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", module="nibabel")
warnings.filterwarnings("ignore", module="pydicom")


def shared_data_dir() -> Path:
    return Path(os.environ.get("RESDX_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $RESDX_SHARED_DATA). Under CI a missing folder fails, never skips."""
    path = shared_data_dir()
    if not (path / "dicom").is_dir():
        msg = f"shared test data not found at {path} (set RESDX_SHARED_DATA)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory) -> Path:
    """A small synthesized cohort (real DICOM + NIfTI files); returns its manifest path."""
    from pipeline.config import SynthesizeConfig
    from pipeline.stages.synthesize import synthesize

    root = tmp_path_factory.mktemp("demo")
    cfg = SynthesizeConfig(out_dir=root / "data", manifest=root / "manifests" / "demo.csv", n_patients=8)
    synthesize(cfg, seed=7)
    return cfg.manifest


@pytest.fixture(scope="session")
def tiny_ingested(demo_cohort, tmp_path_factory) -> Path:
    """The demo cohort ingested at 24^3 (10 mm voxels): small enough to train in seconds."""
    from pipeline.config import params_from_dict
    from pipeline.stages.ingest import run_ingest

    tmp = tmp_path_factory.mktemp("tiny")
    params = params_from_dict({"seed": 3, "ingest": {"out_dir": str(tmp / "ing"), "cache_dir": str(tmp / "cache"),
                                                      "spacing": [10.0, 10.0, 10.0], "shape": [24, 24, 24],
                                                      "workers": 1, "splits_file": None}})
    run_ingest(params, manifest=demo_cohort, progress=False)
    return tmp / "ing"


def tiny_params(tmp: Path, ingest_dir: Path, **train) -> dict:
    """Raw params for fast CPU training runs in tests (resnet10, 2 epochs, local MLflow store)."""
    t = {"out_dir": str(tmp / "models"), "state_dir": str(tmp / "state"), "epochs": 2, "batch_size": 4,
         "patience": 5, "threads": 1, "device": "cpu", "select": "best", "lr": 3e-4}
    t.update(train)
    # The evidence network of the shipped 48^3 demo, pinned at the widths the plan chooses since issue 16
    # (32-64-128-128: 1.8 M parameters, 7 MB a checkpoint, where 64-...-512 took 57 MB and a finished run's
    # state 280 MB, so a whole test run wrote 13 GB): tests of the stages should not change when the plan's rules
    # change (tests/test_recipe_views.py tests the rules; tests/test_dvc_pipeline.py runs them).
    model = {"name": "resnet10", "conv1_t_stride": 2, "conv1_t_size": 7, "pool": "lse", "output_stride": 8,
             "padding": "replicate", "width": 32, "max_channels": 128}
    return {"seed": 5, "ingest": {"out_dir": str(ingest_dir), "splits_file": None}, "train": t, "model": model,
            "evaluate": {"out_dir": str(tmp / "reports"), "n_bootstrap": 200},
            "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "system_metrics": False}}


@pytest.fixture(scope="session", autouse=True)
def _tests_leave_the_repository_as_they_found_it():
    """The shipped defaults name repository paths (e.g. ingest.splits_file): a test that forgets to point
    them at tmp_path would overwrite committed files. Fail loudly instead of silently."""
    import subprocess

    def tracked_changes() -> str:
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "data_manifests",
                               "configs", "dvc.lock"], cwd=REPO, capture_output=True, text=True).stdout

    before = tracked_changes()
    yield
    assert tracked_changes() == before, "a test changed tracked files of the repository"
