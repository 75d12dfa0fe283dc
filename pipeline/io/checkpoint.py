"""Checkpoints without pickle: safetensors weights + a JSON spec that rebuilds the network."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.core.models import ModelSpec, build_model
from pipeline.errors import MissingInput
from pipeline.io.artifacts import save_json
from pipeline.layout import ModelDir

WEIGHTS = ModelDir(".").weights.name
SPEC = ModelDir(".").spec.name


def state_dict_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    model = getattr(model, "module", model)  # unwrap DDP
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_weights(model: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".tmp-" + path.name)
    save_file(state_dict_of(model), str(tmp))
    tmp.replace(path)


def save_checkpoint(model: torch.nn.Module, spec: ModelSpec, folder: Path, extra: dict) -> None:
    """Write `model.safetensors` and `model.json` (spec + whatever the caller records)."""
    save_weights(model, folder / WEIGHTS)
    save_json(folder / SPEC, {"spec": spec.to_dict(), **extra})


def model_id(folder: Path | str) -> str:
    """The model's identity for review files: a hash of its weights file (pipeline/core/review.py)."""
    from pipeline.core.review import model_id_of

    path = ModelDir(folder).weights
    if not path.exists():
        raise MissingInput(f"{path} is missing", hint="run the train stage first")
    return model_id_of(path.read_bytes())


def load_checkpoint(folder: Path | str, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the network from `model.json` and load `model.safetensors` (strict). Eval mode."""
    folder = Path(folder)
    if not (folder / SPEC).exists() or not (folder / WEIGHTS).exists():
        raise MissingInput(f"no trained model in {folder} (model.json, model.safetensors)",
                           hint="run the train stage first (dvc repro, or resdx train)")
    info = json.loads((folder / SPEC).read_text())
    model = build_model(ModelSpec(**info["spec"]))
    model.load_state_dict(load_file(str(folder / WEIGHTS), device=device))
    return model.to(device).eval(), info


def save_train_state(state: Path, model, opt, sched, progress: dict) -> None:
    """The resumable last-epoch state of one training run (our own files: tensors and JSON only)."""
    save_weights(model, state / "last.safetensors")
    tmp = state / ".tmp-optim.pt"
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp)
    tmp.replace(state / "optim.pt")
    save_json(state / "progress.json", progress)  # written last: it marks the epoch complete


def load_train_state(state: Path, model, opt, sched) -> dict | None:
    """Resume from the last completed epoch of the same run key, if any."""
    prog = state / "progress.json"
    if not prog.exists():
        return None
    progress = json.loads(prog.read_text())
    model.load_state_dict(load_file(str(state / "last.safetensors")))
    blob = torch.load(state / "optim.pt", map_location="cpu", weights_only=True)  # this run's own file, tensors only
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    return progress
