"""Slice geometry on constructed series: sorting, spacing, orientation, tilt (properties)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import write_ct_slice
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid
from scipy.spatial.transform import Rotation

from pipeline.core.preprocess import deshear, is_sheared, resample, to_canonical
from pipeline.errors import RejectedCase
from pipeline.io.dicom import read_dicom_series


def write_series(folder, rotation: np.ndarray, spacing=(0.8, 0.9), step=2.5, n=6, shape=(6, 5), names=None,
                 instance_order=None, tilt_shift=0.0, drop=None, values=None):
    """Write a CT series whose slice k is stored with value 100*k (so order is checkable)."""
    folder.mkdir(parents=True, exist_ok=True)
    row, col = rotation[:, 0], rotation[:, 1]
    normal = np.cross(row, col)
    series = generate_uid()
    origin = np.array([-20.0, 10.0, 30.0])
    names = names or [f"f{k}.dcm" for k in range(n)]
    instance_order = instance_order or list(range(n))
    for k in range(n):
        if drop is not None and k == drop:
            continue
        pos = origin + k * step * normal + k * tilt_shift * col
        img = np.full(shape, 100 * k + 1024, dtype=np.int16) if values is None else values[k]
        img[0, 1] = 0  # a marker: row 0, column 1
        write_ct_slice(folder / names[k], img, sop_uid=generate_uid(), series_uid=series,
                       instance_number=instance_order[k] + 1, ipp=[f"{v:.6f}" for v in pos],
                       iop=[f"{v:.8f}" for v in np.concatenate([row, col])], pixel_spacing=[spacing[0], spacing[1]],
                       slice_thickness=step, rescale=(-1024, 1))
    return origin, row, col, normal


rotations = st.integers(0, 2**32 - 1).map(lambda s: Rotation.random(random_state=s).as_matrix())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rot=rotations, perm=st.permutations(range(6)), step=st.floats(0.5, 6.0), flip=st.booleans(),
       sp=st.tuples(st.floats(0.3, 3.0), st.floats(0.3, 3.0)))
def test_slices_sort_by_position_not_by_name_or_instance(tmp_path_factory, rot, perm, step, flip, sp):
    folder = tmp_path_factory.mktemp("s")
    names = [f"x{p:02d}" for p in perm]
    instance = list(reversed(perm)) if flip else list(perm)
    origin, row, col, normal = write_series(folder, rot, spacing=sp, step=step, names=names, instance_order=instance)
    vol = read_dicom_series(folder)
    # Slice k holds 100*k HU everywhere but the marker: sorted along the normal, ascending.
    assert [vol.data[2, 2, k] for k in range(6)] == [100.0 * k for k in range(6)]
    lps = np.diag([-1, -1, 1]) @ vol.affine[:3, :]
    np.testing.assert_allclose(lps[:, 3], origin, atol=1e-4)
    np.testing.assert_allclose(lps[:, 0], row * sp[1], atol=1e-5)  # i: along the row, column spacing
    np.testing.assert_allclose(lps[:, 1], col * sp[0], atol=1e-5)  # j: along the column, row spacing
    np.testing.assert_allclose(lps[:, 2], normal * step, atol=1e-4)
    assert vol.data[1, 0, 0] == -1024.0  # marker at row 0, column 1 -> i=1, j=0


def test_descending_positions_become_ascending(tmp_path):
    rot = np.eye(3)
    write_series(tmp_path, rot, step=-3.0)  # positions decrease with k
    vol = read_dicom_series(tmp_path)
    assert [vol.data[2, 2, k] for k in range(6)] == [500.0, 400.0, 300.0, 200.0, 100.0, 0.0]
    assert vol.affine[2, 2] == pytest.approx(3.0)


def test_missing_slice_and_nonuniform_spacing_are_rejected(tmp_path):
    write_series(tmp_path / "a", np.eye(3), drop=3)
    with pytest.raises(RejectedCase, match="missing"):
        read_dicom_series(tmp_path / "a")


def test_gantry_tilt_is_detected_and_deshearing_preserves_world_positions(tmp_path):
    write_series(tmp_path, np.eye(3), step=2.0, tilt_shift=0.5, n=8, shape=(8, 8))
    vol = read_dicom_series(tmp_path)
    assert vol.meta["gantry_tilt_deg"] == pytest.approx(np.degrees(np.arctan(0.25)), abs=0.01)
    assert is_sheared(vol.affine)
    data = np.zeros((12, 12, 12), np.float32)
    data[6, 6, 6] = 1.0
    aff = np.eye(4)
    aff[:3, 2] = [0.0, 0.5, 2.0]  # slices shifted along j: a tilted stack
    out, out_aff = deshear(ndimage_blur(data), aff, 0.0)
    assert not is_sheared(out_aff)
    peak = np.unravel_index(np.argmax(out), out.shape)
    world_in = aff @ np.array([6, 6, 6, 1.0])
    world_out = out_aff @ np.array([*peak, 1.0])
    assert np.linalg.norm(world_in[:3] - world_out[:3]) <= 1.5


def ndimage_blur(x):
    from scipy import ndimage

    return ndimage.gaussian_filter(x, 1.0)


@settings(max_examples=30, deadline=None)
@given(rot=rotations, shape=st.tuples(st.integers(2, 9), st.integers(2, 9), st.integers(2, 9)))
def test_canonical_reorientation_keeps_every_voxel_in_place(rot, shape):
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.0, 2.0, 3.0])
    data = np.random.default_rng(0).random(shape).astype(np.float32)
    out, out_aff = to_canonical(data, aff)
    # Each output voxel's world position holds the value the input had there.
    for ijk in [(0, 0, 0), tuple(s - 1 for s in out.shape), (out.shape[0] // 2, 0, out.shape[2] - 1)]:
        world = out_aff @ np.array([*ijk, 1.0])
        src = np.round(np.linalg.inv(aff) @ world).astype(int)[:3]
        assert out[ijk] == data[tuple(src)]
    # Axes point to +R, +A, +S (closest), as nibabel defines canonical.
    assert nib.aff2axcodes(out_aff) == ("R", "A", "S")


def test_resample_keeps_field_of_view_and_world_centre():
    aff = np.diag([1.0, 1.0, 4.0, 1.0])
    data = np.zeros((40, 40, 10), np.float32)
    data[20, 20, 5] = 1.0
    out, out_aff, info = resample(data, aff, (20, 20, 20))
    assert info["coarse_axis"] == 2  # 4 mm vs 1 mm: anisotropic, nearest along z
    np.testing.assert_allclose(np.linalg.norm(out_aff[:3, :3], axis=0), [2.0, 2.0, 2.0])
    # Voxel corners aligned: the world position of the grid's corner is unchanged.
    corner_in = aff @ np.array([-0.5, -0.5, -0.5, 1.0])
    corner_out = out_aff @ np.array([-0.5, -0.5, -0.5, 1.0])
    np.testing.assert_allclose(corner_in, corner_out, atol=1e-9)


def test_rescale_is_applied_per_slice(tmp_path):
    rot = np.eye(3)
    write_series(tmp_path, rot)
    f = sorted(tmp_path.iterdir())[2]
    ds = pydicom.dcmread(f)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -2048
    ds.save_as(f)
    vol = read_dicom_series(tmp_path)
    assert vol.data[2, 2, 2] == 2 * (200 + 1024) - 2048


def _series_values(folder, values, rescale, **tags):
    series = generate_uid()
    for k, img in enumerate(values):
        write_ct_slice(folder / f"s{k}.dcm", img, sop_uid=generate_uid(), series_uid=series, instance_number=k + 1,
                       ipp=[0, 0, 2.0 * k], iop=[1, 0, 0, 0, 1, 0], pixel_spacing=[1, 1], slice_thickness=2.0,
                       rescale=rescale, **tags)


@pytest.mark.parametrize(("rescale", "stored", "want"), [
    (("-1024", "1"), (-2000, 3000), np.int16),       # CT: stored + intercept fits int16
    (("-1024", "2"), (-2000, 3000), np.int16),       # an integral slope other than 1
    (("0", "1"), (-32768, 32767), np.int16),         # the full int16 range, no intercept
    (("-1024", "1"), (-32768, 32767), np.float32),   # -32768 - 1024 leaves int16: float32, same values
    (("30000", "1"), (-2000, 3000), np.float32),     # 3000 + 30000 leaves int16
    (("-1024", "0.5"), (-2000, 3000), np.float32),   # a fractional slope is not integers
])
def test_integer_read_is_exact_or_falls_back_to_float(tmp_path, rescale, stored, want):
    """`integers=True` (what `resdx convert` asks for) gives int16 only where every value is exact in it."""
    rng = np.random.default_rng(5)
    values = [rng.integers(stored[0], stored[1] + 1, size=(9, 7)).astype(np.int16) for _ in range(12)]
    values[3][0, 0], values[8][1, 1] = stored  # both ends present
    _series_values(tmp_path, values, rescale)
    exact = read_dicom_series(tmp_path)
    fast = read_dicom_series(tmp_path, integers=True)
    assert exact.data.dtype == np.float32 and fast.data.dtype == want
    expected = np.stack([v.T.astype(np.float64) * float(rescale[1]) + float(rescale[0]) for v in values], axis=-1)
    np.testing.assert_array_equal(exact.data, expected.astype(np.float32))
    np.testing.assert_array_equal(fast.data.astype(np.float64), expected)
    np.testing.assert_array_equal(fast.affine, exact.affine)


def test_integer_read_of_unsigned_pixels_with_a_negative_intercept_does_not_wrap(tmp_path):
    """uint16 stored values (PixelRepresentation 0) minus 1024, placed through int32 arithmetic."""
    values = [np.full((5, 5), 1000 * k, dtype=np.uint16) for k in range(6)]
    series = generate_uid()
    for k, img in enumerate(values):
        path = write_ct_slice(tmp_path / f"u{k}.dcm", img.astype(np.int16), sop_uid=generate_uid(),
                              series_uid=series, instance_number=k + 1, ipp=[0, 0, 2.0 * k],
                              iop=[1, 0, 0, 0, 1, 0], pixel_spacing=[1, 1], slice_thickness=2.0)
        ds = pydicom.dcmread(path)
        ds.PixelRepresentation = 0
        ds.PixelData = img.astype("<u2").tobytes()
        ds.save_as(path)
    fast = read_dicom_series(tmp_path, integers=True)
    assert fast.data.dtype == np.int16
    assert [int(fast.data[0, 0, k]) for k in range(6)] == [1000 * k - 1024 for k in range(6)]
