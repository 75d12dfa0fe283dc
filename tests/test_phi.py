"""No PHI reaches any ingest output: not index.csv, plan.json, summary.json, tensors, the cache, or the logs.

Distinctive identifiers are planted in DICOM headers (and a NIfTI header), the synthesized cohort's own fake
PHI is read back from its files, ingest runs in-process and through the `resdx` CLI, and every byte written
is searched for every identifier and its common date spellings.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import re
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml
from helpers import ingest_config, read_index, write_ct_series
from pydicom.errors import InvalidDicomError

from pipeline.config import SynthesizeConfig, params_from_dict
from pipeline.stages.ingest import run_ingest
from pipeline.stages.synthesize import synthesize

UID_ROOT = "1.2.826.0.1.3680043.99.777"
PLANTED = {
    "PatientName": "Zyxwvut^Qwertyuiop",
    "PatientID": "PHI-7731-X",
    "PatientBirthDate": "19230417",
    "AccessionNumber": "ACX90412733",
    "InstitutionName": "Blauwhorst Sanatorium",
    "ReferringPhysicianName": "Krumpelbaum^Ottoline^^Dr",
    "StudyDate": "20210321",
    "SeriesDate": "20210321",
    "AcquisitionDate": "20210321",
    "ContentDate": "20210321",
    "OtherPatientIDs": "MRN-PHI-99812",
    "StudyInstanceUID": f"{UID_ROOT}.1",
    "FrameOfReferenceUID": f"{UID_ROOT}.4",
}
# Header fields whose values identify a patient or a study (times and short counters are left out: too generic).
PHI_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
            "ReferringPhysicianName", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "OtherPatientIDs",
            "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
MANIFEST_COLUMNS = ["case_id", "patient_id", "modality", "path", "label", "split", "series_uid", "mask_path"]


# ----------------------------------------------------------------------------- builders
def write_phi_series(folder: Path, n: int = 5, *, tag: int = 1, phi: dict | None = None, **kw) -> list[Path]:
    """A CT series (helpers.write_ct_series) whose headers carry `phi`; UIDs are distinctive, under UID_ROOT."""
    return write_ct_series(folder, n, size=20, origin=(-15.0, -15.0, 0.0), pixel_spacing="1.25", image_type=None,
                           uid_root=UID_ROOT, tag=tag, tags={"SpecificCharacterSet": "ISO_IR 100", **(phi or {})}, **kw)


def write_nifti_with_phi(path: Path) -> Path:
    """A NIfTI whose free-text header fields hold PHI, as some converters leave them."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    img = nib.Nifti1Image(np.random.default_rng(5).uniform(0, 100, (12, 12, 8)).astype(np.float32), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header["descrip"] = b"Zyxwvut^Qwertyuiop PHI-7731-X 19230417"
    img.header["aux_file"] = b"ACX90412733"
    nib.save(img, path)
    return path


# ----------------------------------------------------------------------------- the search
def date_variants(value: str) -> list[str]:
    """YYYYMMDD plus the spellings a date may take once formatted."""
    if not re.fullmatch(r"\d{8}", value):
        return [value]
    y, m, d = value[:4], value[4:6], value[6:]
    return [value, f"{y}-{m}-{d}", f"{y}/{m}/{d}", f"{y}.{m}.{d}", f"{d}.{m}.{y}", f"{d}/{m}/{y}", f"{m}/{d}/{y}",
            f"{d}-{m}-{y}", f"{m}-{d}-{y}"]


def identifier_patterns(values: list[str]) -> dict[str, re.Pattern]:
    """One regex per spelling of each identifier; names also by their parts, numbers only as whole numbers."""
    out: dict[str, re.Pattern] = {}
    for value in {v.strip() for v in values if v and v.strip()}:
        spellings = date_variants(value)
        if "^" in value:
            parts = [p for p in value.split("^") if len(p) >= 4]
            spellings += parts + [" ".join(parts), ", ".join(parts), " ".join(reversed(parts))]
        for s in spellings:
            body = re.escape(s)
            if s[0].isdigit():
                body = r"(?<![\d.])" + body  # digits/UIDs must not match inside a longer number
            if s[-1].isdigit():
                body += r"(?![\d])"
            out[s] = re.compile(body.encode("latin-1"), re.IGNORECASE)
    return out


def _npy_header(path: Path) -> bytes:
    with path.open("rb") as fh:
        version = np.lib.format.read_magic(fh)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        reader(fh)  # advances past the header
        return path.read_bytes()[: fh.tell()]


def output_blobs(*folders: Path) -> dict[str, bytes]:
    """Every file under the folders: whole text files, the header of .npy files."""
    blobs = {}
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            blobs[str(path)] = _npy_header(path) if path.suffix == ".npy" else path.read_bytes()
    return blobs


def find_phi(blobs: dict[str, bytes], patterns: dict[str, re.Pattern]) -> list[tuple[str, str]]:
    return [(name, s) for name, blob in blobs.items() for s, pat in patterns.items() if pat.search(blob)]


def dicom_phi(folder: Path) -> list[str]:
    """The PHI_TAGS values of every DICOM file under `folder` (the synthesized cohort's fake PHI)."""
    values = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            continue
        values += [str(ds.get(tag, "") or "") for tag in PHI_TAGS]
    return [v for v in values if v]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The synthesized cohort plus planted-PHI cases, in one manifest with pseudonymous ids only."""
    root = tmp_path_factory.mktemp("phi")
    cfg = SynthesizeConfig(out_dir=root / "demo", manifest=root / "synth.csv", n_patients=3)
    synthesize(cfg, seed=0)
    with cfg.manifest.open(newline="") as fh:
        rows = [dict(r, split="train") for r in csv.DictReader(fh)]
    synth_phi = dicom_phi(cfg.out_dir)

    planted = root / "planted"
    write_phi_series(planted / "ok", tag=1, phi=PLANTED, seed=1)
    write_phi_series(planted / "by_series_uid", tag=2, phi=PLANTED, seed=2)
    # A second series in the same folder, for the manifest's series_uid to choose between.
    write_phi_series(planted / "by_series_uid", tag=3, n=3, phi=PLANTED, prefix="B", seed=3)
    gap = [(-15.0, -15.0, z) for z in (0.0, 2.5, 5.0, 10.0, 12.5)]
    write_phi_series(planted / "missing_slice", tag=4, positions=gap, phi=PLANTED, seed=4)
    write_phi_series(planted / "modality_mismatch", tag=5, phi=PLANTED, seed=5)
    write_nifti_with_phi(planted / "mr.nii.gz")
    rows += [
        {"case_id": "site-c101", "patient_id": "site-p101", "modality": "CT", "path": "planted/ok", "label": "1"},
        {"case_id": "site-c102", "patient_id": "site-p101", "modality": "CT", "path": "planted/by_series_uid",
         "label": "1", "series_uid": f"{UID_ROOT}.2.2"},
        {"case_id": "site-c103", "patient_id": "site-p102", "modality": "CT", "path": "planted/missing_slice",
         "label": "0"},
        {"case_id": "site-c104", "patient_id": "site-p102", "modality": "MR", "path": "planted/modality_mismatch",
         "label": "0"},
        {"case_id": "site-c105", "patient_id": "site-p103", "modality": "MR", "path": "planted/mr.nii.gz",
         "label": "0"},
    ]
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows({"split": "train", **r} for r in rows)

    identifiers = list(PLANTED.values()) + [UID_ROOT] + dicom_phi(planted) + synth_phi
    return {"root": root, "manifest": manifest, "rows": rows, "synth_phi": synth_phi,
            "patterns": identifier_patterns(identifiers)}


# The ingest section of these runs: helpers.ingest_config at 5 mm / 24^3, one worker, no rejection ceiling.
_ingest_cfg = partial(ingest_config, workers=1, spacing=[5.0, 5.0, 5.0], shape=[24, 24, 24], max_rejected_fraction=1.0)


@pytest.fixture(scope="module")
def in_process(cohort, tmp_path_factory):
    """Run ingest in this process, capturing stdout, stderr, log records and warnings as one text."""
    root = tmp_path_factory.mktemp("phi_run")
    params = params_from_dict({"seed": 0, "ingest": _ingest_cfg(root)})
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # progress=True: the progress bar is part of what a user's terminal log shows.
            summary = run_ingest(params, manifest=cohort["manifest"], progress=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    log = stream.getvalue() + "\n".join(str(w.message) for w in caught)
    return root, summary, log


@pytest.fixture(scope="module")
def cli_run(cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("phi_cli")
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump({"seed": 0, "ingest": _ingest_cfg(root, workers=2)}))
    resdx = Path(sys.executable).with_name("resdx")
    assert resdx.exists(), resdx
    proc = subprocess.run([str(resdx), "ingest", "--manifest", str(cohort["manifest"]), "--out", str(root / "out"),
                           "--params", str(params_file)], capture_output=True, cwd=root, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "HOME": str(root)})
    return root, proc


# ----------------------------------------------------------------------------- tests
def test_the_inputs_really_carry_the_phi(cohort):
    """Positive control: the same search finds every planted identifier in the input files."""
    blobs = output_blobs(cohort["root"] / "planted")
    found = {s for _, s in find_phi(blobs, cohort["patterns"])}
    for value in ("Zyxwvut^Qwertyuiop", "PHI-7731-X", "19230417", "ACX90412733", "Blauwhorst Sanatorium",
                  "Krumpelbaum^Ottoline^^Dr", "20210321", f"{UID_ROOT}.1", f"{UID_ROOT}.2.1", f"{UID_ROOT}.3.1.1"):
        assert value in found or any(value in s for s in found), value
    # The synthesized cohort has fake names, MRNs, birth dates, accession numbers and institutions.
    assert len(cohort["synth_phi"]) > 50
    assert any("^" in v for v in cohort["synth_phi"]) and any(v.startswith("MRN") for v in cohort["synth_phi"])
    names_and_mrns = identifier_patterns([v for v in cohort["synth_phi"] if "^" in v or v.startswith("MRN")])
    firsts = [sorted(d.glob("IM_*"))[0] for d in (cohort["root"] / "demo").rglob("dicom")]
    first_files = {str(p): p.read_bytes() for p in firsts}
    assert len(first_files) >= 1 and all(find_phi({k: v}, names_and_mrns) for k, v in first_files.items())


def test_search_catches_date_variants_and_ignores_longer_numbers():
    pats = identifier_patterns(["19230417", "Zyxwvut^Qwertyuiop"])
    assert find_phi({"a": b'{"born": "1923-04-17"}'}, pats) == [("a", "1923-04-17")]
    assert find_phi({"a": b"17.04.1923"}, pats) == [("a", "17.04.1923")]
    assert find_phi({"a": b"qwertyuiop"}, pats) == [("a", "Qwertyuiop")]
    assert find_phi({"a": b"0.192304170001 and 119230417"}, pats) == []


def test_ingest_outputs_hold_no_phi(cohort, in_process):
    root, summary, log = in_process
    assert summary.n_rows == len(cohort["rows"])
    assert "reading" in log  # the capture did see the progress output
    blobs = output_blobs(root / "out", root / "cache")
    assert {Path(n).name for n in blobs} >= {"index.csv", "plan.json", "summary.json", "site-c101.npy",
                                            "site-c101.json"}
    assert any(n.endswith(".json") and "/cache/" in n for n in blobs)
    blobs["log"] = log.encode("utf-8", "replace")
    assert find_phi(blobs, cohort["patterns"]) == []


def test_cli_outputs_and_logs_hold_no_phi(cohort, cli_run):
    root, proc = cli_run
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    assert b"ingest summary" in proc.stderr + proc.stdout
    blobs = output_blobs(root / "out", root / "cache")
    blobs["stdout"], blobs["stderr"] = proc.stdout, proc.stderr
    assert find_phi(blobs, cohort["patterns"]) == []


@pytest.mark.parametrize("run", ["in_process", "cli_run"])
def test_index_ids_are_exactly_the_manifest_pseudonyms(cohort, run, request):
    root = request.getfixturevalue(run)[0]
    rows = read_index(root / "out")
    assert [(r["case_id"], r["patient_id"]) for r in rows] == [(r["case_id"], r["patient_id"]) for r in cohort["rows"]]
    status = {r["case_id"]: (r["status"], r["reason_code"]) for r in rows}
    # The planted cases went through both the ok and the rejected paths.
    assert status["site-c101"] == ("ok", "") and status["site-c102"] == ("ok", "")
    assert status["site-c103"] == ("rejected", "missing_slice")
    assert status["site-c104"] == ("rejected", "modality_mismatch")
    assert status["site-c105"] == ("ok", "")
    tensors = sorted(p.stem for p in (root / "out" / "tensors").glob("*.npy"))
    assert tensors == sorted(c for c, (s, _) in status.items() if s == "ok")


def test_phi_in_folder_names_stays_out_of_reasons(tmp_path):
    """Exports often name folders after the patient; rejection reasons must not echo the path."""
    base = tmp_path / "Zyxwvut_Qwertyuiop_PHI-7731-X_19230417"
    (base / "empty").mkdir(parents=True)
    write_phi_series(base / "gap", tag=9, positions=[(0.0, 0.0, z) for z in (0.0, 2.5, 7.5, 10.0)], seed=9)
    (base / "text").mkdir()
    (base / "text" / "readme.txt").write_text("not DICOM\n")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("case_id,patient_id,modality,path,label,split\n"
                        f"x1,q1,CT,{base / 'empty'},0,train\n"
                        f"x2,q2,CT,{base / 'gone'},1,train\n"  # two classes: a training cohort
                        f"x3,q3,CT,{base / 'gap'},0,train\n"
                        f"x4,q4,CT,{base / 'text'},0,train\n"
                        f"x5,q5,MR,{base / 'gone.nii.gz'},0,train\n")
    params = params_from_dict({"ingest": _ingest_cfg(tmp_path)})
    summary = run_ingest(params, manifest=manifest, progress=False)
    assert summary.n_rejected == 5
    patterns = identifier_patterns(["Zyxwvut^Qwertyuiop", "PHI-7731-X", "19230417", "Zyxwvut_Qwertyuiop"])
    assert find_phi(output_blobs(tmp_path / "out", tmp_path / "cache"), patterns) == []
