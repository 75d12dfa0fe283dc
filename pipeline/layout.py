"""Every artifact's path, once: the folders the stages write and read (dvc.yaml names the same paths).

Each folder is a small value object over its root (`params.ingest.out_dir`, `params.train.out_dir`,
...), so a stage never spells a file name that another stage also spells.

Ids that become file names (`<case_id>.npy`) follow one rule, kept here because every layer may import
this module: a *safe id* is 1 to 128 characters from A-Z a-z 0-9 . _ -, starting with a letter or a digit.
So it has no path separator, cannot be '.', '..', a hidden file or an option ('-x'), and cannot start a
spreadsheet formula (= + - @). The manifest reader rejects rows whose ids break it; `safe_child` refuses
them again wherever a path is built from an id, so no id can name a file outside its folder.
"""

from __future__ import annotations

import re
from pathlib import Path

SAFE_ID_MAX_LEN = 128
# Used with fullmatch: '$' would also match before a trailing newline.
SAFE_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{SAFE_ID_MAX_LEN - 1}}}")
SAFE_ID_RULE = f"A-Z a-z 0-9 . _ - only, starting with a letter or digit, at most {SAFE_ID_MAX_LEN} characters"


def is_safe_id(text: object) -> bool:
    """Whether `text` may be used as it is as a file name stem and as a table cell."""
    return isinstance(text, str) and SAFE_ID.fullmatch(text) is not None


def safe_child(folder: Path | str, name: str, suffix: str = "") -> Path:
    """`folder / (name + suffix)`; ValueError unless `name` is a safe id, so the path cannot leave `folder`.

    The message leaves the value out: it came from a manifest and may carry PHI."""
    folder = Path(folder)
    if not is_safe_id(name):
        raise ValueError(f"refusing to name a file in {folder.name}/ after an id that is not safe "
                         f"({SAFE_ID_RULE}); got {len(str(name))} characters")
    path = folder / f"{name}{suffix}"
    if path.parent != folder or path.name != f"{name}{suffix}":  # a suffix holding a separator
        raise ValueError(f"the suffix {suffix!r} would leave {folder.name}/")
    return path


class _Folder:
    """A stage's output folder; `FILES` maps attribute names to the file names inside it."""

    FILES: dict[str, str] = {}

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def __getattr__(self, name: str) -> Path:
        try:
            return self.root / type(self).FILES[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no {name!r}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"


class IngestDir(_Folder):
    """ingest's outputs: one row per case in index.csv, the plan, tensors + sidecars, native-grid masks."""

    FILES = {"index": "index.csv", "plan": "plan.json", "summary": "summary.json", "tensors": "tensors",
             "masks": "masks"}

    # Through safe_child: a case_id is manifest text, and must never write outside tensors/ or masks/.
    def tensor(self, case_id: str) -> Path:
        return safe_child(self.tensors, case_id, ".npy")

    def sidecar(self, case_id: str) -> Path:
        return safe_child(self.tensors, case_id, ".json")

    def mask(self, case_id: str) -> Path:
        return safe_child(self.masks, case_id, ".npy")


class ModelDir(_Folder):
    """train's outputs: safetensors weights (one network, or the fold ensemble's members in one file), the
    spec that rebuilds them, the plan (with the network it chose), the MLflow run, and folds.csv: which
    member held out which training case (its validation cases; out-of-fold predictions come from it)."""

    FILES = {"weights": "model.safetensors", "spec": "model.json", "plan": "plan.json", "run": "mlflow_run.json",
             "history": "history.csv", "train_metrics": "train_metrics.json", "folds": "folds.csv"}


class ReportDir(_Folder):
    """evaluate's and register's outputs."""

    FILES = {"metrics": "metrics.json", "calibration": "calibration.json", "predictions": "predictions.csv",
             "plots": "plots", "figures": "figures", "model_card": "model_card.md",
             "registration": "registration.json"}


class ExplainDir(_Folder):
    """explain's outputs."""

    FILES = {"sanity": "sanity.json", "report": "report.html", "cases": "cases.csv",
             "contact_sheet": "contact_sheet.png", "overlays": "overlays", "dicom": "dicom"}
