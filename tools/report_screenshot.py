"""Screenshots of the review report's viewer, as committed under docs/ (reproducible from a `make repro` report).

    python -m tools.report_screenshot [reports/explain/report.html] [--out docs] [--case N] [--width 1400]

Drives the system Chromium (Debian's package; Playwright's own browser download is never used) offline, opens
case N (default: the first CT case whose decision is "lesion" and correct, else the first such case, else the first
with a volume) and
writes docs/review-viewer.png (the case list and the viewer, one screen at --width) and docs/review-viewer-
lung.png (the same case in the lung window, map at full opacity).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def _wait_ready(page, index: int, timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while True:
        s = page.evaluate("() => window.resdxViewer ? window.resdxViewer.state() : {}")
        if s.get("ready") and s.get("caseIndex") == index:
            page.wait_for_timeout(300)
            return
        if time.monotonic() > end:
            raise SystemExit(f"the viewer did not open case {index}: {s}")
        page.wait_for_timeout(100)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", nargs="?", default="reports/explain/report.html", type=Path)
    ap.add_argument("--out", default=Path("docs"), type=Path)
    ap.add_argument("--case", type=int, default=None, help="case index (data-index) to show")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
        ctx = browser.new_context(viewport={"width": args.width, "height": args.height}, offline=True)
        page = ctx.new_page()
        page.goto(args.report.resolve().as_uri(), wait_until="load")
        index = args.case
        if index is None:
            index = page.evaluate("""() => {
                const rows = [...document.querySelectorAll('tr.case')].filter(r => r.dataset.hasVolume === '1');
                const ct = r => document.getElementById('vd-' + r.dataset.index + '-vol').dataset.modality === 'CT';
                const good = r => r.dataset.decision === '1' && r.dataset.correct === '1';
                const hit = rows.find(r => good(r) && ct(r)) || rows.find(good) || rows[0];
                return hit ? Number(hit.dataset.index) : -1; }""")
        if index < 0:
            raise SystemExit("no case with a volume in this report")
        page.evaluate(f"window.resdxSelect({index})")
        _wait_ready(page, index)
        page.evaluate("""() => { const h = document.getElementById('h-cases');
            window.scrollTo(0, h.getBoundingClientRect().top + window.scrollY - 4); }""")
        page.wait_for_timeout(300)
        page.screenshot(path=str(args.out / "review-viewer.png"))
        page.select_option("#v-wl", "lung") if page.locator("#v-wl option[value=lung]").count() else None
        page.eval_on_selector("#v-opacity", "e => { e.value = 100; e.dispatchEvent(new Event('input')); }")
        page.wait_for_timeout(300)
        page.screenshot(path=str(args.out / "review-viewer-lung.png"))
        browser.close()
    print(f"wrote {args.out / 'review-viewer.png'} and {args.out / 'review-viewer-lung.png'} (case {index})")


if __name__ == "__main__":
    main()
