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


@dataclass(frozen=True)
class DecisionRule:
    """Temperature scaling and the operating point, fitted on validation by evaluate.

    Binary models decide class 1 when the calibrated p(class 1) >= `threshold`; models with more
    classes (or without a threshold) take the most probable calibrated class.
    """

    temperature: float
    threshold: float | None
    class_names: tuple[str, ...]
    operating_point: str = "youden"

    @classmethod
    def from_calibration(cls, cal: dict, class_names=None) -> DecisionRule:
        names = cal.get("class_names") or class_names or ["0", "1"]
        thr = cal.get("threshold")
        return cls(float(cal["temperature"]), None if thr is None else float(thr), tuple(names),
                   cal.get("operating_point", "youden"))

    def to_calibration(self) -> dict:
        return {"temperature": self.temperature, "threshold": self.threshold, "class_names": list(self.class_names),
                "binary": self.binary, "operating_point": self.operating_point}

    @property
    def binary(self) -> bool:
        return len(self.class_names) == 2

    def probs(self, logits) -> np.ndarray:
        """(N, K) calibrated probabilities softmax(logits / T)."""
        z = np.asarray(logits, dtype=np.float64)
        if z.ndim == 1:
            z = z[None]
        return apply_temperature(z, self.temperature)

    def score(self, probs: np.ndarray) -> np.ndarray:
        """The number a user reads: p(class 1) for binary models, the top class's probability otherwise."""
        return probs[:, 1] if self.binary else probs.max(axis=1)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        if self.binary and self.threshold is not None:
            return (probs[:, 1] >= self.threshold).astype(int)
        return probs.argmax(axis=1).astype(int)

    def rule_text(self) -> str:
        if self.binary and self.threshold is not None:
            return f"p({self.class_names[1]}) >= threshold"
        return "most probable class"


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

    def logits(self, images) -> np.ndarray:
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images,
                                                                                                dtype=np.float32))
        return predict_logits(self.model, x.float(), self.device, self.batch_size).double().numpy()

    def probs(self, images) -> np.ndarray:
        return self.rule.probs(self.logits(images))

    def predict(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated probabilities (N, K), decisions (N,))."""
        p = self.probs(images)
        return p, self.rule.decide(p)


__all__ = ["Classifier", "DecisionRule", "explained_class", "predict_logits", "resolve_device"]
