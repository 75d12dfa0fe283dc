"""Studies from a DICOMweb server (QIDO-RS to list, WADO-RS to retrieve) into a local, content-addressed cache.

A manifest row or a `resdx predict` input names a study as ``dicomweb:<StudyInstanceUID>`` (optionally
``/<SeriesInstanceUID>``, or the manifest's series_uid column); the server is `pacs.url`. Retrieved
instances are stored by the SHA-256 of their bytes and indexed by server + SOP Instance UID, so a
rerun lists the series again (one QIDO request each) and retrieves nothing it already holds. The
case's instances are then hard-linked into one folder per series set, which the ordinary DICOM
reader reads: the same reader, plan and ingest cache as local files.

Credentials come only from the environment (`RESDX_PACS_TOKEN`: bearer; else `RESDX_PACS_USER` +
`RESDX_PACS_PASSWORD`: basic), never from params, and never appear in reasons or logs: reasons are
fixed sentences (an HTTP error's text holds the URL, i.e. UIDs). Every failure of the server for
one study is a `RejectedCase` with its own code; the caller goes on with the next study.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import PacsConfig
from pipeline.core.limits import DEFAULT_MAX_CASE_BYTES
from pipeline.errors import RejectedCase
from pipeline.sources.multipart import CHUNK, boundary_of, iter_parts

PREFIX = "dicomweb:"
ENV_TOKEN, ENV_USER, ENV_PASSWORD = "RESDX_PACS_TOKEN", "RESDX_PACS_USER", "RESDX_PACS_PASSWORD"
# A DICOM UID: dot-separated numbers, at most 64 characters (PS3.5 9.1).
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
# The modalities the readers take; other series of a study (SR, SEG, our own results) are not retrieved.
IMAGE_MODALITIES = ("CT", "MR")
_SOP_UID, _SERIES_UID, _MODALITY = "00080018", "0020000E", "00080060"

# dicomweb-client logs each request's UIDs at INFO (and urllib3 the URLs at DEBUG): PHI in logs.
for _name in ("dicomweb_client", "urllib3"):
    logging.getLogger(_name).setLevel(logging.WARNING)


@dataclass(frozen=True)
class RemoteStudy:
    """One study (or one series of it) on the configured DICOMweb server."""

    study_uid: str
    series_uid: str = ""


def is_remote(text: str | os.PathLike) -> bool:
    return os.fspath(text).startswith(PREFIX)


def parse_ref(text: str, series_uid: str = "") -> RemoteStudy:
    """``dicomweb:<study>[/<series>]`` -> RemoteStudy; ValueError with why for anything else."""
    body = os.fspath(text)[len(PREFIX):] if is_remote(text) else os.fspath(text)
    study, _, series = body.strip("/").partition("/")
    series = series or series_uid
    for uid in (study, series) if series else (study,):
        if len(uid) > 64 or not _UID.fullmatch(uid):
            raise ValueError("a dicomweb: reference needs a StudyInstanceUID (digits and dots, at most 64), "
                             "optionally /SeriesInstanceUID")
    return RemoteStudy(study, series)


def session(cfg: PacsConfig):
    """A requests Session with the environment's credentials (none when the variables are unset)."""
    import requests

    s = requests.Session()
    token = os.environ.get(ENV_TOKEN, "")
    if token:
        s.headers["Authorization"] = f"Bearer {token}"
    elif os.environ.get(ENV_USER):
        s.auth = (os.environ[ENV_USER], os.environ.get(ENV_PASSWORD, ""))
    return s


def client(cfg: PacsConfig, http=None):
    """A `dicomweb_client.DICOMwebClient` on `pacs.url`: no retries (a down server rejects the case now,
    not after five exponential back-offs), `pacs.timeout_s` to connect and per read."""
    from dicomweb_client import DICOMwebClient

    c = DICOMwebClient(url=cfg.url.rstrip("/"), session=http or session(cfg), timeout=cfg.timeout_s)
    c.set_http_retry_params(retry=False)
    return c


def rejected_for(err: BaseException) -> RejectedCase:
    """The specific reason for a failed request (never the exception's text: it holds the URL)."""
    import requests

    if isinstance(err, RejectedCase):
        return err
    if isinstance(err, requests.Timeout):
        return RejectedCase("pacs_timeout", "the DICOMweb server did not answer within pacs.timeout_s")
    if isinstance(err, requests.ConnectionError):
        return RejectedCase("pacs_unreachable", "the DICOMweb server cannot be reached (connection refused or "
                                                "dropped): check pacs.url and that the server runs")
    if isinstance(err, requests.HTTPError) and err.response is not None:
        code = err.response.status_code
        if code == 404:
            return RejectedCase("pacs_not_found", "the DICOMweb server has no such study or series (HTTP 404)")
        if code in (401, 403):
            return RejectedCase("pacs_unauthorized", f"the DICOMweb server refused access (HTTP {code}): set "
                                                     f"{ENV_TOKEN}, or {ENV_USER} and {ENV_PASSWORD}")
        return RejectedCase("pacs_http_error", f"the DICOMweb server answered HTTP {code}")
    if isinstance(err, ValueError):  # JSON that does not parse, a bad content type
        return RejectedCase("pacs_bad_answer", "the DICOMweb server's answer could not be read as DICOMweb")
    return RejectedCase("pacs_error", f"the DICOMweb request failed ({type(err).__name__})")


def _value(item: dict, tag: str) -> str:
    values = (item.get(tag) or {}).get("Value") or [""]
    return str(values[0])


def list_series(c, ref: RemoteStudy, modality: str | None) -> list[str]:
    """The study's image series of `modality` (CT/MR; either when None), or the one series named."""
    try:
        found = c.search_for_series(study_instance_uid=ref.study_uid, get_remaining=True)
    except Exception as err:  # noqa: BLE001 - mapped to a specific reason
        raise rejected_for(err) from None
    wanted = (modality,) if modality else IMAGE_MODALITIES
    series = [(_value(s, _SERIES_UID), _value(s, _MODALITY)) for s in found or []]
    if ref.series_uid:
        series = [(uid, m) for uid, m in series if uid == ref.series_uid]
    if not series:
        raise RejectedCase("pacs_not_found", "the DICOMweb server lists no such study or series")
    images = [uid for uid, m in series if m in wanted]
    if not images:
        have = ", ".join(sorted({m for _, m in series}))[:40]
        raise RejectedCase("pacs_no_image_series", f"the study has no {'/'.join(wanted)} series on the server "
                                                   f"(modalities: {have or 'none'})")
    return images


def list_instances(c, study_uid: str, series_uid: str) -> list[str]:
    try:
        found = c.search_for_instances(study_instance_uid=study_uid, series_instance_uid=series_uid,
                                       get_remaining=True)
    except Exception as err:  # noqa: BLE001 - mapped to a specific reason
        raise rejected_for(err) from None
    return [uid for uid in (_value(i, _SOP_UID) for i in found or []) if uid]


def _key(*parts: str) -> str:
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=16).hexdigest()


class InstanceCache:
    """Instances by the SHA-256 of their bytes, indexed by (server, study, series, SOP Instance UID).

    File names are hashes: the cache's paths carry no UID (its contents are PHI: keep it private).
    """

    def __init__(self, root: Path, server: str):
        self.root, self.server = Path(root), server.rstrip("/")

    def _index(self, study: str, series: str, sop: str) -> Path:
        k = _key(self.server, study, series, sop)
        return self.root / "index" / k[:2] / k

    def _object(self, digest: str) -> Path:
        return self.root / "objects" / digest[:2] / f"{digest}.dcm"

    def get(self, study: str, series: str, sop: str) -> Path | None:
        idx = self._index(study, series, sop)
        if not idx.is_file():
            return None
        obj = self._object(idx.read_text().strip())
        return obj if obj.is_file() else None

    def put(self, study: str, series: str, sop: str, data: bytes) -> Path:
        digest = hashlib.sha256(data).hexdigest()
        obj = self._object(digest)
        for path, content in ((obj, data), (self._index(study, series, sop), digest.encode())):
            if path == obj and obj.is_file():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(content)
            os.replace(tmp, path)  # atomic: a killed retrieval never leaves half an instance
        return obj

    def view(self, ref: RemoteStudy, series: list[str], files: list[Path]) -> Path:
        """One folder holding exactly `files` (hard links), for the DICOM reader."""
        folder = self.root / "studies" / _key(self.server, ref.study_uid, *series)
        if folder.is_dir() and sorted(p.name for p in folder.iterdir()) == sorted({f.name for f in files}):
            return folder  # names are content hashes: the same names are the same files (and no rebuild
            # under a reader of the same study in another worker)
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in files:
            dest = tmp / f.name
            if not dest.exists():
                try:
                    os.link(f, dest)
                except OSError:  # another file system, or links not allowed
                    shutil.copyfile(f, dest)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return folder


@dataclass
class Retrieved:
    """A study's local folder and what it took: instances retrieved now vs found in the cache, seconds."""

    folder: Path
    n_retrieved: int = 0
    n_cached: int = 0
    seconds: float = 0.0


def _check_part(ctype: str, body: bytes, expected: set[str]) -> str:
    """The SOP Instance UID of one retrieved part; RejectedCase when it is not a DICOM instance."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    if ctype and not ctype.lower().startswith("application/dicom"):
        raise RejectedCase("pacs_not_dicom", f"a part of the server's answer is {ctype.split(';')[0][:40]!r}, "
                                             "not application/dicom")
    if body[128:132] != b"DICM":
        raise RejectedCase("pacs_not_dicom", "a part of the server's answer is not a DICOM file (no DICM preamble)")
    try:
        ds = dcmread(DicomBytesIO(body), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        sop = str(ds.SOPInstanceUID)
    except Exception:  # noqa: BLE001 - any parse failure is the same fault: a damaged part
        raise RejectedCase("pacs_not_dicom", "a part of the server's answer does not parse as DICOM") from None
    if sop not in expected:
        raise RejectedCase("pacs_bad_answer", "the server sent an instance its search did not list")
    return sop


# As stored first (transfer-syntax=*: no transcoding, the bytes the modality sent); a server that will not
# serve "*" (406 Not Acceptable) is asked again for its default, Explicit VR Little Endian (PS3.18 8.7.3).
WADO_ACCEPTS = ('multipart/related; type="application/dicom"; transfer-syntax=*',
                'multipart/related; type="application/dicom"')


def _wado_series(http, cfg: PacsConfig, study: str, series: str, expected: set[str], cache: InstanceCache,
                 max_bytes: int, deadline: float) -> int:
    """WADO-RS one series into the cache (as stored where the server allows); the instances received."""
    import requests

    url = f"{cfg.url.rstrip('/')}/studies/{study}/series/{series}"
    got: set[str] = set()
    for n, accept in enumerate(WADO_ACCEPTS):
        try:
            with http.get(url, headers={"Accept": accept}, stream=True, timeout=cfg.timeout_s) as answer:
                answer.raise_for_status()
                parts = iter_parts(answer.iter_content(CHUNK), boundary_of(answer.headers.get("Content-Type", "")),
                                   max_bytes, deadline)
                for ctype, body in parts:
                    sop = _check_part(ctype, body, expected)
                    cache.put(study, series, sop, body)
                    got.add(sop)
            break
        except requests.HTTPError as err:
            if err.response is not None and err.response.status_code == 406 and n + 1 < len(WADO_ACCEPTS):
                continue
            raise rejected_for(err) from None
        except Exception as err:  # noqa: BLE001 - every failure of the server has its own reason
            raise rejected_for(err) from None
    missing = expected - got
    if missing:
        raise RejectedCase("pacs_incomplete", f"the server listed {len(expected)} instance(s) of a series "
                                              f"but sent {len(got)}")
    return len(got)


def retrieve(ref: RemoteStudy, cfg: PacsConfig, modality: str | None = None, max_bytes: int = DEFAULT_MAX_CASE_BYTES,
             time_limit_s: float = 300.0, http=None) -> Retrieved:
    """The study's image series (or the one named) as a local folder; only what the cache lacks is retrieved.

    Raises RejectedCase with a specific code (pacs_unreachable, pacs_timeout, pacs_not_found,
    pacs_unauthorized, pacs_http_error, pacs_truncated, pacs_not_dicom, pacs_incomplete, pacs_bad_answer).
    """
    t0 = time.monotonic()
    http = http or session(cfg)
    c = client(cfg, http)
    cache = InstanceCache(cfg.cache_dir, cfg.url)
    series = list_series(c, ref, modality)
    files: list[Path] = []
    out = Retrieved(folder=Path())
    for uid in series:
        sops = list_instances(c, ref.study_uid, uid)
        if not sops:
            raise RejectedCase("pacs_incomplete", "a series on the server lists no instances")
        have = {sop: cache.get(ref.study_uid, uid, sop) for sop in sops}
        missing = {sop for sop, path in have.items() if path is None}
        if missing:
            # The whole series in one request: one round trip, and the server sends what it stores.
            _wado_series(http, cfg, ref.study_uid, uid, set(sops), cache, max_bytes, t0 + time_limit_s)
            out.n_retrieved += len(sops)
        else:
            out.n_cached += len(sops)
        found = [cache.get(ref.study_uid, uid, sop) for sop in sops]
        if None in found:  # the cache lost a file under us: never a silently shorter series
            raise RejectedCase("pacs_incomplete", "an instance of the series is missing from the local cache")
        files += found
    out.folder = cache.view(ref, series, files)
    out.seconds = time.monotonic() - t0
    return out


def store(datasets: list, cfg: PacsConfig, http=None) -> int:
    """STOW-RS `datasets` (pydicom) in batches of `pacs.store_batch`; the number the server accepted.

    Raises RejectedCase when the server refuses a batch or reports failed instances.
    """
    c = client(cfg, http)
    stored = 0
    for i in range(0, len(datasets), cfg.store_batch):
        batch = datasets[i:i + cfg.store_batch]
        try:
            answer = c.store_instances(batch)
        except Exception as err:  # noqa: BLE001 - every failure of the server has its own reason
            raise rejected_for(err) from None
        failed = len(getattr(answer, "FailedSOPSequence", []) or [])
        if failed:
            raise RejectedCase("pacs_store_failed", f"the server refused {failed} of {len(batch)} instance(s)")
        stored += len(batch)
    return stored
