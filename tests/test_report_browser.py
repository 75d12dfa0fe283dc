"""The HTML review report: unit tests of build_report, and the page driven in a real headless Chromium."""

from __future__ import annotations

import csv
import html
import io
import re
import time
from pathlib import Path

import numpy as np
import pytest
from browser import ARTIFACTS, chromium_context

from pipeline.core.review import CSV_COLUMNS, case_set_id
from pipeline.reporting.report import build_report, contact_sheet, write_report

PROBS = [0.91, 0.12, 0.55, 0.73, 0.08, 0.64, 0.33, 0.97]
LABELS = [1, 0, 1, 0, 0, 1, 1, 1]
CASE_IDS = [f"case-{i:02d}" for i in range(1, 8)] + ['case-08,"b"']


def _png(rng: np.random.Generator, title: str) -> bytes:
    """A random 'slice' with a saliency overlay and a colour bar, rendered by matplotlib (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.0, 1.7), dpi=60)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(rng.normal(size=(32, 32)), cmap="gray")
    yy, xx = np.mgrid[:32, :32]
    cy, cx = rng.integers(8, 24, size=2)
    heat = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0)
    im = ax.imshow(heat, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=7)
    ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


@pytest.fixture(scope="module")
def report_inputs() -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(0)
    cases = []
    for i, (cid, p, y) in enumerate(zip(CASE_IDS, PROBS, LABELS)):
        decision = int(p >= 0.5)
        n_img = 1 if i == 4 else 3  # one 2D case
        cases.append({
            "case_id": cid, "split": "test", "label": y, "class_name": ["normal", "lesion"][y],
            "probability": p, "decision": decision, "correct": decision == y, "uncertainty": 1 - abs(2 * p - 1),
            "images": [_png(rng, t) for t in ("axial", "coronal", "sagittal")[:n_img]],
            "overlay_path": f"overlays/{cid}_gradcam.nii.gz",
        })
    summary = {
        "model": {"name": "resnet18-3d", "version": "3", "run_id": "abc123", "git_commit": "deadbeef"},
        "data": {"data_hash": "md5:0123456789abcdef", "counts": {"train": 80, "val": 20, "test": 8}},
        "metrics": {
            "test": {"n": 8, "auroc": 0.93, "auroc_ci95": [0.88, 0.97], "auroc_ci95_delong": [0.86, 0.99],
                     "accuracy": 0.75, "sensitivity": 0.8, "specificity": 0.667, "ece": 0.08,
                     "ece_calibrated": 0.04, "brier": 0.12},
            "val": {"n": 20, "auroc": 0.9, "auroc_ci95": [0.8, 0.97], "accuracy": 0.85},
            "calibration": {"temperature": 1.37, "threshold": 0.5, "operating_point": "youden"},
            "subgroups": {"test": {"modality": {"CT": {"n": 3, "result": "too few cases"}}}},
        },
        "calibration_png": _png(rng, "reliability"),
        "sanity": {
            "randomization": {"spearman": 0.12, "ssim": 0.2, "passed": True},
            "pointing_game": {"hit_rate": 0.81, "random_baseline": 0.25, "n": 8},
            "energy_inside": {"mean": 0.1, "random_baseline": 0.15},
        },
        "model_card_md": "# Model card\n\nIntended use: **research** only.\n\n- item one\n- item <b>two</b>\n\n"
                         "| metric | value |\n|---|---|\n| AUROC | 0.93 |\n\nSee [paper](https://example.org/p).\n",
    }
    return summary, cases


# ----------------------------------------------------------------------------------------------- unit tests
_URL_ATTR = re.compile(r"""\b(?:src|href|action|formaction|poster|data|srcset|background)\s*=\s*["']([^"']*)""", re.I)


def test_report_is_self_contained(report_inputs):
    summary, cases = report_inputs
    doc = build_report(summary, cases)
    assert doc.startswith("<!DOCTYPE html>")
    for url in _URL_ATTR.findall(doc):
        assert not url.startswith(("http:", "https:", "//", "ftp:", "file:")), url
        assert url.startswith(("data:image/png;base64,", "#")), url
    css = "".join(re.findall(r"<style>(.*?)</style>", doc, re.S)).lower()
    assert css and "url(" not in css and "@import" not in css and "@font-face" not in css
    # the only web address is the model card's link, kept as plain text, never an href
    assert re.findall(r"https?://[^\s<)]*", doc) == ["https://example.org/p"]
    assert "default-src 'none'" in doc  # CSP forbids any fetch even if something slipped through


def test_report_contents(report_inputs):
    summary, cases = report_inputs
    doc = build_report(summary, cases)
    for c in cases:
        assert f'data-case-id="{html.escape(c["case_id"])}"' in doc
        assert html.escape(c["overlay_path"]) in doc
    assert doc.count('<tr class="case"') == len(cases)
    assert doc.count("data:image/png;base64,") == sum(len(c["images"]) for c in cases) + 1
    for text in ("resnet18-3d", "abc123", "deadbeef", "md5:0123456789abcdef", "0.930", "0.880\u20130.970",
                 "DeLong", "1.370", "Export review CSV", "Model card", "<strong>research</strong>",
                 "<th>metric</th>", "item &lt;b&gt;two&lt;/b&gt;"):
        assert text.lower() in doc.lower(), text
    # sanity badges: explicit flag, above random baseline, and not above it
    assert doc.count("badge-pass\">pass") == 2 and "fail (not above random)" in doc


def test_report_escapes_everything():
    evil = '<script>alert("x")</script>'
    case = {"case_id": evil, "split": "<i>s</i>", "label": 1, "class_name": "<b>c</b>", "probability": 0.5,
            "decision": "<u>1</u>", "correct": True, "uncertainty": 1.0, "images": [],
            "overlay_path": '"><img src=x onerror=alert(1)>'}
    summary = {"model": {"name": "<script>m</script>"}, "data": {"data_hash": "<x>"},
               "sanity": {"<s>": {"passed": False}}, "model_card_md": "<script>c</script>\n\n# <img src=x>"}
    doc = build_report(summary, [case])
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in doc
    assert doc.count("<script") == 1  # only the report's own script element
    for raw in ("<i>s</i>", "<b>c</b>", "<u>1</u>", "<img src=x", "<x>", "<s>", "<script>m"):
        assert raw not in doc, raw


def test_report_handles_missing_parts(tmp_path):
    doc = build_report({}, [{"case_id": "only", "label": 0, "probability": None, "images": []}])
    assert "only" in doc and "No metrics given." in doc
    out = write_report(tmp_path / "sub" / "r.html", {}, [])
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in out.parent.iterdir()] == ["r.html"]  # no temp file left behind


def test_contact_sheet(report_inputs, tmp_path):
    from matplotlib.image import imread

    _, cases = report_inputs
    out = contact_sheet(cases, tmp_path / "sheet.png")
    img = imread(out)
    assert img.shape[0] > img.shape[1] > 100  # 8 rows of 3 columns
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.png"]


# ----------------------------------------------------------------------------------------------- browser
def _expected_csv(cases: list[dict], marks: dict[str, tuple[str, str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(CSV_COLUMNS)
    case_set = case_set_id(c["case_id"] for c in cases)
    for c in cases:
        review, comment = marks.get(c["case_id"], ("", ""))
        w.writerow([c["case_id"], c["label"], repr(c["probability"]), c["decision"], review, comment, "", "",
                    case_set])
    return buf.getvalue()


def test_report_in_headless_chromium(report_inputs, tmp_path):
    summary, cases = report_inputs
    path = write_report(tmp_path / "report.html", summary, cases)
    url = path.as_uri()
    ids = [c["case_id"] for c in cases]
    prob = {c["case_id"]: c["probability"] for c in cases}
    t0 = time.perf_counter()
    with chromium_context() as ctx:
        requests: list[str] = []
        problems: list[str] = []
        ctx.on("request", lambda r: requests.append(r.url))
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type in ("error",
                                                                                                 "warning") else None)
        page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
        page.goto(url, wait_until="load")

        def order() -> list[str]:
            return page.eval_on_selector_all("#case-rows tr.case", "rs => rs.map(r => r.dataset.caseId)")

        def visible() -> list[str]:
            return page.eval_on_selector_all("#case-rows tr.case", "rs => rs.filter(r => !r.hidden && "
                                             "r.getClientRects().length).map(r => r.dataset.caseId)")

        # every case shown, in the given order, with its images, probability and overlay path
        assert order() == ids and visible() == ids
        assert page.locator("#shown-count").inner_text() == f"Showing {len(ids)} of {len(ids)} cases"
        assert page.eval_on_selector_all("img", "is => is.filter(i => i.complete && i.naturalWidth > 0).length") \
            == sum(len(c["images"]) for c in cases) + 1
        row = page.locator("tr.case").nth(0)
        assert "0.910" in row.locator(".prob").inner_text()
        assert "overlays/case-01_gradcam.nii.gz" in row.inner_text()
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280  # no horizontal scroll at 1280px

        # sorting
        page.select_option("#sort-key", "probability")
        assert order() == sorted(ids, key=prob.get)
        page.select_option("#sort-dir", "desc")
        assert order() == sorted(ids, key=prob.get, reverse=True)
        page.select_option("#sort-key", "caseId")
        page.select_option("#sort-dir", "asc")
        assert order() == sorted(ids)

        # filtering (combined filters intersect); the DOM order is kept
        page.select_option("#f-correct", "0")
        assert visible() == [c["case_id"] for c in sorted(cases, key=lambda c: c["case_id"]) if not c["correct"]]
        page.select_option("#f-correct", "")
        page.select_option("#f-label", "1")
        page.fill("#f-pmin", "0.5")
        page.fill("#f-pmax", "0.95")
        want = sorted(c["case_id"] for c in cases if c["label"] == 1 and 0.5 <= c["probability"] <= 0.95)
        assert visible() == want and len(want) == 3
        assert page.locator("#shown-count").inner_text() == f"Showing 3 of {len(ids)} cases"
        page.click("#f-reset")
        page.select_option("#sort-key", "index")
        assert visible() == ids

        # review marks, then export: the Blob text and the real download agree with Python's csv module
        marks = {ids[0]: ("agree", "clear lesion, left lobe"), ids[2]: ("disagree", 'says "benign"\nsee prior'),
                 ids[7]: ("unsure", ""), ids[5]: ("", "comment only")}
        for cid, (review, comment) in marks.items():
            r = page.locator("tr.case").nth(ids.index(cid))
            if review:
                r.locator(f'input[value="{review}"]').check()
            if comment:
                r.locator("textarea").fill(comment)
        assert page.locator("#review-count").inner_text() == f"3 of {len(ids)} reviewed"
        expected = _expected_csv(cases, marks)
        assert page.evaluate("window.resdxReviewCSV()") == expected
        with page.expect_download() as dl_info:
            page.click("#export-csv")
        download = dl_info.value
        assert download.suggested_filename.startswith("review-") and download.suggested_filename.endswith(".csv")
        assert Path(download.path()).read_bytes().decode("utf-8") == expected

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(ARTIFACTS / "report_browser.png"), full_page=True)

        # marks survive a reload (localStorage keyed by report id)
        page.reload(wait_until="load")
        assert page.evaluate("window.resdxReviewCSV()") == expected

    elapsed = time.perf_counter() - t0
    assert not problems, problems
    assert requests, "request recording did not work"
    bad = [u for u in requests if not (u == url or u.startswith(("data:", "blob:file://", "blob:null/")))]
    assert not bad, f"unexpected requests: {bad}"
    assert elapsed < 60
