"""Training checkpoints: the trainable parameters and the optimizer state in one safetensors file (tensors) with JSON
metadata (scalars), written atomically, so a crash leaves the previous checkpoint whole and a run resumes exactly."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import InvalidCheckpointError, TrainingDivergedError
from ..storage import atomic_path
from .record import valid_log

CHECKPOINT_NAME = "checkpoint.safetensors"


def check_finite(params: list[torch.Tensor], epoch: int, skipped: int, steps: int, checkpoint: Path) -> None:
    """After epoch `epoch` (from 0), of whose `steps` steps `skipped` had a non-finite loss: stop before a checkpoint
    holds anything non-finite (the previous one is kept), and warn about skipped steps."""
    if skipped == steps or not all(bool(p.isfinite().all()) for p in params):
        kept = f"the checkpoint of epoch {epoch} is kept at {checkpoint}" if epoch else "no checkpoint was written"
        raise TrainingDivergedError(
            f"Training diverged in epoch {epoch + 1}: {skipped} of {steps} steps had a non-finite loss; {kept}. "
            "Lower the learning rate, or use --mixed-precision bf16 (or no) instead of fp16."
        )
    if skipped:
        warnings.warn(
            f"Skipped {skipped} of {steps} steps of epoch {epoch + 1} whose loss was NaN or infinite.", stacklevel=3
        )


def save_checkpoint(
    path: Path,
    params: list[torch.Tensor],
    optimizer: Any,
    epoch: int,
    run: dict[str, Any],
    buffers: dict[str, list[torch.Tensor] | None] | None = None,
    log: dict[str, Any] | None = None,
) -> None:
    """Write the trainable parameters, the optimizer state, the run's other copies of the parameters (`buffers`, by
    kind: PromptSRC's running average, the best evaluated candidate; None when the run keeps none), its log (`log`,
    JSON) and its description (`run`: the recipe and the data's fingerprint) to `path` atomically: a crash leaves the
    previous checkpoint whole."""
    tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    for kind, values in (buffers or {}).items():
        tensors.update({f"{kind}.{i}": v.detach().cpu().contiguous() for i, v in enumerate(values or [])})
    scalars: dict[str, Any] = {}
    for index, values in optimizer.state_dict()["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    metadata = {"epoch": str(epoch), "scalars": json.dumps(scalars), "run": json.dumps(run, sort_keys=True)}
    metadata["log"] = json.dumps(log or {})
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as exc:  # a full disk, say: the previous checkpoint stays
            raise OSError(f"Could not write the checkpoint {path} ({exc}); the previous one is kept.") from None


def load_checkpoint(
    path: Path,
    params: list[torch.Tensor],
    optimizer: Any,
    run: dict[str, Any],
    buffers: dict[str, list[torch.Tensor] | None] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Restore the parameters, optimizer state and the other copies of the parameters (into `buffers`, by kind, those
    the run keeps) saved by [`save_checkpoint`] for the same `run`; returns the epochs already done and the run's log.
    The optimizer's hyperparameters are this run's, never read from the file.

    Raises:
        `InvalidCheckpointError`: naming what is damaged, or how the checkpoint's run differs from this one.
    """
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; train without --resume to start anew.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        saved_run = json.loads(metadata["run"])
        scalars = json.loads(metadata["scalars"])
        log = json.loads(metadata["log"])
        epoch = int(metadata["epoch"])
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
        raise InvalidCheckpointError(
            f"{path} is damaged or was made by an older version ({type(exc).__name__}: {exc}); train without --resume "
            "to start anew."
        ) from None
    if not isinstance(saved_run, dict) or not isinstance(scalars, dict) or not valid_log(log):
        raise InvalidCheckpointError(f"{path} has malformed metadata; train without --resume to start anew.")
    differences = [f"{k}: {saved_run.get(k)!r} there, {v!r} here" for k, v in run.items() if saved_run.get(k) != v]
    if differences:
        stopping = saved_run.get("early_stop") != run.get("early_stop")  # None: a run without (or before) it
        raise InvalidCheckpointError(
            f"{path} was made by another run ({'; '.join(differences)}); resume with the same settings and data"
            f"{' (early stopping: --patience N as that run, --no-early-stop where it had none)' if stopping else ''}, "
            "or train without --resume into another folder."
        )
    if epoch < 0:
        raise InvalidCheckpointError(f"{path} says {epoch} epochs are done, which this run cannot have.")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
        elif key.partition(".")[0] not in {"param", *(buffers or {})}:
            raise InvalidCheckpointError(f"{path} holds an unknown tensor {key!r}.")
    for key, value in scalars.items():
        index, _, name = key.partition(".")
        if not isinstance(value, int | float) or not math.isfinite(value) or not index.isdigit():
            raise InvalidCheckpointError(f"{path} has a malformed optimizer value {key!r}: {value!r}.")
        state.setdefault(int(index), {})[name] = value
    kept = {kind: values for kind, values in (buffers or {}).items() if values is not None}
    for kind, targets in (("param", params), *kept.items()):
        for i, p in enumerate(targets):
            saved = tensors.get(f"{kind}.{i}")
            if saved is None or saved.shape != p.shape or not saved.is_floating_point() or not saved.isfinite().all():
                raise InvalidCheckpointError(
                    f"{path} holds no finite {kind} {i} of shape {tuple(p.shape)}; train without --resume."
                )
    for index, values in state.items():
        if index >= len(params) or any(
            isinstance(v, torch.Tensor) and (not v.isfinite().all() or (v.dim() and v.shape != params[index].shape))
            for v in values.values()
        ):
            raise InvalidCheckpointError(f"{path} has optimizer state that does not fit parameter {index}.")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])
        for kind, values in kept.items():
            for i, v in enumerate(values):
                v.copy_(tensors[f"{kind}.{i}"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    except (KeyError, ValueError, RuntimeError) as exc:
        raise InvalidCheckpointError(f"{path}: the optimizer state does not fit this optimizer ({exc}).") from None
    return epoch, log
