"""Learning a prompt adapter on labelled images with Accelerate: CoOp's recipe by default, cached image features,
class prompts encoded in chunks with an exact gradient, atomic checkpoints every epoch and exact resume."""

from __future__ import annotations

import math
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType
from peft import PeftModel

from .checkpoints import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .data import LabeledImages, default_workers, image_batches, image_inputs
from .encoder import PromptEncoder
from .errors import TrainingDivergedError
from .layer import find_prompt_layer
from .losses import PromptLoss, StepOutputs
from .progress import progress
from .storage import save_adapter, write_json

__all__ = ["CHECKPOINT_NAME", "LOG_NAME", "PromptTrainer", "TrainingArguments", "coop_epochs"]

#: The per-epoch log of a run (loss, accuracy, learning rate, evaluations), saved beside the adapter.
LOG_NAME = "training_log.json"


def _tracker(report_to: str | None) -> str | None:
    """`report_to` as Accelerate takes it: None for `"none"`, and a named tracker only if it is installed."""
    if report_to is None or report_to.lower() == "none":
        return None
    name = report_to.lower()
    known = [t.value for t in LoggerType if t.value != "all"]
    if name != "all" and name not in known:
        raise ValueError(f"report_to must be 'none', 'all' or one of {known}, got {report_to!r}.")
    installed = [str(getattr(t, "value", t)) for t in get_available_trackers()]
    if name != "all" and name not in installed:
        raise ValueError(
            f"report_to={name!r}, but {name} is not installed (installed trackers: {installed or 'none'}); "
            f"pip install {name}, or use --report-to none."
        )
    return name


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
        mixed_precision (`str`, *optional*): `"no"`, `"fp16"` or `"bf16"`; by default Accelerate's own setting (its
            launch configuration, e.g. `accelerate launch --mixed_precision bf16`, else `"no"`).
        augment (`bool`, *optional*, defaults to `False`): CoOp's random resized crop + flip. Off, the image features
            are computed once and cached. Off by default, by measurement: on the accuracy benchmark (benchmarks/
            augmentation.py) no augmentation was the best or within one std of it for CoOp and CSC at 1, 4 and 16
            shots, on clean and shifted images; CoOp's paper used the crops on natural 224-px photos, where they may
            pay: compare on held-out images of your own.
        augment_views (`int`, *optional*): with augmentation, compute the image features of this many augmented views
            of each training image once, and let each epoch draw one of them per image, instead of running the image
            tower on a fresh crop every step: a run then costs what a cached run costs plus one pass over the views.
            Fewer distinct crops than per-step augmentation's one per epoch. Off by default (per-step augmentation);
            not used by adapters with vision prompts, whose image features change as they learn.
        num_workers (`int`, *optional*): worker processes that decode, augment and transform the images ahead of the
            steps (a `DataLoader`); by default, with CUDA, half the CPUs, at most 4, and none on CPU (where the towers
            use every core). The adapter is the same for any count.
        class_chunk_size (`int`, *optional*): encode the class prompts this many at a time (exact gradient), to bound
            memory with many classes; all at once by default.
        share_prefix (`bool`, *optional*, defaults to `True`): encode the prefix that all class prompts share (`[SOS]`
            and a shared context at the end position) once per step, where that is exact (see [`PromptEncoder`]).
        kg_weight (`float`, *optional*, defaults to 0): KgCoOp's regulariser (Yao et al., CVPR 2023): adds
            `kg_weight * mean(1 - cos(learned class feature, hand-written class feature))`; KgCoOp uses 8.0.
        kl_weight (`float`, *optional*, defaults to 0): a ProGrad-style regulariser (Zhu et al., ICCV 2023): adds
            `kl_weight * KL(zero-shot probabilities || learned probabilities)` per image (zero-shot: the frozen model
            with the hand-written prompt). PromptSRC's logit term is this with weight `1 / classes`.
        scl_text_weight (`float`, *optional*, defaults to 0): PromptSRC's text self-consistency term (Khattak et al.,
            ICCV 2023): adds `scl_text_weight * mean |learned class features - hand-written class features|`; 25.0 in
            its paper.
        scl_image_weight (`float`, *optional*, defaults to 0): PromptSRC's image term, for adapters with vision
            prompts: adds `scl_image_weight * mean |prompted image features - frozen image features|` per image; 10.0
            in its paper.
        hand_template (`str` or `list[str]`, *optional*, defaults to `"a photo of a {}."`): the hand-written prompt of
            the regularisers; several templates give the normalised mean of their class features (PromptSRC's textual
            diversity uses `IMAGENET_TEMPLATES`).
        gpa_mean (`float`, *optional*): PromptSRC's Gaussian weighted prompt aggregation: the adapter saved at the end
            is the mean of its parameters after each epoch `e` (from 1), weighted by a Gaussian of `e` with this mean
            and `gpa_std`; 15 for its 20 epochs. Off by default (the last epoch's parameters).
        gpa_std (`float`, *optional*, defaults to 1.0): the Gaussian's standard deviation, in epochs.
        eval_every (`int`, *optional*): with `eval_data`, evaluate the adapter on it every this many epochs (and after
            the last); by default ten times over the run. The adapter saved in `output_dir` is then the evaluated one
            with the highest accuracy (ties: the lower loss), the initial one (epoch 0) included, so that a run whose
            learning does not pay keeps its start ("a photo of a" is the zero-shot prompt); the end of training's is
            saved in `output_dir/last`.
        seed (`int`, *optional*, defaults to 1): seeds batch order and augmentation.
        report_to (`str`, *optional*): an Accelerate tracker, e.g. `"tensorboard"`; `"all"` for every installed one,
            `"none"` (or unset) for none. A named tracker that is not installed is an error before training.
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
    mixed_precision: str | None = None
    augment: bool = False
    augment_views: int | None = None
    num_workers: int | None = None
    class_chunk_size: int | None = None
    share_prefix: bool = True
    kg_weight: float = 0.0
    kl_weight: float = 0.0
    scl_text_weight: float = 0.0
    scl_image_weight: float = 0.0
    hand_template: str | list[str] = "a photo of a {}."
    gpa_mean: float | None = None
    gpa_std: float = 1.0
    eval_every: int | None = None
    seed: int = 1
    report_to: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        weights = ("kg_weight", "kl_weight", "scl_text_weight", "scl_image_weight", "gpa_std")
        for name in ("lr", "momentum", "weight_decay", "warmup_lr", *weights):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer between 0 and 2**63 - 1, got {self.seed!r}.")
        self.report_to = _tracker(self.report_to)
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}.")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}.")
        for name in ("batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}.")
        if self.kg_weight < 0 or self.kl_weight < 0:
            raise ValueError(f"kg_weight and kl_weight must be >= 0, got {self.kg_weight} and {self.kl_weight}.")
        if self.gpa_std <= 0:
            raise ValueError(f"gpa_std must be above 0, got {self.gpa_std}.")
        if self.gpa_mean is not None and (
            not isinstance(self.gpa_mean, int | float) or not math.isfinite(self.gpa_mean)
        ):
            raise ValueError(f"gpa_mean must be a number (an epoch, from 1), got {self.gpa_mean!r}.")
        templates = [self.hand_template] if isinstance(self.hand_template, str) else self.hand_template
        if not templates or any(not isinstance(t, str) or "{}" not in t for t in templates):
            raise ValueError(f"hand_template needs a '{{}}' for the class name, got {self.hand_template!r}.")
        if self.num_workers is None:
            self.num_workers = default_workers()
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {self.num_workers!r}.")
        if self.augment_views is not None and (isinstance(self.augment_views, bool) or self.augment_views < 1):
            raise ValueError(f"augment_views must be at least 1, got {self.augment_views!r}.")
        if self.eval_every is not None and (isinstance(self.eval_every, bool) or self.eval_every < 1):
            raise ValueError(f"eval_every must be at least 1 (epochs), got {self.eval_every!r}.")
        if self.class_chunk_size is not None and self.class_chunk_size < 1:
            raise ValueError(f"class_chunk_size must be at least 1, got {self.class_chunk_size}.")

    def gpa_weights(self, epochs: int) -> list[float] | None:
        """PromptSRC's aggregation weights of the parameters after each of `epochs` epochs (summing to 1), or None
        without `gpa_mean`."""
        if self.gpa_mean is None:
            return None
        weights = [math.exp(-((e + 1 - self.gpa_mean) ** 2) / (2 * self.gpa_std**2)) for e in range(epochs)]
        if sum(weights) == 0:
            raise ValueError(
                f"gpa_mean={self.gpa_mean} with gpa_std={self.gpa_std} gives no weight to any of the {epochs} epochs; "
                f"choose a mean between 1 and {epochs}."
            )
        return [w / sum(weights) for w in weights]

    def learning_rate(self, epoch: int, epochs: int) -> float:
        """CoOp's schedule: `warmup_lr` for the warm-up epochs, then cosine from `lr` to 0 over all epochs."""
        if epoch < self.warmup_epochs:
            return self.warmup_lr
        return 0.5 * self.lr * (1 + math.cos(math.pi * epoch / epochs))


@dataclass
class _EpochStats:
    loss: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    skipped: int = 0
    step_seconds: list[float] = field(default_factory=list)


@torch.no_grad()
def _copy(sources: list[torch.Tensor], into: list[torch.Tensor]) -> None:
    """Copy each tensor of `sources` into the tensor of `into` at the same place (parameters, averages, candidates)."""
    for target, source in zip(into, sources, strict=True):
        target.copy_(source)


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
    """

    def __init__(
        self,
        model: PeftModel,
        processor: Any,
        train_data: LabeledImages,
        args: TrainingArguments,
        eval_data: LabeledImages | None = None,
    ) -> None:
        if not isinstance(model, PeftModel) or find_prompt_layer(model) is None:
            raise TypeError("model must be a PeftModel with a prompt adapter (see get_prompt_model).")
        if not len(train_data):
            raise ValueError("train_data is empty.")
        if len(train_data.class_names) < 2:
            raise ValueError(
                f"Training needs at least two classes to tell apart, got {train_data.class_names}; a prompt learned "
                "on one class has nothing to learn (its loss is 0)."
            )
        if eval_data is not None and (
            list(eval_data.class_names) != list(train_data.class_names) or not len(eval_data)
        ):
            raise ValueError(
                "eval_data must hold images of the training data's classes, in the same order "
                f"({train_data.class_names}); it has {len(eval_data)} images of {eval_data.class_names}."
            )
        self.model = model
        self.processor = processor
        self.data = train_data
        self.eval_data = eval_data
        self.args = args
        self.adapter_name: str = model.active_adapter
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("The adapter has no trainable context: load it with is_trainable=True to go on training.")
        self._claim_classes(model.peft_config[self.adapter_name])
        shots = max(train_data.counts())
        self.epochs = args.epochs or coop_epochs(shots)
        self.eval_every = args.eval_every or math.ceil(self.epochs / 10)
        self.augment = args.augment
        self.views = args.augment_views if self.augment else None
        self.accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            log_with=args.report_to,
            project_dir=args.output_dir if args.report_to else None,
        )
        self.model.to(self.accelerator.device).eval()  # CLIP has no dropout; eval also freezes nothing else
        self.encoder = PromptEncoder(model, processor, share_prefix=args.share_prefix)
        self.conditional = self.encoder.is_conditional(self.adapter_name)
        self.prompts_images = self.encoder.prompts_images(self.adapter_name)
        if self.conditional and (args.kg_weight or args.kl_weight or args.scl_text_weight):
            raise ValueError(
                "kg_weight, kl_weight and scl_text_weight regularise a context shared by all images, not CoCoOp's."
            )
        if args.scl_image_weight and not self.prompts_images:
            raise ValueError(
                "scl_image_weight compares prompted with frozen image features, but this adapter has no vision "
                "prompts (its image features are the frozen ones): set vision_n_ctx or coupled, or drop "
                "scl_image_weight."
            )
        self.class_tokens = self.encoder.tokenize([f"{name}." for name in train_data.class_names], self.adapter_name)
        regularised = args.kg_weight or args.kl_weight or args.scl_text_weight
        self.loss = PromptLoss(
            args.kg_weight,
            args.kl_weight,
            self.hand_features() if regularised else None,
            args.scl_text_weight,
            args.scl_image_weight,
        )
        self.gpa_weights = args.gpa_weights(self.epochs)
        self.averages = [torch.zeros_like(p) for p in self.params] if self.gpa_weights else None
        self.best = [p.detach().clone() for p in self.params] if eval_data is not None else None
        self._eval_frozen: torch.Tensor | None = None
        self.labels = torch.tensor(train_data.labels, device=self.accelerator.device)
        # what a checkpoint must share with this run to be resumed by it: the adapter, the base model, the recipe and
        # the loss (more epochs may follow) and the data's fingerprint
        config = model.peft_config[self.adapter_name]
        adapter_fields = ("n_ctx", "ctx_init", "init_seed", "class_token_position", "class_specific", "conditional")
        adapter_fields += ("meta_net_reduction", "suffix_token_ids", "base_model_name_or_path", "prompt_depth")
        adapter_fields += ("vision_n_ctx", "vision_prompt_depth", "coupled")
        recipe = ("optimizer", "lr", "momentum", "weight_decay", "warmup_epochs", "warmup_lr", "batch_size", "seed")
        recipe += ("kg_weight", "kl_weight", "scl_text_weight", "scl_image_weight", "hand_template", "gpa_mean")
        recipe += ("gpa_std",)
        self.run = {
            **{k: getattr(config, k) for k in adapter_fields},
            **{k: getattr(args, k) for k in recipe},
            "augment": self.augment,
            "augment_views": self.views,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "class_names": list(train_data.class_names),
            "images": len(train_data),
            "eval_images": len(eval_data) if eval_data is not None else 0,
            "eval_every": args.eval_every,  # None: a tenth of the epochs, so more epochs may follow
        }
        if self.gpa_weights:  # the Gaussian's weights are normalised over the epochs: a resumed run needs the same
            self.run["epochs"] = self.epochs
        self.optimizer = self.accelerator.prepare(self._optimizer())

    def _claim_classes(self, config: Any) -> None:
        """The adapter is learned for the data's classes, and says so in its config; a class-specific context that was
        learned for other classes cannot be silently renamed."""
        names = list(self.data.class_names)
        if config.class_specific and config.class_names is not None and config.class_names != names:
            raise ValueError(
                f"This adapter has one context per class for {config.class_names}, but the data's classes are "
                f"{names}. Train it on those classes (in that order), or start a new class-specific adapter."
            )
        if config.class_specific and config.num_classes != len(names):
            raise ValueError(
                f"This adapter has class-specific context for {config.num_classes} classes; the data has {len(names)}."
            )
        config.class_names = names

    def hand_features(self) -> torch.Tensor:
        """The hand-written prompts' class features (`hand_template` with the base model, the zero-shot prompt; the
        normalised mean over several templates), for the regularisers and the zero-shot reference."""
        args = self.args
        templates = [args.hand_template] if isinstance(args.hand_template, str) else args.hand_template
        total = 0
        with torch.no_grad():
            for template in templates:
                tokens = self.encoder.tokenize(
                    [template.format(name) for name in self.data.class_names], enabled=False
                )
                total = total + self.encoder.class_features(tokens, enabled=False, chunk_size=args.class_chunk_size)
        return torch.nn.functional.normalize(total, dim=-1)

    def _optimizer(self) -> torch.optim.Optimizer:
        args = self.args
        if args.optimizer == "sgd":
            return torch.optim.SGD(self.params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        return torch.optim.AdamW(self.params, lr=args.lr, weight_decay=args.weight_decay)

    # -- one step -------------------------------------------------------------------------------------------------

    def image_features(
        self, indices: list[int], augment_seed: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised features of the training images `indices`, augmented with `augment_seed` when given: the frozen
        image tower's; for an adapter with vision prompts, the prompted tower's (with autograd) and the frozen ones
        when the loss compares with them (else None)."""
        return self._features(image_inputs(self.processor, self.data, indices, augment_seed=augment_seed))

    def _features(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[`image_features`] of the image tower's `inputs`."""
        with self.accelerator.autocast():
            frozen = None
            if not self.prompts_images or self.loss.needs_frozen_images:
                with torch.no_grad():
                    frozen = self.encoder.image_features(inputs, enabled=False)
            if not self.prompts_images:
                return frozen, None
            return self.encoder.image_features(inputs, self.adapter_name), frozen

    def cached_image_features(self, views: int | None = None) -> torch.Tensor:
        """Features of every training image from the frozen image tower, computed once in batches of 64: unaugmented
        `(images, dim)`, or of `views` augmented views of each `(views, images, dim)` (view `v` drawn with the seed
        `"{seed}-view{v}"`)."""
        order = list(range(len(self.data)))
        seeds = [None] if views is None else [f"{self.args.seed}-view{v}" for v in range(views)]
        chunks = [order[i : i + 64] for i in range(0, len(order), 64)]
        parts = []
        with torch.no_grad(), self.accelerator.autocast():
            for seed in seeds:
                for inputs in self._image_batches(self.data, chunks, seed):
                    parts.append(self.encoder.image_features(inputs, enabled=False))
        features = torch.cat(parts)
        return features if views is None else features.view(views, len(order), -1)

    def _image_batches(self, data: LabeledImages, batches: list[list[int]], seed: str | None = None):
        """The image tower's inputs of `data`'s `batches` of indices (see [`image_batches`])."""
        return image_batches(
            self.processor,
            data,
            batches,
            seed,
            self.args.num_workers,
            pin_memory=self.accelerator.device.type == "cuda",
        )

    def view_of(self, epoch: int, index: int) -> int:
        """Which cached augmented view of training image `index` epoch `epoch` uses: drawn from a stream of its own
        per (seed, epoch, image), so that any process or resumed run draws the same."""
        return random.Random(f"{self.args.seed}-{epoch}-view-{index}").randrange(self.views)

    def step(
        self,
        image_features: torch.Tensor,
        labels: torch.Tensor,
        global_count: int,
        frozen_image_features: torch.Tensor | None = None,
    ) -> tuple[float, int]:
        """Forward and backward of this process's share of a batch of `global_count` images (over all processes);
        returns its summed loss and its correct count. The gradient is accumulated, not applied. With vision prompts,
        `image_features` come from the prompted tower (with autograd) and `frozen_image_features` from the frozen
        one."""
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
        outputs = StepOutputs(logits, labels, text, image_features, scale, frozen_image_features)
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
        (`hand_template` on the base model) with `zero_shot=True`."""
        if self.eval_data is None:
            raise ValueError("evaluate() needs eval_data: pass it to PromptTrainer.")
        labels = torch.tensor(self.eval_data.labels, device=self.accelerator.device)
        loss, correct = 0.0, 0
        with self.accelerator.autocast():
            if self._eval_frozen is None:  # the frozen image tower's features, computed once
                self._eval_frozen = torch.cat(
                    [self.encoder.image_features(inputs, enabled=False) for inputs in self._eval_batches()]
                )
            if zero_shot or not self.prompts_images:
                batches = self._eval_frozen.split(64)
            else:  # the prompted image tower changes as the adapter learns
                batches = (self.encoder.image_features(inputs, self.adapter_name) for inputs in self._eval_batches())
            shared = self.hand_features() if zero_shot else None
            if shared is None and not self.conditional:
                shared = self.encoder.class_features(
                    self.class_tokens,
                    self.adapter_name,
                    chunk_size=self.args.class_chunk_size,
                    class_names=self.data.class_names,
                )
            start = 0
            for features in batches:
                text = shared
                if text is None:  # CoCoOp: each image's own class features
                    text = self.encoder.class_features(
                        self.class_tokens,
                        self.adapter_name,
                        image_features=features,
                        chunk_size=self.args.class_chunk_size,
                    )
                logits = self.encoder.logits(features, text).float()
                part = labels[start : start + len(features)]
                loss += torch.nn.functional.cross_entropy(logits, part, reduction="sum").item()
                correct += int((logits.argmax(-1) == part).sum())
                start += len(features)
        return {"accuracy": correct / len(labels), "loss": loss / len(labels)}

    def _eval_batches(self):
        chunks = [list(range(i, min(i + 64, len(self.eval_data)))) for i in range(0, len(self.eval_data), 64)]
        return self._image_batches(self.eval_data, chunks)

    def _consider(self, log: dict[str, Any], epoch: int | str) -> dict[str, float]:
        """Evaluate the adapter as it is now as the candidate `epoch`, and keep it in `self.best` when it beats the
        best so far (higher accuracy; at equal accuracy, lower loss)."""
        scores = self.evaluate()
        best = log.get("best")
        if best is None or (scores["accuracy"], -scores["loss"]) > (best["accuracy"], -best["loss"]):
            log["best"] = {"epoch": epoch, **scores}
            _copy(self.params, into=self.best)
        return scores

    # -- epochs ---------------------------------------------------------------------------------------------------

    def _batches(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.data)))
        random.Random(f"{self.args.seed}-{epoch}").shuffle(order)
        size = self.args.batch_size
        return [order[i : i + size] for i in range(0, len(order), size)]

    def _train_epoch(self, epoch: int, cached: torch.Tensor | None, bar: Any) -> _EpochStats:
        acc, args, stats = self.accelerator, self.args, _EpochStats()
        for group in self.optimizer.param_groups:
            group["lr"] = args.learning_rate(epoch, self.epochs)
        batches = self._batches(epoch)
        shares = [batch[acc.process_index :: acc.num_processes] for batch in batches]  # this process's share of each
        if cached is None:  # the images of the epoch's steps, decoded and augmented ahead by the workers
            seed = f"{args.seed}-{epoch}" if self.augment else None
            inputs = self._image_batches(self.data, [share for share in shares if share], seed)
        for n, (batch, mine) in enumerate(zip(batches, shares, strict=True)):
            start = time.perf_counter()
            if not mine:
                loss, correct = 0.0, 0
            else:
                if cached is not None and cached.dim() == 3:  # cached augmented views: one per image and epoch
                    views = [self.view_of(epoch, i) for i in mine]
                    features, frozen = cached[views, mine], None
                elif cached is not None:
                    features, frozen = cached[mine], None
                else:
                    features, frozen = self._features(next(inputs))
                loss, correct = self.step(features, self.labels[mine], len(batch), frozen)
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
            if stats.seen:
                bar.set_postfix(
                    epoch=epoch + 1,
                    loss=f"{stats.loss / stats.seen:.4f}",
                    acc=f"{stats.correct / stats.seen:.3f}",
                    refresh=False,
                )
        return stats

    def train(self) -> dict[str, Any]:
        """Run the training; returns a summary: epochs, the last epoch's loss and accuracy, the median seconds per
        step, and with `eval_data` the evaluations (`"eval"`: the zero-shot prompt's, the best candidate's and the end
        of training's; see [`TrainingArguments`]). The per-epoch log is saved as `training_log.json` beside the
        adapter."""
        acc, args = self.accelerator, self.args
        output = Path(args.output_dir)
        if acc.is_main_process:
            output.mkdir(parents=True, exist_ok=True)
        checkpoint = output / CHECKPOINT_NAME
        buffers = {"average": self.averages, "best": self.best}
        start_epoch, log = (
            load_checkpoint(checkpoint, self.params, self.optimizer, self.run, buffers) if args.resume else (0, {})
        )
        log.setdefault("history", [])
        if self.eval_data is not None and start_epoch == 0:
            log["zero_shot"] = self.evaluate(zero_shot=True)
            log["initial"] = self._consider(log, 0)
        if args.report_to:
            # trackers take scalars: a template ensemble is logged as one string
            hparams = {k: " | ".join(v) if isinstance(v, list) else v for k, v in asdict(args).items()}
            acc.init_trackers("peft-prompt-clip", config=hparams)
        if self.prompts_images or (self.augment and self.views is None):
            cached = None  # the image tower runs every step
        else:
            cached = self.cached_image_features(self.views)
        batches_per_epoch = math.ceil(len(self.data) / args.batch_size)
        bar = progress(
            total=self.epochs * batches_per_epoch,
            initial=start_epoch * batches_per_epoch,
            desc="training",
            **({} if acc.is_local_main_process else {"disable": True}),
        )
        step_seconds: list[float] = []
        for epoch in range(start_epoch, self.epochs):
            stats = self._train_epoch(epoch, cached, bar)
            step_seconds += stats.step_seconds
            self._check_finite(epoch, stats.skipped, batches_per_epoch, checkpoint)
            if self.averages is not None:
                with torch.no_grad():
                    for average, p in zip(self.averages, self.params, strict=True):
                        average.add_(p, alpha=self.gpa_weights[epoch])
            entry = {
                "epoch": epoch + 1,
                "loss": stats.loss / stats.seen,
                "accuracy": stats.correct / stats.seen,
                "lr": self.optimizer.param_groups[0]["lr"],
                "skipped_steps": stats.skipped,
            }
            if self.eval_data is not None and ((epoch + 1) % self.eval_every == 0 or epoch + 1 == self.epochs):
                scores = self._consider(log, epoch + 1)
                entry.update(eval_accuracy=scores["accuracy"], eval_loss=scores["loss"])
            log["history"].append(entry)
            if args.report_to:
                acc.log({k: v for k, v in entry.items() if k != "epoch"}, step=epoch + 1)
            if acc.is_main_process:
                save_checkpoint(checkpoint, self.params, self.optimizer, epoch + 1, self.run, buffers, log)
            acc.wait_for_everyone()
        bar.close()
        if args.report_to:
            acc.end_training()
        if self.averages is not None:  # PromptSRC's GPA: the adapter is the weighted mean over epochs
            _copy(self.averages, into=self.params)
        summary: dict[str, Any] = {"epochs": self.epochs, "augment": self.augment, "loss": None, "accuracy": None}
        if start_epoch < self.epochs:  # a resumed run whose checkpoint holds every epoch only saves the adapter
            last = log["history"][-1]
            summary.update(loss=last["loss"], accuracy=last["accuracy"], skipped_steps=last["skipped_steps"])
        summary["seconds_per_step"] = sorted(step_seconds)[len(step_seconds) // 2] if step_seconds else None
        if self.eval_data is not None:
            if self.averages is not None:  # the end of training's adapter, the GPA mean, is a candidate too
                log["last"] = {"epoch": "average", **self._consider(log, "average")}
            else:
                last = log["history"][-1]
                log["last"] = {"epoch": last["epoch"], "accuracy": last["eval_accuracy"], "loss": last["eval_loss"]}
            if acc.is_main_process:
                save_adapter(self.model, output / "last")
            _copy(self.best, into=self.params)
            summary["eval"] = {
                "images": len(self.eval_data),
                **{k: log[k] for k in ("zero_shot", "initial", "best", "last")},
            }
        if acc.is_main_process:
            save_adapter(self.model, output)
            if self.eval_data is None:  # the end of training's adapter is the one saved: no other
                shutil.rmtree(output / "last", ignore_errors=True)
            write_json(output / LOG_NAME, {"epochs": self.epochs, **log})
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
