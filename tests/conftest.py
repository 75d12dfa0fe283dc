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
    from pipeline.synthesize import synthesize

    root = tmp_path_factory.mktemp("demo")
    cfg = SynthesizeConfig(out_dir=root / "data", manifest=root / "manifests" / "demo.csv", n_patients=8)
    synthesize(cfg, seed=7)
    return cfg.manifest
