"""The loss of a prompt-learning step: CoOp's cross-entropy and the terms its successors add (regularisers, a
teacher's soft labels), as a registry ([`LOSS_TERMS`]): a new method's term is a function of the step's tensors and an
entry there, with what it needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class StepOutputs:
    """What one step computed, for the loss terms.

    Args:
        logits (`torch.Tensor`): scaled similarities `(images, classes)`.
        labels (`torch.Tensor`): the images' classes `(images,)`.
        class_features (`torch.Tensor`): normalised learned class features `(classes, dim)` (or `(images, classes,
            dim)` for CoCoOp).
        image_features (`torch.Tensor`): normalised image features `(images, dim)`.
        logit_scale (`torch.Tensor`): the model's scale, `exp(logit_scale)`.
        frozen_image_features (`torch.Tensor`, *optional*): the base model's image features, when `image_features`
            come from a prompted image tower (vision prompts); otherwise `image_features` are the base model's.
        teacher_logits (`torch.Tensor`, *optional*): a teacher's logits `(images, classes)` of the step's images, for
            distillation.
        labeled (`torch.Tensor`, *optional*): which images' labels are true (booleans `(images,)`), the ones the
            cross-entropy uses; by default all.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    class_features: torch.Tensor
    image_features: torch.Tensor
    logit_scale: torch.Tensor
    frozen_image_features: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    labeled: torch.Tensor | None = None

    @property
    def zero_shot_image_features(self) -> torch.Tensor:
        """The base model's image features of the step's images."""
        return self.image_features if self.frozen_image_features is None else self.frozen_image_features


def kgcoop_loss(class_features: torch.Tensor, hand_features: torch.Tensor) -> torch.Tensor:
    """KgCoOp (Yao et al., CVPR 2023): mean over classes of `1 - cos(learned, hand-written class feature)`."""
    return (1 - (class_features * hand_features).sum(-1)).mean()


def kl_to_zero_shot(logits: torch.Tensor, zero_shot_logits: torch.Tensor) -> torch.Tensor:
    """ProGrad-style (Zhu et al., ICCV 2023): `KL(zero-shot probabilities || learned probabilities)`, summed over
    images."""
    return F.kl_div(logits.log_softmax(-1), zero_shot_logits.log_softmax(-1), log_target=True, reduction="sum")


def distillation_kl(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s distillation term, as PromptKD (Li et al., CVPR 2024) learns a student's prompts from a
    teacher: `T^2 KL(teacher || student)` of the class probabilities at temperature `T`, summed over images. (PromptKD
    averages over classes as well: its weight is this one's times the number of classes.)"""
    student = (logits / temperature).log_softmax(-1)
    teacher = (teacher_logits.to(logits.dtype) / temperature).log_softmax(-1)
    return temperature**2 * F.kl_div(student, teacher, log_target=True, reduction="sum")


def l1_to_frozen(features: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """PromptSRC (Khattak et al., ICCV 2023): mean absolute difference between prompted and frozen normalised features,
    per row `(rows,)`: its self-consistency terms for text (class features) and images."""
    return (features - frozen).abs().mean(-1)


@dataclass(frozen=True)
class LossTerm:
    """One regulariser a method adds to CoOp's cross-entropy.

    Args:
        weight (`str`): the [`TrainingArguments`] field of its weight (0: off).
        paper (`str`): where it comes from.
        compute (`Callable`): `(step, loss) -> tensor` of the step's [`StepOutputs`] and the [`PromptLoss`] (its
            `hand_features` and `temperature`): summed over the step's images when `per_image`, else one value for the
            whole batch.
        per_image (`bool`): a sum over images (normalised by the global batch), not a term of the batch's class
            features (the same on every process).
        needs_hand (`bool`): it compares with the hand-written prompts' class features.
        needs_frozen_images (`bool`): it compares with the frozen image tower's features.
        needs_vision_prompts (`bool`): it only means something for adapters with vision prompts.
        needs_teacher (`bool`): it compares with a teacher's logits of the images.
        conditional (`bool`): it applies to CoCoOp's per-image context.
    """

    weight: str
    paper: str
    compute: Callable[[StepOutputs, PromptLoss], torch.Tensor]
    per_image: bool = False
    needs_hand: bool = False
    needs_frozen_images: bool = False
    needs_vision_prompts: bool = False
    needs_teacher: bool = False
    conditional: bool = False


def _zero_shot_kl(step: StepOutputs, loss: PromptLoss) -> torch.Tensor:
    return kl_to_zero_shot(step.logits, step.logit_scale * step.zero_shot_image_features @ loss.hand_features.T)


#: The loss terms, by their weight's name. A new method's term is one entry here and a weight field in
#: [`TrainingArguments`].
LOSS_TERMS: dict[str, LossTerm] = {
    term.weight: term
    for term in (
        LossTerm(
            "kg_weight", "KgCoOp", lambda s, loss: kgcoop_loss(s.class_features, loss.hand_features), needs_hand=True
        ),
        LossTerm(
            "scl_text_weight",
            "PromptSRC",
            lambda s, loss: l1_to_frozen(s.class_features, loss.hand_features).mean(),
            needs_hand=True,
        ),
        LossTerm("kl_weight", "ProGrad", _zero_shot_kl, per_image=True, needs_hand=True, needs_frozen_images=True),
        LossTerm(
            "scl_image_weight",
            "PromptSRC",
            lambda s, loss: l1_to_frozen(s.image_features, s.zero_shot_image_features).sum(),
            per_image=True,
            needs_frozen_images=True,
            needs_vision_prompts=True,
            conditional=True,
        ),
        LossTerm(
            "distill_weight",
            "PromptKD",
            lambda s, loss: distillation_kl(s.logits, s.teacher_logits, loss.temperature),
            per_image=True,
            needs_teacher=True,
            conditional=True,
        ),
    )
}


class PromptLoss:
    """
    CoOp's cross-entropy on the images' labels (weighted by `label_weight`) plus the weighted terms of [`LOSS_TERMS`]
    (regularisers towards the frozen model and its hand-written prompts; a teacher's soft labels).

    A call returns two parts, so that the trainer can normalise each exactly however a batch is split among processes
    and accumulation steps: terms summed over this process's images, and terms of the whole batch's class features
    (the same on every process).

    Args:
        hand_features (`torch.Tensor`, *optional*): normalised class features of the hand-written prompt(s), needed by
            the terms that compare with them.
        label_weight (`float`, *optional*, defaults to 1.0): the cross-entropy's weight (0: the labels are not used,
            as when distilling a teacher's soft labels).
        temperature (`float`, *optional*, defaults to 1.0): the distillation term's temperature.
        **weights (`float`): each term's weight, by its name in [`LOSS_TERMS`] (`kg_weight`, `kl_weight`,
            `scl_text_weight`, `scl_image_weight`, `distill_weight`); 0 or absent: off.
    """

    def __init__(
        self,
        hand_features: torch.Tensor | None = None,
        label_weight: float = 1.0,
        temperature: float = 1.0,
        **weights: float,
    ) -> None:
        unknown = sorted(set(weights) - set(LOSS_TERMS))
        if unknown:
            raise ValueError(f"Unknown loss terms {unknown}; known: {list(LOSS_TERMS)}.")
        self.terms = [(term, weights[name]) for name, term in LOSS_TERMS.items() if weights.get(name)]
        if not label_weight and not self.terms:
            raise ValueError("With label_weight 0 the loss has no term: give a term a weight (e.g. distill_weight).")
        self.hand_features = hand_features
        self.label_weight = label_weight
        self.temperature = temperature

    @property
    def needs_hand(self) -> bool:
        """Whether a term compares with the hand-written prompts' class features."""
        return any(term.needs_hand for term, _ in self.terms)

    @property
    def needs_teacher(self) -> bool:
        """Whether a term compares with a teacher's logits."""
        return any(term.needs_teacher for term, _ in self.terms)

    @property
    def needs_frozen_images(self) -> bool:
        """Whether a term compares with the frozen model's image features."""
        return any(term.needs_frozen_images for term, _ in self.terms)

    def check(self, conditional: bool, prompts_images: bool) -> None:
        """Refuse terms that do not apply to the adapter: to CoCoOp's per-image context, or without vision prompts."""
        for term, _ in self.terms:
            if conditional and not term.conditional:
                raise ValueError(
                    f"{term.weight} ({term.paper}) regularises a context shared by all images, not CoCoOp's "
                    "per-image one: drop it, or use a shared context."
                )
            if term.needs_vision_prompts and not prompts_images:
                raise ValueError(
                    f"{term.weight} ({term.paper}) compares prompted with frozen image features, but this adapter has "
                    "no vision prompts (its image features are the frozen ones): set vision_n_ctx or coupled, or drop "
                    f"{term.weight}."
                )

    def __call__(self, step: StepOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        """`(per_image, per_batch)`: the sum of the per-image terms over the images, and the per-batch terms."""
        per_image = step.logits.new_zeros(())
        if self.label_weight:
            cross_entropy = F.cross_entropy(step.logits, step.labels, reduction="none")
            if step.labeled is not None:
                cross_entropy = cross_entropy[step.labeled]
            per_image = self.label_weight * cross_entropy.sum()
        per_batch = step.logits.new_zeros(())
        if self.needs_hand and self.hand_features is None:
            needing = [term.weight for term, _ in self.terms if term.needs_hand]
            raise ValueError(f"{', '.join(needing)} need the hand-written prompt's class features (hand_features).")
        if self.needs_teacher and step.teacher_logits is None:
            raise ValueError("distill_weight needs a teacher's logits of the images (teacher_logits).")
        for term, weight in self.terms:
            value = weight * term.compute(step, self)
            if term.per_image:
                per_image = per_image + value
            else:
                per_batch = per_batch + value
        return per_image, per_batch
