"""The ingest stage end to end on a synthesized cohort of real DICOM/NIfTI files."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import ingest_params, read_index
from scipy import ndimage

from pipeline.core.preprocess import resample_to_grid
from pipeline.stages.ingest import run_ingest

REPO = Path(__file__).resolve().parents[1]


# Ingest params of these tests: helpers.ingest_params with two workers at 5 mm.
_params = partial(ingest_params, seed=3, workers=2, spacing=[5.0, 5.0, 5.0])


@pytest.fixture(scope="module")
def ingested(demo_cohort, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ingest")
    params = _params(tmp)
    summary = run_ingest(params, manifest=demo_cohort, progress=False)
    return params, summary, tmp / "out"


def test_every_row_is_accounted_for_and_ok(ingested, demo_cohort):
    _, summary, out = ingested
    with demo_cohort.open() as fh:
        n_rows = sum(1 for _ in csv.DictReader(fh))
    rows = read_index(out)
    assert len(rows) == n_rows == summary.n_rows == summary.n_ok + summary.n_rejected
    assert all(r["status"] == "ok" for r in rows), [r["reason"] for r in rows if r["status"] != "ok"]


def test_tensors_are_pickle_free_memory_mapped_and_normalized(ingested):
    _, _, out = ingested
    for r in read_index(out):
        t = np.load(out / r["tensor"], mmap_mode="r", allow_pickle=False)
        assert isinstance(t, np.memmap) and t.shape == (1, 48, 48, 48) and t.dtype == np.float32
        assert np.isfinite(t).all() and t.std() > 0.1


def test_splits_are_patient_level_and_stratified(ingested, tmp_path, demo_cohort):
    _, _, out = ingested
    rows = read_index(out)
    run_ingest(_params(tmp_path, splits_file=str(tmp_path / "splits.csv")), manifest=demo_cohort, progress=False)
    written = list(csv.DictReader((tmp_path / "splits.csv").open()))
    assert {(r["case_id"], r["split"]) for r in written} == {(r["case_id"], r["split"]) for r in rows}
    rows = rows + [dict(r, case_id="again-" + r["case_id"]) for r in written]
    split_of: dict[str, set] = {}
    for r in rows:
        split_of.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values()), split_of
    assert {r["split"] for r in rows} == {"train", "val", "test"}


def test_plan_records_every_decision_fitted_on_train(ingested):
    _, _, out = ingested
    plan = json.loads((out / "plan.json").read_text())
    assert plan["orientation"] == "RAS" and plan["shape"] == [48, 48, 48] and plan["target_spacing"] == [5, 5, 5]
    assert plan["fitted_on"] == "train"
    lo, hi = plan["ct"]["window"]
    assert -600 < lo < 0 < 300 < hi < 1500  # soft tissue .. bone, from the training foreground percentiles
    assert plan["ct"]["std"] > 0 and plan["mr"]["normalization"] == "per-image z-score"


def test_lesions_land_where_the_scanner_put_them(ingested, demo_cohort):
    """Geometry through the whole chain: for every orientation, flip, slice order and storage,
    the ground-truth lesion mask (native grid) taken into the tensor grid through the saved
    tensor affine covers voxels brighter than the tissue around them."""
    _, _, out = ingested
    truth = json.loads((demo_cohort.parent.parent / "data" / "truth.json").read_text())["cases"]
    root = demo_cohort.parent.parent / "data"
    checked = 0
    for case in truth:
        if case["label"] != 1:
            continue
        side = json.loads((out / "tensors" / f"{case['case_id']}.json").read_text())
        tensor = np.load(out / "tensors" / f"{case['case_id']}.npy")[0]
        mask_img = nib.load(root / case["mask"])
        mask = resample_to_grid(np.asarray(mask_img.dataobj, np.float32), mask_img.affine, tensor.shape,
                                np.array(side["tensor_affine"]), order=1) > 0.5
        assert mask.sum() > 3, case["case_id"]
        centre = np.linalg.inv(np.array(side["tensor_affine"])) @ np.array(case["lesion_centre_ras"] + [1.0])
        ijk = tuple(int(round(c)) for c in centre[:3])
        assert mask[ijk], case["case_id"]
        ring = ndimage.binary_dilation(mask, iterations=2) & ~mask
        assert tensor[mask].mean() > tensor[ring].mean() + 0.1 * tensor.std(), case["case_id"]
        checked += 1
    assert checked >= 3


def test_rerun_on_unchanged_inputs_does_no_work(ingested, demo_cohort):
    params, first, out = ingested
    again = run_ingest(params, manifest=demo_cohort, progress=False)
    assert again.n_cached == again.n_rows and again.n_reused == again.n_ok == first.n_ok


def test_changed_parameter_redoes_only_the_affected_pass(demo_cohort, tmp_path):
    params = _params(tmp_path)
    run_ingest(params, manifest=demo_cohort, progress=False)
    changed = _params(tmp_path, shape=[40, 40, 40])
    s = run_ingest(changed, manifest=demo_cohort, progress=False)
    assert s.n_cached == s.n_rows and s.n_reused == 0
    first = read_index(tmp_path / "out")[0]
    assert np.load(tmp_path / "out" / first["tensor"]).shape[1:] == (40, 40, 40)


def test_changed_input_redoes_only_that_case(demo_cohort, tmp_path):
    import shutil

    data = tmp_path / "cohort"
    shutil.copytree(demo_cohort.parent.parent, data)
    manifest = data / "manifests" / "demo.csv"
    params = _params(tmp_path, ct={"window": [-200.0, 300.0]})  # fixed plan: one case cannot shift it
    run_ingest(params, manifest=manifest, progress=False)
    rows = list(csv.DictReader(manifest.open()))
    mr = next(r for r in rows if r["modality"] == "MR")
    path = (manifest.parent / mr["path"]).resolve()
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 2, img.affine, img.header), path)
    s = run_ingest(params, manifest=manifest, progress=False)
    assert s.n_cached == s.n_rows - 1


@pytest.mark.parametrize("mode,channels", [("2d", 1), ("2.5d", 3)])
def test_2d_modes_extract_axial_slices_keeping_ids(demo_cohort, tmp_path, mode, channels):
    params = _params(tmp_path, mode=mode, slices_per_case=8, shape=[32, 32, 32])
    run_ingest(params, manifest=demo_cohort, progress=False)
    r = read_index(tmp_path / "out")[0]
    t = np.load(tmp_path / "out" / r["tensor"])
    assert t.shape == (8, channels, 32, 32)
    side = json.loads((tmp_path / "out" / "tensors" / f"{r['case_id']}.json").read_text())
    assert side["slice_index"] == sorted(side["slice_index"]) and len(side["slice_index"]) == 8
    assert r["patient_id"] and r["case_id"]


def test_same_inputs_give_identical_tensors(demo_cohort, tmp_path, ingested):
    _, _, out = ingested
    params = _params(tmp_path)
    run_ingest(params, manifest=demo_cohort, progress=False)
    for r in read_index(out):
        np.testing.assert_array_equal(np.load(out / r["tensor"]), np.load(tmp_path / "out" / r["tensor"]))


def test_first_pass_resampling_gives_the_one_paths_tensors(ingested, demo_cohort, tmp_path, monkeypatch):
    """With ingest.spacing set, ingest resamples in its first pass (the source read once); its tensors are
    those of `preprocess_case` (what predict and serving run) bit for bit, and those of the two-pass path (a
    grid fitted from the fingerprint is resampled in the second pass), forced here onto the same grid."""
    import pipeline.stages.ingest as ingest_stage
    from pipeline.core.plan import load_plan
    from pipeline.core.preprocess import preprocess_case
    from pipeline.io.reader import read_case
    from pipeline.sources.manifest import read_manifest

    params, _, out = ingested
    plan = load_plan(out / "plan.json")
    rows = {r.case_id: r for r in read_manifest(demo_cohort)}
    index = read_index(out)
    for r in [r for r in index if r["modality"] == "CT"][:3] + [r for r in index if r["modality"] == "MR"][:3]:
        row = rows[r["case_id"]]
        case = preprocess_case(read_case(row.path, row.modality, plan.reader, row.series_uid), row.modality, plan)
        np.testing.assert_array_equal(np.load(out / r["tensor"]), case.tensor)
    monkeypatch.setattr(ingest_stage, "fixed_geometry", lambda _params: None)
    two_pass = run_ingest(_params(tmp_path), manifest=demo_cohort, progress=False)
    assert two_pass.n_ok == len([r for r in index if r["status"] == "ok"])
    assert not any("grid" in json.loads(f.read_text()) for f in (tmp_path / "cache" / "prepared").glob("*.json"))
    for r in index:
        np.testing.assert_array_equal(np.load(out / r["tensor"]), np.load(tmp_path / "out" / r["tensor"]))


def test_killed_run_leaves_no_half_files_and_rerun_finishes(demo_cohort, tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        f"seed: 3\ningest:\n  out_dir: {tmp_path / 'out'}\n  cache_dir: {tmp_path / 'cache'}\n"
        "  workers: 1\n  spacing: [5.0, 5.0, 5.0]\n  splits_file: null\n")
    cmd = [sys.executable, "-m", "pipeline.cli", "ingest", "--manifest", str(demo_cohort), "--params", str(params_file)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    prepared = tmp_path / "cache" / "prepared"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(prepared.glob("*.json"))) < 6:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # A case's first pass writes its canonical entry, then (the grid is fixed: ingest.spacing) its resampled one.
    done_before = sum("grid" in json.loads(f.read_text()) for f in prepared.glob("*.json"))
    assert 1 <= done_before
    assert not (tmp_path / "out" / "index.csv").exists() or done_before == len(read_index(tmp_path / "out"))
    for f in prepared.glob("*.npy"):
        np.load(f, allow_pickle=False)  # every visible file is complete
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_index(tmp_path / "out")
    assert all(r["status"] == "ok" for r in rows)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_cached"] >= done_before - 1  # a json may land between kill and count


def test_rejected_fraction_ceiling_fails_the_stage_after_writing_the_index(demo_cohort, tmp_path):
    from pipeline.errors import IngestFailed

    bad = tmp_path / "m.csv"
    lines = demo_cohort.read_text().splitlines()
    # label 1: with the two label-0 demo rows, a training cohort of two classes (manifest.split_rows)
    rows = [lines[0]] + lines[1:3] + [f"bad{i},pbad{i},CT,{tmp_path}/nowhere{i},1," for i in range(3)]
    bad.write_text("\n".join(rows) + "\n")
    text = bad.read_text().replace("../", str(demo_cohort.parent) + "/../")
    bad.write_text(text)
    with pytest.raises(IngestFailed, match="max_rejected_fraction"):
        run_ingest(_params(tmp_path, max_rejected_fraction=0.2), manifest=bad, progress=False)
    rows = read_index(tmp_path / "out")
    assert len(rows) == 5 and sum(r["status"] == "ok" for r in rows) == 2
    assert {r["reason_code"] for r in rows if r["status"] != "ok"} == {"missing_path"}


def test_the_plan_is_typed_and_carries_the_reader_settings(ingested):
    from pipeline.core.plan import PLAN_VERSION, load_plan

    params, _, out = ingested
    plan = load_plan(out / "plan.json")
    assert plan.version == PLAN_VERSION and plan.source == "manifest" and plan.reads_studies
    # The reader settings are decisions of the plan: a registered model reads new studies with these,
    # never with whatever the params say at prediction time.
    assert plan.reader.take_volume == params.ingest.take_volume
    assert plan.reader.min_slices == params.ingest.min_slices
    assert plan.reader.ct_foreground_hu == params.ingest.ct.foreground_hu
    assert len(plan.hash()) == 32 and plan.hash() == load_plan(out / "plan.json").hash()


def test_masks_are_recorded_on_the_native_grid_and_follow_edits(demo_cohort, tmp_path):
    """Explain scores localisation on ingest's copy of each mask: it reads no raw mask, and a mask edit
    reaches it through ingest (whose deps DVC tracks)."""
    from pipeline.io.tensors import read_native_mask, read_sidecar
    from pipeline.sources.manifest import read_manifest

    rows = [r for r in read_manifest(demo_cohort) if r.mask_path is not None][:2]
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "patient_id", "modality", "path", "label", "mask_path", "split"])
        for r in rows:
            mask = tmp_path / f"{r.case_id}_mask.nii.gz"
            mask.write_bytes(r.mask_path.read_bytes())
            # split test: the two rows may share one class, which a training cohort may not (split_rows)
            w.writerow([r.case_id, r.patient_id, r.modality, r.path, r.label, mask, "test"])
    params = _params(tmp_path)
    run_ingest(params, manifest=manifest, progress=False)
    out = tmp_path / "out"
    cid = rows[0].case_id
    recorded = read_native_mask(out, cid)
    source = np.asarray(nib.load(str(rows[0].mask_path)).dataobj) > 0
    assert recorded is not None and recorded.dtype == bool
    assert recorded.shape == tuple(read_sidecar(out, cid)["native_shape"])
    np.testing.assert_array_equal(recorded, source)

    edited = nib.load(str(tmp_path / f"{cid}_mask.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(edited.shape, np.uint8), edited.affine), tmp_path / f"{cid}_mask.nii.gz")
    run_ingest(params, manifest=manifest, progress=False)
    assert not read_native_mask(out, cid).any()  # the edit reached ingest's copy
    np.testing.assert_array_equal(read_native_mask(out, rows[1].case_id),
                                  np.asarray(nib.load(str(rows[1].mask_path)).dataobj) > 0)
