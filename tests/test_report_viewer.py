"""The report's per-case viewer (vendored Niivue) and case list, driven in a real headless Chromium.

The cases carry a CT-like volume on an oblique, flipped grid and a map with one Gaussian peak, written as the
NIfTI overlay explain writes; the checks read the page's pixels (canvas screenshots) and the viewer's state.
"""

from __future__ import annotations

import io
import math
import time

import nibabel as nib
import numpy as np
import pytest
from browser import ARTIFACTS, chromium_context
from matplotlib.image import imread

from pipeline.core.volume import Volume
from pipeline.io.nifti import write_nifti
from pipeline.reporting.report import build_report, write_report
from pipeline.reporting.viewer import NIIVUE_VERSION, block_affine, block_factor, block_mean, niivue_script, viewer_case

EVIL = '<img src=x onerror="window.__pwned=1">'


def _rotation(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1.0]])


def _case_volume(shape=(72, 64, 36), peak=(50, 22, 24)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(HU volume int16, map float32 in [0, 1], voxel-to-RAS affine: flipped i/j, 15 degrees oblique)."""
    rng = np.random.default_rng(3)
    ii, jj, kk = np.indices(shape)
    vol = np.full(shape, -1000.0)
    body = ((ii - shape[0] / 2) / (shape[0] * 0.42)) ** 2 + ((jj - shape[1] / 2) / (shape[1] * 0.4)) ** 2 < 1
    vol[body] = 40.0
    vol[body & (((ii - 22) / 8) ** 2 + ((jj - 32) / 10) ** 2 < 1)] = -820.0  # a "lung"
    vol[body & (((ii - 50) / 4) ** 2 + ((jj - 40) / 4) ** 2 < 1)] = 700.0   # a "bone"
    vol = np.round(vol + rng.normal(0, 12, shape)).astype(np.int16)
    cam = np.exp(-(((ii - peak[0]) / 5.0) ** 2 + ((jj - peak[1]) / 5.0) ** 2 + ((kk - peak[2]) / 3.0) ** 2))
    affine = np.eye(4)
    affine[:3, :3] = _rotation(15) @ np.diag([-2.4, -2.4, 4.0])
    affine[:3, 3] = [80.0, 70.0, -60.0]
    return vol, cam.astype(np.float32), affine


# ----------------------------------------------------------------------------------------------- unit tests
def test_block_downsampling_keeps_positions():
    assert block_factor((80, 80, 80), 524_288) == 1 and block_factor((112, 112, 80), 524_288) == 2
    # 512 x 512 x 300: f = 5 gives 103 x 103 x 60 = 636,540 voxels, f = 6 gives 86 x 86 x 50 = 369,800
    assert block_factor((512, 512, 300), 524_288) == 6 and block_factor((512, 512, 300), 2_097_152) == 4
    x = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    m = block_mean(x, 2)
    assert m.shape == (3, 2, 2)
    assert m[0, 0, 0] == pytest.approx(x[:2, :2, :2].mean())
    assert m[2, 1, 1] == pytest.approx(x[4:, 2:, 2:].mean())  # the edge block repeats the last voxels
    aff = np.array([[2.0, 0, 0, 10], [0, 3.0, 0, 20], [0, 0, 4.0, 30], [0, 0, 0, 1]])
    new = block_affine(aff, 2)
    # new voxel 1 is the centre of old voxels 2 and 3, i.e. old index 2.5
    assert np.allclose(new @ [1, 1, 1, 1], aff @ [2.5, 2.5, 2.5, 1])


def test_viewer_case_encoding_round_trip():
    vol, cam, affine = _case_volume()
    v = viewer_case(vol, cam, affine, "CT", 524_288)
    assert (v.factor, v.grid, v.units, v.modality) == (1, "native", "HU", "CT")
    import base64
    import gzip

    img = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(v.volume_b64)))
    assert img.get_data_dtype() == np.int16 and np.array_equal(np.asanyarray(img.dataobj), vol)  # HU exact
    assert np.allclose(img.affine, affine)
    mp = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(v.map_b64)))
    assert mp.get_data_dtype() == np.uint8
    assert np.abs(np.asanyarray(mp.dataobj) - cam).max() <= 1.0 / 255 + 1e-6
    assert v.peak == (50, 22, 24) and np.allclose(v.peak_mm, (affine @ [50, 22, 24, 1])[:3])
    assert np.allclose(np.asarray(v.world_to_voxel).reshape(3, 4) @ [*v.peak_mm, 1], v.peak)
    assert viewer_case(vol, cam, affine, "CT", 524_288).volume_b64 == v.volume_b64  # reproducible bytes
    small = viewer_case(vol, cam, affine, "CT", 20_000)  # 36 x 32 x 18 = 20,736 > 20,000
    assert small.factor == 3 and small.shape == (24, 22, 12) and small.n_bytes < v.n_bytes
    # MR: float data are scaled into int16 by nibabel, within its quantisation
    mr = viewer_case(vol.astype(np.float32) / 700.0, cam, affine, "MR", 524_288)
    back = np.asanyarray(nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(mr.volume_b64))).dataobj)
    assert mr.units == "" and np.abs(back - vol / 700.0).max() < 1e-3


def test_vendored_niivue_is_pinned_and_licensed():
    from pipeline.reporting.viewer import VENDOR

    text = niivue_script()
    assert text.startswith("var niivue=") and "</script" not in text.lower()
    licences = (VENDOR / "LICENSES.txt").read_text()
    assert f"@niivue/niivue@{NIIVUE_VERSION} (BSD-2-Clause)" in licences and "BSD 2-Clause License" in licences
    for dep in ("fflate@", "gl-matrix@", "nifti-reader-js@"):
        assert dep in licences, dep


def test_report_without_volumes_has_no_viewer_script():
    doc = build_report({}, [{"case_id": "a", "label": 0, "probability": 0.2, "images": []}])
    assert "var niivue=" not in doc and len(doc) < 100_000


# ----------------------------------------------------------------------------------------------- browser
def _cases(tmp_path) -> tuple[list[dict], dict]:
    vol, cam, affine = _case_volume()
    overlay = write_nifti(Volume(cam, affine, {"integer_valued": False}), tmp_path / "overlays" / "c0.nii.gz")
    cases = []
    for n in range(4):
        viewer = viewer_case(vol, cam, affine, "CT", 524_288) if n != 2 else None  # case 2: a 2D case
        cases.append({
            "case_id": EVIL if n == 3 else f"case-{n}", "split": "test", "label": n % 2, "class_name": "x",
            "probability": [0.81, 0.35, 0.62, 0.9][n], "decision": [1, 0, 1, 1][n], "correct": n != 0,
            "uncertainty": [0.2, 0.7, 0.5, 0.1][n], "referred": n == 1, "images": [], "viewer": viewer,
            "overlay_path": "overlays/c0.nii.gz",
            "verdicts": [{"reader": "dr-b", "review": "disagree", "comment": EVIL, "corrected_label": "0"}]
            if n == 3 else [],
        })
    return cases, {"overlay": overlay}


def _png(data: bytes) -> np.ndarray:
    return imread(io.BytesIO(data), format="png")[..., :3]


def _tile(shot: np.ndarray, st: dict, plane: int) -> np.ndarray:
    t = next(t for t in st["tiles"] if t["plane"] == plane)
    left, top, w, h = (int(round(v / st["dpr"])) for v in t["ltwh"])
    return shot[top:top + h, left:left + w]


def _tile_point(page, st: dict, plane: int, fx: float, fy: float) -> tuple[float, float]:
    box = page.locator("#v-gl").bounding_box()
    t = next(t for t in st["tiles"] if t["plane"] == plane)
    left, top, w, h = (v / st["dpr"] for v in t["ltwh"])
    return box["x"] + left + fx * w, box["y"] + top + fy * h


def test_viewer_in_headless_chromium(tmp_path):
    cases, extra = _cases(tmp_path)
    path = write_report(tmp_path / "report.html", {"model_id": "m" * 16, "class_names": ["no", "yes"]}, cases)
    url = path.as_uri()
    overlay = nib.load(extra["overlay"])
    data = np.asanyarray(overlay.dataobj)
    peak_mm = (overlay.affine @ [*np.unravel_index(int(np.argmax(data)), data.shape), 1])[:3]
    t0 = time.perf_counter()
    with chromium_context(viewport=(1400, 1000)) as ctx:
        requests: list[str] = []
        problems: list[str] = []
        ctx.on("request", lambda r: requests.append(r.url))
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("dialog", lambda d: problems.append(f"dialog: {d.message}"))
        page.goto(url, wait_until="load")

        def state() -> dict:
            return page.evaluate("window.resdxViewer.state()")

        def wait_ready(index: int, timeout_s: float = 20.0) -> dict:
            # polled from Python: wait_for_function evaluates a string, which the report's CSP forbids
            end = time.monotonic() + timeout_s
            while True:
                s = page.evaluate("() => window.resdxViewer ? window.resdxViewer.state() : {}")
                if s.get("ready") and s.get("caseIndex") == index:
                    page.wait_for_timeout(150)
                    return state()
                assert time.monotonic() < end, f"viewer not ready on case {index}: {s}"
                page.wait_for_timeout(50)

        def canvas() -> np.ndarray:
            return _png(page.locator("#v-gl").screenshot())

        st = wait_ready(0)
        assert st["error"] == "" and st["radiological"] and st["orientationText"]
        # it opens on the map's peak: the overlay NIfTI's maximum, in millimetres
        assert np.allclose(st["mm"], peak_mm, atol=1e-3), (st["mm"], peak_mm)
        assert st["map"] == pytest.approx(1.0, abs=1 / 255) and st["window"] == [-160, 240]
        assert page.locator("#v-case").inner_text() == "case-0"
        assert "native grid 72x64x36" in page.locator("#v-grid").inner_text()
        page.locator("#cases").scroll_into_view_if_needed()
        before = canvas()

        # the wheel over the axial plane moves its slice (one voxel along S) and changes its pixels
        x, y = _tile_point(page, st, 0, 0.5, 0.5)
        page.mouse.move(x, y)
        page.mouse.wheel(0, -120)
        page.wait_for_timeout(200)
        st2 = state()
        assert st2["mm"][2] != pytest.approx(st["mm"][2], abs=0.5) and st2["vox"] != st["vox"]
        after = canvas()
        assert np.abs(_tile(after, st, 0) - _tile(before, st, 0)).mean() > 1e-3
        assert "value" in page.locator("#v-hover").inner_text() and "HU" in page.locator("#v-hover").inner_text()

        # a click in the axial plane moves the crosshair there; the coronal and sagittal planes follow
        x, y = _tile_point(page, st, 0, 0.3, 0.35)
        page.mouse.click(x, y)
        page.wait_for_timeout(200)
        st3 = state()
        assert st3["mm"][0] != pytest.approx(st2["mm"][0], abs=1) and st3["mm"][1] != pytest.approx(st2["mm"][1],
                                                                                                 abs=1)
        assert st3["mm"][2] == pytest.approx(st2["mm"][2], abs=1e-3)  # the axial slice itself stays
        clicked = canvas()
        for plane in (1, 2):
            assert np.abs(_tile(clicked, st, plane) - _tile(after, st, plane)).mean() > 1e-3, plane
        assert page.locator("#v-cross").inner_text().startswith(f"voxel {st3['vox'][0]}, {st3['vox'][1]}")

        # arrow keys scroll the plane under the mouse
        page.locator("#v-gl").focus()
        page.mouse.move(*_tile_point(page, st, 1, 0.5, 0.5))
        page.keyboard.press("ArrowUp")
        page.wait_for_timeout(150)
        assert state()["mm"][1] != pytest.approx(st3["mm"][1], abs=0.5)  # coronal moves along A

        # "jump to peak" puts the crosshair on the overlay's maximum
        page.click("#v-peak")
        page.wait_for_timeout(150)
        st4 = state()
        assert np.allclose(st4["mm"], peak_mm, atol=1e-3) and st4["map"] == pytest.approx(1.0, abs=1 / 255)

        # the opacity slider and the on/off toggle change the overlay's pixels (around the peak)
        def set_opacity(v: int) -> np.ndarray:
            page.eval_on_selector("#v-opacity", "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", v)
            page.wait_for_timeout(150)
            return canvas()

        full, none = set_opacity(100), set_opacity(0)
        assert state()["opacity"] == 0
        half = set_opacity(50)
        assert np.abs(full - half).mean() > 1e-3 and np.abs(half - none).mean() > 1e-3
        page.uncheck("#v-map-on")
        page.wait_for_timeout(150)
        off = canvas()
        assert np.abs(off - none).max() < 0.02 and state()["opacity"] == 0
        page.check("#v-map-on")

        # window presets and right-drag windowing
        page.select_option("#v-wl", "lung")
        page.wait_for_timeout(100)
        assert state()["window"] == [-1350, 150] and "W 1500 L -600" in page.locator("#v-window").inner_text()
        lung = canvas()
        assert np.abs(lung - half).mean() > 1e-3
        x, y = _tile_point(page, st, 0, 0.5, 0.5)
        page.mouse.move(x, y)
        page.mouse.down(button="right")
        page.mouse.move(x + 60, y + 40, steps=5)
        page.mouse.up(button="right")
        page.wait_for_timeout(150)
        assert state()["window"] != [-1350, 150]
        page.screenshot(path=str(ARTIFACTS / "report_viewer.png"))

        # keyboard navigation between cases: n / p, d = next disagreement (wrong decision or a reader disagreed)
        page.locator("h1").click()
        page.keyboard.press("n")
        assert wait_ready(1)["caseIndex"] == 1
        page.keyboard.press("n")  # case 2 has no volume: the viewer says so
        wait_ready(2)
        assert "no volume" in page.locator("#v-grid").inner_text()
        page.keyboard.press("p")
        wait_ready(1)
        page.keyboard.press("d")
        assert wait_ready(3)["caseIndex"] == 3  # the hostile case id, with an earlier reader's "disagree"
        assert page.locator("#v-case").inner_text() == EVIL  # shown as text
        assert page.locator("li.verdict q").inner_text() == EVIL
        page.keyboard.press("x")
        assert page.locator("#case-3 input[value=disagree]").is_checked()

        # filters survive a reload
        page.select_option("#f-review", "prior-disagree")
        page.fill("#f-pmin", "0.5")
        shown = page.eval_on_selector_all("tr.case", "rs => rs.filter(r => !r.hidden).map(r => r.dataset.index)")
        assert shown == ["3"]
        page.reload(wait_until="load")
        assert page.input_value("#f-review") == "prior-disagree" and page.input_value("#f-pmin") == "0.5"
        assert page.eval_on_selector_all("tr.case", "rs => rs.filter(r => !r.hidden).map(r => r.dataset.index)") \
            == ["3"]
        assert wait_ready(3)["caseIndex"] == 3
        assert page.locator("#case-3 input[value=disagree]").is_checked()  # the mark survived too
        assert page.evaluate("window.__pwned") is None

    elapsed = time.perf_counter() - t0
    assert not problems, problems
    assert requests, "request recording did not work"
    bad = [u for u in requests if not (u == url or u.startswith(("data:", "blob:file://", "blob:null/")))]
    assert not bad, f"unexpected requests: {bad}"
    assert elapsed < 90
