"""Training checkpoints: the trainable parameters and the optimizer state in one safetensors file (tensors) with JSON
metadata (scalars), written atomically, so a crash leaves the previous checkpoint whole and a run resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .storage import atomic_path

CHECKPOINT_NAME = "checkpoint.safetensors"


def save_checkpoint(path: Path, params: list[torch.Tensor], optimizer: Any, epoch: int) -> None:
    """Write the context and the optimizer state to `path` atomically: a crash leaves the previous checkpoint whole."""
    tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    state = optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    metadata = {"epoch": str(epoch), "param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_checkpoint(path: Path, params: list[torch.Tensor], optimizer: Any) -> int:
    """Restore the context and optimizer state saved by [`save_checkpoint`]; returns the epochs already done."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; train without --resume to start anew.")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with torch.no_grad():
        for i, p in enumerate(params):
            saved = tensors[f"param.{i}"]
            if saved.shape != p.shape:
                raise ValueError(
                    f"The checkpoint's context has shape {tuple(saved.shape)}, the model's {tuple(p.shape)}."
                )
            p.copy_(saved)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in json.loads(metadata["scalars"]).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    return int(metadata["epoch"])
