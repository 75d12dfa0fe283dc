"""A real Orthanc PACS (DICOMweb) for tests, started by tools/orthanc.py.

Use from a test module:

    from pacs_fixtures import orthanc  # noqa: F401

    def test_reads_from_pacs(orthanc):
        client = DICOMwebClient(url=orthanc.dicomweb_url)

`orthanc` is module-scoped: every test module that imports it gets its own fresh instance (on a free port, in
a tmp folder; about 0.3 s to start), shared by that module's tests, so give each test its own UIDs. Without
Orthanc or its DICOMweb plugin (`make setup-pacs`) the tests skip, and fail under CI (as `shared_data` does).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # tools/ is not an installed package; `python -m pytest` from REPO has it anyway
    sys.path.insert(0, str(REPO))

from tools.orthanc import OrthancNotInstalled, OrthancServer, check_installed, start  # noqa: E402


def require_orthanc() -> None:
    """Skip the calling test (fail it under CI) when Orthanc or its DICOMweb plugin is not installed."""
    try:
        check_installed()
    except OrthancNotInstalled as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> Iterator[OrthancServer]:
    """A fresh Orthanc with DICOMweb at `.dicomweb_url` (no authentication), stopped by PID at teardown."""
    require_orthanc()
    server = start(tmp_path_factory.mktemp("orthanc"), port=None, timeout_s=30)
    try:
        yield server
    finally:
        server.stop()
