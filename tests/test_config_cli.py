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


def _params_file(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(sections))
    return path


@pytest.mark.parametrize("args, code", [
    (["evaluate"], "missing_input"),      # no trained model
    (["explain"], "missing_input"),
    (["ingest"], "bad_manifest"),          # manifest not found
])
def test_user_errors_print_code_and_what_to_do_without_a_traceback(tmp_path, args, code):
    p = _params_file(tmp_path, data={"manifest": str(tmp_path / "none.csv")},
                     ingest={"out_dir": str(tmp_path / "ing"), "splits_file": None},
                     train={"out_dir": str(tmp_path / "models")}, evaluate={"out_dir": str(tmp_path / "rep")},
                     explain={"out_dir": str(tmp_path / "exp")})
    out = _resdx(*args, "--params", str(p), cwd=tmp_path)
    assert out.returncode in (1, 2), out.stderr
    assert f"error [{code}]" in out.stderr and "what to do:" in out.stderr
    assert "Traceback" not in out.stderr
    debug = _resdx("--debug", *args, "--params", str(p), cwd=tmp_path)
    assert "Traceback" in debug.stderr  # --debug shows where it failed


def test_every_user_facing_error_is_a_resdx_error_with_a_hint():
    from pipeline import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.ResDxError)
        if cls is not errors.ResDxError:
            assert cls.code != "error" and cls.hint, name


def test_plans_of_another_version_or_schema_are_refused(tmp_path):
    from pipeline.core.plan import PLAN_VERSION, load_plan
    from pipeline.errors import PlanError

    old = tmp_path / "old.json"
    old.write_text('{"version": 1, "shape": [48, 48, 48]}')
    with pytest.raises(PlanError, match="plan version 1 is not"):
        load_plan(old)
    typo = tmp_path / "typo.json"
    typo.write_text(f'{{"version": {PLAN_VERSION}, "source": "manifest", "shape": [8, 8, 8], "n_classes": 2, '
                    '"class_names": ["a", "b"], "shapee": 1}')
    with pytest.raises(PlanError, match="shapee"):
        load_plan(typo)
    with pytest.raises(PlanError, match="missing"):
        load_plan(tmp_path / "absent.json")
