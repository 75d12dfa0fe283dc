"""Studies from a DICOMweb server: references, the content-addressed cache, and every bad answer as its own reason.

The answers a real Orthanc never gives (cut connections, non-DICOM parts, stalls) come from
tests/bad_pacs.py, a real HTTP server on 127.0.0.1; the happy path against Orthanc itself is in
tests/test_pacs_e2e.py.
"""

from __future__ import annotations

import socket

import pytest
from bad_pacs import BadPacs, series_bytes
from helpers import write_ct_series

from pipeline.config import PacsConfig
from pipeline.errors import RejectedCase
from pipeline.sources.dicomweb import parse_ref, retrieve

STUDY = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture
def bad_pacs(tmp_path):
    tags = {"StudyInstanceUID": STUDY}  # series UIDs 1.2.3.2.1 and 1.2.3.2.2 (uid_root.2.tag)
    a = series_bytes(write_ct_series(tmp_path / "a", n=4, size=16, seed=1, uid_root="1.2.3", tag=1, tags=tags)[0]
                     .parent)
    b = series_bytes(write_ct_series(tmp_path / "b", n=3, size=16, seed=2, uid_root="1.2.3", tag=2, tags=tags)[0]
                     .parent)
    pacs = BadPacs(STUDY, {"1.2.3.2.1": a, "1.2.3.2.2": b})
    yield pacs
    pacs.close()


def _cfg(url: str, tmp_path, **kw) -> PacsConfig:
    return PacsConfig(url=url, cache_dir=tmp_path / "cache", **kw)


def test_references_parse_and_refuse_what_is_not_a_uid():
    assert parse_ref("dicomweb:1.2.3") == parse_ref("1.2.3")
    assert parse_ref("dicomweb:1.2.3/4.5").series_uid == "4.5"
    assert parse_ref("dicomweb:1.2.3", series_uid="4.6").series_uid == "4.6"
    for bad in ("dicomweb:", "dicomweb:1.2.x", "dicomweb:../../etc", "dicomweb:1." + "2" * 70, "dicomweb:1.2/../3"):
        with pytest.raises(ValueError, match="StudyInstanceUID"):
            parse_ref(bad)


def test_a_study_is_retrieved_once_then_served_from_the_cache(bad_pacs, tmp_path):
    cfg = _cfg(bad_pacs.url, tmp_path)
    first = retrieve(parse_ref(STUDY), cfg)
    assert (first.n_retrieved, first.n_cached, bad_pacs.wado_requests) == (7, 0, 2)
    sent = sorted(d for files in bad_pacs.series.values() for d in files)
    assert sorted(p.read_bytes() for p in first.folder.iterdir()) == sent  # the bytes as the server sent them
    again = retrieve(parse_ref(STUDY), cfg)
    assert (again.n_retrieved, again.n_cached, bad_pacs.wado_requests) == (0, 7, 2)  # a rerun retrieves nothing
    assert again.folder == first.folder
    one = retrieve(parse_ref(f"{STUDY}/1.2.3.2.2"), cfg)  # a named series: only its instances
    assert sorted(p.read_bytes() for p in one.folder.iterdir()) == sorted(bad_pacs.series["1.2.3.2.2"])
    assert STUDY not in " ".join(str(p) for p in (tmp_path / "cache").rglob("*"))  # paths carry no UID
    accept = {a for path, _, a in bad_pacs.requests if path.endswith(("1.2.3.2.1", "1.2.3.2.2"))}
    assert accept == {'multipart/related; type="application/dicom"; transfer-syntax=*'}


@pytest.mark.parametrize(("mode", "code"), [
    ("truncated", "pacs_truncated"), ("not_dicom", "pacs_not_dicom"), ("html_part", "pacs_not_dicom"),
    ("missing_one", "pacs_incomplete"), ("404", "pacs_not_found"), ("500", "pacs_http_error"),
    ("401", "pacs_unauthorized"),
])
def test_each_bad_answer_has_its_own_reason_and_the_good_series_is_kept(bad_pacs, tmp_path, mode, code):
    cfg = _cfg(bad_pacs.url, tmp_path)
    bad_pacs.mode["1.2.3.2.2"] = mode
    with pytest.raises(RejectedCase) as err:
        retrieve(parse_ref(STUDY), cfg)
    assert err.value.code == code
    assert STUDY not in err.value.reason and "1.2.3." not in err.value.reason and "127.0.0.1" not in err.value.reason
    good = retrieve(parse_ref(f"{STUDY}/1.2.3.2.1"), cfg)  # the other series is unaffected (and already cached)
    assert good.n_retrieved + good.n_cached == 4 and len(list(good.folder.iterdir())) == 4


def test_a_server_that_will_not_send_as_stored_is_asked_for_its_default_syntax(bad_pacs, tmp_path):
    bad_pacs.mode["1.2.3.2.1"] = "no_star"
    got = retrieve(parse_ref(f"{STUDY}/1.2.3.2.1"), _cfg(bad_pacs.url, tmp_path))
    assert got.n_retrieved == 4 and bad_pacs.wado_requests == 2
    assert [a for path, _, a in bad_pacs.requests if path.endswith("1.2.3.2.1")] == [
        'multipart/related; type="application/dicom"; transfer-syntax=*', 'multipart/related; type="application/dicom"']


def test_an_unknown_study_a_down_server_and_a_stalled_one(bad_pacs, tmp_path):
    with pytest.raises(RejectedCase, match="lists no such study") as err:
        retrieve(parse_ref("1.2.9"), _cfg(bad_pacs.url, tmp_path))
    assert err.value.code == "pacs_not_found"
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RejectedCase) as err:
        retrieve(parse_ref(STUDY), _cfg(f"http://127.0.0.1:{port}/dicom-web", tmp_path))
    assert err.value.code == "pacs_unreachable"
    bad_pacs.mode["1.2.3.2.1"] = "slow"
    with pytest.raises(RejectedCase) as err:
        retrieve(parse_ref(STUDY), _cfg(bad_pacs.url, tmp_path, timeout_s=1.0))
    assert err.value.code == "pacs_timeout"


def test_credentials_come_from_the_environment_only(bad_pacs, tmp_path, monkeypatch):
    monkeypatch.setenv("RESDX_PACS_TOKEN", "s3cret-token")
    retrieve(parse_ref(STUDY), _cfg(bad_pacs.url, tmp_path))
    assert {auth for _, auth, _ in bad_pacs.requests} == {"Bearer s3cret-token"}
    monkeypatch.delenv("RESDX_PACS_TOKEN")
    monkeypatch.setenv("RESDX_PACS_USER", "reader")
    monkeypatch.setenv("RESDX_PACS_PASSWORD", "pw")
    bad_pacs.requests.clear()
    bad_pacs.mode["1.2.3.2.1"] = "401"
    with pytest.raises(RejectedCase) as err:
        retrieve(parse_ref(STUDY), _cfg(bad_pacs.url, tmp_path))
    assert {auth for _, auth, _ in bad_pacs.requests} == {"Basic cmVhZGVyOnB3"}
    assert "pw" not in err.value.reason.split() and "reader" not in err.value.reason


def test_ingest_takes_remote_rows_beside_local_ones_and_rejects_only_the_bad_study(bad_pacs, tmp_path):
    from helpers import ingest_params, read_index

    from pipeline.stages.ingest import run_ingest

    local = write_ct_series(tmp_path / "local", n=4, size=16, seed=3)[0].parent
    bad_pacs.mode["1.2.3.2.2"] = "truncated"
    manifest = tmp_path / "m.csv"
    manifest.write_text("case_id,patient_id,modality,path,label,split,series_uid\n"
                        f"r1,p1,CT,dicomweb:{STUDY},1,train,1.2.3.2.1\n"
                        f"r2,p2,CT,dicomweb:{STUDY}/1.2.3.2.2,0,train,\n"
                        f"l1,p3,CT,{local},0,train,\n"
                        "r3,p4,CT,dicomweb:1.2.x,1,train,\n")
    params = ingest_params(tmp_path, spacing=[4.0, 4.0, 4.0], shape=[8, 8, 8], workers=1, min_slices=3,
                           max_rejected_fraction=1.0)
    params = params.model_copy(update={"pacs": _cfg(bad_pacs.url, tmp_path)})
    run_ingest(params, manifest=manifest, progress=False)
    rows = {r["case_id"]: r for r in read_index(tmp_path / "out")}
    assert {k: (r["status"], r["reason_code"]) for k, r in rows.items()} == {
        "r1": ("ok", ""), "r2": ("rejected", "pacs_truncated"), "l1": ("ok", ""),
        "r3": ("rejected", "bad_manifest_row")}
    text = "".join(p.read_text(errors="ignore") for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert STUDY not in text and "1.2.3.2.1" not in text
