"""The record of a run, with one owner: its log (`training_log.json`: the numbers of each epoch, the evaluations on
held-out images, the data it learned from) and its fingerprint (what a checkpoint must share with a run to be resumed
by it)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..config import PromptEmbeddingConfig
from ..data import LabeledImages
from ..options import describe_templates
from ..storage import read_json, write_json
from .arguments import TrainingArguments

#: The per-epoch log of a run (loss, accuracy, learning rate, evaluations, the data), saved beside the adapter.
LOG_NAME = "training_log.json"

#: The config fields a resumed run may differ in: they name files, versions and classes (the data's are recorded on
#: their own), not what is learned. Every other field is part of the fingerprint, those added later included.
RESUMABLE_CONFIG_FIELDS = frozenset(
    {"task_type", "peft_type", "auto_mapping", "peft_version", "inference_mode", "target_modules", "weights_sha256"}
    | {"class_names", "num_classes"}
)
#: The training arguments a resumed run may differ in: where it writes and reports, how it computes the same numbers
#: (precision, workers, chunks, the shared prefix), and its length (more epochs may follow, except under PromptSRC's
#: aggregation, whose weights depend on them). Every other argument is part of the fingerprint.
RESUMABLE_ARGUMENTS = frozenset(
    {"output_dir", "epochs", "mixed_precision", "num_workers", "class_chunk_size", "share_prefix", "report_to"}
    | {"resume"}
)


def fingerprint(
    config: PromptEmbeddingConfig,
    args: TrainingArguments,
    epochs: int,
    data: LabeledImages,
    eval_data: LabeledImages | None,
    teacher_logits: torch.Tensor | None = None,
    labeled: torch.Tensor | None = None,
) -> dict[str, Any]:
    """What a checkpoint must share with a run to be resumed by it: the adapter's config and the training arguments,
    less the fields named resumable, the data's classes, image counts and labels, the teacher's logits and which labels
    are true (hashes)."""
    run = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CONFIG_FIELDS}
    run["fixed_token_ids"] = run.get("fixed_token_ids") or None  # none: as checkpoints from before the field read
    run.update({k: v for k, v in asdict(args).items() if k not in RESUMABLE_ARGUMENTS})
    if not args.augment:
        run["augment_views"] = None  # views are drawn with augmentation only
    # early stopping as it acts: its patience, or None where it is off (as checkpoints from before it read)
    run["early_stop"] = args.stopping_patience(eval_data is not None)
    del run["patience"]
    if args.gpa_mean is not None:
        run["epochs"] = epochs
    run.update(
        class_names=list(data.class_names),
        images=len(data),
        labels=hashlib.sha256(str(list(data.labels)).encode()).hexdigest(),  # another teacher's guesses, too
        eval_images=0 if eval_data is None else len(eval_data),
    )
    if teacher_logits is not None:
        run["teacher"] = hashlib.sha256(teacher_logits.detach().float().cpu().numpy().tobytes()).hexdigest()
    if labeled is not None:
        run["labeled"] = hashlib.sha256(torch.as_tensor(labeled).cpu().numpy().tobytes()).hexdigest()
    return json.loads(json.dumps(run))  # as the checkpoint stores it (enums as their values, tuples as lists)


#: From this many epochs on, a run whose loss fell by less than 1% (or rose) is said not to learn
FLAT_EPOCHS = 5


def describe_run(summary: dict[str, Any], data: LabeledImages, processes: int, output: str) -> str:
    """A run's [`PromptTrainer.train`] `summary` in one line: what it trained on, its last epoch, where it saved; and a
    warning when its loss did not fall."""
    result = (
        "nothing left to train (the checkpoint holds every epoch)"
        if summary["loss"] is None
        else f"loss {summary['loss']:.4f}, train accuracy {summary['accuracy']:.3f}"
    )
    where = f" in {processes} processes" if processes > 1 else ""
    stopped = summary.get("stopped")
    epochs = f"{stopped['epoch']} of {summary['epochs']}" if stopped else summary["epochs"]
    text = (
        f"trained {epochs} epochs on {len(data)} images of {len(data.class_names)} classes{where}: "
        f"{result}; adapter saved to {output}"
    )
    if stopped:
        text += (
            f"\nstopped early: no held-out gain in {stopped['patience']} evaluations after the best (epoch "
            f"{stopped['best']}); --no-early-stop runs every epoch"
        )
    first, loss = summary.get("first_loss"), summary["loss"]
    if first is not None and loss is not None and summary["epochs"] >= FLAT_EPOCHS and first - loss < 0.01 * first:
        text += (
            f"\nwarning: the training loss did not fall ({first:.4f} in the first epoch, {loss:.4f} in the last): the "
            "prompt learned next to nothing; try --optimizer adamw (the recipe's SGD at lr 0.002 is slow on few "
            f"images), a higher --lr, or {'--no-early-stop' if stopped else 'more --epochs'}"
        )
    return text


def describe_held_out(scores: dict[str, Any], output: str, template: str | list[str], ctx_init: str | None) -> str:
    """What a run's held-out images chose (`scores`: its summary's `"eval"`), in words: the kept candidate against the
    zero-shot prompt (`template`) and the end of training, with advice when the kept one scores below zero-shot."""
    best, last, zero = scores["best"], scores["last"], scores["zero_shot"]["accuracy"]
    name = {0: "the initial prompt (epoch 0)", "average": "the epochs' Gaussian average"}.get(
        best["epoch"], f"epoch {best['epoch']}"
    )
    prompt = describe_templates(template)
    text = (
        f"validation accuracy ({scores['images']} held-out images): zero-shot ({prompt}) {zero:.3f}, initial prompt "
        f"{scores['initial']['accuracy']:.3f}, end of training {last['accuracy']:.3f}, best {best['accuracy']:.3f}: "
        f"kept {name} in {output}; the end of training's adapter is in {Path(output) / 'last'}"
    )
    if best["accuracy"] < zero:
        advice = "more shots or another --lr" if ctx_init else "--ctx-init 'a photo of a', more shots or another --lr"
        text += (
            "\nwarning: the kept prompt scores below the zero-shot prompt on the held-out images "
            f"({best['accuracy']:.3f} < {zero:.3f}): use zero-shot, or try {advice}"
        )
    return text


def read_log(folder: str | Path) -> Any:
    """The `training_log.json` in `folder` as JSON, or None when there is none (see [`read_json`])."""
    return read_json(Path(folder) / LOG_NAME)


def write_log(folders: Iterable[str | Path], log: dict[str, Any]) -> None:
    """Write the run's log into each of `folders` (those that exist), atomically."""
    for folder in map(Path, folders):
        if folder.is_dir():
            write_json(folder / LOG_NAME, log)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


#: The training log's schema: each per-epoch entry's fields (required, then optional), and each evaluation's; a field
#: not named here may hold anything, and nothing reads it
EPOCH_FIELDS = {"epoch": lambda v: _count(v, 1), "loss": _number, "accuracy": _number, "lr": _number}
EPOCH_OPTIONAL = {
    "eval_accuracy": _number,
    "eval_loss": _number,
    "skipped_steps": lambda v: _count(v, 0),
    "seconds": _number,
}
EVALUATION_FIELDS = {
    "accuracy": _number,
    "loss": _number,
    "epoch": lambda v: _count(v, 0) or v == "average",
}


def valid_log(log: Any) -> bool:
    """Whether `log` is a run's log as the trainer writes it (see `EPOCH_FIELDS`): a history of epochs (1 on), each
    with finite numbers for its loss, accuracy and learning rate, and evaluations (`zero_shot`, `initial`, `best`,
    `last`) with finite numbers."""
    if not isinstance(log, dict) or not isinstance(log.get("history", []), list):
        return False
    for entry in log.get("history", []):
        if not isinstance(entry, dict) or not all(
            name in entry and ok(entry[name]) for name, ok in EPOCH_FIELDS.items()
        ):
            return False
        if not all(ok(entry[name]) for name, ok in EPOCH_OPTIONAL.items() if name in entry):
            return False
    evaluations = [log[k] for k in ("zero_shot", "initial", "best", "last") if k in log]
    return all(
        isinstance(e, dict) and all(ok(e[name]) for name, ok in EVALUATION_FIELDS.items() if name in e)
        for e in evaluations
    )
