"""The classifier contract: network weights + temperature + threshold -> calibrated probabilities and a decision.

Evaluate fits the temperature and the threshold on validation (`DecisionRule.fit` is not here:
fitting is evaluate's job, `pipeline.core.metrics` has the pieces); everything after it — explain,
the registered model, predict — applies them through `DecisionRule`, so a case gets one
probability, one decision and one explained class everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.core.metrics import apply_temperature


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """`auto` takes the GPU when there is one; `cuda` insists on it."""
    from pipeline.errors import ResDxError

    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ResDxError("train.device=cuda but no CUDA device is visible", code="no_gpu",
                             hint="set train.device to auto or cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int,
                   amp: bool = False) -> torch.Tensor:
    """Logits for every case (eval mode, no augmentation), in input order, on the CPU."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        xb = images[i:i + batch_size].to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            out.append(model(xb).float().cpu())
    return torch.cat(out) if out else torch.zeros((0, 2))


_EPS = 1e-12


def _logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class DecisionRule:
    """Temperature scaling and the operating point, fitted on validation by evaluate.

    Binary models decide class 1 when the calibrated p(class 1) >= `threshold`; models with more
    classes (or without a threshold) take the most probable calibrated class. Multi-label models
    (`task` "multi_label", `class_names` naming the labels) give each label its own calibrated
    probability sigmoid(logit / T), one T shared by all labels, and decide each label on its own:
    p(label) >= `thresholds[label]`; decisions are then (N, L) 0/1.
    """

    temperature: float
    threshold: float | None
    class_names: tuple[str, ...]
    operating_point: str = "youden"
    tta: str = "none"  # the test-time views the temperature and threshold were fitted on (core/views.py)
    refer_band: float = 0.0  # refer to a human within this band around the threshold (see refer_margin)
    refer_spread: float | None = None  # ... or when the views' spread of the probability is above this
    task: str = "single_label"  # or "multi_label"
    thresholds: tuple[float, ...] | None = None  # multi-label: one per label (None: 0.5 each)
    bias: tuple[float, ...] | None = None  # single-label: softmax(logits / T + bias) (evaluate.calibration)

    @classmethod
    def from_calibration(cls, cal: dict, class_names=None) -> DecisionRule:
        names = cal.get("class_names") or class_names or ["0", "1"]
        thr = cal.get("threshold")
        referral = cal.get("referral") or {}
        spread = referral.get("max_spread")
        per_label, bias = cal.get("thresholds"), cal.get("bias")
        return cls(float(cal["temperature"]), None if thr is None else float(thr), tuple(names),
                   cal.get("operating_point", "youden"), cal.get("tta", "none"), float(referral.get("band", 0.0)),
                   None if spread is None else float(spread), cal.get("task", "single_label"),
                   None if per_label is None else tuple(float(t) for t in per_label),
                   None if bias is None else tuple(float(b) for b in bias))

    def to_calibration(self) -> dict:
        out = {"temperature": self.temperature, "threshold": self.threshold, "class_names": list(self.class_names),
               "binary": self.binary, "operating_point": self.operating_point, "tta": self.tta,
               "referral": {"band": self.refer_band, "max_spread": self.refer_spread}}
        if self.multi_label:
            out |= {"task": self.task, "thresholds": list(self.label_thresholds)}
        if self.bias is not None:
            out["bias"] = list(self.bias)
        return out

    @property
    def multi_label(self) -> bool:
        return self.task == "multi_label"

    @property
    def binary(self) -> bool:
        return len(self.class_names) == 2 and not self.multi_label

    @property
    def label_thresholds(self) -> np.ndarray:
        """Multi-label: the per-label thresholds (L,)."""
        return np.asarray(self.thresholds if self.thresholds is not None else [0.5] * len(self.class_names))

    def probs(self, logits) -> np.ndarray:
        """(N, K) calibrated probabilities softmax(logits / T); multi-label (N, L) sigmoid(logits / T)."""
        z = np.asarray(logits, dtype=np.float64)
        if z.ndim == 1:
            z = z[None]
        if self.multi_label:
            from scipy.special import expit

            return expit(z / self.temperature)
        if self.bias is not None:
            z = z + self.temperature * np.asarray(self.bias)  # softmax((z + T b) / T) = softmax(z / T + b)
        return apply_temperature(z, self.temperature)

    def score(self, probs: np.ndarray) -> np.ndarray:
        """The number a user reads: p(class 1) for binary models, the top class's (multi-label: the most
        probable label's) probability otherwise."""
        return probs[:, 1] if self.binary else probs.max(axis=1)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        if self.multi_label:
            return (probs >= self.label_thresholds).astype(int)
        if self.binary and self.threshold is not None:
            return (probs[:, 1] >= self.threshold).astype(int)
        return probs.argmax(axis=1).astype(int)

    # Margins are log-odds distances: a fixed band in probability (|p - t| < 0.1) would refer almost every
    # case above a threshold near 1 (measured: 87% of the PneumoniaMNIST test set at t = 0.92), while the
    # same distance in log-odds is as wide in evidence at every threshold.
    def label_margins(self, probs: np.ndarray) -> np.ndarray:
        """Multi-label: |logit p(label) - logit(its threshold)|, (N, L)."""
        return np.abs(_logit(probs) - _logit(np.asarray(self.label_thresholds, dtype=float)))

    def margin(self, probs: np.ndarray) -> np.ndarray:
        """Log-odds distance of each case from a different decision: |logit p - logit threshold| for binary
        models with a threshold, log(p_first / p_second) of the two most probable classes otherwise (the
        same number at threshold 0.5); multi-label: the smallest of the labels' margins."""
        if self.multi_label:
            return self.label_margins(probs).min(axis=1)
        if self.binary and self.threshold is not None:
            return np.abs(_logit(probs[:, 1]) - _logit(np.float64(self.threshold)))
        top = np.sort(np.clip(probs, _EPS, 1.0), axis=1)
        return np.log(top[:, -1] / top[:, -2])

    @property
    def refer_margin(self) -> float:
        """The referral band as a log-odds margin: `refer_band` is the probability half-width it has at a
        threshold of 0.5 (0.1: p in 0.4-0.6), the same width in log-odds at any threshold."""
        b = self.refer_band
        return float("inf") if b >= 0.5 else float(np.log((0.5 + b) / (0.5 - b)))

    def decided_column(self, decisions: np.ndarray) -> np.ndarray:
        """The probability column a case's uncertainty is measured on: class 1 (binary), else the decision."""
        return np.ones_like(decisions) if self.binary else decisions

    def uncertainty(self, view_probs: np.ndarray, decisions: np.ndarray) -> np.ndarray:
        """Per case, the std over views (V, N, K) of the decided column's probability; multi-label: the
        largest over labels of each label's std. 0 with one view."""
        from pipeline.core.views import spread

        v = np.asarray(view_probs)
        if self.multi_label:
            return v.std(axis=0).max(axis=1) if v.shape[0] > 1 and v.shape[2] else np.zeros(v.shape[1])
        return spread(v, self.decided_column(decisions))

    def refer(self, probs: np.ndarray, spread: np.ndarray) -> np.ndarray:
        """True where a human should decide: too close to the threshold (multi-label: any label within the
        band), or the views disagree."""
        out = self.margin(probs) < self.refer_margin
        if self.refer_spread is not None:
            out |= np.asarray(spread) > self.refer_spread
        return out

    def rule_text(self) -> str:
        if self.multi_label:
            return "each label: p(label) >= its threshold"
        if self.binary and self.threshold is not None:
            return f"p({self.class_names[1]}) >= threshold"
        return "most probable class"

    def explained_label(self, probs: np.ndarray, decisions: np.ndarray) -> int:
        """Multi-label, one case: the most probable label decided positive, else label 0."""
        positive = np.flatnonzero(np.asarray(decisions))
        return int(positive[np.argmax(np.asarray(probs)[positive])]) if len(positive) else 0


def explained_class(decision: int, fixed: int | None) -> int:
    """The class a saliency map explains: the calibrated decision, unless configured to a fixed class."""
    return int(decision if fixed is None else fixed)


@dataclass
class Classifier:
    """A network and its decision rule: tensors in, calibrated probabilities and decisions out."""

    model: nn.Module
    rule: DecisionRule
    device: torch.device = torch.device("cpu")
    batch_size: int = 4

    def views(self, images) -> np.ndarray:
        """Logits of every (test-time transform, member) view, flattened to (V, N, K)."""
        from pipeline.core.views import view_logits

        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images,
                                                                                                dtype=np.float32))
        v = view_logits(self.model, x.float(), self.device, self.batch_size, self.rule.tta).double().numpy()
        return v.reshape(-1, *v.shape[2:])

    def logits(self, images) -> np.ndarray:
        """The served logits: the mean over views (the plain forward pass with one model and no TTA)."""
        return self.views(images).mean(axis=0)

    def probs(self, images) -> np.ndarray:
        return self.rule.probs(self.logits(images))

    def predict(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated probabilities (N, K), decisions (N,); multi-label (N, L))."""
        p = self.probs(images)
        return p, self.rule.decide(p)

    def assess(self, images) -> Assessment:
        """Probabilities, decisions, per-case uncertainty (spread over views) and referral, in one pass."""
        views = self.views(images)
        probs = self.rule.probs(views.mean(axis=0))
        decisions = self.rule.decide(probs)
        view_probs = np.stack([self.rule.probs(v) for v in views])
        unc = self.rule.uncertainty(view_probs, decisions)
        return Assessment(probs, decisions, unc, self.rule.refer(probs, unc), len(views))


@dataclass(frozen=True)
class Assessment:
    probs: np.ndarray        # calibrated (N, K)
    decisions: np.ndarray    # (N,); multi-label (N, L) 0/1
    uncertainty: np.ndarray  # (N,) std of the decided column's probability over views (multi-label: the
    # largest over labels); 0 with one view
    referred: np.ndarray     # (N,) bool
    n_views: int


__all__ = ["Assessment", "Classifier", "DecisionRule", "explained_class", "predict_logits", "resolve_device"]
