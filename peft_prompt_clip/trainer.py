"""Learning a prompt adapter on labelled images with Accelerate: CoOp's recipe by default, cached image features,
class prompts encoded in chunks with an exact gradient, atomic checkpoints every epoch and exact resume."""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .classifier import PromptClassifier, _features, tokenize_prompts
from .data import LabeledImages, image_inputs
from .errors import TrainingDivergedError
from .layer import find_prompt_layer
from .storage import atomic_path, save_adapter

CHECKPOINT_NAME = "checkpoint.safetensors"


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Losses and similarities in float32 under mixed precision (float64 stays float64)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def coop_epochs(shots: int) -> int:
    """CoOp's epochs by shots per class: 50 for 1 shot, 100 for 2-4, 200 for 8 and more."""
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


@dataclass
class TrainingArguments:
    """
    How to learn the prompt. The defaults are CoOp's recipe: SGD (momentum 0.9, weight decay 5e-4) at lr 0.002 with a
    cosine schedule, one warm-up epoch at a constant 1e-5, batches of 32, epochs by shots (see [`coop_epochs`]).

    Args:
        output_dir (`str`): where the adapter, the checkpoint and the logs go.
        epochs (`int`, *optional*): number of epochs; by default CoOp's count for the number of shots per class.
        batch_size (`int`, *optional*, defaults to 32): images per optimizer step, over all processes.
        optimizer (`str`, *optional*, defaults to `"sgd"`): `"sgd"` or `"adamw"`.
        lr (`float`, *optional*, defaults to 0.002): peak learning rate.
        weight_decay (`float`, *optional*, defaults to 5e-4): weight decay.
        warmup_epochs (`int`, *optional*, defaults to 1): epochs at the constant `warmup_lr` first.
        warmup_lr (`float`, *optional*, defaults to 1e-5): learning rate of the warm-up epochs.
        gradient_accumulation_steps (`int`, *optional*, defaults to 1): batches per optimizer step.
        mixed_precision (`str`, *optional*, defaults to `"no"`): `"no"`, `"fp16"` or `"bf16"`.
        augment (`bool`, *optional*): CoOp's random resized crop + flip. By default on when the training set has at
            most 16 images per class; off means image features are computed once and cached.
        class_chunk_size (`int`, *optional*): encode the class prompts this many at a time (exact gradient), to bound
            memory with many classes; all at once by default.
        kg_weight (`float`, *optional*, defaults to 0): KgCoOp's regulariser (Yao et al., CVPR 2023): adds
            `kg_weight * mean(1 - cos(learned class feature, hand-written class feature))`; KgCoOp uses 8.0.
        kl_weight (`float`, *optional*, defaults to 0): a ProGrad-style regulariser (Zhu et al., ICCV 2023): adds
            `kl_weight * KL(zero-shot probabilities || learned probabilities)` per image.
        hand_template (`str`, *optional*, defaults to `"a photo of a {}."`): the hand-written prompt of both.
        seed (`int`, *optional*, defaults to 1): seeds batch order and augmentation.
        report_to (`str`, *optional*): an Accelerate tracker, e.g. `"tensorboard"`.
        resume (`bool`, *optional*, defaults to `False`): continue from the checkpoint in `output_dir`.
    """

    output_dir: str
    epochs: int | None = None
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    augment: bool | None = None
    class_chunk_size: int | None = None
    kg_weight: float = 0.0
    kl_weight: float = 0.0
    hand_template: str = "a photo of a {}."
    seed: int = 1
    report_to: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}.")
        for name in ("batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}.")
        if self.kg_weight < 0 or self.kl_weight < 0:
            raise ValueError(f"kg_weight and kl_weight must be >= 0, got {self.kg_weight} and {self.kl_weight}.")
        if "{}" not in self.hand_template:
            raise ValueError(f"hand_template needs a '{{}}' for the class name, got {self.hand_template!r}.")
        if self.class_chunk_size is not None and self.class_chunk_size < 1:
            raise ValueError(f"class_chunk_size must be at least 1, got {self.class_chunk_size}.")

    def learning_rate(self, epoch: int, epochs: int) -> float:
        """CoOp's schedule: `warmup_lr` for the warm-up epochs, then cosine from `lr` to 0 over all epochs."""
        if epoch < self.warmup_epochs:
            return self.warmup_lr
        return 0.5 * self.lr * (1 + math.cos(math.pi * epoch / epochs))


class PromptTrainer:
    """
    Learns the active prompt adapter of `model` to classify `train_data`.

    Each step encodes the class prompts (`"{class name}."`, the adapter adding its context) with the text tower,
    compares them with the images' features and takes a cross-entropy step on the context alone. The image tower is
    frozen: without augmentation its features are computed once; with it, it runs without autograd.

    Args:
        model (`PeftModel`): a CLIP model with a prompt adapter (`get_peft_model` / `get_prompt_model`).
        processor: the model's processor (tokenizer and image processor).
        train_data ([`LabeledImages`]): the training images.
        args ([`TrainingArguments`]): the recipe.
    """

    def __init__(self, model: PeftModel, processor: Any, train_data: LabeledImages, args: TrainingArguments) -> None:
        layer = find_prompt_layer(model)
        if not isinstance(model, PeftModel) or layer is None:
            raise TypeError("model must be a PeftModel with a prompt adapter (see get_prompt_model).")
        if not len(train_data):
            raise ValueError("train_data is empty.")
        self.model = model
        self.processor = processor
        self.data = train_data
        self.args = args
        self.layer = layer
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("The adapter has no trainable context: load it with is_trainable=True to go on training.")
        if self.layer.is_conditional() and (args.kg_weight or args.kl_weight):
            raise ValueError("kg_weight and kl_weight regularise a context shared by all images, not CoCoOp's.")
        shots = max(train_data.counts())
        self.epochs = args.epochs or coop_epochs(shots)
        self.augment = shots <= 16 if args.augment is None else args.augment
        self.accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            log_with=args.report_to,
            project_dir=args.output_dir if args.report_to else None,
        )

    # -- class prompts -------------------------------------------------------------------------------------------

    def _text_chunks(self) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
        texts = [f"{name}." for name in self.data.class_names]
        tokens = {
            k: v.to(self.accelerator.device) for k, v in tokenize_prompts(self.processor, self.model, texts).items()
        }
        size = self.args.class_chunk_size or len(texts)
        # every chunk keeps the same padded length, so each class prompt is computed exactly as without chunks
        return [
            (
                list(range(start, min(start + size, len(texts)))),
                {k: v[start : start + size] for k, v in tokens.items()},
            )
            for start in range(0, len(texts), size)
        ]

    def _encode(self, indices: list[int], tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.layer.selecting_classes(indices), self.accelerator.autocast():
            features = _at_least_fp32(_features(self.model.get_text_features(**tokens)))
        return features / features.norm(dim=-1, keepdim=True)

    # -- images ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _image_features(self, indices: list[int], augment_seed: str | None) -> torch.Tensor:
        base = self.model.get_base_model()
        inputs = image_inputs(self.processor, self.data, indices, augment_seed=augment_seed)
        inputs = {k: v.to(self.accelerator.device) for k, v in inputs.items()}
        with self.accelerator.autocast():
            features = _at_least_fp32(_features(base.get_image_features(**inputs)))
        return features / features.norm(dim=-1, keepdim=True)

    def _cached_image_features(self) -> torch.Tensor:
        order = list(range(len(self.data)))
        return torch.cat([self._image_features(order[i : i + 64], None) for i in range(0, len(order), 64)])

    # -- training -------------------------------------------------------------------------------------------------

    def _batches(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.data)))
        random.Random(f"{self.args.seed}-{epoch}").shuffle(order)
        size = self.args.batch_size
        return [order[i : i + size] for i in range(0, len(order), size)]

    def _step(
        self, chunks, image_features: torch.Tensor, labels: torch.Tensor, global_count: int
    ) -> tuple[float, int]:
        """Forward and backward of one process's share of a batch; returns its summed loss and correct count."""
        scale = _at_least_fp32(self.model.get_base_model().logit_scale.exp())
        if self.layer.is_conditional():
            return self._conditional_step(chunks, scale, image_features, labels, global_count)
        chunked = len(chunks) > 1
        with torch.no_grad() if chunked else nullcontext():
            text = torch.cat([self._encode(i, t) for i, t in chunks])
        if chunked:  # the loss's gradient w.r.t. all class features first, then each chunk again with autograd
            text.requires_grad_(True)
        logits = scale * image_features @ text.T
        args, share = self.args, self.accelerator.num_processes * self.args.gradient_accumulation_steps
        loss = F.cross_entropy(logits, labels, reduction="sum") / (global_count * args.gradient_accumulation_steps)
        if args.kg_weight:  # the same term on every process: each adds its share
            loss = loss + args.kg_weight * (1 - (text * self.hand_features).sum(-1)).mean() / share
        if args.kl_weight:
            zero_shot = (scale * image_features @ self.hand_features.T).log_softmax(-1)
            kl = F.kl_div(logits.log_softmax(-1), zero_shot, log_target=True, reduction="sum")
            loss = loss + args.kl_weight * kl / (global_count * args.gradient_accumulation_steps)
        self.accelerator.backward(loss)
        if chunked:
            for indices, tokens in chunks:
                self._encode(indices, tokens).backward(text.grad[indices[0] : indices[-1] + 1])
        correct = int((logits.argmax(-1) == labels).sum())
        return loss.item() * global_count * self.args.gradient_accumulation_steps, correct

    def _conditional_step(self, chunks, scale, image_features, labels, global_count: int) -> tuple[float, int]:
        """CoCoOp: every image has its own context, so the text tower runs over all (image, class) prompts at once,
        in chunks of about `class_chunk_size` prompts, each chunk's loss back-propagated at once (exact: the loss is
        a sum over images)."""
        tokens = {k: torch.cat([t[k] for _, t in chunks]) for k in chunks[0][1]}
        classes = tokens["input_ids"].shape[0]
        per_call = max(1, (self.args.class_chunk_size or classes * len(labels)) // classes)
        total, correct = 0.0, 0
        for start in range(0, len(labels), per_call):
            images = image_features[start : start + per_call]
            rows = {k: v.repeat(len(images), 1) for k, v in tokens.items()}
            with self.layer.conditioned_on(images), self.accelerator.autocast():
                text = _at_least_fp32(_features(self.model.get_text_features(**rows)))
            text = (text / text.norm(dim=-1, keepdim=True)).view(len(images), classes, -1)
            logits = scale * torch.einsum("bd,bcd->bc", images, text)
            part = labels[start : start + per_call]
            loss = F.cross_entropy(logits, part, reduction="sum") / (
                global_count * self.args.gradient_accumulation_steps
            )
            self.accelerator.backward(loss)
            total += loss.item() * global_count * self.args.gradient_accumulation_steps
            correct += int((logits.argmax(-1) == part).sum())
        return total, correct

    def train(self) -> dict[str, Any]:
        """Run the training; returns a summary (epochs, final loss and accuracy, seconds per step)."""
        acc, args = self.accelerator, self.args
        output = Path(args.output_dir)
        if acc.is_main_process:
            output.mkdir(parents=True, exist_ok=True)
        self.model.to(acc.device).eval()  # CLIP has no dropout; eval also freezes nothing else
        optimizer = (
            torch.optim.SGD(self.params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
            if args.optimizer == "sgd"
            else torch.optim.AdamW(self.params, lr=args.lr, weight_decay=args.weight_decay)
        )
        optimizer = acc.prepare(optimizer)
        start_epoch = 0
        if args.resume:
            start_epoch = load_checkpoint(output / CHECKPOINT_NAME, self.params, optimizer)
        if args.report_to:
            acc.init_trackers("peft-prompt-clip", config=asdict(args))
        chunks = self._text_chunks()
        if args.kg_weight or args.kl_weight:  # the hand-written prompt's class features, computed once
            names, template = self.data.class_names, [args.hand_template]
            hand = PromptClassifier(self.model, self.processor, names, template, use_adapter=False).class_features()
            self.hand_features = _at_least_fp32(hand)
        cached = None if self.augment else self._cached_image_features()
        labels_all = torch.tensor(self.data.labels, device=acc.device)
        batches_per_epoch = math.ceil(len(self.data) / args.batch_size)
        progress = tqdm(
            total=self.epochs * batches_per_epoch,
            initial=start_epoch * batches_per_epoch,
            disable=not acc.is_local_main_process,
            desc="training",
        )
        # a resumed run whose checkpoint already holds every epoch trains nothing and only saves the adapter
        summary: dict[str, Any] = {"epochs": self.epochs, "augment": self.augment, "loss": None, "accuracy": None}
        step_times = []
        for epoch in range(start_epoch, self.epochs):
            for group in optimizer.param_groups:
                group["lr"] = args.learning_rate(epoch, self.epochs)
            total_loss, total_correct, seen, skipped = 0.0, 0, 0, 0
            for n, batch in enumerate(self._batches(epoch)):
                start = time.perf_counter()
                mine = batch[acc.process_index :: acc.num_processes]  # this process's share of the global batch
                if cached is not None:
                    features = cached[mine]
                else:
                    features = self._image_features(mine, augment_seed=f"{args.seed}-{epoch}")
                loss, correct = self._step(chunks, features, labels_all[mine], len(batch)) if mine else (0.0, 0)
                stats = acc.reduce(torch.tensor([loss, correct, len(mine)], device=acc.device), "sum")
                if not math.isfinite(stats[0].item()):  # e.g. fp16 overflow: drop this step's gradient, keep going
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                else:
                    if (n + 1) % args.gradient_accumulation_steps == 0 or n + 1 == batches_per_epoch:
                        self._sync_gradients()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    total_loss += stats[0].item()
                    total_correct += stats[1].item()
                    seen += stats[2].item()
                step_times.append(time.perf_counter() - start)
                progress.update(1)
                if seen:
                    progress.set_postfix(
                        epoch=epoch + 1,
                        loss=f"{total_loss / seen:.4f}",
                        acc=f"{total_correct / seen:.3f}",
                        refresh=False,
                    )
            self._check_finite(epoch, skipped, batches_per_epoch, output / CHECKPOINT_NAME)
            summary.update(loss=total_loss / seen, accuracy=total_correct / seen, skipped_steps=skipped)
            if args.report_to:
                acc.log(
                    {"loss": summary["loss"], "accuracy": summary["accuracy"], "lr": optimizer.param_groups[0]["lr"]},
                    step=epoch + 1,
                )
            if acc.is_main_process:
                save_checkpoint(output / CHECKPOINT_NAME, self.params, optimizer, epoch + 1)
            acc.wait_for_everyone()
        progress.close()
        if args.report_to:
            acc.end_training()
        if acc.is_main_process:
            config = self.model.peft_config[self.model.active_adapter]
            config.class_names = list(self.data.class_names)
            config.num_classes = len(self.data.class_names) if config.class_specific else config.num_classes
            save_adapter(self.model, output)
        summary["seconds_per_step"] = sorted(step_times)[len(step_times) // 2] if step_times else None
        return summary

    def _check_finite(self, epoch: int, skipped: int, steps: int, checkpoint: Path) -> None:
        """Stop before saving anything non-finite; warn about skipped steps."""
        if skipped == steps or not all(bool(p.isfinite().all()) for p in self.params):
            kept = f"the checkpoint of epoch {epoch} is kept at {checkpoint}" if epoch else "no checkpoint was written"
            raise TrainingDivergedError(
                f"Training diverged in epoch {epoch + 1}: {skipped} of {steps} steps had a non-finite loss; {kept}. "
                "Lower the learning rate, or use --mixed-precision bf16 (or no) instead of fp16."
            )
        if skipped:
            warnings.warn(
                f"Skipped {skipped} of {steps} steps of epoch {epoch + 1} whose loss was NaN or infinite.",
                stacklevel=3,
            )

    def _sync_gradients(self) -> None:
        if self.accelerator.num_processes > 1:  # exact: every process summed its share of the global mean
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad = self.accelerator.reduce(p.grad, "sum")


# -- checkpoints ----------------------------------------------------------------------------------------------------


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
