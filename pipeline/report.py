"""Self-contained HTML review report (plus a PNG contact sheet) for a radiologist.

``build_report(summary, cases)`` returns ONE offline HTML document: inline CSS and vanilla JS, images as
``data:`` URIs, a Content-Security-Policy that forbids every network fetch, and no external URL anywhere.
It shows the run summary (model/data version, metrics with 95% intervals, calibration plot, saliency sanity
checks, optional model card) and a sortable/filterable case gallery with a review column (agree / disagree /
unsure + comment) that exports a CSV in the browser (Blob + download link, no server).

Nothing is looked up: the report prints only what it is given, and every string is HTML-escaped.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import numbers
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_report", "write_report", "contact_sheet"]

REVIEW_CHOICES = ("agree", "disagree", "unsure")
CSV_COLUMNS = ("case_id", "label", "probability", "decision", "review", "comment")

_METRIC_NAMES = {
    "n": "Cases",
    "n_positive": "Positives",
    "auroc": "AUROC",
    "auroc_micro": "AUROC (micro)",
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "f1": "F1",
    "threshold": "Threshold",
    "ece": "ECE",
    "ece_calibrated": "ECE (calibrated)",
    "ece_adaptive": "Adaptive ECE",
    "ece_adaptive_calibrated": "Adaptive ECE (calibrated)",
    "mce": "MCE",
    "mce_calibrated": "MCE (calibrated)",
    "brier": "Brier score",
    "brier_calibrated": "Brier score (calibrated)",
    "nll": "NLL",
    "nll_calibrated": "NLL (calibrated)",
    "temperature": "Temperature",
}
_SANITY_NAMES = {
    "randomization": "Model-parameter randomization",
    "pointing_game": "Pointing game",
    "energy_inside": "Saliency energy inside lesion",
}


# --------------------------------------------------------------------------------------------- helpers
def _e(value: Any) -> str:
    """HTML-escape anything (quotes included, safe in attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _fmt(value: Any, nd: int = 3) -> str:
    """A readable, escaped scalar: ints as ints, floats with `nd` decimals, None/NaN as an em dash."""
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, str) or not isinstance(value, numbers.Real):
        return _e(value)
    x = _num(value)
    if x is None:
        return "\u2014"
    if math.isinf(x):
        return "\u221e" if x > 0 else "\u2212\u221e"
    return f"{x:.{nd}f}"


def _is_interval(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(v is None or _num(v) is not None for v in value))


def _fmt_interval(value: Sequence) -> str:
    return f"{_fmt(value[0])}\u2013{_fmt(value[1])}"


def _label(key: Any, names: Mapping[str, str] = _METRIC_NAMES) -> str:
    key = str(key)
    return _e(names.get(key, key.replace("_", " ")))


def _data_uri(png: bytes | bytearray | memoryview) -> str:
    return "data:image/png;base64," + base64.b64encode(bytes(png)).decode("ascii")


def _badge(kind: str, text: str) -> str:
    return f'<span class="badge badge-{_e(kind)}">{_e(text)}</span>'


def _value_html(value: Any, depth: int = 0) -> str:
    """Generic, escaped rendering of nested dicts/lists/scalars (dicts become small key/value tables)."""
    if isinstance(value, Mapping):
        if not value:
            return "\u2014"
        rows = "".join(f'<tr><th scope="row">{_label(k)}</th><td>{_value_html(v, depth + 1)}</td></tr>'
                       for k, v in value.items())
        return f'<table class="kv kv-nested">{rows}</table>'
    if _is_interval(value):
        return f"[{_fmt_interval(value)}]"
    if isinstance(value, (list, tuple)):
        return ", ".join(_value_html(v, depth + 1) for v in value) or "\u2014"
    return _fmt(value)


def _kv_table(mapping: Mapping, caption: str | None = None, cls: str = "kv") -> str:
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    rows = "".join(f'<tr><th scope="row">{_label(k)}</th><td>{_value_html(v)}</td></tr>' for k, v in mapping.items())
    return f'<table class="{cls}">{cap}<tbody>{rows}</tbody></table>'


def _report_id(summary: Mapping, cases: Sequence[Mapping]) -> str:
    if summary.get("report_id"):
        return str(summary["report_id"])
    model = summary.get("model") or {}
    data = summary.get("data") or {}
    key = json.dumps({"run": model.get("run_id"), "commit": model.get("git_commit"), "data": data.get("data_hash"),
                      "cases": [str(c.get("case_id")) for c in cases]}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- summary
def _model_data_section(summary: Mapping) -> str:
    model = summary.get("model") or {}
    data = summary.get("data") or {}
    parts = []
    if model:
        parts.append(_kv_table(model, "Model"))
    if data:
        parts.append(_kv_table(data, "Data"))
    if not parts:
        parts.append("<p>No model or data version given.</p>")
    return ('<section aria-labelledby="h-version"><h2 id="h-version">Model and data version</h2>'
            f'<div class="cards">{"".join(parts)}</div></section>')


def _is_flat_metrics(section: Any) -> bool:
    return isinstance(section, Mapping) and bool(section) and all(
        v is None or isinstance(v, (int, float, str)) or _is_interval(v) for v in section.values())


def _metrics_table(splits: Mapping[str, Mapping]) -> str:
    """One table: a row per metric, a column per split; `X_ci95*` keys join X's cell as intervals."""
    keys: list[str] = []
    for section in splits.values():
        for k in section:
            if k not in keys:
                keys.append(k)
    base_keys = [k for k in keys if not any(k.startswith(f"{b}_ci95") for b in keys if b != k)]
    head = "".join(f'<th scope="col">{_e(s)}</th>' for s in splits)
    body = []
    for k in base_keys:
        cells = []
        for section in splits.values():
            if k not in section:
                cells.append("<td>\u2014</td>")
                continue
            v = section[k]
            text = f"[{_fmt_interval(v)}]" if _is_interval(v) else _fmt(v)
            extra = []
            for ck, cv in section.items():
                if ck.startswith(f"{k}_ci95") and _is_interval(cv):
                    method = ck[len(f"{k}_ci95"):].strip("_").replace("_", " ")
                    name = "95% CI" + (f" ({_e(method)})" if method else "")
                    extra.append(f'<span class="ci">{name} {_fmt_interval(cv)}</span>')
            cells.append(f'<td><span class="val">{text}</span>{"".join(extra)}</td>')
        body.append(f'<tr><th scope="row">{_label(k)}</th>{"".join(cells)}</tr>')
    return (f'<table class="metrics"><caption>Metrics (95% confidence intervals)</caption>'
            f'<thead><tr><th scope="col">Metric</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')


def _metrics_section(summary: Mapping) -> str:
    metrics = summary.get("metrics") or {}
    flat = {k: v for k, v in metrics.items() if k != "calibration" and _is_flat_metrics(v)}
    parts = []
    if flat:
        parts.append(_metrics_table(flat))
    cal = metrics.get("calibration")
    if isinstance(cal, Mapping) and cal:
        parts.append(_kv_table(cal, "Calibration"))
    other = {k: v for k, v in metrics.items() if k != "calibration" and k not in flat}
    for k, v in other.items():
        parts.append(f'<details class="more"><summary>{_label(k)}</summary>{_value_html(v)}</details>')
    png = summary.get("calibration_png")
    if png:
        parts.append('<figure class="calplot"><img src="' + _data_uri(png) + '" alt="Calibration (reliability) '
                     'plot of the test split"><figcaption>Calibration plot</figcaption></figure>')
    if not parts:
        parts.append("<p>No metrics given.</p>")
    return ('<section aria-labelledby="h-metrics"><h2 id="h-metrics">Performance</h2>'
            f'<div class="cards">{"".join(parts)}</div></section>')


def _sanity_verdict(value: Any) -> tuple[str, str]:
    """(badge kind, text): the explicit `passed` flag wins; else better than the random baseline."""
    if isinstance(value, bool):
        return ("pass", "pass") if value else ("fail", "fail")
    if not isinstance(value, Mapping):
        return "na", "n/a"
    if isinstance(value.get("passed"), bool):
        return ("pass", "pass") if value["passed"] else ("fail", "fail")
    base = _num(value.get("random_baseline"))
    for key in ("hit_rate", "mean"):
        x = _num(value.get(key))
        if x is not None and base is not None:
            return ("pass", "pass (above random)") if x > base else ("fail", "fail (not above random)")
    return "na", "n/a"


def _sanity_section(summary: Mapping) -> str:
    sanity = summary.get("sanity") or {}
    if not sanity:
        body = "<p>No sanity checks given.</p>"
    else:
        rows = []
        for name, value in sanity.items():
            kind, text = _sanity_verdict(value)
            if isinstance(value, Mapping):
                details = "; ".join(f"{_label(k)} = {_value_html(v)}" for k, v in value.items() if k != "passed")
            else:
                details = _value_html(value)
            rows.append(f'<tr><th scope="row">{_label(name, _SANITY_NAMES)}</th><td>{details or "—"}</td>'
                        f"<td>{_badge(kind, text)}</td></tr>")
        body = ('<table class="sanity"><caption>Saliency sanity checks</caption><thead><tr><th scope="col">Check'
                '</th><th scope="col">Values</th><th scope="col">Result</th></tr></thead>'
                f'<tbody>{"".join(rows)}</tbody></table>')
    return f'<section aria-labelledby="h-sanity"><h2 id="h-sanity">Explanation sanity checks</h2>{body}</section>'


def _markdown_html(text: str) -> str:
    """Minimal, safe Markdown: raw HTML escaped; links/images/autolinks kept as plain text (offline report)."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # pragma: no cover - markdown-it-py comes with rich, a core dependency
        return f"<pre>{_e(text)}</pre>"
    md = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
    md.disable(["link", "image", "autolink"])
    return md.render(text)


def _model_card_section(summary: Mapping) -> str:
    text = summary.get("model_card_md")
    if not text:
        return ""
    return ('<section aria-labelledby="h-card"><h2 id="h-card">Model card</h2><details class="model-card">'
            f'<summary>Show model card</summary><div class="md">{_markdown_html(str(text))}</div></details></section>')


# --------------------------------------------------------------------------------------------- gallery
def _case_row(index: int, case: Mapping) -> str:
    cid = str(case.get("case_id", f"case-{index}"))
    label = case.get("label")
    prob = _num(case.get("probability"))
    unc = _num(case.get("uncertainty"))
    correct = case.get("correct")
    decision = case.get("decision")
    images = case.get("images") or []
    names = ("slice 1", "slice 2", "slice 3") if len(images) == 3 else tuple(f"image {i + 1}" for i in
                                                                              range(len(images)))
    imgs = "".join(
        f'<img class="slice" src="{_data_uri(png)}" alt="Case {_e(cid)}, {names[i]} of {len(images)} with '
        f'saliency overlay" title="Click to enlarge" tabindex="0">' for i, png in enumerate(images)
    ) or '<span class="muted">no image</span>'
    if correct is True:
        cbadge = _badge("pass", "correct")
    elif correct is False:
        cbadge = _badge("fail", "incorrect")
    else:
        cbadge = _badge("na", "unknown")
    class_name = case.get("class_name")
    label_text = _e(label) + (f" <span class='muted'>({_e(class_name)})</span>" if class_name else "")
    prob_attr = repr(prob) if prob is not None else ""
    unc_attr = repr(unc) if unc is not None else ""
    corr_attr = "1" if correct is True else ("0" if correct is False else "")
    gid = f"rv{index}"
    radios = "".join(
        f'<label class="choice"><input type="radio" name="{gid}" value="{c}" data-review="{c}"> {c}</label>'
        for c in REVIEW_CHOICES
    )
    return (
        f'<tr class="case" id="case-{index}" data-index="{index}" data-case-id="{_e(cid)}" data-label="{_e(label)}" '
        f'data-probability="{prob_attr}" data-correct="{corr_attr}" data-uncertainty="{unc_attr}" '
        f'data-decision="{_e(decision)}">'
        f'<th scope="row" class="c-id"><span class="case-id">{_e(cid)}</span>'
        f'<span class="muted small">split: {_e(case.get("split", "—"))}</span>'
        f'<span class="small">overlay: <code class="overlay-path">{_e(case.get("overlay_path", "—"))}</code></span>'
        "</th>"
        f'<td class="c-img"><div class="slices">{imgs}</div></td>'
        '<td class="c-pred"><dl>'
        f"<dt>True label</dt><dd>{label_text}</dd>"
        f'<dt>Calibrated p</dt><dd class="prob">{_fmt(prob)}</dd>'
        f'<dt>Decision</dt><dd class="decision">{_e(decision)}</dd>'
        f"<dt>Uncertainty</dt><dd>{_fmt(unc)}</dd>"
        f"</dl>{cbadge}</td>"
        f'<td class="c-review"><fieldset><legend class="sr-only">Review of case {_e(cid)}</legend>'
        f'<div class="choices">{radios}</div>'
        f'<label class="sr-only" for="{gid}-c">Comment on case {_e(cid)}</label>'
        f'<textarea id="{gid}-c" class="comment" rows="3" placeholder="Comment"></textarea></fieldset></td>'
        "</tr>"
    )


def _gallery_section(cases: Sequence[Mapping]) -> str:
    labels: dict[str, str] = {}
    for c in cases:
        key = str(c.get("label"))
        labels.setdefault(key, str(c.get("class_name") or ""))
    label_opts = "".join(
        f'<option value="{_e(k)}">{_e(k)}{" (" + _e(n) + ")" if n else ""}</option>'
        for k, n in sorted(labels.items(), key=lambda kv: (len(kv[0]), kv[0]))
    )
    rows = "".join(_case_row(i, c) for i, c in enumerate(cases))
    n = len(cases)
    return f"""<section aria-labelledby="h-cases" id="cases"><h2 id="h-cases">Cases</h2>
<form class="controls no-print" id="controls" onsubmit="return false" aria-label="Sort and filter cases">
  <fieldset><legend>Sort</legend>
    <label for="sort-key">by</label>
    <select id="sort-key">
      <option value="index">original order</option>
      <option value="caseId">case id</option>
      <option value="label">true label</option>
      <option value="probability">calibrated probability</option>
      <option value="correct">correct / incorrect</option>
      <option value="uncertainty">uncertainty</option>
    </select>
    <label for="sort-dir">order</label>
    <select id="sort-dir"><option value="asc">ascending</option><option value="desc">descending</option></select>
  </fieldset>
  <fieldset><legend>Filter</legend>
    <label for="f-label">true label</label>
    <select id="f-label"><option value="">all</option>{label_opts}</select>
    <label for="f-correct">result</label>
    <select id="f-correct"><option value="">all</option><option value="1">correct</option>
      <option value="0">incorrect</option></select>
    <label for="f-pmin">p from</label>
    <input id="f-pmin" type="number" min="0" max="1" step="0.01" value="0" inputmode="decimal">
    <label for="f-pmax">to</label>
    <input id="f-pmax" type="number" min="0" max="1" step="0.01" value="1" inputmode="decimal">
    <button type="button" id="f-reset">Reset</button>
  </fieldset>
  <div class="actions">
    <p id="shown-count" aria-live="polite">Showing {n} of {n} cases</p>
    <p id="review-count" aria-live="polite">0 of {n} reviewed</p>
    <button type="button" id="export-csv">Export review CSV</button>
  </div>
</form>
<table class="gallery" id="gallery"><caption class="sr-only">Cases with saliency images, prediction and review
</caption><thead><tr><th scope="col">Case</th><th scope="col">Saliency (overlay + colour bar)</th>
<th scope="col">Prediction</th><th scope="col">Review</th></tr></thead>
<tbody id="case-rows">{rows}</tbody></table>
</section>"""


# --------------------------------------------------------------------------------------------- page
_CSS = """
:root{--fg:#1b1f24;--muted:#57606a;--line:#d0d7de;--bg:#fff;--soft:#f6f8fa;--accent:#0b5cad;
--ok:#116329;--okbg:#dafbe1;--bad:#a40e26;--badbg:#ffebe9;--na:#57606a;--nabg:#eaeef2}
*{box-sizing:border-box}
html{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);
background:var(--bg)}
body{margin:0 auto;padding:0 24px 48px;max-width:1400px;min-width:960px}
header.top{border-bottom:2px solid var(--fg);padding:16px 0 8px;margin-bottom:8px}
h1{font-size:1.6rem;margin:0}h2{font-size:1.25rem;margin:28px 0 10px;border-bottom:1px solid var(--line);
padding-bottom:4px}
.muted{color:var(--muted)}.small{font-size:.82rem;display:block}
.sr-only{position:absolute;width:1px;height:1px;padding:0;margin:-1px;overflow:hidden;clip:rect(0,0,0,0);border:0}
.skip{position:absolute;left:-9999px}.skip:focus{left:8px;top:8px;background:#fff;padding:6px;z-index:9}
.cards{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
caption{text-align:left;font-weight:600;padding:4px 0}
th,td{border:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
thead th{background:var(--soft)}
table.kv th{background:var(--soft);font-weight:600;white-space:nowrap}
table.kv-nested{font-size:.85rem}table.kv-nested th,table.kv-nested td{padding:2px 6px}
table.metrics td .val{display:block;font-weight:600}
table.metrics td .ci{display:block;font-size:.8rem;color:var(--muted)}
figure.calplot{margin:0}figure.calplot img{max-width:420px;border:1px solid var(--line)}
figcaption{font-size:.85rem;color:var(--muted)}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:.8rem;font-weight:600;border:1px solid}
.badge-pass{color:var(--ok);background:var(--okbg);border-color:var(--ok)}
.badge-fail{color:var(--bad);background:var(--badbg);border-color:var(--bad)}
.badge-na{color:var(--na);background:var(--nabg);border-color:var(--na)}
details.more,details.model-card{border:1px solid var(--line);padding:6px 10px;border-radius:6px;max-width:100%}
details summary{cursor:pointer;font-weight:600}
.md{max-width:80ch}.md table{margin:8px 0}.md h1{font-size:1.25rem;margin:10px 0 6px}
.md h2{font-size:1.1rem;border:0;margin:10px 0 4px}.md h3,.md h4{font-size:1rem;margin:8px 0 4px}
form.controls{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-end;background:var(--soft);
border:1px solid var(--line);border-radius:6px;padding:8px 12px;margin-bottom:12px;position:sticky;top:0;z-index:2}
form.controls fieldset{border:0;margin:0;padding:0;display:flex;gap:6px;align-items:center;flex-wrap:wrap}
form.controls legend{font-weight:600;float:left;margin-right:6px}
form.controls input[type=number]{width:5.5em}
.actions{display:flex;gap:12px;align-items:center;margin-left:auto}.actions p{margin:0}
button{font:inherit;padding:4px 12px;border:1px solid var(--accent);background:var(--accent);color:#fff;
border-radius:4px;cursor:pointer}
button#f-reset{background:#fff;color:var(--accent)}
:focus-visible{outline:3px solid #f0b400;outline-offset:2px}
table.gallery{width:100%}
table.gallery th.c-id{width:200px;font-weight:400}
.case-id{display:block;font-weight:700;word-break:break-all}
code.overlay-path{word-break:break-all;font-size:.78rem}
.slices{display:flex;gap:4px;flex-wrap:wrap}
img.slice{width:168px;height:auto;border:1px solid var(--line);background:#000;cursor:zoom-in}
img.slice.zoomed{width:min(100%,520px);cursor:zoom-out}
td.c-pred{width:215px}td.c-pred dl{margin:0 0 6px;display:grid;grid-template-columns:auto 1fr;gap:0 8px}
td.c-pred dt{color:var(--muted);font-size:.85rem}td.c-pred dd{margin:0;font-weight:600}
td.c-review{width:270px}td.c-review fieldset{border:0;margin:0;padding:0}
.choices{display:flex;gap:10px;margin-bottom:4px}.choice{white-space:nowrap}
textarea.comment{width:100%;font:inherit;font-size:.9rem;resize:vertical}
tr.case.rv-agree td.c-review{background:var(--okbg)}tr.case.rv-disagree td.c-review{background:var(--badbg)}
tr.case.rv-unsure td.c-review{background:#fff8c5}
@media print{
 html{font-size:10pt}body{max-width:none;min-width:0;padding:0}
 .no-print,button,.skip{display:none!important}
 form.controls{position:static}
 tr,figure,table.kv,table.metrics{break-inside:avoid}
 thead{display:table-header-group}
 .slices{flex-wrap:nowrap}img.slice{width:32%;min-width:0}img.slice.zoomed{width:32%}
 table.gallery th.c-id{width:120px}td.c-pred{width:150px}td.c-review{width:170px}
 .choices{flex-wrap:wrap;gap:4px 8px}
 .badge{background:none!important}
 details>summary{list-style:none}
 a{color:inherit;text-decoration:none}
}
"""

_JS = r"""
(function () {
  "use strict";
  var REPORT_ID = document.documentElement.getAttribute("data-report-id") || "";
  var STORE = "resdx-review:" + REPORT_ID;
  var tbody = document.getElementById("case-rows");
  function $(id) { return document.getElementById(id); }
  function rows() { return Array.prototype.slice.call(tbody.querySelectorAll("tr.case")); }
  function num(s) { var x = parseFloat(s); return isNaN(x) ? null : x; }
  var collator = new Intl.Collator(undefined, {numeric: true, sensitivity: "base"});

  function keyOf(row, key) {
    var d = row.dataset;
    if (key === "index") return num(d.index);
    if (key === "caseId") return d.caseId;
    if (key === "label") { var l = num(d.label); return l === null ? d.label : l; }
    if (key === "correct") return d.correct === "" ? null : num(d.correct);
    return num(d[key]);
  }
  function compare(a, b) {
    if (a === null || a === "") return (b === null || b === "") ? 0 : 1;
    if (b === null || b === "") return -1;
    if (typeof a === "number" && typeof b === "number") return a - b;
    return collator.compare(String(a), String(b));
  }
  function applySort() {
    var key = $("sort-key").value, dir = $("sort-dir").value === "desc" ? -1 : 1;
    var rs = rows();
    rs.sort(function (a, b) {
      var ka = keyOf(a, key), kb = keyOf(b, key);
      var missing = (ka === null || ka === "") - (kb === null || kb === "");
      if (missing) return missing;  /* missing values always last */
      var r = dir * compare(ka, kb);
      return r || (num(a.dataset.index) - num(b.dataset.index));
    });
    rs.forEach(function (r) { tbody.appendChild(r); });
  }
  function applyFilter() {
    var lab = $("f-label").value, cor = $("f-correct").value;
    var lo = num($("f-pmin").value), hi = num($("f-pmax").value);
    var shown = 0, all = rows();
    all.forEach(function (r) {
      var p = num(r.dataset.probability), ok = true;
      if (lab !== "" && r.dataset.label !== lab) ok = false;
      if (cor !== "" && r.dataset.correct !== cor) ok = false;
      if (lo !== null && (p === null || p < lo)) ok = false;
      if (hi !== null && (p === null || p > hi)) ok = false;
      r.hidden = !ok;
      if (ok) shown++;
    });
    $("shown-count").textContent = "Showing " + shown + " of " + all.length + " cases";
  }

  function reviewOf(row) {
    var c = row.querySelector("input[type=radio]:checked");
    return {review: c ? c.value : "", comment: row.querySelector("textarea.comment").value};
  }
  function paint(row) {
    var v = reviewOf(row).review;
    row.classList.remove("rv-agree", "rv-disagree", "rv-unsure");
    if (v) row.classList.add("rv-" + v);
  }
  function countReviewed() {
    var all = rows(), n = all.filter(function (r) { return reviewOf(r).review !== ""; }).length;
    $("review-count").textContent = n + " of " + all.length + " reviewed";
  }
  function save() {
    var marks = {};
    rows().forEach(function (r) {
      var v = reviewOf(r);
      if (v.review || v.comment) marks[r.dataset.caseId] = v;
    });
    try { window.localStorage.setItem(STORE, JSON.stringify(marks)); } catch (e) { /* storage unavailable */ }
  }
  function restore() {
    var marks = null;
    try { marks = JSON.parse(window.localStorage.getItem(STORE) || "null"); } catch (e) { marks = null; }
    if (!marks) return;
    rows().forEach(function (r) {
      var v = marks[r.dataset.caseId];
      if (!v) return;
      r.querySelectorAll("input[type=radio]").forEach(function (i) { i.checked = i.value === v.review; });
      r.querySelector("textarea.comment").value = v.comment || "";
      paint(r);
    });
  }

  function csvField(s) {
    s = s === null || s === undefined ? "" : String(s);
    return /[",\r\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }
  /* All cases (filtered or not), in the original order; RFC 4180 quoting and CRLF line ends. */
  function buildCSV() {
    var lines = [["case_id", "label", "probability", "decision", "review", "comment"]];
    rows().slice().sort(function (a, b) { return num(a.dataset.index) - num(b.dataset.index); })
      .forEach(function (r) {
        var v = reviewOf(r), d = r.dataset;
        lines.push([d.caseId, d.label, d.probability, d.decision, v.review, v.comment]);
      });
    return lines.map(function (l) { return l.map(csvField).join(","); }).join("\r\n") + "\r\n";
  }
  function exportCSV() {
    var blob = new Blob([buildCSV()], {type: "text/csv;charset=utf-8"});
    var url = URL.createObjectURL(blob);
    var a = document.createElement("a");
    a.href = url;
    a.download = "review-" + (REPORT_ID || "report") + ".csv";
    a.style.display = "none";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 10000);
  }
  window.resdxReviewCSV = buildCSV;

  ["sort-key", "sort-dir"].forEach(function (id) { $(id).addEventListener("change", applySort); });
  ["f-label", "f-correct", "f-pmin", "f-pmax"].forEach(function (id) {
    $(id).addEventListener("change", applyFilter);
    $(id).addEventListener("input", applyFilter);
  });
  $("f-reset").addEventListener("click", function () {
    $("f-label").value = ""; $("f-correct").value = ""; $("f-pmin").value = "0"; $("f-pmax").value = "1";
    applyFilter();
  });
  $("export-csv").addEventListener("click", exportCSV);
  tbody.addEventListener("change", function (ev) {
    var row = ev.target.closest("tr.case");
    if (row) { paint(row); countReviewed(); save(); }
  });
  tbody.addEventListener("input", function (ev) { if (ev.target.matches("textarea")) save(); });
  function zoom(ev) {
    if (ev.target.matches && ev.target.matches("img.slice") &&
        (ev.type === "click" || ev.key === "Enter" || ev.key === " ")) {
      ev.preventDefault();
      ev.target.classList.toggle("zoomed");
    }
  }
  tbody.addEventListener("click", zoom);
  tbody.addEventListener("keydown", zoom);
  window.addEventListener("beforeprint", function () {
    document.querySelectorAll("details").forEach(function (d) { d.setAttribute("open", ""); });
  });
  restore();
  countReviewed();
  applyFilter();
})();
"""

_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "base-uri 'none'; form-action 'none'")


def build_report(summary: Mapping[str, Any], cases: Sequence[Mapping[str, Any]]) -> str:
    """One self-contained HTML document (inline CSS/JS, data: images, no external URL) for human review."""
    summary = summary or {}
    cases = list(cases)
    report_id = _report_id(summary, cases)
    model = summary.get("model") or {}
    title = "ResDx review report"
    sub = " \u00b7 ".join(
        _e(x) for x in (model.get("name"), model.get("version") and f"v{model.get('version')}",
                        model.get("run_id") and f"run {model.get('run_id')}") if x)
    n_correct = sum(1 for c in cases if c.get("correct") is True)
    dash_sub = f" \u2014 {sub}" if sub else ""
    return f"""<!DOCTYPE html>
<html lang="en" data-report-id="{_e(report_id)}">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title}{dash_sub}</title>
<style>{_CSS}</style>
</head>
<body>
<a class="skip" href="#cases">Skip to cases</a>
<header class="top"><h1>{title}</h1>
<p class="muted">{sub or "model not named"} \u00b7 report {_e(report_id)} \u00b7 {len(cases)} cases,
{n_correct} correct. For research review only; probabilities are calibrated.</p></header>
<main>
{_model_data_section(summary)}
{_metrics_section(summary)}
{_sanity_section(summary)}
{_model_card_section(summary)}
{_gallery_section(cases)}
</main>
<script>{_JS}</script>
</body>
</html>
"""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(path: str | os.PathLike, summary: Mapping[str, Any], cases: Iterable[Mapping[str, Any]]) -> Path:
    """Build the report and write it atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    _atomic_write_bytes(path, build_report(summary, list(cases)).encode("utf-8"))
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
        prob = _num(case.get("probability"))
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
    _atomic_write_bytes(path, buf.getvalue())
    return path
