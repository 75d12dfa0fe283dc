"""The README's PACS commands on the demo cohort, against a real Orthanc: push, list, ingest from the server."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
import yaml
from helpers import read_index
from pacs_fixtures import orthanc  # noqa: F401 - the fixture

from pipeline.config import params_from_dict

pytestmark = pytest.mark.slow


def _resdx(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=600)


def test_push_the_demo_then_ingest_it_from_the_server_as_from_disk(orthanc, demo_cohort, tiny_ingested,  # noqa: F811
                                                                    tmp_path):
    from pipeline.io.dicom import read_dicom_series
    from pipeline.sources.dicomweb import parse_ref, retrieve
    from pipeline.stages.ingest import run_ingest

    pacs = {"url": orthanc.dicomweb_url, "cache_dir": str(tmp_path / "dicomweb")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"pacs": pacs}))
    data = demo_cohort.parent.parent / "data"
    pushed = _resdx("pacs", "push", str(data), "--manifest", str(demo_cohort), "--manifest-out",
                    str(tmp_path / "remote.csv"), "-p", str(tmp_path / "params.yaml"))
    assert pushed.returncode == 0, pushed.stderr
    assert "other files skipped" in pushed.stderr
    listed = _resdx("pacs", "studies", "-p", str(tmp_path / "params.yaml"))
    assert listed.returncode == 0, listed.stderr
    studies = [line.split("\t") for line in listed.stdout.splitlines()]
    rows = list(csv.DictReader((tmp_path / "remote.csv").open()))
    remote = [r for r in rows if r["path"].startswith("dicomweb:")]
    assert len(remote) == len({s[0] for s in studies}) == sum(r["modality"] == "CT" for r in rows) > 0
    assert {r["path"].removeprefix("dicomweb:") for r in remote} == {s[0] for s in studies}

    params = params_from_dict({"seed": 3, "pacs": pacs, "ingest": {
        "out_dir": str(tmp_path / "ing"), "cache_dir": str(tmp_path / "cache"), "spacing": [10.0, 10.0, 10.0],
        "shape": [24, 24, 24], "workers": 1, "splits_file": None}})
    run_ingest(params, manifest=tmp_path / "remote.csv", progress=False)
    from_server = {r["case_id"]: r for r in read_index(tmp_path / "ing")}
    from_disk = {r["case_id"]: r for r in read_index(tiny_ingested)}
    assert from_server.keys() == from_disk.keys()
    for cid, r in from_disk.items():  # every case reads the same grid from the server as from disk
        assert (from_server[cid]["status"], from_server[cid]["native_shape"], from_server[cid]["native_spacing"]) \
            == (r["status"], r["native_shape"], r["native_spacing"]), cid

    first = next(r for r in remote)  # the same voxels and affine, read from the retrieved copy
    local = next(r for r in csv.DictReader(demo_cohort.open()) if r["case_id"] == first["case_id"])
    got = retrieve(parse_ref(first["path"]), params.pacs)
    assert got.n_retrieved == 0  # ingest retrieved it already: the cache answers
    a, b = read_dicom_series(got.folder), read_dicom_series(demo_cohort.parent / local["path"])
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.affine, b.affine)
