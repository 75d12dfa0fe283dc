"""Readers' verdicts against the model and each other, and the reference labels their corrections give.

Pure: no files. Inputs are `pipeline.core.review.Verdict`s grouped by reader (`{reader: [Verdict, ...]}`,
what `pipeline.io.reviews.read_reviews` returns) and labels/decisions as text cells (a class index "1",
or a multi-label vector "1;0", as index.csv writes them). A reader who has several verdicts on one case
(tables of several models) counts once per case: the last one in their list (the latest import).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import combinations

from pipeline.core.review import REVIEW_CHOICES, Verdict


def latest(verdicts: Iterable[Verdict]) -> dict[str, Verdict]:
    """One verdict per case: the last one given (case_id -> Verdict, in first-seen order)."""
    out: dict[str, Verdict] = {}
    for v in verdicts:
        if v.review or v.corrected_label:
            out[v.case_id] = v
    return out


def reader_agreement(verdicts: Mapping[str, Iterable[Verdict]],
                     decisions: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Per reader: n_reviewed, n_agree, n_disagree, n_unsure, agreement = agree / (agree + disagree)
    (None when both are 0), n_corrected (verdicts with a corrected label), and n_inconsistent: an
    'agree' whose corrected label is not the model's decision, or a 'disagree' whose corrected label is.

    `decisions` (case_id -> the model's decision as text), when given, is the set of cases counted:
    verdicts on other cases are left out (n_outside says how many), and it is what n_inconsistent
    compares with (0 without it)."""
    out = {}
    for reader in sorted(verdicts):
        given = [v for v in latest(verdicts[reader]).values() if v.review]
        mine = [v for v in given if decisions is None or v.case_id in decisions]
        n = Counter(v.review for v in mine)
        agree, disagree = n["agree"], n["disagree"]
        inconsistent = 0
        for v in mine:
            if decisions is not None and v.corrected_label:
                same = v.corrected_label == str(decisions[v.case_id])
                inconsistent += (v.review == "agree" and not same) or (v.review == "disagree" and same)
        out[reader] = {"n_reviewed": len(mine), **{f"n_{c}": n[c] for c in REVIEW_CHOICES},
                       "agreement": round(agree / (agree + disagree), 4) if agree + disagree else None,
                       "n_corrected": sum(bool(v.corrected_label) for v in mine),
                       "n_inconsistent": int(inconsistent), "n_outside": len(given) - len(mine)}
    return out


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa of two readers' categories on the same cases (sklearn), over REVIEW_CHOICES;
    None with fewer than 2 cases or when undefined (both readers gave one and the same category)."""
    if len(a) < 2 or len(a) != len(b):
        return None
    from sklearn.metrics import cohen_kappa_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 0/0 when chance agreement is 1: reported as None
        k = float(cohen_kappa_score(a, b, labels=list(REVIEW_CHOICES)))
    return None if math.isnan(k) else round(k, 4)


def pairwise_kappa(verdicts: Mapping[str, Iterable[Verdict]],
                   cases: Iterable[str] | None = None) -> dict[str, dict]:
    """Cohen's kappa of every pair of readers on their verdict categories, over the cases both reviewed
    (and, with `cases`, that are among them): {"<a> vs <b>": {"n_shared": n, "kappa": k or None}}, the
    readers in sorted order."""
    keep = None if cases is None else set(cases)
    by_reader = {r: {c: v.review for c, v in latest(vs).items() if v.review and (keep is None or c in keep)}
                 for r, vs in verdicts.items()}
    out = {}
    for a, b in combinations(sorted(by_reader), 2):
        shared = [c for c in by_reader[a] if c in by_reader[b]]
        out[f"{a} vs {b}"] = {"n_shared": len(shared),
                              "kappa": cohen_kappa([by_reader[a][c] for c in shared],
                                                   [by_reader[b][c] for c in shared])}
    return out


@dataclass(frozen=True)
class Reference:
    """The corrected reference of a set of cases.

    labels: case_id -> the reference label (every case given, corrected or not); readers: case_id -> the
    readers whose corrected label it is, for the cases whose label the readers decided (a majority of those
    who gave one; it may equal the original); changed: the cases whose reference differs from the original;
    conflicts: cases whose correcting readers tie (the original label is kept)."""

    labels: dict[str, str]
    readers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    changed: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()

    @property
    def n_changed(self) -> int:
        return len(self.changed)

    @property
    def n_conflicts(self) -> int:
        return len(self.conflicts)


def corrected_reference(labels: Mapping[str, str], verdicts: Mapping[str, Iterable[Verdict]]) -> Reference:
    """The reference label of each case of `labels` (case_id -> original label text) from the readers'
    corrected labels: the label most of the readers who gave one gave (one vote per reader: their latest);
    a tie between labels keeps the original and counts as a conflict. Cases no reader corrected keep
    their label; corrections of cases not in `labels` are ignored. Labels are compared as text, so give
    them in one canonical form (index.csv's)."""
    votes: dict[str, dict[str, str]] = {}  # case -> reader -> label
    for reader in sorted(verdicts):
        for case, v in latest(verdicts[reader]).items():
            if v.corrected_label and case in labels:
                votes.setdefault(case, {})[reader] = v.corrected_label
    out, readers, changed, conflicts = dict(labels), {}, [], []
    for case in labels:
        if case not in votes:
            continue
        ranked = Counter(votes[case].values()).most_common()
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            conflicts.append(case)
            continue
        label = ranked[0][0]
        readers[case] = tuple(r for r, lab in votes[case].items() if lab == label)
        if label != str(labels[case]):
            out[case] = label
            changed.append(case)
    return Reference(out, readers, tuple(changed), tuple(conflicts))


__all__ = ["Reference", "cohen_kappa", "corrected_reference", "latest", "pairwise_kappa", "reader_agreement"]
