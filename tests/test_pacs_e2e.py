"""PACS in, PACS out, against a real Orthanc with its DICOMweb plugin (tests/pacs_fixtures.py).

A demo CT study with PHI planted in its headers is pushed (STOW-RS), predicted by StudyInstanceUID with
the registered champion, and its SR, Parametric Map and Secondary Capture are stored into the same
study. Both halves of the PHI boundary are checked: the results reference the source by its real
UIDs and carry its patient; nothing from those headers reaches a research artifact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from helpers import dciodvfy_errors, read_index, register_tiny_champion
from pacs_fixtures import orthanc  # noqa: F401 - the fixture

from pipeline.config import ExplainConfig, PacsConfig, params_from_dict

pytestmark = pytest.mark.slow
NAME = "resdx-pacs"
CHAMPION = f"models:/{NAME}@champion"
PHI = {"PatientName": "Doe^Jane^Q", "PatientID": "MRN-20261202-77", "PatientBirthDate": "19510203",
       "AccessionNumber": "ACC99887766", "InstitutionName": "St Example Hospital", "ReferringPhysicianName": "Who^Dr",
       "StudyDate": "20260314", "StudyID": "STUDY4242"}


@pytest.fixture(scope="module")
def study(demo_cohort, tmp_path_factory) -> dict:
    """One demo CT study copied with PHI planted in every header (the UIDs are the source's own)."""
    from pipeline.sources.manifest import read_manifest

    case = next(r for r in read_manifest(demo_cohort) if r.modality == "CT" and r.path.is_dir())
    folder = tmp_path_factory.mktemp("phi") / "Doe_Jane_MRN-20261202-77"
    shutil.copytree(case.path, folder)
    dicom = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.read_bytes()[128:132] == b"DICM"]
    by_series: dict[str, set[str]] = {}
    for f in dicom:  # the demo's folders also hold a localizer slice and a text note
        ds = pydicom.dcmread(f)
        for key, value in PHI.items():
            setattr(ds, key, value)
        ds.save_as(f)
        by_series.setdefault(str(ds.SeriesInstanceUID), set()).add(str(ds.SOPInstanceUID))
    series = max(by_series, key=lambda uid: len(by_series[uid]))  # the CT the reader chooses, not the localizer
    return {"folder": folder, "study_uid": str(ds.StudyInstanceUID), "series_uid": series,
            "sops": by_series[series], "n_dicom": len(dicom)}


@pytest.fixture(scope="module")
def champion(tiny_ingested, tmp_path_factory):
    return register_tiny_champion(tmp_path_factory.mktemp("pacs-model"), tiny_ingested, NAME)


@pytest.fixture(scope="module")
def flow(orthanc, study, champion, tmp_path_factory):  # noqa: F811 - the fixture
    """Push, predict by UID with DICOM results, and predict the local copy: (records, pacs config, tmp)."""
    from pipeline.stages.pacs import push_folder
    from pipeline.stages.predict import run_predict

    tmp = tmp_path_factory.mktemp("flow")
    cfg = PacsConfig(url=orthanc.dicomweb_url, cache_dir=tmp / "dicomweb-cache")
    pushed = push_folder(study["folder"], cfg, progress=False)
    assert (pushed["n_stored"], pushed["n_failed"], pushed["n_studies"], pushed["n_other"]) == \
        (study["n_dicom"], 0, 1, 1)
    # The map of "lesion" (class 1), whatever the tiny model decides: a real map, not an empty one.
    kw = {"tracking_uri": champion.mlflow.tracking_uri, "progress": False, "pacs": cfg,
          "explain": ExplainConfig(class_index=1)}
    remote = run_predict(CHAMPION, [f"dicomweb:{study['study_uid']}"], tmp / "out", dicom_results=True, **kw)
    local = run_predict(CHAMPION, [study["folder"]], tmp / "out-local", dicom_results=True, saliency=True,
                        dicom_out=tmp / "local-dicom", **kw)
    again = run_predict(CHAMPION, [f"dicomweb:{study['study_uid']}"], tmp / "out-again", **kw)
    return {"remote": remote["records"][0], "local": local["records"][0], "again": again["records"][0],
            "cfg": cfg, "tmp": tmp, "client": DICOMwebClient(url=orthanc.dicomweb_url)}


def _series(client, study_uid: str) -> dict[str, list]:
    """Modality -> the study's instances of that modality, retrieved whole."""
    out: dict[str, list] = {}
    for s in client.search_for_series(study_instance_uid=study_uid):
        uid, modality = s["0020000E"]["Value"][0], s["00080060"]["Value"][0]
        desc = (s.get("0008103E") or {}).get("Value", [""])[0]
        key = "SC" if desc.startswith("ResDx saliency overlay") else modality
        out.setdefault(key, []).extend(client.retrieve_series(study_uid, uid))
    return out


def test_results_land_in_the_source_study_and_state_the_local_prediction(flow, study):
    remote, local = flow["remote"], flow["local"]
    assert remote["status"] == local["status"] == "ok"
    assert remote["dicom_results"] == {"stored_to": "pacs", "sr": 1, "parametric_map": 1,
                                       "secondary_capture": len(study["sops"])}
    assert remote["probabilities"] == local["probabilities"]  # same bytes, same reader, same model
    from pipeline.io.dicom_results import read_sr_probabilities

    objs = _series(flow["client"], study["study_uid"])
    assert set(objs) == {"CT", "SR", "OT", "SC"}, set(objs)  # source, SR, Parametric Map (OT), overlay
    (sr,), (pmap,) = objs["SR"], objs["OT"]
    assert sr.StudyInstanceUID == pmap.StudyInstanceUID == study["study_uid"]
    assert read_sr_probabilities(sr) == {"lesion": remote["probabilities"]["lesion"]}
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert evidence == study["sops"]
    assert str(sr.PatientName) == PHI["PatientName"] and sr.PatientID == PHI["PatientID"]  # PACS side: real identity
    assert {str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) for sc in objs["SC"]} == study["sops"]


def test_the_parametric_map_sits_on_the_source_geometry(flow, study):
    objs = _series(flow["client"], study["study_uid"])
    (pmap,) = objs["OT"]
    sources = [s for s in objs["CT"] if s.SeriesInstanceUID == study["series_uid"]]
    positions = sorted(tuple(float(v) for v in s.ImagePositionPatient) for s in sources)
    frames = pmap.PerFrameFunctionalGroupsSequence
    assert sorted(tuple(float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient) for f in frames) \
        == positions
    shared = pmap.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == \
        [float(v) for v in sources[0].ImageOrientationPatient]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == \
        [float(v) for v in sources[0].PixelSpacing]
    assert pmap.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    import nibabel as nib

    from pipeline.io.dicom_results import read_parametric_map, source_instances

    local = nib.load(flow["tmp"] / "out-local" / flow["local"]["saliency"]).get_fdata(dtype=np.float32)
    values = read_parametric_map(pmap, source_instances(study["folder"]))  # back on the reader's grid
    assert values.dtype == np.float32 and values.shape == local.shape and local.max() > 0.5
    np.testing.assert_allclose(values, np.clip(local, 0, 1), atol=1e-6)  # the map `resdx predict --saliency` writes


def test_dciodvfy_finds_no_errors_in_the_stored_objects(flow, study, tmp_path):
    objs = _series(flow["client"], study["study_uid"])
    for kind in ("SR", "OT", "SC"):
        path = tmp_path / f"{kind}.dcm"
        objs[kind][0].save_as(path)
        assert dciodvfy_errors(path) == [], kind


def test_a_rerun_retrieves_nothing(flow):
    again = flow["again"]
    assert again["status"] == "ok" and again["probabilities"] == flow["remote"]["probabilities"]
    assert again["timing"]["instances_retrieved"] == 0 and again["timing"]["instances_cached"] > 0


def test_no_phi_reaches_the_research_side(flow, study, tiny_ingested, tmp_path):
    from pipeline.stages.ingest import run_ingest

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"case_id,patient_id,modality,path,label,split\nc1,p1,CT,dicomweb:{study['study_uid']},1,"
                        "test\n")
    params = params_from_dict({"ingest": {"out_dir": str(tmp_path / "ing"), "cache_dir": str(tmp_path / "cache"),
                                          "splits_file": None, "workers": 1, "spacing": [10.0, 10.0, 10.0],
                                          "shape": [24, 24, 24]},
                               "pacs": {"url": flow["cfg"].url, "cache_dir": str(flow["cfg"].cache_dir)}})
    run_ingest(params, manifest=manifest, progress=False)
    assert read_index(tmp_path / "ing")[0]["status"] == "ok"
    research = [flow["tmp"] / "out", flow["tmp"] / "out-again", flow["tmp"] / "out-local", tmp_path / "ing"]
    secrets = [*PHI.values(), study["study_uid"], study["series_uid"], *study["sops"], study["folder"].name,
               "Doe", "MRN-20261202-77"]
    files = [p for d in research for p in d.rglob("*") if p.is_file()]
    assert any(p.suffix == ".json" for p in files)
    for p in files:
        text = p.read_bytes().decode("latin-1")
        leaked = [s for s in secrets if s in text]
        assert not leaked, (p.relative_to(p.parents[1]), leaked)
    rec = json.loads((flow["tmp"] / "out" / f"{flow['remote']['study_id']}.json").read_text())
    assert rec["source"] == "dicomweb" and "dicom_results" in rec
    # The local study's DICOM results are PACS side, and outside OUT: they do carry the identity.
    sr = pydicom.dcmread(next((flow["tmp"] / "local-dicom").rglob("sr.dcm")))
    assert sr.StudyInstanceUID == study["study_uid"] and str(sr.PatientName) == PHI["PatientName"]


def test_a_down_server_rejects_the_study_and_the_batch_goes_on(champion, study, tmp_path):
    from pipeline.stages.predict import run_predict
    from tools.orthanc import free_port

    cfg = PacsConfig(url=f"http://127.0.0.1:{free_port()}/dicom-web", cache_dir=tmp_path / "c", timeout_s=2)
    r = run_predict(CHAMPION, [f"dicomweb:{study['study_uid']}", str(study["folder"])], tmp_path / "out",
                    tracking_uri=champion.mlflow.tracking_uri, progress=False, pacs=cfg)
    assert [(x["status"], x.get("reason_code")) for x in r["records"]] == [
        ("rejected", "pacs_unreachable"), ("ok", "")]
    assert Path(r["out_dir"]).is_dir()
