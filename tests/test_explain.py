"""Explain stage: Grad-CAM polarity, native-geometry overlays, DICOM overlays without PHI, report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from helpers import train_params
from torch import nn

from pipeline.core.classifier import Classifier, DecisionRule
from pipeline.core.saliency import _stride, class_map, explain_case, randomized_copy, upsample


class _BlobDetector(nn.Module):
    """Class 1 = bright voxels anywhere (max-pooled), so the evidence sits where the blob is."""

    def __init__(self):
        super().__init__()
        self.layer4 = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU())
        with torch.no_grad():
            self.layer4[0].weight.zero_()
            self.layer4[0].weight[:, 0, 1, 1, 1] = 1.0
            self.layer4[0].bias.fill_(-0.5)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.layer4(x).amax(dim=(2, 3, 4)))


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_map_polarity_high_means_supports_the_class(method):
    x = torch.zeros(1, 16, 16, 16)
    x[0, 11, 4, 6] = 3.0  # the only evidence for class 1
    clf = Classifier(_BlobDetector(), DecisionRule(1.0, 0.5, ("a", "b")))
    ex = explain_case(clf, x, method=method, target_layer="layer4")
    cam, cls, probs = ex.cam, ex.explained_class, ex.probs
    assert cls == 1 and ex.decision == 1 and probs[1] > 0.5
    assert np.unravel_index(int(np.argmax(cam)), cam.shape) == (11, 4, 6)  # MONAI's default normalizer would invert
    assert cam.min() >= 0 and cam.max() == pytest.approx(1.0)


def test_cells_sit_on_the_networks_sampling_grid():
    assert [_stride(48, 6), _stride(48, 2), _stride(50, 7), _stride(48, 48), _stride(48, 10)] == [8, 32, 8, 1, None]
    cells = np.zeros((6, 6, 6))
    cells[2, 3, 1] = 1.0
    up = upsample(cells, (48, 48, 48), [8, 8, 8])
    # cell i of a 'same'-padded stride-8 stage is centred on voxel 8 i (MONAI's stretched grid: 8 i + 3.5)
    assert np.unravel_index(int(np.argmax(up)), up.shape) == (16, 24, 8)
    assert up.min() >= 0.0
    np.testing.assert_allclose(upsample(cells, (6, 6, 6), [1, 1, 1]), cells, atol=1e-12)  # stride 1: identity


class _StridedDetector(nn.Module):
    """Class 1 = bright regions, seen through a mean filter sampled every `stride` voxels."""

    def __init__(self, stride: int):
        super().__init__()
        self.layer4 = nn.Sequential(nn.Conv3d(1, 2, 3, stride=stride, padding=1, padding_mode="replicate"), nn.ReLU())
        with torch.no_grad():
            self.layer4[0].weight.fill_(1.0 / 27)
            self.layer4[0].bias.copy_(torch.tensor([-0.1, -0.3]))
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-1.0, -0.5], [1.0, 0.5]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.layer4(x).amax(dim=(2, 3, 4)))


def test_shifted_runs_interleave_into_the_finer_networks_map():
    """Stride 4 with 2 shifts per axis samples exactly the cells of the same network at stride 2."""
    x = torch.zeros(1, 1, 24, 24, 24)
    x[0, 0, 9:13, 7:10, 12:17] = 1.0
    x[0, 0, 10, 8, 14] = 2.0
    fine = class_map(_StridedDetector(4).eval(), x, 1, shifts=2)
    reference = class_map(_StridedDetector(2).eval(), x, 1, shifts=1)
    np.testing.assert_allclose(fine, reference, atol=1e-5)
    coarse = class_map(_StridedDetector(4).eval(), x, 1, shifts=1)
    assert np.abs(coarse - reference).max() > 0.05  # the shifts add information


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
@pytest.mark.parametrize("pool", ["avg", "lse"])
def test_cells_equal_monais_grad_cam(method, pool):
    """`_layer_cells` stops the backward at the layer; its cells are MONAI's `compute_map` (Grad-CAM++
    without MONAI's exp(score) factor), for every case of a batch at once."""
    import math

    from monai.visualize import GradCAM, GradCAMpp

    from pipeline.core.models import ModelSpec, build_model
    from pipeline.core.saliency import _Centered, _layer_cells

    torch.manual_seed(0)
    net = build_model(ModelSpec("resnet10", 3, 1, 2, 3, pool=pool, output_stride=8, padding="replicate",
                                width=8)).eval()
    x = torch.randn(3, 1, 24, 24, 24)
    nonzero = 0
    ours_of = {cls: _layer_cells(net, "layer4", x, cls, method) for cls in (0, 1)}  # before MONAI hooks the net
    for cls in (0, 1):  # a random network's map of one class may be all zero (ReLU): both are compared
        ours = ours_of[cls]
        for i in range(len(x)):
            cam = (GradCAMpp if method == "gradcampp" else GradCAM)(nn_module=_Centered(net).eval(),
                                                                     target_layers="net.layer4")
            ref = cam.compute_map(x[i:i + 1], class_idx=cls)[0, 0].detach().double().numpy()
            if method == "gradcampp":
                ref = ref / math.exp(float(cam.nn_module.score.detach().reshape(-1)[0]))
            np.testing.assert_allclose(ours[i], ref, rtol=1e-4, atol=1e-5 * max(np.abs(ref).max(), 1e-12))
            nonzero += bool(np.abs(ref).max() > 0)
    assert nonzero >= 3


class _SidewaysDetector(nn.Module):
    """Class 1 = bright voxels, but each cell reports the voxel one step along axis 0 from itself: a network
    that learned to light up the cell beside a finding."""

    def __init__(self):
        super().__init__()
        self.layer4 = nn.Sequential(nn.Conv3d(1, 1, 3, padding=1, padding_mode="replicate"), nn.ReLU())
        with torch.no_grad():
            self.layer4[0].weight.zero_()
            self.layer4[0].weight[0, 0, 2, 1, 1] = 1.0  # out[p] = x[p + 1 along axis 0]
            self.layer4[0].bias.fill_(-0.05)
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.layer4(x).amax(dim=(2, 3, 4)))


def test_the_reflected_view_centres_a_map_its_network_puts_beside_the_finding():
    grid = np.stack(np.meshgrid(*[np.arange(20)] * 3, indexing="ij"))
    centre = np.array([9, 11, 8])
    blob = np.exp(-((grid - centre[:, None, None, None]) ** 2).sum(0) / (2 * 2.0**2))
    x = torch.from_numpy(blob.astype(np.float32))[None, None]
    plain = class_map(_SidewaysDetector(), x, 1)
    both = class_map(_SidewaysDetector(), x, 1, reflect=True)
    assert np.unravel_index(int(np.argmax(plain)), plain.shape) == (8, 11, 8)  # one voxel beside the blob
    assert np.unravel_index(int(np.argmax(both)), both.shape) == (9, 11, 8)  # on it
    assert both.min() >= 0 and both.max() == pytest.approx(1.0)


def test_pointing_game_and_energy_share_against_the_random_baseline():
    from pipeline.core.sanity import localization as _localization

    mask = np.zeros((10, 10, 10), bool)
    mask[2:4, 2:4, 2:4] = True
    cam = np.zeros((10, 10, 10))
    cam[3, 3, 3] = 1.0
    cam[8, 8, 8] = 0.5
    loc = _localization(cam, mask)
    assert loc["hit"] and loc["inside"] == pytest.approx(1.0 / 1.5)
    assert loc["random_hit"] == loc["random_inside"] == pytest.approx(8 / 1000)
    cam[8, 8, 8] = 2.0
    assert not _localization(cam, mask)["hit"]


def test_randomized_copy_changes_every_parameter():
    model = _BlobDetector()
    rand = randomized_copy(model, seed=0)
    for (name, a), (_, b) in zip(model.named_parameters(), rand.named_parameters()):
        assert not torch.equal(a, b), name


@pytest.fixture(scope="module")
def explained(tiny_ingested, demo_cohort, tmp_path_factory):
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.explain import run_explain
    from pipeline.stages.train import run_train

    tmp = tmp_path_factory.mktemp("explain")
    explain = {"out_dir": str(tmp / "explain"), "target_layer": "layer1", "splits": ["val", "test"]}
    params = train_params(tmp, tiny_ingested, data={"manifest": str(demo_cohort)}, explain=explain)
    run_train(params, progress=False)
    run_evaluate(params)
    return tmp, run_explain(params)


def test_overlays_have_the_source_grid(explained, demo_cohort):
    from pipeline.io.dicom import read_dicom_series
    from pipeline.sources.manifest import read_manifest

    tmp, result = explained
    rows = {r.case_id: r for r in read_manifest(demo_cohort)}
    cases = list(csv.DictReader((tmp / "explain/cases.csv").open()))
    assert len(cases) == result["n_cases"] > 0
    kinds = set()
    for c in cases:
        overlay = nib.load(tmp / "explain" / c["overlay"])
        src = rows[c["case_id"]].path
        if src.is_dir():
            ref = read_dicom_series(src)
            ref_shape, ref_affine = ref.data.shape[:3], ref.affine
            kinds.add("dicom")
        else:
            img = nib.load(src)
            ref_shape, ref_affine = img.shape[:3], img.affine
            kinds.add("nifti")
        assert overlay.shape == ref_shape, c["case_id"]
        np.testing.assert_allclose(overlay.affine, ref_affine, atol=1e-4)
        data = np.asarray(overlay.dataobj)
        assert 0.0 <= data.min() and data.max() <= 1.0 + 1e-6
    assert kinds == {"dicom", "nifti"}


def test_dicom_overlays_carry_no_source_phi(explained, demo_cohort):
    from pipeline.sources.manifest import read_manifest

    tmp, _ = explained
    rows = {r.case_id: r for r in read_manifest(demo_cohort)}
    folders = sorted((tmp / "explain/dicom").iterdir())
    assert folders
    for folder in folders:
        src_file = next(p for p in rows[folder.name].path.iterdir() if p.suffix != ".txt")
        src = pydicom.dcmread(src_file, stop_before_pixels=True)
        out = pydicom.dcmread(next(folder.iterdir()))
        assert str(out.PatientName).rstrip("^") == folder.name and out.PatientID == rows[folder.name].patient_id
        assert out.StudyInstanceUID != src.StudyInstanceUID
        assert out.ReferencedSeriesSequence[0].SeriesInstanceUID != src.SeriesInstanceUID
        text = out.to_json()
        for value in (str(src.PatientName), src.PatientID, src.get("PatientBirthDate", "x"),
                      src.get("AccessionNumber", "x"), src.get("InstitutionName", "x")):
            assert value and value not in text
        assert out.pixel_array.shape[-1] == 3  # overlay burned into RGB


def test_report_and_sanity_are_written(explained):
    tmp, result = explained
    html = (tmp / "explain/report.html").read_text()
    for c in csv.DictReader((tmp / "explain/cases.csv").open()):
        assert c["case_id"] in html
    sanity = json.loads((tmp / "explain/sanity.json").read_text())
    assert {"spearman", "ssim", "passed"} <= set(sanity["randomization"])
    assert "hit_rate" in sanity["pointing_game"] and "random_baseline" in sanity["pointing_game"]
    assert (tmp / "explain/contact_sheet.png").read_bytes()[:4] == b"\x89PNG"


def _embedded(html: str, element_id: str) -> nib.Nifti1Image:
    import base64
    import gzip
    import re

    found = re.search(rf'<script type="text/plain" id="{element_id}"[^>]*>([^<]*)</script>', html)
    assert found, element_id
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(found.group(1))))


def test_report_viewer_embeds_the_native_scan_and_the_overlay(explained, demo_cohort):
    """Each case's viewer holds the source re-read on its own grid (HU for CT) and the NIfTI overlay's map."""
    from pipeline.config import ExplainConfig
    from pipeline.io.dicom import read_dicom_series
    from pipeline.reporting.viewer import block_affine, block_factor, block_mean
    from pipeline.sources.manifest import read_manifest

    tmp, _ = explained
    html = (tmp / "explain/report.html").read_text()
    assert html.count("var niivue=") == 1
    rows = {r.case_id: r for r in read_manifest(demo_cohort)}
    factors = set()
    for n, c in enumerate(csv.DictReader((tmp / "explain/cases.csv").open())):
        vol, cam = _embedded(html, f"vd-{n}-vol"), _embedded(html, f"vd-{n}-map")
        overlay = nib.load(tmp / "explain" / c["overlay"])
        src = rows[c["case_id"]].path
        ref = read_dicom_series(src).data if src.is_dir() else np.asarray(nib.load(src).dataobj, dtype=np.float32)
        assert overlay.shape == ref.shape[:3]
        f = block_factor(ref.shape[:3], ExplainConfig().viewer_max_voxels)  # the demo has cases with f = 1 and 2
        factors.add(f)
        assert vol.shape == block_mean(ref, f).shape
        np.testing.assert_allclose(vol.affine, block_affine(overlay.affine, f), atol=1e-4)
        want = block_mean(ref, f)
        if f > 1 and src.is_dir():
            want = np.round(want)  # block means of integer HU are stored as int16
        np.testing.assert_allclose(np.asarray(vol.dataobj, dtype=np.float64), want, atol=2e-3 * np.abs(ref).max())
        o = block_mean(np.asarray(overlay.dataobj), f)
        assert np.abs(np.asarray(cam.dataobj, dtype=np.float64) - o).max() <= o.max() / 255 + 1e-6
        for img in (vol, cam):  # nothing from the source's header travels
            assert img.header["descrip"].tobytes().strip(b"\0") == b""
            assert img.header["db_name"].tobytes().strip(b"\0") == b""
    assert 1 in factors


def test_slice_model_maps_fill_the_slices_between_the_bag():
    from pipeline.core.models import ModelSpec, build_model

    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet10", 2, 1, 2, 3, slices_2d=5, pool="lse", output_stride=8,
                                  padding="replicate")).eval()
    x = torch.randn(1, 32, 32, 17)
    cam = class_map(model, x.unsqueeze(0), 1, shifts=2)
    assert cam.shape == (32, 32, 17) and cam.max() == pytest.approx(1.0)
    idx = model.slice_index(17).tolist()  # [0, 4, 8, 12, 16]
    for a, b in zip(idx, idx[1:]):
        for k in range(a + 1, b):
            t = (k - a) / (b - a)
            np.testing.assert_allclose(cam[..., k], (1 - t) * cam[..., a] + t * cam[..., b], atol=1e-5)


def test_maps_report_and_sanity_numbers_are_logged_to_the_training_run(explained):
    import mlflow

    tmp, result = explained
    run_id = json.loads((tmp / "models/mlflow_run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    logged = {a.path for a in client.list_artifacts(run_id, "explain")}
    assert {"explain/report.html", "explain/contact_sheet.png", "explain/sanity.json", "explain/maps"} <= logged
    maps = {a.path for a in client.list_artifacts(run_id, "explain/maps")}
    cases = [c["case_id"] for c in csv.DictReader((tmp / "explain/cases.csv").open())]
    assert maps == {f"explain/maps/{c}.png" for c in cases} and len(cases) == result["n_cases"]
    metrics = client.get_run(run_id).data.metrics
    assert {"saliency_randomization_spearman", "saliency_pointing_game_hit_rate",
            "saliency_pointing_game_random_baseline", "saliency_energy_inside_mean"} <= set(metrics)


def test_review_round_trip_export_import_report_and_agreement(explained, tiny_ingested, demo_cohort):
    """In real Chromium: mark cases in the report and export them; `resdx review import` stores the file; evaluate
    reports agreement and kappa; the next report shows the verdicts (escaped) beside each case."""
    from browser import chromium_context

    from pipeline.io.reviews import read_reviews
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.explain import run_explain
    from pipeline.stages.review import import_review

    tmp, _ = explained
    # the fixture's model, with its own evaluate/explain folders and verdict store (nothing shared is touched)
    explain = {"out_dir": str(tmp / "explain-rv"), "target_layer": "layer1", "splits": ["val", "test"]}
    params = train_params(tmp, tiny_ingested, data={"manifest": str(demo_cohort), "reviews_dir": str(tmp / "reviews")},
                          explain=explain, evaluate={"out_dir": str(tmp / "reports-rv")})
    run_evaluate(params)
    run_explain(params)
    report = tmp / "explain-rv" / "report.html"
    evil = '=cmd|"/c calc"!A0 <img src=x onerror=alert(1)>'
    with chromium_context(viewport=(1400, 1000)) as ctx:
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        page.goto(report.as_uri(), wait_until="load")
        rows = page.locator("tr.case")
        ids = page.eval_on_selector_all("tr.case", "rs => rs.map(r => r.dataset.caseId)")
        rows.nth(0).locator('input[value="agree"]').check()
        rows.nth(1).locator('input[value="disagree"]').check()
        rows.nth(1).locator("textarea").fill(evil)
        rows.nth(1).locator("select.corrected").select_option("1")
        rows.nth(2).locator('input[value="unsure"]').check()
        with page.expect_download() as dl:
            page.click("#export-csv")
        export = tmp / "dr-a.csv"
        export.write_bytes(Path(dl.value.path()).read_bytes())
    # the command a reader runs
    import subprocess
    import sys

    import yaml

    pfile = tmp / "params-rv.yaml"
    pfile.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    cli = subprocess.run([sys.executable, "-m", "pipeline.cli", "review", "import", str(export), "--reader", "dr-a",
                          "--params", str(pfile)], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    summary = " ".join((cli.stdout + cli.stderr).split())
    assert "dr-a" in summary and "dvc repro" in summary
    assert [v.review for v in read_reviews(tmp / "reviews")["dr-a"]].count("agree") == 1
    # a second reader: the same file with the first verdict turned round
    text = export.read_text(encoding="utf-8").splitlines(keepends=True)
    second = tmp / "dr-b.csv"
    second.write_text(text[0] + text[1].replace(",agree,", ",disagree,", 1) + "".join(text[2:]), encoding="utf-8")
    import_review(params, second, "dr-b")
    stored = read_reviews(tmp / "reviews")
    assert sorted(stored) == ["dr-a", "dr-b"]
    assert [v.comment for v in stored["dr-a"] if v.case_id == ids[1]] == [evil]

    metrics = run_evaluate(params)
    review = json.loads((tmp / "reports-rv" / "metrics.json").read_text())["review"]
    assert review["readers"]["dr-a"]["agreement"] == 0.5 and review["readers"]["dr-b"]["agreement"] == 0.0
    kappa = next(iter(review["kappa"].values()))
    assert kappa["n_shared"] == 3 and kappa["kappa"] is not None and kappa["kappa"] < 1
    assert metrics is not None
    run_explain(params)
    with chromium_context(viewport=(1400, 1000)) as ctx:
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        page.on("dialog", lambda d: pytest.fail(f"a dialog opened: {d.message}"))
        page.goto(report.as_uri(), wait_until="load")
        shown = page.locator("tr.case").nth(1).locator("li.verdict")
        texts = shown.all_inner_texts()
        assert len(texts) == 2 and texts[0].startswith("dr-a: disagree") and "corrected label 1" in texts[0]
        assert shown.nth(0).locator("q").inner_text() == evil
        assert page.locator("tr.case").nth(0).locator("li.verdict").all_inner_texts()[1].startswith("dr-b: disagree")
        page.select_option("#f-review", "prior-disagree")
        assert page.eval_on_selector_all("tr.case", "rs => rs.filter(r => !r.hidden).length") == 2

