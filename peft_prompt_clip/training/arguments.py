"""How a prompt is learned: [`TrainingArguments`], CoOp's recipe by default."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType

from ..data import default_workers
from ..options import IMAGENET_TEMPLATES, MAX_RAISE, MIN_STEPS, STEP_BUDGET, RecipeOptions
from .losses import LOSS_TERMS, PromptLoss


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


def bounded_epochs(
    epochs: int, images: int, batch_size: int, steps: int | None = STEP_BUDGET, accumulation: int = 1
) -> int:
    """`epochs`, or more on few images and fewer on many. Raised toward [`MIN_STEPS`] optimizer steps over `images` in
    batches of `batch_size`, `accumulation` batches a step (to [`MAX_RAISE`] times `epochs` at most: MaPLe's 2 epochs
    of 160 images, 80 steps, learned far less than 10); and unless `steps` is None, cut to about `steps` steps (at
    least one epoch): a few-shot recipe's epochs on an unlabeled set of 10,000 images would take 56,000 steps, and
    measured on faded Fashion-MNIST (benchmarks/distill.py), 10,000 keep most of the gain."""
    if steps is not None:
        epochs = max(1, min(epochs, round(steps * batch_size * accumulation / images)))
    per_epoch = steps_per_epoch(images, batch_size, accumulation)
    return max(epochs, min(MAX_RAISE * epochs, math.ceil(MIN_STEPS / per_epoch)))


def steps_per_epoch(images: int, batch_size: int, accumulation: int = 1) -> int:
    """Optimizer steps an epoch over `images` takes, in batches of `batch_size`, `accumulation` batches a step."""
    return math.ceil(math.ceil(images / batch_size) / accumulation)


@dataclass
class TrainingArguments(RecipeOptions):
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
        label_weight (`float`, *optional*, defaults to 1.0): the weight of CoOp's cross-entropy on the images'
            labels; 0 when the labels are a teacher's guesses and its soft labels are learned instead.
        distill_weight (`float`, *optional*, defaults to 0): PromptKD's term (Li et al., CVPR 2024): adds
            `distill_weight * T^2 * KL(teacher || student)` per image, of the class probabilities at temperature
            `distill_temperature`; needs the teacher's logits (`PromptTrainer(teacher_logits=...)`).
        distill_temperature (`float`, *optional*, defaults to 1.0): `T` above (PromptKD's 1).
        hand_template (`str` or `list[str]`, *optional*, defaults to `"a photo of a {}."`): the hand-written prompt of
            the regularisers; several templates give the normalised mean of their class features (PromptSRC's textual
            diversity uses `IMAGENET_TEMPLATES`, which `"imagenet"` names).
        gpa_mean (`float`, *optional*): PromptSRC's Gaussian weighted prompt aggregation: the adapter saved at the end
            is the mean of its parameters after each epoch `e` (from 1), weighted by a Gaussian of `e` with this mean
            and `gpa_std`; 15 for its 20 epochs. Off by default (the last epoch's parameters).
        gpa_std (`float`, *optional*, defaults to 1.0): the Gaussian's standard deviation, in epochs.
        eval_every (`int`, *optional*): with `eval_data`, evaluate the adapter on it every this many epochs (and after
            the last); by default ten times over the run. The adapter saved in `output_dir` is then the evaluated one
            with the highest accuracy (ties: the lower loss), the initial one (epoch 0) included, so that a run whose
            learning does not pay keeps its start ("a photo of a" is the zero-shot prompt); the end of training's is
            saved in `output_dir/last`.
        early_stop (`bool`, *optional*, defaults to `True`): with `eval_data`, stop once `patience` evaluations in a
            row bring no gain over the best so far (higher accuracy, or at equal accuracy a lower loss); `epochs` is
            then the ceiling (the learning rate's schedule spans it either way, so a stopped run's adapter is the one
            the full run had at that epoch). Off where the adapter is PromptSRC's average over every epoch
            (`gpa_mean`).
        patience (`int`, *optional*, defaults to `PATIENCE`): evaluations without a gain before the run stops.
        seed (`int`, *optional*, defaults to 1): seeds batch order and augmentation.
        report_to (`str`, *optional*): an Accelerate tracker, e.g. `"tensorboard"`; `"all"` for every installed one,
            `"none"` (or unset) for none. A named tracker that is not installed is an error before training.
        resume (`bool`, *optional*, defaults to `False`): continue from the checkpoint in `output_dir`.
    """

    def __post_init__(self) -> None:
        for name in ("lr", "momentum", "weight_decay", "warmup_lr", "label_weight", *LOSS_TERMS, "gpa_std"):
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
        for name in ("gpa_std", "distill_temperature"):
            if not isinstance(getattr(self, name), int | float) or not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number above 0, got {getattr(self, name)!r}.")
        if self.gpa_mean is not None and (
            not isinstance(self.gpa_mean, int | float) or not math.isfinite(self.gpa_mean)
        ):
            raise ValueError(f"gpa_mean must be a number (an epoch, from 1), got {self.gpa_mean!r}.")
        if self.hand_template == "imagenet":
            self.hand_template = list(IMAGENET_TEMPLATES)
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
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"patience must be at least 1 (evaluations), got {self.patience!r}.")
        if self.class_chunk_size is not None and self.class_chunk_size < 1:
            raise ValueError(f"class_chunk_size must be at least 1, got {self.class_chunk_size}.")

    def stopping_patience(self, held_out: bool) -> int | None:
        """The patience of early stopping for a run with or without `held_out` images, or None where it is off: turned
        off, without held-out images, or under PromptSRC's average over every epoch (`gpa_mean`)."""
        return self.patience if self.early_stop and held_out and self.gpa_mean is None else None

    def loss(self) -> PromptLoss:
        """The recipe's loss: the cross-entropy's weight, the distillation temperature and each term's weight."""
        weights = {name: getattr(self, name) for name in LOSS_TERMS}
        return PromptLoss(label_weight=self.label_weight, temperature=self.distill_temperature, **weights)

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

    def tracker_config(self) -> dict[str, Any]:
        """The arguments as trackers take them (scalars: a template ensemble as one string)."""
        return {k: " | ".join(v) if isinstance(v, list) else v for k, v in asdict(self).items()}

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """The recipe's optimizer of `params`: SGD with `momentum`, or AdamW."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def learning_rate(self, epoch: int, epochs: int) -> float:
        """CoOp's schedule: `warmup_lr` for the warm-up epochs, then cosine from `lr` to 0 over all epochs."""
        if epoch < self.warmup_epochs:
            return self.warmup_lr
        return 0.5 * self.lr * (1 + math.cos(math.pi * epoch / epochs))
