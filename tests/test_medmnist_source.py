"""MedMNIST source: official-layout .npz -> ingest's outputs (index.csv, plan.json, summary.json, tensors)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import read_index

from pipeline.config import params_from_dict
from pipeline.core.plan import PLAN_VERSION, load_plan
from pipeline.io.index import INDEX_COLUMNS
from pipeline.sources.medmnist import MedMNISTCountWarning, MedMNISTError, medmnist_info, run_medmnist


def _params(flag: str, root: Path, out: Path, size: int = 28, download: bool = False):
    return params_from_dict({"data": {"source": "medmnist", "medmnist": {"flag": flag, "root": str(root),
                                                                         "size": size, "download": download}},
                             "ingest": {"out_dir": str(out), "splits_file": None}})


def _write_npz(path: Path, image_shape: tuple, counts: dict, n_classes: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in counts.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, *image_shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, n_classes, size=(n, 1), dtype=np.uint8)
    np.savez_compressed(path, **arrays)


def _load_split(out: Path, rows: list[dict], split: str) -> np.ndarray:
    return np.stack([np.load(out / r["tensor"], allow_pickle=False) for r in rows if r["split"] == split])


def test_info_loaded_without_importing_the_package():
    # `import medmnist` pulls torch, PIL, pandas and scikit-learn; only its INFO table is needed.
    code = ("import sys; from pipeline.sources.medmnist import medmnist_info; "
            "assert medmnist_info()['pneumoniamnist']['n_samples']['train'] == 4708; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('medmnist', 'torch', 'torchvision')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_shared_pneumoniamnist_subset(shared_data, tmp_path):
    npz = shared_data / "medmnist/pneumoniamnist_subset.npz"
    out = tmp_path / "out"
    params = _params("pneumoniamnist", npz, out)
    with pytest.warns(MedMNISTCountWarning, match=r"train split has 3882 images.*official.*4708"):
        s = run_medmnist(params, progress=False)

    assert (s.n_rows, s.n_ok, s.n_rejected, s.n_reused) == (5030, 5030, 0, 0)
    assert s.splits == {"train": 3882, "val": 524, "test": 624}
    assert s.by_modality == {"pneumoniamnist:ok": 5030}
    assert json.loads((out / "summary.json").read_text())["n_ok"] == 5030

    rows = read_index(out)
    assert list(rows[0]) == INDEX_COLUMNS
    assert rows[0]["case_id"] == rows[0]["patient_id"] == "pneumoniamnist-train-00000"
    assert {r["status"] for r in rows} == {"ok"} and {r["source_format"] for r in rows} == {"medmnist"}
    labels = {sp: Counter(r["label"] for r in rows if r["split"] == sp) for sp in ("train", "val", "test")}
    assert labels == {"train": {"0": 388, "1": 3494}, "val": {"0": 135, "1": 389}, "test": {"0": 234, "1": 390}}

    train = _load_split(out, rows, "train")
    assert train.shape == (3882, 1, 28, 28) and train.dtype == np.float32
    assert abs(float(train.mean(dtype=np.float64))) < 1e-4
    assert abs(float(train.std(dtype=np.float64)) - 1.0) < 1e-4
    assert np.load(out / rows[-1]["tensor"]).shape == (1, 28, 28)

    plan = json.loads((out / "plan.json").read_text())
    assert plan["version"] == PLAN_VERSION and plan["source"] == "medmnist"
    origin = plan["medmnist"]
    assert (origin["flag"], origin["size"], plan["mode"], plan["shape"], plan["channels"]) == (
        "pneumoniamnist", 28, "2d", [28, 28], 1)
    assert origin["task"] == "binary-class" and plan["n_classes"] == 2
    assert plan["class_names"] == ["normal", "pneumonia"]
    norm = plan["arrays"]
    assert norm["fitted_on"] == "train" and norm["scale"] == pytest.approx(1 / 255)
    assert len(norm["mean"]) == len(norm["std"]) == 1 and 0 < norm["mean"][0] < 1
    assert plan["orientation"] is None and plan["ct"] is None and plan["mr"] is None
    assert plan["counts"] == {"train/ok": 3882, "val/ok": 524, "test/ok": 624}
    assert origin["file"] == "pneumoniamnist_subset.npz" and origin["file_md5"] == "f5b994ec7c2fe8bc81ae15cbab7c3df8"
    assert load_plan(out / "plan.json").source == "medmnist"  # the one typed schema validates it
    assert len(plan["warnings"]) == 1 and "train" in plan["warnings"][0]

    # A rerun on the unchanged file rewrites no tensor.
    first = rows[0]["tensor"]
    mtime = (out / first).stat().st_mtime_ns
    (out / "tensors" / "stale-case.npy").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedMNISTCountWarning)
        again = run_medmnist(params, progress=False)
    assert again.n_reused == 5030 and again.n_ok == 5030
    assert (out / first).stat().st_mtime_ns == mtime
    assert not (out / "tensors" / "stale-case.npy").exists()
    assert json.loads((out / "plan.json").read_text()) == plan


def test_3d_flag(tmp_path):
    root = tmp_path / "medmnist"
    root.mkdir()
    _write_npz(root / "organmnist3d.npz", (28, 28, 28), {"train": 6, "val": 3, "test": 3}, n_classes=11)
    out = tmp_path / "out"
    with pytest.warns(MedMNISTCountWarning):
        s = run_medmnist(_params("organmnist3d", root, out), progress=False)
    assert s.splits == {"train": 6, "val": 3, "test": 3}
    rows = read_index(out)
    assert [r["case_id"] for r in rows[:2]] == ["organmnist3d-train-00000", "organmnist3d-train-00001"]
    assert all(np.load(out / r["tensor"]).shape == (1, 28, 28, 28) for r in rows)
    assert {r["tensor_shape"] for r in rows} == {"1x28x28x28"}
    train = _load_split(out, rows, "train")
    assert abs(float(train.mean(dtype=np.float64))) < 1e-4
    plan = json.loads((out / "plan.json").read_text())
    info = medmnist_info()["organmnist3d"]
    assert plan["mode"] == "3d" and plan["shape"] == [28, 28, 28] and plan["channels"] == 1
    assert plan["n_classes"] == 11
    assert plan["class_names"] == [info["label"][str(i)] for i in range(11)]
    assert plan["medmnist"]["file"] == "organmnist3d.npz"


def test_rgb_flag_and_size_suffix_for_28(tmp_path):
    root = tmp_path / "medmnist"
    root.mkdir()
    _write_npz(root / "pathmnist_28.npz", (28, 28, 3), {"train": 8, "val": 4, "test": 4}, n_classes=9, seed=1)
    out = tmp_path / "out"
    with pytest.warns(MedMNISTCountWarning):
        run_medmnist(_params("pathmnist", root, out), progress=False)
    rows = read_index(out)
    train = _load_split(out, rows, "train")
    assert train.shape == (8, 3, 28, 28)
    assert np.allclose(train.mean(axis=(0, 2, 3), dtype=np.float64), 0.0, atol=1e-4)
    assert np.allclose(train.std(axis=(0, 2, 3), dtype=np.float64), 1.0, atol=1e-4)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["channels"] == 3 and len(plan["arrays"]["mean"]) == 3 and len(plan["arrays"]["std"]) == 3
    # Channel c of the tensor is channel c of the file image (an (H, W, 3) -> (3, H, W) transpose).
    with np.load(root / "pathmnist_28.npz") as z:
        img = z["train_images"][0]
    mean, std = (np.array(plan["arrays"][k]) for k in ("mean", "std"))
    expected = (np.moveaxis(img, -1, 0) / 255.0 - mean[:, None, None]) / std[:, None, None]
    assert np.allclose(np.load(out / rows[0]["tensor"]), expected, atol=1e-5)


def test_missing_file_names_the_expected_file(tmp_path):
    with pytest.raises(MedMNISTError, match=r"bloodmnist_64\.npz.*download: true"):
        run_medmnist(_params("bloodmnist", tmp_path, tmp_path / "out", size=64), progress=False)
    with pytest.raises(MedMNISTError, match=r"bloodmnist\.npz or .*bloodmnist_28\.npz"):
        run_medmnist(_params("bloodmnist", tmp_path, tmp_path / "out"), progress=False)
    with pytest.raises(MedMNISTError, match=r"not found: .*nothere\.npz"):
        run_medmnist(_params("bloodmnist", tmp_path / "nothere.npz", tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_flags_are_rejected(tmp_path):
    with pytest.raises(MedMNISTError, match="unknown MedMNIST flag 'pneumomnist'"):
        run_medmnist(_params("pneumomnist", tmp_path, tmp_path / "out"), progress=False)


def _write_multilabel_npz(path: Path, image_shape: tuple, counts: dict, n_labels: int, seed: int = 0) -> None:
    """The official multi-label layout (chestmnist): labels (N, L) of 0/1."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in counts.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, *image_shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.random((n, n_labels)) < 0.3).astype(np.uint8)
    np.savez_compressed(path, **arrays)


def test_multi_label_flag_ingests_label_vectors(tmp_path):
    from pipeline.io.tensors import load_split

    root = tmp_path / "medmnist"
    root.mkdir()
    _write_multilabel_npz(root / "chestmnist.npz", (28, 28), {"train": 8, "val": 4, "test": 4}, n_labels=14)
    out = tmp_path / "out"
    with pytest.warns(MedMNISTCountWarning):
        s = run_medmnist(_params("chestmnist", root, out), progress=False)
    assert s.splits == {"train": 8, "val": 4, "test": 4}
    plan = json.loads((out / "plan.json").read_text())
    info = medmnist_info()["chestmnist"]
    assert plan["task"] == "multi_label" and load_plan(out / "plan.json").multi_label
    assert plan["n_classes"] == 14 and plan["class_names"] == [info["label"][str(i)] for i in range(14)]
    rows = read_index(out)
    with np.load(root / "chestmnist.npz") as z:
        expected = z["train_labels"]
    assert rows[0]["label"] == ";".join(str(v) for v in expected[0])  # one `label` column, ';'-joined
    train = load_split(out, "train")
    assert train.labels.shape == (8, 14) and train.labels.dtype.is_floating_point is False
    assert np.array_equal(train.labels.numpy(), expected)
    assert train.images.shape == (8, 1, 28, 28)


def test_multi_label_flag_needs_label_vectors_and_single_label_flags_refuse_them(tmp_path):
    _write_npz(tmp_path / "chestmnist.npz", (28, 28), {"train": 2, "val": 1, "test": 1}, n_classes=2)
    with pytest.raises(MedMNISTError, match=r"multi-label flag needs \(N, 14\) integer 0/1 labels"):
        run_medmnist(_params("chestmnist", tmp_path / "chestmnist.npz", tmp_path / "out"), progress=False)
    _write_multilabel_npz(tmp_path / "bloodmnist.npz", (28, 28, 3), {"train": 2, "val": 1, "test": 1}, n_labels=3)
    with pytest.raises(MedMNISTError, match="3 labels per image .*single-label task"):
        run_medmnist(_params("bloodmnist", tmp_path / "bloodmnist.npz", tmp_path / "out"), progress=False)


def test_wrong_image_size_is_a_clear_error(tmp_path):
    _write_npz(tmp_path / "bloodmnist_64.npz", (28, 28, 3), {"train": 2, "val": 1, "test": 1}, n_classes=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedMNISTCountWarning)
        with pytest.raises(MedMNISTError, match="images are 28x28 but data.medmnist.size is 64"):
            run_medmnist(_params("bloodmnist", tmp_path, tmp_path / "out", size=64), progress=False)
