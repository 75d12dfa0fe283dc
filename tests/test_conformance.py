"""`resdx convert` against dcm2niix's reference NIfTIs and dicom2nifti's test series (real files)."""

from __future__ import annotations

import collections
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import RejectedCase
from pipeline.io.dicom import read_dicom_series
from pipeline.stages.convert import convert

D2N = "dicom/dicom2nifti/tests/data"


def canonical(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Bring an image to RAS voxel order: one convention for both sides of a comparison."""
    c = nib.as_closest_canonical(img)
    return np.asarray(c.get_fdata()), c.affine


def assert_same_grid(ours: nib.Nifti1Image, ref: nib.Nifti1Image, values: bool = True) -> None:
    a, aa = canonical(ours)
    b, ba = canonical(ref)
    b = b.reshape(b.shape[:3] + b.shape[3:]) if b.ndim == a.ndim else np.squeeze(b, axis=tuple(range(3, b.ndim)))
    assert a.shape == b.shape
    # 1e-3 mm on translation; 1e-4 rad on directions (unit columns compared).
    assert np.abs(aa[:3, 3] - ba[:3, 3]).max() < 1e-3
    np.testing.assert_allclose(np.linalg.norm(aa[:3, :3], axis=0), np.linalg.norm(ba[:3, :3], axis=0), atol=1e-4)
    da = aa[:3, :3] / np.linalg.norm(aa[:3, :3], axis=0)
    db = ba[:3, :3] / np.linalg.norm(ba[:3, :3], axis=0)
    assert np.abs(da - db).max() < 1e-4
    if values:
        np.testing.assert_array_equal(a, b)


TS = [str(i) for i in range(1, 10)]


@pytest.mark.parametrize("n", TS)
def test_transfer_syntaxes_match_dcm2niix(shared_data, tmp_path, n):
    out = tmp_path / f"{n}.nii.gz"
    convert(shared_data / f"dicom/dcm_qa_ts/In/{n}.dcm", out)
    assert_same_grid(nib.load(out), nib.load(shared_data / f"dicom/dcm_qa_ts/Ref/{n}.nii"))


@pytest.mark.parametrize("src,ref", [("12bitUnsigned", "2"), ("12bitUnsigned_0x0F0F", "3"),
                                     ("12bitSigned_0x0F0F", "4")])
def test_12bit_masking_and_sign_match_dcm2niix(shared_data, tmp_path, src, ref):
    out = tmp_path / "o.nii"
    convert(shared_data / f"dicom/dcm_qa_12bit/In/{src}.dcm", out)
    img = nib.load(out)
    assert_same_grid(img, nib.load(shared_data / f"dicom/dcm_qa_12bit/Ref/{ref}.nii"))
    data = np.asarray(img.dataobj)
    assert data.max() <= 4095 and (data.min() >= 0 if "Unsigned" in src else data.min() >= -2048)


def _orientation_cases(root: Path) -> list[tuple[str, str]]:
    """(series folder, dcm2niix reference) pairs, matched by plane, order, slice count and series number."""
    import pydicom

    cases = []
    ref_dir = root / "dicom/dcm_qa_orientation/Ref"
    for plane in ("ax", "cor", "sag"):
        for folder in sorted((root / "dicom/dcm_qa_orientation/In/Orientation" / plane).iterdir()):
            name = folder.name[len(plane):].rstrip("b")  # e.g. asc35
            order, n = name.rstrip("0123456789"), "".join(c for c in name if c.isdigit())
            first = next(p for p in sorted(folder.iterdir()) if not p.name.endswith(".nii"))
            series = pydicom.dcmread(first, stop_before_pixels=True).SeriesNumber
            ref = ref_dir / f"{plane}_{order}_{n}sl_{series}.nii"
            if ref.exists():
                cases.append((str(folder.relative_to(root)), str(ref.relative_to(root))))
    return cases


def test_orientation_and_slice_order_series_match_dcm2niix(shared_data, tmp_path):
    cases = _orientation_cases(shared_data)
    assert len(cases) == 19, cases
    for src, ref in cases:
        out = tmp_path / (Path(src).name + ".nii")
        vol = convert(shared_data / src, out)
        assert vol.data.ndim == 4  # two volumes per series, as dcm2niix writes them
        assert_same_grid(nib.load(out), nib.load(shared_data / ref))


@pytest.mark.parametrize("folder", ["axmb/AxAsc36mb2a", "axmb/AxInt36mb"])
def test_multiband_jpeg_mosaics_decode_to_36_slices(shared_data, folder):
    vol = read_dicom_series(shared_data / "dicom/dcm_qa_orientation/In/Orientation" / folder)
    assert vol.data.shape == (86, 86, 36, 2)  # 516/6 = 86 px tiles, 36 slices, 2 volumes
    assert vol.data.std() > 0


D2N_GOOD = [
    "anatomical/001", "anatomical/001_implicit", "ge/anatomical/001", "ge/anatomical/001_implicit",
    "ge/anatomical/001_single_slice", "ge/dti/001", "ge/dti/001_implicit", "ge/dti/002", "ge/fmri/001",
    "ge/fmri/001_implicit", "hitachi/anatomical/001", "hitachi/anatomical/001_implicit",
    "philips_enhanced/anatomical/001", "philips_enhanced/anatomical/001_implicit", "philips_enhanced/fmri/001",
    "philips_enhanced/fmri/001_implicit", "siemens_multiframe/anatomical/001", "failing/slicecount/001",
]


@pytest.mark.parametrize("case", D2N_GOOD)
def test_dicom2nifti_series_match_their_ground_truth(shared_data, tmp_path, case):
    src = shared_data / D2N / case
    ref = src.parent / f"{src.name}_ground_truth.nii.gz"
    out = tmp_path / "o.nii.gz"
    convert(src, out)
    assert_same_grid(nib.load(out), nib.load(ref))


@pytest.mark.parametrize("case", ["philips_enhanced/dti/001", "philips_enhanced/dti/001_implicit"])
def test_philips_enhanced_dwi_geometry(shared_data, tmp_path, case):
    # Geometry only: the volume order of these anonymised objects (no DimensionIndexSequence) is
    # ambiguous and dicom2nifti's regression output orders it differently; pixels are noise.
    src = shared_data / D2N / case
    out = tmp_path / "o.nii.gz"
    convert(src, out)
    assert_same_grid(nib.load(out), nib.load(src.parent / f"{src.name}_ground_truth.nii.gz"), values=False)


@pytest.mark.parametrize("case,code", [
    ("failing/notavolume/001", "duplicate_positions"),
    ("failing/sliceincrement/001", "missing_slice"),
    ("failing/sliceincrement/002", "missing_slice"),
])
def test_dicom2nifti_failing_series_are_rejected_with_reason(shared_data, case, code):
    with pytest.raises(RejectedCase) as err:
        read_dicom_series(shared_data / D2N / case)
    assert err.value.code == code


def test_gantry_tilt_is_kept_exact_in_the_affine(shared_data):
    vol = read_dicom_series(shared_data / D2N / "failing/gantrytilting/001")
    assert vol.meta["gantry_tilt_deg"] == pytest.approx(14.0, abs=0.1)
    # The slice axis follows the real positions (sheared), not the nominal normal.
    d = vol.affine[:3, :3] / np.linalg.norm(vol.affine[:3, :3], axis=0)
    assert abs(np.degrees(np.arccos(abs(np.dot(np.cross(d[:, 0], d[:, 1]), d[:, 2]))))) == pytest.approx(14.0, abs=0.1)


def test_mixed_orientations_in_one_uid_choose_one_stack(shared_data):
    with pytest.raises(RejectedCase) as err:
        read_dicom_series(shared_data / D2N / "failing/sliceorientation/001", min_slices=3)
    assert err.value.code == "too_few_slices" and "orientations" in err.value.reason
    vol = read_dicom_series(shared_data / D2N / "failing/sliceorientation/001")
    assert vol.data.shape[2] == 2 and "2 orientations" in vol.meta["notes"][0]


def test_nifti_file_inside_dicom_folder_is_skipped(shared_data):
    vol = read_dicom_series(shared_data / "dicom/dcm_qa_orientation/In/Orientation/ax/axasc35")
    assert vol.meta["skipped"] == {"not DICOM": 1}


def _pydicom_files() -> list[str]:
    import data_store  # the pydicom-data package's local files
    import pydicom.data

    # Not pydicom's get_testdata_files(): it tries the network for files it does not ship.
    files = [str(p) for p in Path(pydicom.data.__file__).parent.joinpath("test_files").rglob("*") if p.is_file()]
    files += [str(p) for p in Path(data_store.__file__).parent.joinpath("data").glob("*") if p.is_file()]
    return sorted(set(files))


def test_pydicom_test_files_never_crash():
    """Every bundled file either reads or is rejected with a specific code; none crashes."""
    outcomes = collections.Counter()
    for f in _pydicom_files():
        try:
            vol = read_dicom_series(f)
        except RejectedCase as err:
            assert err.code and err.reason
            assert "site-packages" not in err.reason  # no paths (folder names can carry PHI) in reasons
            outcomes[err.code] += 1
            continue
        outcomes["ok"] += 1
        assert np.isfinite(vol.data).all()
    assert outcomes["ok"] >= 25, outcomes
    assert set(outcomes) - {"ok"} <= {"no_images", "no_geometry", "no_spacing", "legacy_multiframe", "bad_multiframe",
                                      "undecodable", "truncated", "damaged_file", "unsupported_bits",
                                      "colour_image", "bad_dimensions"}, outcomes


def test_grey_scale_pixel_data_decodes_in_every_common_transfer_syntax():
    import pydicom

    from pipeline.io.dicom_pixels import decode_pixels

    decoded = collections.Counter()
    for f in _pydicom_files():
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - deliberately broken files in the set
            continue
        if "PixelData" not in ds.keys() and ds.get("Rows") is None or int(ds.get("SamplesPerPixel", 1)) != 1:
            continue
        try:
            decode_pixels(f)
        except RejectedCase:
            continue
        decoded[str(ds.file_meta.TransferSyntaxUID)] += 1
    # implicit/explicit/big-endian/deflated, JPEG extended + lossless, JPEG-LS, JPEG 2000, RLE.
    for ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
               "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
               "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5"):
        assert decoded[ts] >= 1, (ts, decoded)
