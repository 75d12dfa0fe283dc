(function () {
  "use strict";
  var REPORT_ID = document.documentElement.getAttribute("data-report-id") || "";
  var STORE = "resdx-review:" + REPORT_ID;
  var FILTERS = "resdx-filters:" + REPORT_ID;
  var MODEL_ID = document.documentElement.getAttribute("data-model-id") || "";
  var CASE_SET = document.documentElement.getAttribute("data-case-set") || "";
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
  function priorHas(row, review) { return (" " + row.dataset.prior + " ").indexOf(" " + review + " ") >= 0; }
  function applyFilter() {
    var lab = $("f-label").value, cor = $("f-correct").value, rev = $("f-review").value;
    var referred = $("f-referred").checked;
    var lo = num($("f-pmin").value), hi = num($("f-pmax").value);
    var shown = 0, all = rows();
    all.forEach(function (r) {
      var p = num(r.dataset.probability), ok = true, mine = reviewOf(r).review;
      if (lab !== "" && r.dataset.label !== lab) ok = false;
      if (cor !== "" && r.dataset.correct !== cor) ok = false;
      if (lo !== null && (p === null || p < lo)) ok = false;
      if (hi !== null && (p === null || p > hi)) ok = false;
      if (referred && r.dataset.referred !== "1") ok = false;
      if (rev === "none" && mine !== "") ok = false;
      if (rev === "prior-disagree" && !priorHas(r, "disagree")) ok = false;
      if (rev !== "" && rev !== "none" && rev !== "prior-disagree" && mine !== rev) ok = false;
      r.hidden = !ok;
      if (ok) shown++;
    });
    $("shown-count").textContent = "Showing " + shown + " of " + all.length + " cases";
  }
  /* Sort and filter settings survive a reload (localStorage, keyed by report id like the marks). */
  var FILTER_IDS = ["sort-key", "sort-dir", "f-label", "f-correct", "f-pmin", "f-pmax", "f-review", "f-referred"];
  function saveFilters() {
    var f = {};
    FILTER_IDS.forEach(function (id) { var e = $(id); f[id] = e.type === "checkbox" ? e.checked : e.value; });
    try { window.localStorage.setItem(FILTERS, JSON.stringify(f)); } catch (e) { /* storage unavailable */ }
  }
  function restoreFilters() {
    var f = null;
    try { f = JSON.parse(window.localStorage.getItem(FILTERS) || "null"); } catch (e) { f = null; }
    if (!f) return;
    FILTER_IDS.forEach(function (id) {
      var e = $(id);
      if (!(id in f)) return;
      if (e.type === "checkbox") e.checked = !!f[id];
      else if (e.tagName !== "SELECT" || Array.prototype.some.call(e.options, function (o) { return o.value === f[id]; }))
        e.value = f[id];
    });
  }

  function reviewOf(row) {
    var c = row.querySelector("input[type=radio]:checked");
    var corr = row.querySelector(".corrected");
    return {review: c ? c.value : "", comment: row.querySelector("textarea.comment").value,
            corrected: corr ? corr.value.trim() : ""};
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
      if (v.review || v.comment || v.corrected) marks[r.dataset.caseId] = v;
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
      var corr = r.querySelector(".corrected");
      if (corr) corr.value = v.corrected || "";
      paint(r);
    });
  }

  /* OWASP CSV injection, the rule of pipeline/io/artifacts.py csv_cell: text starting = + - @ TAB or CR
     gets a leading ' so a spreadsheet shows it instead of running it; a plain number ("-1.5") is kept. */
  var FORMULA_START = /^[=+\-@\t\r]/;
  var PLAIN_NUMBER = /^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$/;
  function csvField(s) {
    s = s === null || s === undefined ? "" : String(s);
    if (FORMULA_START.test(s) && !PLAIN_NUMBER.test(s)) s = "'" + s;
    return /[",\r\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }
  /* All cases (filtered or not), in the original order; RFC 4180 quoting and CRLF line ends. */
  function buildCSV() {
    var lines = [["case_id", "label", "probability", "decision", "review", "comment", "corrected_label", "model_id",
                  "case_set"]];
    rows().slice().sort(function (a, b) { return num(a.dataset.index) - num(b.dataset.index); })
      .forEach(function (r) {
        var v = reviewOf(r), d = r.dataset;
        lines.push([d.caseId, d.label, d.probability, d.decision, v.review, v.comment, v.corrected, MODEL_ID,
                    CASE_SET]);
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

  ["sort-key", "sort-dir"].forEach(function (id) {
    $(id).addEventListener("change", function () { applySort(); saveFilters(); });
  });
  ["f-label", "f-correct", "f-pmin", "f-pmax", "f-review", "f-referred"].forEach(function (id) {
    $(id).addEventListener("change", function () { applyFilter(); saveFilters(); });
    $(id).addEventListener("input", function () { applyFilter(); saveFilters(); });
  });
  $("f-reset").addEventListener("click", function () {
    $("f-label").value = ""; $("f-correct").value = ""; $("f-pmin").value = "0"; $("f-pmax").value = "1";
    $("f-review").value = ""; $("f-referred").checked = false;
    applyFilter(); saveFilters();
  });

  /* The selected case: highlighted, scrolled into view, and shown in the viewer (viewer.js). */
  var selected = null;
  function select(row, scroll) {
    if (!row) return;
    if (selected) selected.classList.remove("selected");
    selected = row;
    row.classList.add("selected");
    row.setAttribute("aria-current", "true");
    if (scroll) row.scrollIntoView({block: "nearest"});
    if (window.resdxViewer) window.resdxViewer.open(row);
  }
  function shownRows() { return rows().filter(function (r) { return !r.hidden; }); }
  function isDisagreement(r) {
    return r.dataset.correct === "0" || reviewOf(r).review === "disagree" || priorHas(r, "disagree");
  }
  function step(dir, test) {
    var list = shownRows(), at = selected ? list.indexOf(selected) : -1;
    for (var k = 1; k <= list.length; k++) {
      var i = at + dir * k;
      if (i < 0 || i >= list.length) break;
      if (!test || test(list[i])) { select(list[i], true); return true; }
    }
    return false;
  }
  window.resdxSelect = function (caseIndex) { select($("case-" + caseIndex), true); };
  document.addEventListener("keydown", function (ev) {
    var t = ev.target;
    if (ev.ctrlKey || ev.metaKey || ev.altKey || (t && t.matches && t.matches("input, textarea, select"))) return;
    var marks = {a: "agree", x: "disagree", u: "unsure"};
    if (ev.key === "n") step(1);
    else if (ev.key === "p") step(-1);
    else if (ev.key === "d") step(1, isDisagreement);
    else if (marks[ev.key] && selected) {
      var input = selected.querySelector('input[value="' + marks[ev.key] + '"]');
      input.checked = true;
      input.dispatchEvent(new Event("change", {bubbles: true}));
    } else return;
    ev.preventDefault();
  });
  tbody.addEventListener("click", function (ev) {
    if (ev.target.closest("input, textarea, select, label, img.slice")) return;
    var row = ev.target.closest("tr.case");
    if (row) select(row, false);
  });
  ["v-prev", "v-next", "v-next-dis"].forEach(function (id, k) {
    var b = $(id);
    if (b) b.addEventListener("click", function () { if (k === 0) step(-1); else if (k === 1) step(1); else step(1, isDisagreement); });
  });
  $("export-csv").addEventListener("click", exportCSV);
  tbody.addEventListener("change", function (ev) {
    var row = ev.target.closest("tr.case");
    if (row) { paint(row); countReviewed(); save(); }
  });
  tbody.addEventListener("input", function (ev) { if (ev.target.matches("textarea, input.corrected")) save(); });
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
  restoreFilters();
  countReviewed();
  applySort();
  applyFilter();
  var first = shownRows().filter(function (r) { return r.dataset.hasVolume === "1"; })[0];
  if (first) select(first, false);
})();
