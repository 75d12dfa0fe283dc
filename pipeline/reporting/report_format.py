"""Plain-text formatting for the HTML review report: numbers, intervals, metric names, sanity verdicts.

Every function here returns *unescaped* text; the Jinja2 template escapes it on output.
"""

from __future__ import annotations

import base64
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

METRIC_NAMES = {
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
SANITY_NAMES = {
    "randomization": "Model-parameter randomization",
    "pointing_game": "Pointing game",
    "energy_inside": "Saliency energy inside lesion",
}
DASH = "\u2014"


def num(value: Any) -> float | None:
    """`value` as a float, or None for bools, None, NaN and anything that is not a number."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def fmt(value: Any, nd: int = 3) -> str:
    """A readable scalar: ints as ints, floats with `nd` decimals, None/NaN as an em dash, bools as yes/no."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, str) or not isinstance(value, numbers.Real):
        return str(value)
    x = num(value)
    if x is None:
        return DASH
    if math.isinf(x):
        return "\u221e" if x > 0 else "\u2212\u221e"
    return f"{x:.{nd}f}"


def is_interval(value: Any) -> bool:
    """A (low, high) pair of numbers (either may be None)."""
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(v is None or num(v) is not None for v in value))


def is_seq(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def fmt_interval(value: Sequence) -> str:
    return f"{fmt(value[0])}\u2013{fmt(value[1])}"


def label(key: Any, names: Mapping[str, str] = METRIC_NAMES) -> str:
    """The display name of a metric (or other) key: a known name, else the key with spaces for underscores."""
    key = str(key)
    return names.get(key, key.replace("_", " "))


def data_uri(png: bytes | bytearray | memoryview) -> str:
    """A PNG as a data: URI (base64 only, nothing in it needs HTML escaping)."""
    return "data:image/png;base64," + base64.b64encode(bytes(png)).decode("ascii")


def is_flat_metrics(section: Any) -> bool:
    """A split's metrics: a non-empty mapping of scalars and intervals only (nested ones are shown elsewhere)."""
    return isinstance(section, Mapping) and bool(section) and all(
        v is None or isinstance(v, (int, float, str)) or is_interval(v) for v in section.values())


def metric_rows(splits: Mapping[str, Mapping]) -> list[dict]:
    """Rows of the metrics table: one per metric, a cell per split (None where the split lacks it).

    A cell is {"text": the value, "cis": [(name, interval), ...]}: `X_ci95*` keys join X's cell as intervals.
    """
    keys: list[str] = []
    for section in splits.values():
        for k in section:
            if k not in keys:
                keys.append(k)
    base_keys = [k for k in keys if not any(k.startswith(f"{b}_ci95") for b in keys if b != k)]
    rows = []
    for k in base_keys:
        cells: list[dict | None] = []
        for section in splits.values():
            if k not in section:
                cells.append(None)
                continue
            v = section[k]
            cis = []
            for ck, cv in section.items():
                if ck.startswith(f"{k}_ci95") and is_interval(cv):
                    method = ck[len(f"{k}_ci95"):].strip("_").replace("_", " ")
                    cis.append(("95% CI" + (f" ({method})" if method else ""), fmt_interval(cv)))
            cells.append({"text": f"[{fmt_interval(v)}]" if is_interval(v) else fmt(v), "cis": cis})
        rows.append({"name": label(k), "cells": cells})
    return rows


def sanity_verdict(value: Any) -> tuple[str, str]:
    """(badge kind, text): the explicit `passed` flag wins; else better than the random baseline."""
    if isinstance(value, bool):
        return ("pass", "pass") if value else ("fail", "fail")
    if not isinstance(value, Mapping):
        return "na", "n/a"
    if isinstance(value.get("passed"), bool):
        return ("pass", "pass") if value["passed"] else ("fail", "fail")
    base = num(value.get("random_baseline"))
    for key in ("hit_rate", "mean"):
        x = num(value.get(key))
        if x is not None and base is not None:
            return ("pass", "pass (above random)") if x > base else ("fail", "fail (not above random)")
    return "na", "n/a"
