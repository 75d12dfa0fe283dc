"""Synthetic cohort knobs: the default cohort's pinned bytes, the hard preset, the three-class task."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.config import SynthesizeConfig, params_from_dict
from pipeline.core.phantom import ct_hu_volume, grid_points, make_ct_geometry, make_phantom
from pipeline.errors import ConfigError
from pipeline.io.dicom import read_dicom_series
from pipeline.stages.synthesize import CLASS_NAMES, DIFFICULTY_KEYS, PRESETS, plan_cohort, resolve_preset, synthesize


def _cfg(root: Path, **kw) -> SynthesizeConfig:
    return SynthesizeConfig(out_dir=root / "data" / "demo", manifest=root / "manifests" / "demo.csv", **kw)


def _cohort_digest(cfg: SynthesizeConfig) -> str:
    files = {f"data/{p.relative_to(cfg.out_dir)}": p for p in Path(cfg.out_dir).rglob("*") if p.is_file()}
    files["manifest"] = Path(cfg.manifest)
    digest = {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in sorted(files.items())}
    return hashlib.sha256(json.dumps(digest, sort_keys=True).encode()).hexdigest()


def _truth(cfg: SynthesizeConfig) -> dict:
    return json.loads((Path(cfg.out_dir) / "truth.json").read_text())


def _lesion_cnr(out_dir: Path, case: dict) -> float:
    """(median of the lesion core - median of a soft-tissue ring 3-6 mm outside it) / robust sigma of the ring,
    measured on the written image (CT in HU from the DICOM series, MR in the file's units)."""
    path = Path(out_dir) / case["image"]
    if case["modality"] == "CT":
        vol = read_dicom_series(path)
        data, affine = vol.data, vol.affine
    else:
        img = nib.load(path)
        data, affine = np.asarray(img.dataobj, dtype=float), img.affine
    d = np.linalg.norm(grid_points(affine, data.shape) - np.asarray(case["lesion_centre_ras"]), axis=-1)
    r = case["lesion_radius_mm"]
    core, ring = data[d <= 0.6 * r], data[(d >= r + 3.0) & (d <= r + 6.0)]
    mid = np.median(ring)
    return float((np.median(core) - mid) / (1.4826 * np.median(np.abs(ring - mid))))


# ---- default cohort: unchanged bytes -----------------------------------------------------------------


# sha256 over the per-file sha256 of a 2-patient default cohort (seed 3), recorded before the difficulty
# knobs, preset and task existed: their defaults must leave every byte as it was. If this fails after a
# library upgrade (numpy, scipy, pydicom, nibabel, zlib) rather than a code change, check the full cohort
# against dvc.lock's data/demo hash before re-pinning.
DEFAULT_COHORT_SHA256 = "3a56f812d6dae74e48b698cd2e5f087fea099d5811654706f37b31f0b896b6b9"


def test_default_knobs_leave_the_cohort_bytes_unchanged(tmp_path):
    cfg = _cfg(tmp_path / "a", n_patients=2)
    synthesize(cfg, seed=3)
    assert _cohort_digest(cfg) == DEFAULT_COHORT_SHA256
    truth = _truth(cfg)
    assert set(truth) == {"seed", "cases"}  # task/preset/class_names are written only when not the defaults
    # Spelling out today's values changes nothing either; the hard preset changes the pixels.
    explicit = _cfg(tmp_path / "b", n_patients=2, task="binary", preset="default", ct_noise_hu=(10.0, 20.0),
                    mr_noise=(0.015, 0.05), mr_bias_field=0.3, ct_drift_hu=0.0)
    synthesize(explicit, seed=3)
    assert _cohort_digest(explicit) == DEFAULT_COHORT_SHA256
    hard = _cfg(tmp_path / "c", n_patients=2, preset="hard")
    synthesize(hard, seed=3)
    assert _cohort_digest(hard) != DEFAULT_COHORT_SHA256
    assert _truth(hard)["preset"] == "hard" and _truth(hard)["class_names"] == ["no lesion", "lesion"]


def test_shipped_params_synthesize_section_is_the_default_cohort():
    cfg = params_from_dict({}).synthesize
    assert (cfg.task, cfg.preset) == ("binary", "default") and resolve_preset(cfg) is cfg


# ---- hard preset --------------------------------------------------------------------------------------


def test_hard_preset_replaces_every_difficulty_knob():
    assert set(PRESETS["hard"]) == set(DIFFICULTY_KEYS) <= set(SynthesizeConfig.model_fields)
    assert PRESETS["default"] == {}
    cfg = resolve_preset(SynthesizeConfig(preset="hard", lesion_radius_mm=(20.0, 30.0), ct_drift_hu=0.0))
    for key, value in PRESETS["hard"].items():
        assert getattr(cfg, key) == value, key  # the preset wins over explicit values
    plans = plan_cohort(SynthesizeConfig(n_patients=20, preset="hard"), seed=1)
    lo, hi = PRESETS["hard"]["lesion_radius_mm"]
    assert all(lo <= p.lesion_radius <= hi for p in plans)
    for p in plans:
        lo, hi = PRESETS["hard"]["lesion_contrast_hu" if p.modality == "CT" else "lesion_gain_mr"]
        assert lo <= p.lesion_contrast <= hi
        assert (p.ct_noise_hu, p.mr_noise, p.ct_drift_hu) == (
            PRESETS["hard"]["ct_noise_hu"], PRESETS["hard"]["mr_noise"], PRESETS["hard"]["ct_drift_hu"])


@pytest.mark.parametrize("bad", [{"preset": "extreme"}, {"task": "four_class"}, {"ct_noise_hu": [20.0, 10.0]},
                                 {"mr_noise": [-0.1, 0.1]}, {"mr_bias_field": 1.0}, {"ct_drift_hu": -5.0}])
def test_bad_knobs_are_config_errors(bad):
    with pytest.raises(ConfigError):
        params_from_dict({"synthesize": bad})


def test_ct_drift_is_smooth_bounded_and_off_by_default():
    rng_state = np.random.default_rng(4)
    ph = make_phantom(rng_state, lesion_radius=None)
    geo = make_ct_geometry(rng_state, plane="axial")
    flat = ct_hu_volume(ph, geo, np.random.default_rng(9), 0.0, noise_hu=0.0)
    again = ct_hu_volume(ph, geo, np.random.default_rng(9), 0.0, noise_hu=0.0, drift_hu=0.0)
    drifted = ct_hu_volume(ph, geo, np.random.default_rng(9), 0.0, noise_hu=0.0, drift_hu=30.0)
    np.testing.assert_array_equal(flat, again)
    diff = drifted - flat
    assert 0 < np.abs(diff).max() <= 30.0 + 1e-9
    assert np.abs(np.diff(diff, axis=0)).max() < 2.0  # low frequency: < 2 HU between neighbouring voxels


@pytest.fixture(scope="module")
def lesion_cohorts(tmp_path_factory):
    """Default and hard three-class cohorts of the same plan, every study with a lesion."""
    root = tmp_path_factory.mktemp("difficulty")
    out = {}
    for preset in ("default", "hard"):
        cfg = _cfg(root / preset, n_patients=4, studies_per_patient=(2, 2), lesion_fraction=1.0,
                   task="three_class", preset=preset)
        synthesize(cfg, seed=10)
        out[preset] = (cfg, _truth(cfg)["cases"])
    kinds = {(c["modality"], c["label"]) for c in out["hard"][1]}
    assert kinds == {("CT", 1), ("CT", 2), ("MR", 1), ("MR", 2)}  # this seed gives two of every kind
    return out


def test_hard_preset_lesions_are_fainter_than_the_default(lesion_cohorts):
    cnr = {preset: {(c["modality"], c["case_id"]): _lesion_cnr(cfg.out_dir, c) for c in cases}
           for preset, (cfg, cases) in lesion_cohorts.items()}
    for modality in ("CT", "MR"):
        default = np.sort(np.abs([v for (m, _), v in cnr["default"].items() if m == modality]))
        hard = np.sort(np.abs([v for (m, _), v in cnr["hard"].items() if m == modality]))
        # The hard table spans faint to obvious lesions (its upper ends near the default's), so each
        # ranked hard lesion is fainter than the default's of the same rank, the median clearly so.
        # Measured |CNR| per voxel on the native grid (4 lesions each): CT hard 7.6-13.4 vs default
        # 14.1-20.2 (median 0.45x), MR hard 4.2-22.9 vs 5.2-25.7 (median 0.74x).
        assert (hard < default).all(), (modality, hard, default)
        assert np.median(hard) < 0.85 * np.median(default), (modality, hard, default)
        assert np.median(hard) > 0.5, (modality, hard)  # faint, but there


# ---- three-class task ---------------------------------------------------------------------------------


def test_three_class_lesions_have_the_sign_of_their_label(lesion_cohorts):
    for preset, (cfg, cases) in lesion_cohorts.items():
        for c in cases:
            cnr = _lesion_cnr(cfg.out_dir, c)
            assert (cnr > 0) == (c["label"] == 1) and (c["lesion_contrast"] > 0) == (c["label"] == 1), (preset, c)


def test_three_class_plan_splits_the_binary_positives():
    binary = plan_cohort(SynthesizeConfig(n_patients=30), seed=2)
    three = plan_cohort(SynthesizeConfig(n_patients=30, task="three_class"), seed=2)
    n_pos = sum(p.label for p in binary)
    assert [min(p.label, 1) for p in three] == [p.label for p in binary]  # same cases, same draws
    assert sum(p.label == 2 for p in three) == n_pos // 2
    for b, t in zip(binary, three):
        assert t.lesion_contrast == (-b.lesion_contrast if t.label == 2 else b.lesion_contrast)
        assert (t.modality, t.lesion_radius, t.compressed, t.phi) == (b.modality, b.lesion_radius, b.compressed, b.phi)


def test_three_class_manifest_and_truth_name_the_classes(lesion_cohorts):
    cfg, cases = lesion_cohorts["default"]
    assert _truth(cfg)["class_names"] == list(CLASS_NAMES["three_class"]) == ["no lesion", "hyperdense", "hypodense"]
    with Path(cfg.manifest).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["case_id", "patient_id", "modality", "path", "label", "mask_path", "label_name"]
    assert all(r["label_name"] == CLASS_NAMES["three_class"][int(r["label"])] for r in rows)
    assert [int(r["label"]) for r in rows] == [c["label"] for c in cases]
