"""tools/orthanc.py: a real Orthanc (DICOMweb) started and stopped by the project; STOW-RS, QIDO-RS, WADO-RS."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient
from helpers import write_ct_series
from pacs_fixtures import REPO, orthanc, require_orthanc  # noqa: F401

from tools import orthanc as pacs


def _bindable(port: int) -> bool:
    """Whether a server could listen on `port` now (as Orthanc would: all interfaces, SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
        return True


def _gone(pid: int) -> bool:
    """No process (not even a zombie) has `pid`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return not Path(f"/proc/{pid}").exists()
    return False


# ----------------------------------------------------------------------------- DICOMweb round trip
def test_stow_qido_wado_round_trip(orthanc, tmp_path):  # noqa: F811
    files = write_ct_series(tmp_path / "ct", n=3, size=16)
    originals = [pydicom.dcmread(f) for f in files]
    study_uid, series_uid = originals[0].StudyInstanceUID, originals[0].SeriesInstanceUID
    client = DICOMwebClient(url=orthanc.dicomweb_url)

    response = client.store_instances(originals)
    assert len(response.get("FailedSOPSequence", [])) == 0
    assert sorted(item.ReferencedSOPInstanceUID for item in response.ReferencedSOPSequence) == \
        sorted(ds.SOPInstanceUID for ds in originals)
    assert all(item.RetrieveURL.startswith(orthanc.dicomweb_url + "/studies/")
               for item in response.ReferencedSOPSequence)

    studies = client.search_for_studies(search_filters={"StudyInstanceUID": study_uid})
    assert [s["0020000D"]["Value"][0] for s in studies] == [study_uid]
    instances = client.search_for_instances(study_instance_uid=study_uid)
    assert sorted(i["00080018"]["Value"][0] for i in instances) == sorted(ds.SOPInstanceUID for ds in originals)

    for original in originals:
        back = client.retrieve_instance(study_uid, series_uid, original.SOPInstanceUID)
        assert back.SOPInstanceUID == original.SOPInstanceUID
        assert back.PixelData == original.PixelData
        np.testing.assert_array_equal(back.pixel_array, original.pixel_array)


# ----------------------------------------------------------------------------- authentication
def test_basic_auth_rejects_requests_without_credentials(tmp_path):
    require_orthanc()
    password = "s3cret-Pw-4-tests"
    with pacs.running(tmp_path / "state", users={"alice": password}) as srv:
        assert requests.get(srv.dicomweb_url + "/studies", timeout=10).status_code == 401
        assert requests.get(srv.url + "/system", auth=("alice", "wrong"), timeout=10).status_code == 401

        session = requests.Session()
        session.auth = ("alice", password)
        assert DICOMwebClient(url=srv.dicomweb_url, session=session).search_for_studies() == []

        assert stat.S_IMODE(srv.config_file.stat().st_mode) == 0o600
        assert password not in srv.log_file.read_text()


# ----------------------------------------------------------------------------- process handling
def test_stop_leaves_no_process_and_frees_the_port(tmp_path):
    require_orthanc()
    state = tmp_path / "state"
    srv = pacs.start(state)
    try:
        print(f"\nOrthanc start-up (API, until /system and /dicom-web/studies answer): {srv.startup_s:.3f} s")
        pid, port = srv.pid, srv.port
        assert (state / "orthanc.pid").read_text().strip() == str(pid)
        assert pacs.port_in_use(port) and not _bindable(port)
        assert requests.get(srv.url + "/system", timeout=10).json()["HttpPort"] == port
        with pytest.raises(pacs.OrthancError, match="already runs"):
            pacs.start(state)
        found = pacs.status(state)
        assert found is not None and (found.pid, found.port) == (pid, port)
    finally:
        srv.stop()
    assert _gone(pid)
    assert not (state / "orthanc.pid").exists()
    assert not pacs.port_in_use(port) and _bindable(port)
    assert pacs.status(state) is None


def test_cli_start_status_stop(tmp_path):
    require_orthanc()
    state, port = tmp_path / "cli-state", pacs.free_port()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tools.orthanc", *args, "--state-dir", str(state)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    try:
        t0 = time.monotonic()
        started = cli("start", "--port", str(port))
        print(f"\nOrthanc start-up (CLI, incl. the Python process): {time.monotonic() - t0:.3f} s")
        assert started.returncode == 0, started.stderr
        assert f"http://127.0.0.1:{port}/app/explorer.html" in started.stdout
        assert f"http://127.0.0.1:{port}/dicom-web" in started.stdout
        pid = int((state / "orthanc.pid").read_text())
        assert pacs.pid_alive(pid)
        assert json.loads((state / "orthanc.json").read_text())["HttpPort"] == port
        assert requests.get(f"http://127.0.0.1:{port}/dicom-web/studies", timeout=10).status_code == 200

        again = cli("start", "--port", str(port))
        assert again.returncode == 0 and "already running" in again.stdout
        status = cli("status")
        assert status.returncode == 0 and f"pid {pid}" in status.stdout

        stopped = cli("stop")
        assert stopped.returncode == 0 and f"stopped (pid {pid})" in stopped.stdout
        assert not (state / "orthanc.pid").exists()
        assert not pacs.pid_alive(pid)  # the CLI's Orthanc was reparented: init reaps it, not us
        assert not pacs.port_in_use(port)
        assert cli("status").returncode == 3
        assert "not running" in cli("stop").stdout
    finally:
        pacs.stop(state)


# ----------------------------------------------------------------------------- without Orthanc
def test_config_keeps_orthanc_local_and_without_dimse(tmp_path):
    plugin = tmp_path / "libOrthancDicomWeb.so"
    plugin.write_bytes(b"")
    path = pacs.write_config(tmp_path / "s", 18042, {"bob": "pw"}, plugin=plugin)
    cfg = json.loads(path.read_text())
    assert cfg["HttpPort"] == 18042 and cfg["RemoteAccessAllowed"] is False and cfg["DicomServerEnabled"] is False
    assert cfg["AuthenticationEnabled"] is True and cfg["RegisteredUsers"] == {"bob": "pw"}
    assert cfg["Plugins"] == [str(plugin)] and cfg["DicomWeb"]["Enable"] is True
    assert cfg["DicomWeb"]["Root"] == "/dicom-web/" and cfg["StorageCompression"] is False
    assert Path(cfg["StorageDirectory"]).parent == (tmp_path / "s").resolve()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert pacs.write_config(tmp_path / "t", 1, plugin=plugin).read_text().count('"AuthenticationEnabled": false') == 1


def test_missing_orthanc_says_make_setup_pacs(tmp_path, monkeypatch):
    monkeypatch.setenv("ORTHANC_BIN", str(tmp_path / "no-such-Orthanc"))
    with pytest.raises(pacs.OrthancNotInstalled, match="make setup-pacs"):
        pacs.start(tmp_path / "s")
    monkeypatch.delenv("ORTHANC_BIN")
    monkeypatch.setenv("ORTHANC_DICOMWEB_PLUGIN", str(tmp_path / "no-plugin.so"))
    with pytest.raises(pacs.OrthancNotInstalled, match="make setup-pacs"):
        pacs.check_installed()


def _fake_orthanc(tmp_path: Path, monkeypatch, body: str) -> None:
    script = tmp_path / "Orthanc"
    script.write_text(f'#!/bin/sh\necho $$ > "$(dirname "$1")/fake.pid"\n{body}\n')
    script.chmod(0o755)
    plugin = tmp_path / "plugin.so"
    plugin.write_bytes(b"")
    monkeypatch.setenv("ORTHANC_BIN", str(script))
    monkeypatch.setenv("ORTHANC_DICOMWEB_PLUGIN", str(plugin))


def test_start_that_never_answers_times_out_with_the_log_tail(tmp_path, monkeypatch):
    _fake_orthanc(tmp_path, monkeypatch, 'echo "fake Orthanc is thinking"\nexec sleep 60')
    state = tmp_path / "s"
    with pytest.raises(pacs.OrthancError, match="(?s)did not answer.*fake Orthanc is thinking"):
        pacs.start(state, timeout_s=1.5)
    assert _gone(int((state / "fake.pid").read_text()))
    assert not (state / "orthanc.pid").exists()


def test_start_that_exits_reports_status_and_log_tail(tmp_path, monkeypatch):
    _fake_orthanc(tmp_path, monkeypatch, 'echo "E: something is wrong" >&2\nexit 7')
    with pytest.raises(pacs.OrthancError, match="(?s)status 7.*something is wrong"):
        pacs.start(tmp_path / "s", port=pacs.free_port())
