"""The loss of a prompt-learning step: CoOp's cross-entropy and the regularisers its successors add. A new method's
terms go here: a function of the step's tensors, and a weight in [`PromptLoss`]."""

from __future__ import annotations

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
    """

    logits: torch.Tensor
    labels: torch.Tensor
    class_features: torch.Tensor
    image_features: torch.Tensor
    logit_scale: torch.Tensor
    frozen_image_features: torch.Tensor | None = None

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


def l1_to_frozen(features: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """PromptSRC (Khattak et al., ICCV 2023): mean absolute difference between prompted and frozen normalised features,
    per row `(rows,)`: its self-consistency terms for text (class features) and images."""
    return (features - frozen).abs().mean(-1)


class PromptLoss:
    """
    CoOp's cross-entropy plus weighted regularisers towards the frozen model and its hand-written prompts.

    A call returns two parts, so that the trainer can normalise each exactly however a batch is split among processes
    and accumulation steps: terms summed over this process's images, and terms of the whole batch's class features
    (the same on every process).

    Args:
        kg_weight (`float`, *optional*, defaults to 0): weight of [`kgcoop_loss`].
        kl_weight (`float`, *optional*, defaults to 0): weight of [`kl_to_zero_shot`] (zero-shot logits of the frozen
            image features and `hand_features`).
        scl_text_weight (`float`, *optional*, defaults to 0): weight of [`l1_to_frozen`] between the learned class
            features and `hand_features`, mean over classes (PromptSRC's text term).
        scl_image_weight (`float`, *optional*, defaults to 0): weight of [`l1_to_frozen`] between prompted and frozen
            image features, per image (PromptSRC's image term).
        hand_features (`torch.Tensor`, *optional*): normalised class features of the hand-written prompt(s), needed by
            every regulariser but the image term.
    """

    def __init__(
        self,
        kg_weight: float = 0.0,
        kl_weight: float = 0.0,
        hand_features: torch.Tensor | None = None,
        scl_text_weight: float = 0.0,
        scl_image_weight: float = 0.0,
    ):
        if (kg_weight or kl_weight or scl_text_weight) and hand_features is None:
            raise ValueError(
                "kg_weight, kl_weight and scl_text_weight need the hand-written prompt's class features "
                "(hand_features)."
            )
        self.kg_weight = kg_weight
        self.kl_weight = kl_weight
        self.scl_text_weight = scl_text_weight
        self.scl_image_weight = scl_image_weight
        self.hand_features = hand_features

    @property
    def needs_frozen_images(self) -> bool:
        """Whether the terms compare with the frozen model's image features."""
        return bool(self.kl_weight or self.scl_image_weight)

    def __call__(self, step: StepOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        """`(per_image, per_batch)`: the sum of the per-image terms over the images, and the per-batch terms."""
        per_image = F.cross_entropy(step.logits, step.labels, reduction="sum")
        per_batch = step.logits.new_zeros(())
        if self.kg_weight:
            per_batch = per_batch + self.kg_weight * kgcoop_loss(step.class_features, self.hand_features)
        if self.scl_text_weight:
            per_batch = per_batch + self.scl_text_weight * l1_to_frozen(step.class_features, self.hand_features).mean()
        if self.kl_weight:
            zero_shot = step.logit_scale * step.zero_shot_image_features @ self.hand_features.T
            per_image = per_image + self.kl_weight * kl_to_zero_shot(step.logits, zero_shot)
        if self.scl_image_weight:
            scl = l1_to_frozen(step.image_features, step.zero_shot_image_features).sum()
            per_image = per_image + self.scl_image_weight * scl
        return per_image, per_batch
