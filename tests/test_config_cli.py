"""Typed config (typos name the key) and the thin CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_params, params_from_dict

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_validate():
    p = load_params(REPO / "configs" / "params.yaml")
    assert p.ingest.shape == (48, 48, 48) and p.data.source == "manifest"


def test_typo_names_the_bad_key():
    with pytest.raises(ConfigError, match=r"ingest\.spacng: unknown key"):
        params_from_dict({"ingest": {"spacng": [1, 1, 1]}})


def test_wrong_type_names_the_key_and_value():
    with pytest.raises(ConfigError, match=r"ingest\.workers"):
        params_from_dict({"ingest": {"workers": "many"}})
    with pytest.raises(ConfigError, match=r"ingest\.ct\.percentiles"):
        params_from_dict({"ingest": {"ct": {"percentiles": [99, 1]}}})


def test_medmnist_keys_exist_for_later_stages():
    p = params_from_dict({"data": {"source": "medmnist", "medmnist": {"flag": "organmnist3d", "size": 64}}})
    assert p.data.medmnist.size == 64


def _resdx(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_cli_help_lists_stages():
    out = _resdx("--help")
    assert out.returncode == 0
    for stage in ("synthesize", "ingest", "convert"):
        assert stage in out.stdout


def test_cli_bad_params_file_exits_2_with_the_key(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump({"ingest": {"shap": [1, 2, 3]}}))
    out = _resdx("ingest", "--params", str(bad))
    assert out.returncode == 2 and "ingest.shap" in out.stderr


def test_cli_convert_writes_nifti_and_reports_rejections(shared_data, tmp_path):
    out = _resdx("convert", str(shared_data / "dicom/dcm_qa_ts/In/4.dcm"), str(tmp_path / "o.nii.gz"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "o.nii.gz").exists()
    bad = _resdx("convert", str(shared_data / "dicom/dicom2nifti/tests/data/failing/sliceincrement/001"),
                 str(tmp_path / "x.nii.gz"))
    assert bad.returncode == 1 and "missing_slice" in bad.stderr and not (tmp_path / "x.nii.gz").exists()
