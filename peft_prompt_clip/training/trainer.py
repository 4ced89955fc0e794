"""The loop that learns a prompt adapter on labelled images with Accelerate: cached image features, class prompts
encoded in chunks with an exact gradient, gradients summed exactly over processes, atomic checkpoints every epoch and
exact resume. The recipe, the loss terms, the run's record and what it keeps beside the adapter are the other modules
of this package."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from peft import PeftModel

from ..classifier import PromptClassifier
from ..data import LabeledImages
from ..encoder import PromptEncoder
from ..layer import find_prompt_layer
from ..progress import progress
from ..storage import run_lock, save_adapter
from .arguments import TrainingArguments, coop_epochs
from .callbacks import BestEpoch, GaussianAverage
from .checkpoints import CHECKPOINT_NAME, check_finite, load_checkpoint, save_checkpoint
from .features import CHUNK, TrainingImages, check_labeled, check_teacher_logits, check_training_data
from .losses import StepOutputs
from .record import fingerprint, write_log


@dataclass
class _EpochStats:
    """The running numbers of an epoch, over all processes."""

    epoch: int
    loss: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    skipped: int = 0
    step_seconds: list[float] = field(default_factory=list)

    def show(self, bar: Any) -> None:
        if self.seen:
            loss, accuracy = f"{self.loss / self.seen:.4f}", f"{self.correct / self.seen:.3f}"
            bar.set_postfix(epoch=self.epoch + 1, loss=loss, acc=accuracy, refresh=False)

    def entry(self, lr: float) -> dict[str, Any]:
        """The epoch's line of the log."""
        return {
            "epoch": self.epoch + 1,
            "loss": self.loss / self.seen,
            "accuracy": self.correct / self.seen,
            "lr": lr,
            "skipped_steps": self.skipped,
            "seconds": round(sum(self.step_seconds), 3),  # the epoch's steps
        }


class PromptTrainer:
    """
    Learns the active prompt adapter of `model` to classify `train_data`.

    Each step encodes the class prompts (`"{class name}."`, the adapter adding its context) with the text tower,
    compares them with the images' features and takes a step on the loss ([`PromptLoss`]) with respect to the
    adapter alone. The image tower is frozen: without augmentation its features are computed once; with it, it runs
    without autograd.

    Args:
        model (`PeftModel`): a CLIP model with a prompt adapter (`get_peft_model` / `get_prompt_model`).
        processor: the model's processor (tokenizer and image processor).
        train_data ([`LabeledImages`]): the training images.
        args ([`TrainingArguments`]): the recipe.
        eval_data ([`LabeledImages`], *optional*): held-out images of the same classes, to choose the epoch kept (see
            `TrainingArguments.eval_every`), e.g. a few shots per class that training does not use ([`hold_out`]).
        data_record (`dict`, *optional*): what `train_data` is (its source and the ids of the images used), recorded
            in the run's log under `"data"`, so that an evaluation can leave those images out.
        teacher_logits (`torch.Tensor`, *optional*): a teacher's logits `(images, classes)` of `train_data`'s images,
            for the distillation term (`TrainingArguments.distill_weight`); see [`Teacher`]. With cached augmented
            views (`augment_views`), `(views, images, classes)` gives each view its own, the teacher's of the same
            crop (`Teacher.logits(..., augment_seed=)` with [`view_seeds`]).
        labeled (`torch.Tensor`, *optional*): which of `train_data`'s images have true labels (booleans, one per
            image): the cross-entropy (`TrainingArguments.label_weight`) is on those alone, the others' labels being
            a teacher's guesses (labelled shots mixed in with distillation). By default every label is used.
    """

    def __init__(
        self,
        model: PeftModel,
        processor: Any,
        train_data: LabeledImages,
        args: TrainingArguments,
        eval_data: LabeledImages | None = None,
        data_record: dict[str, Any] | None = None,
        teacher_logits: torch.Tensor | None = None,
        labeled: torch.Tensor | None = None,
    ) -> None:
        if not isinstance(model, PeftModel) or find_prompt_layer(model) is None:
            raise TypeError("model must be a PeftModel with a prompt adapter (see get_prompt_model).")
        check_training_data(train_data, eval_data)
        self.model = model
        self.processor = processor
        self.data = train_data
        self.eval_data = eval_data
        self.data_record = data_record
        self.args = args
        self.adapter_name: str = model.active_adapter
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("The adapter has no trainable context: load it with is_trainable=True to go on training.")
        model.peft_config[self.adapter_name].claim_classes(list(train_data.class_names))
        shots = max(train_data.counts())
        self.epochs = args.epochs or coop_epochs(shots)
        self.eval_every = args.eval_every or math.ceil(self.epochs / 10)
        self.patience = args.stopping_patience(eval_data is not None)
        self.accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            log_with=args.report_to,
            project_dir=args.output_dir if args.report_to else None,
        )
        self.model.to(self.accelerator.device).eval()  # CLIP has no dropout; eval also freezes nothing else
        self.encoder = PromptEncoder(model, processor, share_prefix=args.share_prefix)
        self.conditional = self.encoder.is_conditional(self.adapter_name)
        self.loss = args.loss()
        self.loss.check(self.conditional, self.encoder.prompts_images(self.adapter_name))
        needs_frozen, autocast = self.loss.needs_frozen_images, self.accelerator.autocast
        self.images = TrainingImages(
            self.encoder,
            processor,
            train_data,
            args,
            self.adapter_name,
            needs_frozen,
            autocast,
            eval_data,
            self.epochs,
        )
        self.class_tokens = self.encoder.tokenize([f"{name}." for name in train_data.class_names], self.adapter_name)
        if self.loss.needs_hand:
            self.loss.hand_features = self.hand_features()
        gpa_weights = args.gpa_weights(self.epochs)
        self.average = GaussianAverage(self.params, gpa_weights) if gpa_weights else None
        self.best = BestEpoch(self.params, self.evaluate) if eval_data is not None else None
        self.labels = torch.tensor(train_data.labels, device=self.accelerator.device)
        views, needs_teacher = self.images.cached_views, self.loss.needs_teacher
        self.teacher_logits = check_teacher_logits(teacher_logits, train_data, needs_teacher, views)
        self.labeled = check_labeled(labeled, train_data, args.label_weight)
        self.teacher_logits, self.labeled = (
            None if t is None else t.to(self.accelerator.device) for t in (self.teacher_logits, self.labeled)
        )
        config = model.peft_config[self.adapter_name]
        self.run = fingerprint(config, args, self.epochs, train_data, eval_data, teacher_logits, labeled)
        self.optimizer = self.accelerator.prepare(args.make_optimizer(self.params))

    def hand_features(self) -> torch.Tensor:
        """The hand-written prompts' class features (`hand_template` with the base model, the zero-shot prompt; the
        normalised mean over several templates), for the regularisers and the zero-shot reference."""
        return self._classifier(zero_shot=True).class_features()

    def _classifier(self, zero_shot: bool = False) -> PromptClassifier:
        """The classifier of the training classes: with the adapter, or the zero-shot prompt(s) on the base model."""
        hand = self.args.hand_template
        return PromptClassifier(
            self.model,
            self.processor,
            self.data.class_names,
            ([hand] if isinstance(hand, str) else hand) if zero_shot else ("{}.",),
            use_adapter=not zero_shot,
            adapter_name=self.adapter_name,
            chunk_size=self.args.class_chunk_size,
            share_prefix=self.args.share_prefix,
        )

    # -- one step -------------------------------------------------------------------------------------------------

    def step(
        self,
        image_features: torch.Tensor,
        labels: torch.Tensor,
        global_count: int,
        frozen_image_features: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        labeled: torch.Tensor | None = None,
    ) -> tuple[float, int]:
        """Forward and backward of this process's share of a batch of `global_count` images (over all processes);
        returns its summed loss and its correct count. The gradient is accumulated, not applied. With vision prompts,
        `image_features` come from the prompted tower (with autograd) and `frozen_image_features` from the frozen
        one; `teacher_logits` are the teacher's of the images, `labeled` which of their labels are true."""
        with self.accelerator.autocast():
            text = self.encoder.class_features(
                self.class_tokens,
                self.adapter_name,
                image_features=image_features if self.conditional else None,
                chunk_size=self.args.class_chunk_size,
                class_names=self.data.class_names,
            )
        logits = self.encoder.logits(image_features, text)
        scale = self.encoder.base.logit_scale.exp()
        outputs = StepOutputs(
            logits, labels, text, image_features, scale, frozen_image_features, teacher_logits, labeled
        )
        per_image, per_batch = self.loss(outputs)
        # every process sums its images' terms over the global batch, and adds its share of the batch terms, so the
        # gradients summed over processes (see _sync_gradients) are exactly those of the whole batch
        accumulation = self.args.gradient_accumulation_steps
        loss = per_image / (global_count * accumulation) + per_batch / (self.accelerator.num_processes * accumulation)
        self.accelerator.backward(loss)
        return loss.item() * global_count * accumulation, int((logits.argmax(-1) == labels).sum())

    def _sync_gradients(self) -> None:
        # Not `accelerator.prepare(model)` (DDP) nor `accumulate()`: DDP averages the processes' gradients, which is
        # exact only for equal shares of a batch (the last batch of an epoch is not), and all-reduces on every
        # backward pass; one sum over processes of gradients already scaled by the global batch is exact for any
        # split and runs once per optimizer step
        if self.accelerator.num_processes > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad = self.accelerator.reduce(p.grad, "sum")

    # -- evaluation -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, zero_shot: bool = False) -> dict[str, float]:
        """Accuracy and mean cross-entropy on `eval_data` of the adapter as it is now, or of the zero-shot prompt
        (`hand_template` on the base model) with `zero_shot=True`: [`PromptClassifier`]'s logits."""
        if self.eval_data is None:
            raise ValueError("evaluate() needs eval_data: pass it to PromptTrainer.")
        classifier = self._classifier(zero_shot)
        features = self.images.held_out_features(prompted=self.images.prompted and not zero_shot)
        with self.accelerator.autocast():  # in chunks: a conditional adapter's class prompts are per image
            logits = torch.cat([classifier.image_logits(part).float() for part in features.split(CHUNK)])
        labels = torch.tensor(self.eval_data.labels, device=logits.device)
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        return {"accuracy": int((logits.argmax(-1) == labels).sum()) / len(labels), "loss": loss / len(labels)}

    # -- epochs ---------------------------------------------------------------------------------------------------

    def _train_epoch(self, epoch: int, bar: Any) -> _EpochStats:
        acc, args, stats = self.accelerator, self.args, _EpochStats(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = args.learning_rate(epoch, self.epochs)
        batches = self.images.order(epoch)
        shares = [batch[acc.process_index :: acc.num_processes] for batch in batches]  # this process's share of each
        features_of_shares = self.images.epoch(epoch, shares)
        for n, (batch, mine) in enumerate(zip(batches, shares, strict=True)):
            start = time.perf_counter()
            if not mine:
                loss, correct = 0.0, 0
            else:
                features, frozen = next(features_of_shares)
                teacher, known = (
                    None if t is None else self.images.rows(t, epoch, mine)
                    for t in (self.teacher_logits, self.labeled)
                )
                loss, correct = self.step(features, self.labels[mine], len(batch), frozen, teacher, known)
            totals = acc.reduce(torch.tensor([loss, correct, len(mine)], device=acc.device), "sum")
            if not math.isfinite(totals[0].item()):  # e.g. fp16 overflow: drop this step's gradient, keep going
                self.optimizer.zero_grad(set_to_none=True)
                stats.skipped += 1
            else:
                if (n + 1) % args.gradient_accumulation_steps == 0 or n + 1 == len(batches):
                    self._sync_gradients()
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                stats.loss += totals[0].item()
                stats.correct += totals[1].item()
                stats.seen += totals[2].item()
            stats.step_seconds.append(time.perf_counter() - start)
            bar.update(1)
            stats.show(bar)
        return stats

    def _stops(self, entry: dict[str, Any], epoch: int, log: dict[str, Any]) -> bool:
        """Whether the run stops early after epoch `epoch` (its log `entry`): an evaluation before the last, `patience`
        evaluations since the best candidate so far (see [`BestEpoch`]); the first process decides for all (their
        evaluations may differ in rounding)."""
        if not self.patience or "eval_accuracy" not in entry or epoch + 1 == self.epochs:  # alike in every process
            return False
        best = log["best"]["epoch"]
        stop = sum(1 for e in log["history"] if "eval_accuracy" in e and e["epoch"] > best) >= self.patience
        if self.accelerator.num_processes > 1:
            stop = bool(broadcast(torch.tensor([stop], device=self.accelerator.device)).item())
        return stop

    def train(self) -> dict[str, Any]:
        """Run the training; returns a summary: epochs, the last epoch's loss and accuracy, the median seconds per
        step, and with `eval_data` the evaluations (`"eval"`: the zero-shot prompt's, the best candidate's and the end
        of training's; see [`TrainingArguments`]) and, where the run stopped early (`early_stop`), `"stopped"`: the
        epoch it stopped after, the patience and the best epoch. The per-epoch log is saved as `training_log.json`
        beside the adapter. The run holds the output folder: a second run into it is refused (`BlockingIOError`, see
        [`run_lock`])."""
        output = Path(self.args.output_dir)
        with run_lock(output, main=self.accelerator.is_main_process):
            return self._train(output)

    def _train(self, output: Path) -> dict[str, Any]:
        acc, args = self.accelerator, self.args
        checkpoint = output / CHECKPOINT_NAME
        kept = {GaussianAverage.name: self.average, BestEpoch.name: self.best}  # their buffers go into the checkpoint
        buffers = {name: None if keeper is None else keeper.buffer for name, keeper in kept.items()}
        start_epoch, log = (
            load_checkpoint(checkpoint, self.params, self.optimizer, self.run, buffers) if args.resume else (0, {})
        )
        log.setdefault("history", [])
        if self.eval_data is not None and start_epoch == 0:
            log["zero_shot"] = self.evaluate(zero_shot=True)
            log["initial"] = self.best.consider(log, 0)
        if args.report_to:
            acc.init_trackers("peft-prompt-clip", config=args.tracker_config())
        self.images.prepare()
        batches_per_epoch = math.ceil(len(self.data) / args.batch_size)
        bar = progress(
            total=self.epochs * batches_per_epoch,
            initial=start_epoch * batches_per_epoch,
            desc="training",
            **({} if acc.is_local_main_process else {"disable": True}),
        )
        step_seconds: list[float] = []
        for epoch in range(start_epoch, self.epochs):
            if "stopped" in log:  # a resumed run that had stopped early
                break
            stats = self._train_epoch(epoch, bar)
            step_seconds += stats.step_seconds
            check_finite(self.params, epoch, stats.skipped, batches_per_epoch, checkpoint)
            if self.average is not None:
                self.average.epoch_end(epoch)
            entry = stats.entry(self.optimizer.param_groups[0]["lr"])
            if self.eval_data is not None and ((epoch + 1) % self.eval_every == 0 or epoch + 1 == self.epochs):
                scores = self.best.consider(log, epoch + 1)
                entry.update(eval_accuracy=scores["accuracy"], eval_loss=scores["loss"])
            log["history"].append(entry)
            if self._stops(entry, epoch, log):
                log["stopped"] = {"epoch": epoch + 1, "patience": self.patience, "best": log["best"]["epoch"]}
            if args.report_to:
                acc.log({k: v for k, v in entry.items() if k != "epoch"}, step=epoch + 1)
            if acc.is_main_process:
                save_checkpoint(checkpoint, self.params, self.optimizer, epoch + 1, self.run, buffers, log)
            acc.wait_for_everyone()
            if "stopped" in log:
                bar.total = bar.n  # the run's end
                break
        bar.close()
        if args.report_to:
            acc.end_training()
        if self.average is not None:  # PromptSRC's GPA: the adapter is the weighted mean over epochs
            self.average.restore()
        summary: dict[str, Any] = {"epochs": self.epochs, "augment": args.augment, "loss": None, "accuracy": None}
        if "stopped" in log:
            summary["stopped"] = log["stopped"]
        if start_epoch < self.epochs:  # a resumed run whose checkpoint holds every epoch only saves the adapter
            last = log["history"][-1]
            summary.update(loss=last["loss"], accuracy=last["accuracy"], skipped_steps=last["skipped_steps"])
            summary["first_loss"] = log["history"][0]["loss"]
        summary["seconds_per_step"] = sorted(step_seconds)[len(step_seconds) // 2] if step_seconds else None
        if self.eval_data is not None:
            if self.average is not None:  # the end of training's adapter, the GPA mean, is a candidate too
                log["last"] = {"epoch": "average", **self.best.consider(log, "average")}
            else:
                last = log["history"][-1]
                log["last"] = {"epoch": last["epoch"], "accuracy": last["eval_accuracy"], "loss": last["eval_loss"]}
            if acc.is_main_process:
                save_adapter(self.model, output / "last")
            self.best.restore()
            summary["eval"] = {
                "images": len(self.eval_data),
                **{k: log[k] for k in ("zero_shot", "initial", "best", "last")},
            }
        if acc.is_main_process:
            save_adapter(self.model, output)
            if self.eval_data is None:  # the end of training's adapter is the one saved: no other
                shutil.rmtree(output / "last", ignore_errors=True)
            data = {} if self.data_record is None else {"data": self.data_record}
            write_log([output, output / "last"], {"epochs": self.epochs, **log, **data})
        return summary
