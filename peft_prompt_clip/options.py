"""What a user sets, declared without torch or PEFT: the fields of an adapter ([`AdapterOptions`]) and of a training
recipe ([`RecipeOptions`]) with their defaults and help, and the prompt templates. [`PromptEmbeddingConfig`] and
[`TrainingArguments`] take their fields from here and add their checks and behaviour, so that the command line builds
its parser, prints `--help` and refuses a bad flag without importing torch, transformers or PEFT."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field


class ClassTokenPosition(str, enum.Enum):
    """Where the text (the class name) sits relative to the learned context, as in CoOp."""

    END = "end"  # [SOS] ctx text [EOS]
    MIDDLE = "middle"  # [SOS] ctx[:n//2] text ctx[n//2:] suffix [EOS]
    FRONT = "front"  # [SOS] text ctx suffix [EOS]


#: CLIP's hand-written prompt, the zero-shot baseline of CoOp's tables.
CLIP_TEMPLATE = ("a photo of a {}.",)


def describe_templates(templates: str | Sequence[str]) -> str:
    """Prompt template(s) in words, as the reports name the zero-shot prompt: `'a photo of a {}.'`, or `an ensemble
    of 7 templates`."""
    templates = [templates] if isinstance(templates, str) else list(templates)
    return repr(templates[0]) if len(templates) == 1 else f"an ensemble of {len(templates)} templates"


#: The seven-template ensemble CLIP's authors selected for ImageNet (also used by CoOp's zero-shot baselines).
IMAGENET_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


#: The optimizer steps a run on many images takes at most by default ([`bounded_epochs`])
STEP_BUDGET = 10_000
#: The optimizer steps a run on few images takes at least by default ([`bounded_epochs`]). Measured with the presets as
#: a user runs them (benchmarks/cli_presets.py, 160 images): MaPLe's and IVLP's 2 epochs in batches of 4 are 80 steps,
#: the first at the warm-up rate, and gained 16 and 27 points over zero-shot on faded images; 10 epochs (400 steps)
#: gained 33 and 39. The other presets take 800 to 1,600 steps there.
MIN_STEPS = 400
#: How many times its epochs a run on few images is raised to at most, toward [`MIN_STEPS`] (MaPLe's 2 epochs: 20 at
#: most, which its 80 base-class images of benchmarks/cli_presets.py take), so that a handful of images does not take
#: hundreds of epochs.
MAX_RAISE = 10
#: Held-out evaluations without a gain (ten a run by default) after which a run stops early. Measured with every preset
#: as a user runs it, 1/4/16 shots, 3 seeds (benchmarks/early_stopping.py): 3 ran 91% of the epochs (67% at the least)
#: and kept the full runs' test accuracy within 0.2 points everywhere; 2 saved twice that and cost up to 1.7 points; 1
#: fell more than a std below in 4 of 18 settings.
PATIENCE = 3
EPOCHS_HELP = (
    f"epochs (default: the --method preset's, CoOp's 50 / 100 / 200 by shots; on few images raised toward {MIN_STEPS} "
    f"optimizer steps, {MAX_RAISE}x at most, and for distill cut to about {STEP_BUDGET:,} on many)"
)


@dataclass
class AdapterOptions:
    """The fields of [`PromptEmbeddingConfig`] (documented there) that are this package's own."""

    n_ctx: int | None = field(
        default=None,
        metadata={"help": "Number of learned context vectors (default: the token count of ctx_init, else 16)."},
    )
    ctx_init: str | None = field(
        default=None,
        metadata={
            "help": "Words that initialise the context, e.g. 'a photo of a'; random (normal, std 0.02) if unset."
        },
    )
    init_seed: int = field(default=0, metadata={"help": "Seed of the random initialisation of the context."})
    class_token_position: ClassTokenPosition | str = field(
        default=ClassTokenPosition.END,
        metadata={"help": "Where the text sits relative to the context: 'end', 'middle' or 'front'."},
    )
    class_specific: bool = field(
        default=False,
        metadata={"help": "Learn one context per class (CoOp's CSC); needs num_classes or class_names."},
    )
    num_classes: int | None = field(
        default=None, metadata={"help": "Number of classes for class_specific context (default: len(class_names))."}
    )
    class_names: list[str] | None = field(
        default=None, metadata={"help": "Class names the adapter was learned for; saved with the adapter."}
    )
    suffix_token_ids: list[int] | None = field(
        default=None,
        metadata={
            "help": "Token ids ending a text that stay after the context for 'middle'/'front' (CoOp's period); "
            "filled from the tokenizer's ids of '.' when the adapter is created."
        },
    )
    fixed_token_ids: list[int] | None = field(
        default=None,
        metadata={
            "help": "Token ids kept fixed between the context and the text: ctx_init's tokens past n_ctx, filled "
            "from the tokenizer when the adapter is created."
        },
    )
    conditional: bool = field(
        default=False,
        metadata={"help": "CoCoOp: a meta-net adds an image-conditioned bias to every context vector."},
    )
    meta_net_reduction: int = field(
        default=16, metadata={"help": "CoCoOp's meta-net hidden size is the image feature size divided by this."}
    )
    prompt_depth: int = field(
        default=1,
        metadata={"help": "Text layers with learned tokens: 1 = the input context only (CoOp); J adds J-1 layers."},
    )
    vision_n_ctx: int = field(
        default=0, metadata={"help": "Learned tokens appended to the image tower's sequence (0: none)."}
    )
    vision_prompt_depth: int = field(
        default=1, metadata={"help": "Image layers with their own learned tokens (1: the appended tokens only)."}
    )
    coupled: bool = field(
        default=False,
        metadata={"help": "MaPLe: each layer's vision tokens are a learned linear map of its text tokens."},
    )
    class_prompt_layer: int = field(
        default=0,
        metadata={"help": "TCP: the text layer before which class-aware tokens, made from each class's text, go in."},
    )
    target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Name (or end of name) of the text embeddings module to replace (default: found by its class)."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer for ctx_init and suffix_token_ids (default: the base model's name_or_path)."},
    )
    weights_sha256: str | None = field(
        default=None,
        metadata={"help": "SHA-256 of the weights file saved with this config (written on save, checked on load)."},
    )


@dataclass
class RecipeOptions:
    """The fields of [`TrainingArguments`] (documented there)."""

    output_dir: str
    epochs: int | None = field(default=None, metadata={"help": EPOCHS_HELP})
    batch_size: int = field(default=32, metadata={"help": "images per optimizer step, over all processes"})
    optimizer: str = field(default="sgd", metadata={"help": "'sgd' or 'adamw'"})
    lr: float = field(default=0.002, metadata={"help": "peak learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay"})
    warmup_epochs: int = field(default=1, metadata={"help": "epochs at --warmup-lr first (CoOp)"})
    warmup_lr: float = field(default=1e-5, metadata={"help": "learning rate of the warm-up epochs"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimizer step"})
    mixed_precision: str | None = field(
        default=None, metadata={"help": "'no', 'fp16' or 'bf16' (default: Accelerate's launch setting)"}
    )
    augment: bool = field(
        default=False,
        metadata={"help": "CoOp's random crops and flips (default: off, by measurement: docs/training.md)"},
    )
    augment_views: int | None = field(
        default=None, metadata={"help": "with --augment: encode V crops of each image once, draw one per epoch"}
    )
    num_workers: int | None = field(
        default=None, metadata={"help": "processes decoding images (default: CUDA: half the CPUs, <= 4; CPU: 0)"}
    )
    class_chunk_size: int | None = field(
        default=None, metadata={"help": "encode at most this many prompts at a time (bounds memory)"}
    )
    share_prefix: bool = field(
        default=True,
        metadata={"help": "encode the prefix all class prompts share once per step, where exact (default: on)"},
    )
    kg_weight: float = field(default=0.0, metadata={"help": "KgCoOp regulariser weight (KgCoOp uses 8.0)"})
    kl_weight: float = field(default=0.0, metadata={"help": "ProGrad-style KL to the zero-shot predictions"})
    scl_text_weight: float = field(
        default=0.0, metadata={"help": "PromptSRC's L1 to the hand-written class features (it uses 25)"}
    )
    scl_image_weight: float = field(
        default=0.0, metadata={"help": "PromptSRC's L1 to the frozen image features (it uses 10)"}
    )
    label_weight: float = field(
        default=1.0, metadata={"help": "weight of the cross-entropy on the images' labels (0: labels unused)"}
    )
    distill_weight: float = field(
        default=0.0, metadata={"help": "weight of the KL to a teacher's class probabilities (PromptKD)"}
    )
    distill_temperature: float = field(default=1.0, metadata={"help": "temperature of the distillation term"})
    hand_template: str | list[str] = field(
        default="a photo of a {}.",
        metadata={"help": "hand-written prompt of the regularisers ('imagenet': that ensemble)"},
    )
    gpa_mean: float | None = field(
        default=None, metadata={"help": "PromptSRC's Gaussian aggregation of the prompts over epochs: its mean epoch"}
    )
    gpa_std: float = field(
        default=1.0, metadata={"help": "the standard deviation of --gpa-mean's Gaussian, in epochs"}
    )
    eval_every: int | None = field(
        default=None, metadata={"help": "epochs between evaluations on the held-out images (default: a tenth)"}
    )
    early_stop: bool = field(
        default=True,
        metadata={
            "help": "with held-out images, stop after --patience evaluations without a gain; --epochs is the ceiling "
            "(default: on for train, off for distill, where it is not yet measured)"
        },
    )
    patience: int = field(
        default=PATIENCE, metadata={"help": "held-out evaluations without a gain before an early stop"}
    )
    seed: int = 1
    report_to: str | None = field(
        default=None, metadata={"help": "Accelerate tracker, e.g. tensorboard; 'all' or 'none'"}
    )
    resume: bool = False
