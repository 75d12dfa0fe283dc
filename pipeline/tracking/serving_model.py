"""The registered ResDx model, as MLflow "models from code": this file *is* the model definition.

`pipeline.stages.register` logs it with ``mlflow.pyfunc.log_model(python_model=<this file>, artifacts=...,
code_paths=[<the pipeline package>])``. MLflow copies the file and the package into the model
folder and, on ``mlflow.pyfunc.load_model``, executes this file and calls `load_context`:
nothing is unpickled. The network is rebuilt from ``model.json`` (its `ModelSpec`) and the
safetensors weights, so it is an ordinary ``nn.Module`` (Grad-CAM works on it), unlike
MLflow 3's default ``pt2`` export, which fixes input shapes.

Bundled artifacts (names are the keys of ``context.artifacts``):
``weights`` (model.safetensors), ``spec`` (model.json: spec, class names, data hash),
``plan`` (plan.json: the typed ingest plan, reader settings included), ``calibration``
(calibration.json: temperature and operating threshold, fitted on validation), ``model_card``
(Markdown). It imports `pipeline.core`, `pipeline.io` and its guard (`serving_guard`) only: no stage,
no training code.

Two kinds of input:

* ``numpy.ndarray`` float32 of shape (N, C, X, Y, Z), already preprocessed with the bundled plan
  -> ``numpy.ndarray`` (N, K) of calibrated class probabilities (softmax(logits / T); a multi-label
  model: (N, L) per-label probabilities sigmoid(logits / T), which need not sum to 1). This is
  what the signature declares (a TensorSpec) and what ``mlflow models serve`` accepts:
  ``{"inputs": [...]}``.
* a ``pandas.DataFrame`` with a ``path`` column (a DICOM folder or file, or a NIfTI file) and
  optional ``modality`` (CT/MR) and ``series_uid`` columns -> one output row per input row:
  calibrated probabilities, the decision at the registered threshold (multi-label: ``decision_<label>``
  per label at its own threshold, and ``decision`` their ';'-joined vector), and ``status`` /
  ``reason_code`` / ``reason`` for studies that cannot be used. Each study goes through the
  ingest stage's own code (`pipeline.io.reader.read_case` -> `pipeline.core.preprocess.preprocess_case`
  with the bundled plan). MLflow enforces the tensor signature *before* ``predict`` runs, so a
  DataFrame of paths is rejected by ``PyFuncModel.predict``; the in-process route is
  ``mlflow.pyfunc.load_model(uri).unwrap_python_model().predict_studies(df)`` (MLflow's
  documented way to reach custom methods). A side effect we want: the HTTP server can never be
  asked to read files on the server's disk.

Hostile input (the tensor path): `predict` checks, before the network runs, that the array is numeric,
of shape (N, C, *plan shape), finite, and, when served, at most `max_batch()` cases
(``RESDX_SERVE_MAX_BATCH``, default `MAX_BATCH`). Each failure is an `MlflowException`
(INVALID_PARAMETER_VALUE -> HTTP 400) with a short fixed message. Under ``mlflow models serve`` the
model also puts a request-size limit in front of ``/invocations`` (``RESDX_SERVE_MAX_REQUEST_BYTES``,
default `default_max_request_bytes`; 413) and keeps stack traces and echoed input out of error bodies:
see `pipeline.tracking.serving_guard.install_request_guard` for why that has to be done from here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np

from pipeline.tracking.serving_guard import (
    in_serving_environment,
    install_request_guard,
    max_batch,
    max_request_bytes,
    validate_batch,
)

if TYPE_CHECKING:
    import pandas as pd

PROB_PREFIX = "p_"
_MODALITIES = {"CT": "CT", "MR": "MR", "MRI": "MR"}

def _peek_dicom_modality(path: Path, max_files: int = 64) -> str | None:
    """Modality (CT/MR) from the first readable DICOM header under `path`, pixels not read."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files[:max_files]:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["Modality"])
        except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError, EOFError):
            continue
        m = _MODALITIES.get(str(ds.get("Modality", "")).upper())
        if m:
            return m
    return None


class ResDxModel(mlflow.pyfunc.PythonModel):
    """Calibrated ResDx classifier: preprocessed tensors or study paths in, probabilities out."""

    # ------------------------------------------------------------------ loading
    def load_context(self, context) -> None:
        self.load_artifacts(context.artifacts)

    def load_artifacts(self, artifacts: dict[str, str]) -> None:
        import torch
        from safetensors.torch import load_file

        from pipeline.core.classifier import Classifier, DecisionRule
        from pipeline.core.models import ModelSpec, build_model
        from pipeline.core.plan import load_plan

        info = json.loads(Path(artifacts["spec"]).read_text())
        self.info = info
        self.spec = ModelSpec(**info["spec"])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_model(self.spec)
        model.load_state_dict(load_file(artifacts["weights"], device="cpu"))  # strict
        self.model = model.to(self.device).eval()
        self.plan = load_plan(artifacts["plan"])
        cal = json.loads(Path(artifacts["calibration"]).read_text())
        self.rule = DecisionRule.from_calibration(cal, info.get("class_names"))
        self.classifier = Classifier(self.model, self.rule, self.device, batch_size=4)
        self.max_batch = max_batch()
        self.max_request_bytes = max_request_bytes(self.item_shape, self.max_batch)
        install_request_guard(self.max_request_bytes)

    @property
    def item_shape(self) -> tuple[int, ...]:
        """One case's tensor shape: (C, X, Y, Z) from the plan (2D/2.5D models: (C, X, Y) slices)."""
        return (int(self.plan.channels), *(int(n) for n in self.plan.shape[:self.spec.input_ndim]))

    @property
    def class_names(self) -> list[str]:
        return list(self.rule.class_names)

    @property
    def binary(self) -> bool:
        return self.rule.binary

    @property
    def threshold(self) -> float | None:
        return self.rule.threshold

    @property
    def temperature(self) -> float:
        return self.rule.temperature

    # ------------------------------------------------------------------ tensors
    def logits(self, images: np.ndarray) -> np.ndarray:
        """Raw logits (N, K) for preprocessed tensors, in input order (the evaluate stage's code path)."""
        x = np.asarray(images)
        if x.ndim != self.spec.input_ndim + 2:
            raise ValueError(f"expected a batch of shape (N, C, {', '.join('XYZ'[:self.spec.input_ndim])}); "
                             f"got {tuple(x.shape)}")
        return self.classifier.logits(x)

    def predict_tensors(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, K): softmax(logits / T), T fitted on validation."""
        if len(images) == 0:
            return np.zeros((0, len(self.class_names)))
        return self.rule.probs(self.logits(images))

    @property
    def multi_label(self) -> bool:
        return self.rule.multi_label

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Binary: 1 where p(class 1) >= the registered threshold; otherwise the argmax class.
        Multi-label: (N, L), 1 where p(label) >= that label's registered threshold."""
        return self.rule.decide(probs)

    def assess_tensors(self, images: np.ndarray):
        """Probabilities, decisions, per-case uncertainty (spread over the fold members and test-time
        views) and referral, as the evaluate stage computed them (`pipeline.core.classifier.Assessment`)."""
        return self.classifier.assess(np.asarray(images, dtype=np.float32))

    # ------------------------------------------------------------------ studies
    def resolve_modality(self, path: Path, modality: str | None) -> str:
        """A DICOM header's modality, else the given one (CT/MR/MRI; NIfTI has none), else the
        model's only training modality. A batch may mix DICOM and NIfTI under one `modality`."""
        from pipeline.errors import RejectedCase
        from pipeline.io.nifti import is_nifti
        from pipeline.io.reader import read_case

        if not path.exists():
            raise RejectedCase("missing_path", "the path does not exist")
        dicom = not (path.is_file() and is_nifti(path))
        found = _peek_dicom_modality(path) if dicom else None
        if found:
            return found
        if modality:
            m = _MODALITIES.get(str(modality).strip().upper())
            if not m:
                raise RejectedCase("bad_modality", f"modality must be CT or MR, got {modality!r}")
            return m
        seen = self.plan.modalities
        if len(seen) == 1:
            return seen[0]  # a single-modality model: its modality is the only sensible reading
        if dicom:
            read_case(path, "CT", self.plan.reader)  # no readable header: let the reader say why (empty, not DICOM)
        raise RejectedCase("modality_required", "the modality cannot be read from the input (NIfTI has none); "
                           "pass modality CT or MR")

    def prepare_study(self, path: Path | str, modality: str | None = None, series_uid: str = ""):
        """Read and preprocess one study exactly as the ingest stage does; raises `RejectedCase`.

        Returns a `pipeline.core.preprocess.PreparedCase` (model tensor, its affine, the native grid).
        """
        from pipeline.core.preprocess import preprocess_case
        from pipeline.errors import RejectedCase
        from pipeline.io.reader import read_case

        if not self.plan.reads_studies:
            raise RejectedCase("no_study_input", "this model was trained on MedMNIST arrays; pass preprocessed "
                               "tensors instead of DICOM/NIfTI studies")
        path = Path(path)
        m = self.resolve_modality(path, modality)
        case = preprocess_case(read_case(path, m, self.plan.reader, series_uid or ""), m, self.plan)
        if m not in (self.plan.modalities or [m]):
            case.notes.append(f"{m} was not among the training modalities")
        return case

    def predict_studies(self, studies) -> pd.DataFrame:
        """DataFrame (or list of paths) of studies -> one row each: probabilities, decision, status, reason."""
        import pandas as pd

        from pipeline.errors import RejectedCase, unexpected_reason

        df = studies if isinstance(studies, pd.DataFrame) else pd.DataFrame({"path": [str(p) for p in studies]})
        if "path" not in df.columns:
            raise ValueError("a DataFrame of studies needs a `path` column")
        rows, tensors, ok_rows = [], [], []
        for i, r in enumerate(df.to_dict("records")):
            row = {"status": "rejected", "reason_code": "", "reason": "", "modality": ""}
            try:
                prep = self.prepare_study(r["path"], _clean(r.get("modality")), _clean(r.get("series_uid")) or "")
                tensors.append(prep.tensor)
                ok_rows.append(i)
                row.update(status="ok", modality=prep.modality)
            except RejectedCase as err:
                row.update(reason_code=err.code, reason=err.reason)
            except Exception as err:  # noqa: BLE001 - one broken study must never stop the batch
                row.update(reason_code="unexpected_error", reason=unexpected_reason(err, "reading the study"))
            rows.append(row)
        a = self.assess_tensors(np.stack(tensors)) if tensors else None
        position = {i: j for j, i in enumerate(ok_rows)}
        for i, row in enumerate(rows):
            j = position.get(i)
            for c, name in enumerate(self.class_names):
                row[PROB_PREFIX + name] = float(a.probs[j, c]) if j is not None else float("nan")
            if self.multi_label:
                self._label_decisions(row, a.decisions[j] if j is not None else None)
            else:
                row["decision"] = int(a.decisions[j]) if j is not None else None
                row["predicted_class"] = self.class_names[int(a.decisions[j])] if j is not None else None
            row["uncertainty"] = float(a.uncertainty[j]) if j is not None else float("nan")
            row["referred"] = bool(a.referred[j]) if j is not None else None
        out = pd.DataFrame(rows, index=df.index)
        for c in ["decision_" + n for n in self.class_names] if self.multi_label else ["decision"]:
            out[c] = out[c].astype("Int64")
        return out

    def _label_decisions(self, row: dict, decisions) -> None:
        """Multi-label columns: decision_<label> (0/1), `decision` the ';'-joined vector, `predicted_class`
        the positive labels joined by '+' ("" when none)."""
        for c, name in enumerate(self.class_names):
            row["decision_" + name] = int(decisions[c]) if decisions is not None else None
        row["decision"] = ";".join(str(int(d)) for d in decisions) if decisions is not None else None
        row["predicted_class"] = ("+".join(n for n, d in zip(self.class_names, decisions) if d)
                                  if decisions is not None else None)

    # ------------------------------------------------------------------ the pyfunc entry point
    def predict(self, context, model_input: np.ndarray, params=None):
        """ndarray (N, C, X, Y, Z) -> (N, K) probabilities. (The hint is for MLflow, which infers no schema
        from it; called directly, e.g. through `unwrap_python_model()`, a DataFrame of paths also works.)"""
        import pandas as pd

        if isinstance(model_input, pd.DataFrame) and "path" in model_input.columns:
            return self.predict_studies(model_input)  # reachable through unwrap_python_model().predict
        # NaN/Inf would otherwise run through the network into NaN probabilities (or a torch error
        # whose traceback the server would send back); the batch limit holds when served only.
        x = validate_batch(model_input, self.item_shape, self.max_batch if in_serving_environment() else None)
        return self.predict_tensors(x)


def _clean(value) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    value = str(value).strip()
    return value or None


mlflow.models.set_model(ResDxModel())
