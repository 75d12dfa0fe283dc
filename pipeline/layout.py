"""Every artifact's path, once: the folders the stages write and read (dvc.yaml names the same paths).

Each folder is a small value object over its root (`params.ingest.out_dir`, `params.train.out_dir`,
...), so a stage never spells a file name that another stage also spells.
"""

from __future__ import annotations

from pathlib import Path


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

    def tensor(self, case_id: str) -> Path:
        return self.tensors / f"{case_id}.npy"

    def sidecar(self, case_id: str) -> Path:
        return self.tensors / f"{case_id}.json"

    def mask(self, case_id: str) -> Path:
        return self.masks / f"{case_id}.npy"


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
