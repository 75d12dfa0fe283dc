"""Hostile DICOM and NIfTI: sizes known before allocating, geometry validated, no silent slice loss.

Each class of the hostile-input issue is checked at its root: property tests (hypothesis) over header
values with a small `max_bytes` and `tracemalloc` watching every numpy allocation, plus one example per
named failure. The whole-corpus run under `ulimit -v` is tests/test_hostile_corpus.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.core.limits import require_fits
from pipeline.core.preprocess import resample, zoom
from pipeline.errors import RejectedCase, ResDxError
from pipeline.io.dicom import read_dicom_series
from pipeline.io.folder_lock import folder_lock, remove_temp_files
from pipeline.io.nifti import read_nifti
from pipeline.progress import progress_map

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from hostile_corpus import ct_series, deflate_bomb, nifti, nifti_header_only, rgb_secondary_capture  # noqa: E402

MiB = 2**20
SMALL = 8 * MiB  # the ceiling in the property tests: every allocation must stay within a few times it
GEOMETRY_CODES = {"bad_orientation", "bad_position", "bad_pixel_spacing", "duplicate_positions", "missing_slice",
                  "nonuniform_spacing", "noncollinear_slices", "too_large", "non_finite"}
PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _peak(fn) -> tuple[object, int]:
    """(result or the RejectedCase raised, peak bytes traced while `fn` ran); numpy reports to tracemalloc."""
    tracemalloc.start()
    try:
        try:
            out = fn()
        except RejectedCase as err:
            out = err
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ----------------------------------------------------------------------------- 1. sizes before allocation
def test_require_fits_refuses_absurd_claims_without_overflow():
    assert require_fits((600, 512, 512), 4, 700 * MiB, "x") == 600 * 512 * 512 * 4
    with pytest.raises(RejectedCase) as err:
        require_fits((2**40, 2**40, 2**40), 8, 700 * MiB, "the claim")
    assert err.value.code == "too_large" and "ingest.max_case_bytes" in err.value.reason


@PROPERTY
@given(rows=st.integers(1, 65535), cols=st.integers(1, 65535), frames=st.integers(1, 4096),
       bits=st.sampled_from([1, 8, 12, 16, 32, 64]))
def test_any_matrix_claim_is_refused_or_decoded_within_the_ceiling(tmp_path_factory, rows, cols, frames, bits):
    folder = tmp_path_factory.mktemp("claim")
    tags = {"Rows": rows, "Columns": cols, "BitsAllocated": bits, "BitsStored": min(bits, 16),
            "HighBit": min(bits, 16) - 1}
    if frames > 1:
        tags["NumberOfFrames"] = frames

    def edit(k, ds):
        for key, value in tags.items():
            setattr(ds, key, value)
    ct_series(folder, 3, 8, edit=edit)  # 128 bytes of pixel data, whatever the header claims
    out, peak = _peak(lambda: read_dicom_series(folder, max_bytes=SMALL))
    assert isinstance(out, RejectedCase) or out.data.nbytes <= SMALL
    assert peak < 3 * SMALL, (tags, peak)


@PROPERTY
@given(shape=st.lists(st.integers(1, 4096), min_size=3, max_size=4),
       dtype=st.sampled_from([np.uint8, np.int16, np.float32, np.float64]))
def test_any_nifti_claim_is_refused_or_read_within_the_ceiling(tmp_path_factory, shape, dtype):
    path = tmp_path_factory.mktemp("nii") / "claim.nii.gz"
    nifti_header_only(path, tuple(shape), dtype)
    out, peak = _peak(lambda: read_nifti(path, max_bytes=SMALL))
    assert isinstance(out, RejectedCase), out  # the data are missing: never a volume
    assert out.code in {"too_large", "bad_nifti"}, out
    assert peak < 3 * SMALL, (shape, peak)


def test_a_deflate_bomb_is_refused_before_it_is_inflated(tmp_path):
    (tmp_path / "s").mkdir()
    deflate_bomb(tmp_path / "s" / "IM0.dcm", 64 * MiB)
    assert (tmp_path / "s" / "IM0.dcm").stat().st_size < MiB
    out, peak = _peak(lambda: read_dicom_series(tmp_path / "s", max_bytes=SMALL))
    assert isinstance(out, RejectedCase) and out.code == "too_large", out
    assert "deflated" in out.reason and peak < 3 * SMALL, peak


@pytest.mark.parametrize("spacing", [2000.0, 1e6])
def test_a_huge_voxel_spacing_is_refused_before_resampling(spacing):
    affine = np.diag([spacing, spacing, 2.5, 1.0])
    new_shape = [int(round(32 * spacing / 5.0))] * 2 + [8]
    out, peak = _peak(lambda: resample(np.zeros((32, 32, 8), np.float32), affine, new_shape, max_bytes=SMALL))
    assert isinstance(out, RejectedCase) and out.code == "too_large" and "spacing" in out.reason
    assert peak < MiB


@PROPERTY
@given(shape=st.tuples(st.integers(2, 12), st.integers(2, 12), st.integers(2, 12)),
       new=st.tuples(st.integers(1, 15), st.integers(1, 15), st.integers(1, 15)), order=st.sampled_from([0, 1, 3]))
def test_bounded_zoom_equals_scipy_zoom(shape, new, order):
    """One axis at a time (cubic) gives scipy's 3D zoom up to float rounding; orders 0 and 1 are scipy's own."""
    from scipy import ndimage

    data = np.random.default_rng(sum(shape)).normal(0, 100, shape).astype(np.float32)
    want = ndimage.zoom(data, np.array(new) / np.array(shape), order=order, mode="nearest", grid_mode=True)
    assert want.shape == new
    got = zoom(data, new, order)
    if order < 3:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * float(np.abs(data).max()))


def test_bounded_zoom_of_a_large_volume_stays_close_to_scipy(monkeypatch):
    """Above EXACT_PREFILTER_BYTES each pass's prefilter runs in float32: within 1e-5 of scipy."""
    from scipy import ndimage

    from pipeline.core import preprocess

    monkeypatch.setattr(preprocess, "EXACT_PREFILTER_BYTES", 0)  # the float32 path, on a small volume
    data = np.random.default_rng(1).normal(0, 100, (20, 18, 9)).astype(np.float32)
    want = ndimage.zoom(data, np.array((13, 27, 11)) / np.array(data.shape), order=3, mode="nearest", grid_mode=True)
    got = zoom(data, (13, 27, 11), 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
    assert not np.array_equal(got, want)  # it is the other path


# ----------------------------------------------------------------------------- 2-3. geometry, each with its own code
FLOATS = st.one_of(st.floats(-3, 3), st.sampled_from([0.0, 1.0, -1.0, float("nan"), float("inf"), 1e9]))


@PROPERTY
@given(iop=st.lists(FLOATS, min_size=6, max_size=6), spacing=st.lists(FLOATS, min_size=2, max_size=2))
def test_any_orientation_and_spacing_gives_a_sound_affine_or_a_geometry_reason(tmp_path_factory, iop, spacing):
    folder = tmp_path_factory.mktemp("geo")
    ct_series(folder, 4, 8, iop=[f"{v:.6g}" for v in iop], spacing=tuple(f"{v:.6g}" for v in spacing))
    try:
        vol = read_dicom_series(folder, max_bytes=SMALL)
    except RejectedCase as err:
        assert err.code in GEOMETRY_CODES, err
        return
    axes = vol.affine[:3, :3]
    norms = np.linalg.norm(axes, axis=0)
    assert np.all(np.isfinite(vol.affine)) and np.all(norms > 0) and abs(np.linalg.det(axes)) > 0
    # In-plane axes are orthonormal directions times the positive PixelSpacing; the slice axis may be
    # tilted (positions off the normal: a gantry tilt, kept exact in the affine and noted).
    assert abs(float(np.dot(axes[:, 0], axes[:, 1]))) / (norms[0] * norms[1]) < 0.02
    assert np.allclose(norms[:2], [float(spacing[1]), float(spacing[0])], rtol=1e-3)


@pytest.mark.parametrize("kw, code", [
    ({"iop": [0, 0, 0, 0, 0, 0]}, "bad_orientation"),
    ({"iop": [10, 0, 0, 0, 10, 0]}, "bad_orientation"),
    ({"iop": [1, 0, 0, 0.9999, 0.0141, 0]}, "bad_orientation"),
    ({"spacing": ("NaN", "NaN")}, "bad_pixel_spacing"),
    ({"spacing": ("0", "0")}, "bad_pixel_spacing"),
    ({"spacing": ("-0.8", "-0.8")}, "bad_pixel_spacing"),
    ({"edit": lambda k, ds: setattr(ds, "ImagePositionPatient", ["NaN", "0", "0"])}, "bad_position"),
    ({"edit": lambda k, ds: (setattr(ds, "BitsAllocated", 1), setattr(ds, "BitsStored", 1))}, "unsupported_bits"),
])
def test_each_invalid_geometry_has_its_own_reason(tmp_path, kw, code):
    ct_series(tmp_path / "s", 6, 16, **kw)
    with pytest.raises(RejectedCase) as err:
        read_dicom_series(tmp_path / "s")
    assert err.value.code == code, err.value


@pytest.mark.parametrize("affine", [np.full((4, 4), np.nan), np.zeros((4, 4)),
                                    np.array([[1, 0, 0, 0], [0.99, 0.1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])])
def test_a_nifti_affine_that_cannot_place_voxels_is_refused(tmp_path, affine):
    nifti(tmp_path / "a.nii", affine)
    with pytest.raises(RejectedCase) as err:
        read_nifti(tmp_path / "a.nii")
    assert err.value.code == "bad_affine", err.value


# ----------------------------------------------------------------------------- 4. no silent slice loss
@pytest.mark.parametrize("which", [0, 3, 7])
@pytest.mark.parametrize("keep", [140, 300, 700])
def test_a_cut_file_is_a_damaged_slice_not_a_smaller_volume(tmp_path, which, keep):
    files = ct_series(tmp_path / "s", 8, 16)
    files[which].write_bytes(files[which].read_bytes()[:keep])
    with pytest.raises(RejectedCase) as err:
        read_dicom_series(tmp_path / "s")
    assert err.value.code in {"damaged_file", "truncated"}, err.value


def test_convert_refuses_a_series_with_a_cut_slice(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    files = ct_series(tmp_path / "s", 8, 16)
    files[-1].write_bytes(files[-1].read_bytes()[:300])
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "s"), str(tmp_path / "out.nii.gz")])
    assert result.exit_code == 1 and "damaged_file" in result.output
    assert not (tmp_path / "out.nii.gz").exists()


# ----------------------------------------------------------------------------- 5. no hang; a time limit per case
def test_a_fifo_in_a_series_folder_is_skipped_not_opened(tmp_path):
    ct_series(tmp_path / "s", 6, 16)
    os.mkfifo(tmp_path / "s" / "pipe")
    code = ("from pipeline.io.dicom import read_dicom_series; "
            f"print(read_dicom_series({str(tmp_path / 's')!r}).data.shape)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and "(16, 16, 6)" in proc.stdout, proc.stderr


def _sleep(task: dict) -> dict:
    import time

    time.sleep(task["s"])
    return {"slept": task["s"]}


def _die(task: dict) -> dict:
    os._exit(3)


def test_a_case_over_the_time_limit_is_stopped_and_the_rest_go_on():
    tasks = [{"s": 0.0}, {"s": 30.0}, {"s": 0.0}]
    out = progress_map(_sleep, tasks, 2, "t", show=False, timeout_s=2.0, on_fail=lambda t, why: {"failed": why})
    assert out == [{"slept": 0.0}, {"failed": "timeout"}, {"slept": 0.0}]


def test_a_worker_that_dies_ends_its_case_only():
    out = progress_map(_die, [{"s": 0}], 1, "t", show=False, timeout_s=30, on_fail=lambda t, why: {"failed": why})
    assert out == [{"failed": "died (exit code 3)"}]


def _pid_or_die(task: dict) -> dict:
    if task.get("die"):
        os._exit(3)
    if task.get("s"):
        import time

        time.sleep(task["s"])
    return {"pid": os.getpid(), "n": task["n"]}


def test_workers_are_reused_and_replaced_after_a_death_or_a_timeout(monkeypatch):
    """Long-lived workers: many tasks share a few processes; a death or a timeout costs its task only, and the
    next task runs in a fresh worker; a worker is replaced after TASKS_PER_WORKER tasks (bounded memory)."""
    from pipeline import progress

    def fail(t, why):
        return {"failed": why, "n": t["n"]}

    tasks = [{"n": n} for n in range(12)]
    out = progress_map(_pid_or_die, tasks, 2, "t", show=False, timeout_s=30, on_fail=fail)
    assert [o["n"] for o in out] == list(range(12))
    assert len({o["pid"] for o in out}) <= 2 and os.getpid() not in {o["pid"] for o in out}

    tasks = [{"n": 0}, {"n": 1, "die": True}, {"n": 2}, {"n": 3, "s": 30.0}, {"n": 4}, {"n": 5}]
    out = progress_map(_pid_or_die, tasks, 1, "t", show=False, timeout_s=2.0, on_fail=fail)
    assert [o.get("failed") for o in out] == [None, "died (exit code 3)", None, "timeout", None, None]
    assert out[0]["pid"] != out[2]["pid"] != out[4]["pid"] and out[4]["pid"] == out[5]["pid"]

    monkeypatch.setattr(progress, "TASKS_PER_WORKER", 3)
    out = progress_map(_pid_or_die, [{"n": n} for n in range(7)], 1, "t", show=False, timeout_s=30, on_fail=fail)
    pids = [o["pid"] for o in out]
    assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4] == pids[5] != pids[6]


def test_ingest_rejects_timed_out_cases_with_timeout(tmp_path):
    from helpers import ingest_params, read_index
    from test_bad_input import write_manifest

    from pipeline.stages.ingest import run_ingest

    ct_series(tmp_path / "a", 6, 16)
    write_manifest(tmp_path / "m.csv", [{"case_id": "a", "patient_id": "P1", "modality": "CT", "path": "a"},
                                        {"case_id": "b", "patient_id": "P2", "modality": "CT", "path": "a",
                                         "label": "1"}])
    params = ingest_params(tmp_path, workers=1, case_timeout_s=1e-4, max_rejected_fraction=1.0)
    run_ingest(params, manifest=tmp_path / "m.csv", progress=False)
    rows = read_index(tmp_path / "out")
    assert [r["reason_code"] for r in rows] == ["timeout", "timeout"]
    assert "ingest.case_timeout_s" in rows[0]["reason"]


# ----------------------------------------------------------------------------- 10. one voxel rule, convert and ingest
@pytest.mark.parametrize("slope", ["NaN", "1e38"])
def test_convert_refuses_non_finite_volumes_as_ingest_does(tmp_path, slope):
    from pipeline.stages.convert import convert

    ct_series(tmp_path / "s", 6, 16, RescaleSlope=slope)
    with pytest.raises(RejectedCase) as err:
        convert(tmp_path / "s", tmp_path / "o.nii.gz")
    assert err.value.code == "non_finite"
    assert not (tmp_path / "o.nii.gz").exists()


# ----------------------------------------------------------------------------- 12. one run per output folder
def test_a_second_run_on_a_locked_folder_fails_at_once(tmp_path):
    from helpers import ingest_params

    from pipeline.stages.ingest import run_ingest

    ct_series(tmp_path / "a", 6, 16)
    (tmp_path / "m.csv").write_text(f"case_id,patient_id,modality,path,label\na,P1,CT,{tmp_path / 'a'},0\n"
                                    f"b,P2,CT,{tmp_path / 'a'},1\n")
    (tmp_path / "out").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
                               "time.sleep(60)", str(tmp_path / "out" / ".resdx.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ResDxError) as err:
            run_ingest(ingest_params(tmp_path, workers=1), manifest=tmp_path / "m.csv", progress=False)
        assert err.value.code == "busy" and "another ingest holds" in err.value.message
        assert not (tmp_path / "out" / "index.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    run_ingest(ingest_params(tmp_path, workers=1), manifest=tmp_path / "m.csv", progress=False)  # released on exit
    assert (tmp_path / "out" / "index.csv").exists()


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with folder_lock(tmp_path):
        with pytest.raises(ResDxError):
            with folder_lock(tmp_path):
                pass
    with folder_lock(tmp_path):  # released
        pass


def test_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / ".tmp-999999999-x.npy"  # above Linux's pid_max: no such process
    live = tmp_path / f".tmp-{os.getppid()}-y.npy"
    old = tmp_path / ".tmp-legacy.npy"
    for f in (dead, live, old):
        f.write_bytes(b"x")
    os.utime(old, (0, 0))
    assert remove_temp_files(tmp_path) == 2
    assert live.exists() and not dead.exists() and not old.exists()


# ----------------------------------------------------------------------------- 13. real-export quirks
def test_an_instance_present_twice_is_kept_once_with_a_note(tmp_path):
    files = ct_series(tmp_path / "s", 6, 16)
    (tmp_path / "s" / "copy.dcm").write_bytes(files[2].read_bytes())
    other = pydicom.dcmread(files[4])
    other.compress(pydicom.uid.RLELossless, generate_instance_uid=False)
    other.save_as(tmp_path / "s" / "rle_copy.dcm", enforce_file_format=True)
    vol = read_dicom_series(tmp_path / "s")
    assert vol.data.shape == (16, 16, 6)
    assert any("kept one copy of 2 SOP instance" in n for n in vol.meta["notes"])


def test_copies_of_one_instance_with_different_pixels_are_refused(tmp_path):
    files = ct_series(tmp_path / "s", 6, 16)
    other = pydicom.dcmread(files[1])
    other.PixelData = np.zeros((16, 16), "<i2").tobytes()
    other.save_as(tmp_path / "s" / "z.dcm", enforce_file_format=True)
    with pytest.raises(RejectedCase) as err:
        read_dicom_series(tmp_path / "s")
    assert err.value.code == "conflicting_duplicates"


def test_a_colour_secondary_capture_names_its_photometric_interpretation(tmp_path):
    rgb_secondary_capture(tmp_path / "sc")
    with pytest.raises(RejectedCase) as err:
        read_dicom_series(tmp_path / "sc")
    assert err.value.code == "colour_image" and "RGB" in err.value.reason


# ----------------------------------------------------------------------------- 9. no paths in reasons
def test_a_broken_nifti_named_with_phi_gives_a_reason_without_the_name(tmp_path):
    path = tmp_path / "ZZ_Doe_Jane_19010203.nii.gz"
    path.write_bytes(b"not a gzip file")
    with pytest.raises(RejectedCase) as err:
        read_nifti(path)
    assert err.value.code == "bad_nifti"
    assert "Doe" not in err.value.reason and str(tmp_path) not in err.value.reason
