"""Checkpoints without pickle: safetensors weights + a JSON spec that rebuilds the network."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load, load_file, save_file

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
    """The resumable last-epoch state of one training run (our own files: tensors and JSON only).

    The epoch's weights and optimizer go to files named by the epoch; progress.json, written last and
    atomically, names them. A kill at any moment leaves the previous epoch's complete state or this one's,
    never new weights beside an old epoch number. A finished run is never trained further (a longer run is
    another run key), so its state keeps progress.json and best.safetensors only: the last weights and the
    optimizer (2x the weights with Adam) would be three times the network's size of dead files per run."""
    keep: tuple[str, ...] = ()
    if not progress.get("finished"):
        epoch = progress["epoch"]
        keep = (f"last-{epoch}.safetensors", f"optim-{epoch}.pt")
        save_weights(model, state / keep[0])
        tmp = state / ".tmp-optim.pt"
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp)
        tmp.replace(state / keep[1])
    save_json(state / "progress.json", progress | {"files": list(keep)})
    for old in [*state.glob("last*.safetensors"), *state.glob("optim*.pt")]:
        if old.name not in keep:
            old.unlink(missing_ok=True)


def load_train_state(state: Path, model, opt, sched) -> dict | None:
    """Resume from the last completed epoch of the same run key, if any. Under torch.distributed rank 0
    alone writes the state (on its node's disk): it reads the files and sends their bytes to every rank,
    so all ranks resume the same epoch and the nodes need not share `train.state_dir`."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    files = _read_state_files(state) if not distributed or dist.get_rank() == 0 else None
    if distributed:  # the model is already on its device: the device the backend sends from
        files = _broadcast_files(files, next(model.parameters()).device)
    if files is None:
        return None
    progress = json.loads(files["progress.json"])
    if not files["last.safetensors"]:  # a finished run: nothing left to resume, its best weights are exported
        return progress
    model.load_state_dict(load(files["last.safetensors"]))
    # this run's own file, tensors only
    blob = torch.load(io.BytesIO(files["optim.pt"]), map_location="cpu", weights_only=True)
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    return progress


STATE_FILES = ("progress.json", "last.safetensors", "optim.pt")  # what a state holds, as sent between ranks


def _read_state_files(state: Path) -> dict[str, bytes] | None:
    """progress.json and the weights and optimizer files it names (a state from before the names: fixed ones)."""
    if not (state / "progress.json").exists():
        return None
    progress = (state / "progress.json").read_bytes()
    names = json.loads(progress).get("files", ["last.safetensors", "optim.pt"])
    if not names:  # a finished run's state (see save_train_state)
        return dict(zip(STATE_FILES, (progress, b"", b"")))
    weights, optim = names
    return dict(zip(STATE_FILES, (progress, (state / weights).read_bytes(), (state / optim).read_bytes())))


def _broadcast_files(files: dict[str, bytes] | None, device: torch.device) -> dict[str, bytes] | None:
    """Rank 0's state files on every rank (None: there are none): their sizes, then their bytes (no pickle)."""
    import torch.distributed as dist

    sizes = torch.tensor([len(files[n]) if files else -1 for n in STATE_FILES], dtype=torch.int64, device=device)
    dist.broadcast(sizes, src=0)
    sizes = sizes.tolist()
    if sizes[0] < 0:
        return None
    if files:
        buf = torch.frombuffer(bytearray(b"".join(files[n] for n in STATE_FILES)), dtype=torch.uint8).to(device)
    else:
        buf = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    dist.broadcast(buf, src=0)
    data, ends = buf.cpu().numpy().tobytes(), np.cumsum(sizes).tolist()
    return {n: data[end - size:end] for n, size, end in zip(STATE_FILES, sizes, ends)}
