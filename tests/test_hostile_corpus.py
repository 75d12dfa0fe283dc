"""The hostile-corpus command (benchmarks/hostile_corpus.py) under `ulimit -v`: every case ends as expected.

The corpus holds files of a few KB that claim gigabytes, so without the size checks a worker
would allocate past the address-space limit and die (`worker_died`), or the parent would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Address space for the whole run (parent and each worker): the interpreter with numpy, scipy, pydicom
# and nibabel maps about 650 MiB; a 16 GiB claim could never fit.
ULIMIT_KIB = 3_000_000
TIME_LIMIT_S = 240


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile")
    result = out / "result.json"
    cmd = f"ulimit -v {ULIMIT_KIB}; exec {sys.executable} -W ignore benchmarks/hostile_corpus.py --out {out / 'c'} " \
          f"--json {result}"
    proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=TIME_LIMIT_S,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.exists(), proc.stdout + proc.stderr
    return proc, json.loads(result.read_text())


def test_every_hostile_case_ends_with_its_specific_reason(corpus):
    proc, result = corpus
    wrong = [c for c in result["cases"] if not c["match"]]
    assert not wrong, wrong
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert result["n"] == result["n_index_rows"] >= 35
    assert 0 < result["address_space_limit"] <= ULIMIT_KIB * 1024


def test_the_run_stays_small_and_nothing_escapes(corpus):
    _proc, result = corpus
    assert not result["escaped_files"]
    assert result["peak_worker_rss_mib"] < 1536, result
    codes = {c["reason_code"] for c in result["cases"]}
    assert not codes & {"unexpected_error", "preprocess_failed", "worker_died", "timeout"}, codes


def test_reasons_hold_no_paths_or_names(corpus, tmp_path_factory):
    _proc, result = corpus
    for c in result["cases"]:
        reason = c["reason"]
        # No paths (folder names can carry PHI), no names from headers or file names, no raw library text.
        assert str(tmp_path_factory.getbasetemp()) not in reason and ".dcm" not in reason and ".nii" not in reason, c
        assert "Doe" not in reason and "Jane" not in reason and "19010203" not in reason, c
        assert "Traceback" not in reason and "Errno" not in reason, c
