"""Patient-level train/val/test split, stratified by label: no patient in two splits.

Multi-label cases (a 0/1 vector each) are stratified on their label combination: every distinct
vector is one stratum (e.g. 4 strata for two findings), so co-occurrence is balanced too.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold


def strata(labels) -> np.ndarray:
    """The stratification target: the labels themselves (single-label), or per case the index of its
    label combination (multi-label: a sequence of 0/1 per case)."""
    y = np.asarray(labels)
    if y.ndim != 2:
        return y
    _, codes = np.unique(y, axis=0, return_inverse=True)
    return codes.reshape(-1)


def assign_splits(patients: list[str], labels: list[int], val_fraction: float, test_fraction: float,
                  seed: int) -> list[str]:
    """Return a split name per case. Cases of one patient always share a split.

    Uses scikit-learn's StratifiedGroupKFold twice: once to carve off the test set, once to
    carve the validation set out of the rest; fold counts follow the requested fractions.
    """
    n = len(patients)
    out = np.array(["train"] * n, dtype=object)
    if n == 0:
        return []
    groups = np.asarray(patients)
    y = strata(labels)
    idx = np.arange(n)
    for name, frac, pool_frac in (("test", test_fraction, 1.0), ("val", val_fraction, 1.0 - test_fraction)):
        pool = idx[out == "train"]
        n_groups = len(set(groups[pool]))
        k = int(round(pool_frac / frac)) if frac > 0 else 0
        k = min(k, n_groups)
        if k < 2:
            continue
        try:
            splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            _, held = next(splitter.split(pool, y[pool], groups[pool]))
        except ValueError:
            held = _groups_fallback(groups[pool], 1.0 / k, seed)  # too few cases per class to stratify
        out[pool[held]] = name
    return [str(s) for s in out]


def _groups_fallback(groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Unstratified: a seeded share of whole patients (at least one), for tiny cohorts."""
    unique = sorted(set(groups.tolist()))
    rng = np.random.default_rng(seed)
    take = set(rng.permutation(unique)[: max(1, int(round(fraction * len(unique))))].tolist())
    return np.array([i for i, g in enumerate(groups) if g in take], dtype=int)


def assign_folds(patients: list[str], labels: list[int], k: int, seed: int) -> np.ndarray:
    """Fold index 0..k-1 per case for K-fold cross-validation: patient-level (a patient's cases share
    a fold) and label-stratified (scikit-learn's StratifiedGroupKFold; multi-label: on the label
    combination, `strata`); unstratified whole-patient
    folds when a class has too few patients to stratify."""
    n = len(patients)
    groups, y = np.asarray(patients), strata(labels)
    folds = np.zeros(n, dtype=int)
    n_groups = len(set(patients))
    if k > n_groups:
        raise ValueError(f"split.folds={k} but train + val hold only {n_groups} patients")
    try:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        for fold, (_, held) in enumerate(splitter.split(np.zeros(n), y, groups)):
            folds[held] = fold
    except ValueError:
        unique = np.random.default_rng(seed).permutation(sorted(set(patients)))
        of = {g: i % k for i, g in enumerate(unique)}
        folds = np.array([of[g] for g in patients], dtype=int)
    return folds
