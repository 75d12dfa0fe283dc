"""Self-contained HTML review report (plus a PNG contact sheet) for a radiologist.

``build_report(summary, cases)`` returns ONE offline HTML document: inline CSS and vanilla JS, images as
``data:`` URIs, a Content-Security-Policy that forbids every network fetch, and no external URL anywhere.
It shows the run summary (model/data version, metrics with 95% intervals, calibration plot, saliency sanity
checks, optional model card) and a sortable/filterable case gallery with a review column (agree / disagree /
unsure + comment) that exports a CSV in the browser (Blob + download link, no server).

The page is the Jinja2 template ``templates/report.html.j2``; it inlines ``templates/report.css`` and
``templates/report.js``. Autoescaping is on: every value is HTML-escaped on output (by ``html.escape``, see
``_finalize``); only the CSP constant, the model card's Markdown rendering and the vendored Niivue bundle
(checked against its pinned hash, pipeline/reporting/viewer.py) are marked safe. A case with a 3D map also
carries its volume and map for the viewer (``case["viewer"]``, a `ViewerCase`), and earlier readers' verdicts
(``case["verdicts"]``) are shown beside it.
Nothing is looked up: the report prints only what it is given.
"""

from __future__ import annotations

import functools
import hashlib
import html
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from pipeline.core.review import REVIEW_CHOICES, case_set_id
from pipeline.io.artifacts import save_bytes, save_text
from pipeline.reporting import report_format as F
from pipeline.reporting.viewer import niivue_script

__all__ = ["build_report", "write_report", "contact_sheet"]


TEMPLATES = Path(__file__).with_name("templates")
_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "base-uri 'none'; form-action 'none'")


# --------------------------------------------------------------------------------------------- template
def _finalize(value: Any) -> Any:
    """Escape every `{{ ... }}` value with `html.escape` (quotes as &quot; / &#x27;); None prints as nothing.

    Autoescape would escape it anyway (markupsafe spells quotes &#34; / &#39;); escaping here first keeps the
    entities the report always had. Already-safe values (Markup, macro output) pass through unchanged.
    """
    if hasattr(value, "__html__"):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(fmt=F.fmt, label=F.label, interval=F.fmt_interval)
    env.tests.update(interval=F.is_interval, seq=F.is_seq)
    return env


# --------------------------------------------------------------------------------------------- context
def _report_id(summary: Mapping, cases: Sequence[Mapping]) -> str:
    if summary.get("report_id"):
        return str(summary["report_id"])
    model = summary.get("model") or {}
    data = summary.get("data") or {}
    key = json.dumps({"run": model.get("run_id"), "commit": model.get("git_commit"), "data": data.get("data_hash"),
                      "cases": [str(c.get("case_id")) for c in cases]}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _metrics(summary: Mapping) -> dict:
    metrics = summary.get("metrics") or {}
    flat = {k: v for k, v in metrics.items() if k != "calibration" and F.is_flat_metrics(v)}
    cal = metrics.get("calibration")
    png = summary.get("calibration_png")
    return {
        "splits": list(flat),
        "rows": F.metric_rows(flat) if flat else [],
        "calibration": cal if isinstance(cal, Mapping) and cal else None,
        "other": [(k, v) for k, v in metrics.items() if k != "calibration" and k not in flat],
        "calibration_png": F.data_uri(png) if png else None,
    }


def _sanity(summary: Mapping) -> list[dict]:
    rows = []
    for name, value in (summary.get("sanity") or {}).items():
        kind, text = F.sanity_verdict(value)
        pairs = [(k, v) for k, v in value.items() if k != "passed"] if isinstance(value, Mapping) else None
        rows.append({"name": F.label(name, F.SANITY_NAMES), "pairs": pairs, "raw": value, "kind": kind,
                     "text": text})
    return rows


def _markdown_html(text: str) -> Markup:
    """Minimal, safe Markdown: raw HTML escaped; links/images/autolinks kept as plain text (offline report)."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # pragma: no cover - markdown-it-py comes with rich, a core dependency
        return Markup("<pre>" + html.escape(text, quote=True) + "</pre>")
    md = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
    md.disable(["link", "image", "autolink"])
    return Markup(md.render(text))  # html=False: markdown-it escapes every piece of the source text


def _case(index: int, case: Mapping) -> dict:
    cid = str(case.get("case_id", f"case-{index}"))
    prob = F.num(case.get("probability"))
    unc = F.num(case.get("uncertainty"))
    correct = case.get("correct")
    images = case.get("images") or []
    names = ("slice 1", "slice 2", "slice 3") if len(images) == 3 else [f"image {i + 1}" for i in range(len(images))]
    badge = ("pass", "correct") if correct is True else ("fail", "incorrect") if correct is False else ("na",
                                                                                                        "unknown")
    return {
        "index": index,
        "gid": f"rv{index}",
        "cid": cid,
        "label": case.get("label"),
        "class_name": case.get("class_name"),
        "decision": case.get("decision"),
        "split": case.get("split", F.DASH),
        "overlay_path": case.get("overlay_path", F.DASH),
        "prob": F.fmt(prob),
        "unc": F.fmt(unc),
        "referred": bool(case.get("referred")),
        "prob_attr": repr(prob) if prob is not None else "",
        "unc_attr": repr(unc) if unc is not None else "",
        "correct_attr": "1" if correct is True else ("0" if correct is False else ""),
        "badge": badge,
        "images": [{"src": F.data_uri(png), "name": names[i]} for i, png in enumerate(images)],
        "viewer": case.get("viewer"),
        "verdicts": list(case.get("verdicts") or []),
        "prior_reviews": " ".join(sorted({str(_get(v, "review")) for v in case.get("verdicts") or []})),
    }


def _get(item: Any, key: str) -> Any:
    return item.get(key) if isinstance(item, Mapping) else getattr(item, key, None)


def _label_options(cases: Sequence[Mapping]) -> list[tuple[str, str]]:
    labels: dict[str, str] = {}
    for c in cases:
        labels.setdefault(str(c.get("label")), str(c.get("class_name") or ""))
    return sorted(labels.items(), key=lambda kv: (len(kv[0]), kv[0]))


def _context(summary: Mapping, cases: Sequence[Mapping]) -> dict:
    model = summary.get("model") or {}
    parts = (model.get("name"), model.get("version") and f"v{model.get('version')}",
             model.get("run_id") and f"run {model.get('run_id')}")
    md = summary.get("model_card_md")
    rows = [_case(i, c) for i, c in enumerate(cases)]
    has_viewer = any(r["viewer"] for r in rows)
    names = summary.get("class_names")
    return {
        "csp": Markup(_CSP),
        "title": "ResDx review report",
        "report_id": _report_id(summary, cases),
        "sub": " \u00b7 ".join(str(x) for x in parts if x),
        "n_cases": len(cases),
        "n_correct": sum(1 for c in cases if c.get("correct") is True),
        "model": model,
        "data": summary.get("data") or {},
        "metrics": _metrics(summary),
        "sanity": _sanity(summary),
        "model_card": _markdown_html(str(md)) if md else None,
        "label_options": _label_options(cases),
        "cases": rows,
        "review_choices": REVIEW_CHOICES,
        # What an exported verdict file names (pipeline/core/review.py); `resdx review import` checks both.
        "model_id": summary.get("model_id", ""),
        "case_set": case_set_id(str(c.get("case_id")) for c in cases),
        # A corrected label: one of the classes (a select), or for multi-label a ';'-joined vector (a text box).
        "class_options": [] if summary.get("multi_label") or not names else [(str(k), n) for k, n in
                                                                             enumerate(names)],
        "has_viewer": has_viewer,
        "niivue": Markup(niivue_script()) if has_viewer else "",
    }


# --------------------------------------------------------------------------------------------- public API
def build_report(summary: Mapping[str, Any], cases: Sequence[Mapping[str, Any]]) -> str:
    """One self-contained HTML document (inline CSS/JS, data: images, no external URL) for human review."""
    summary = summary or {}
    cases = list(cases)
    return _environment().get_template("report.html.j2").render(_context(summary, cases))


def write_report(path: str | os.PathLike, summary: Mapping[str, Any], cases: Iterable[Mapping[str, Any]]) -> Path:
    """Build the report and write it atomically (temp file in the same folder + os.replace)."""
    path = save_text(path, build_report(summary, list(cases)))
    return path


def contact_sheet(cases: Iterable[Mapping[str, Any]], path: str | os.PathLike, dpi: int = 100) -> Path:
    """A PNG grid, one row per case (its images side by side), titled with id, label, p and correctness."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    cases = list(cases)
    path = Path(path)
    ncols = max([len(c.get("images") or []) for c in cases] + [1])
    nrows = max(len(cases), 1)
    fig = Figure(figsize=(2.6 * ncols, 2.6 * nrows + 0.2), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not cases:
        axes[0, 0].text(0.5, 0.5, "no cases", ha="center", va="center")
    for r, case in enumerate(cases):
        for c, png in enumerate(case.get("images") or []):
            axes[r, c].imshow(imread(io.BytesIO(bytes(png)), format="png"))
        prob = F.num(case.get("probability"))
        correct = case.get("correct")
        verdict = {True: "correct", False: "INCORRECT"}.get(correct, "")
        colour = {True: "#116329", False: "#a40e26"}.get(correct, "black")
        ptxt = f"{prob:.2f}" if prob is not None else "-"
        axes[r, 0].set_title(f"{case.get('case_id')}  y={case.get('label')}  p={ptxt}  {verdict}", loc="left",
                             fontsize=8, color=colour)
        axes[r, 0].axis("off")
    fig.tight_layout(pad=0.4)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    save_bytes(path, buf.getvalue())
    return path
