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
    """

    logits: torch.Tensor
    labels: torch.Tensor
    class_features: torch.Tensor
    image_features: torch.Tensor
    logit_scale: torch.Tensor


def kgcoop_loss(class_features: torch.Tensor, hand_features: torch.Tensor) -> torch.Tensor:
    """KgCoOp (Yao et al., CVPR 2023): mean over classes of `1 - cos(learned, hand-written class feature)`."""
    return (1 - (class_features * hand_features).sum(-1)).mean()


def kl_to_zero_shot(logits: torch.Tensor, zero_shot_logits: torch.Tensor) -> torch.Tensor:
    """ProGrad-style (Zhu et al., ICCV 2023): `KL(zero-shot probabilities || learned probabilities)`, summed over
    images."""
    return F.kl_div(logits.log_softmax(-1), zero_shot_logits.log_softmax(-1), log_target=True, reduction="sum")


class PromptLoss:
    """
    CoOp's cross-entropy plus weighted regularisers towards the hand-written prompt.

    A call returns two parts, so that the trainer can normalise each exactly however a batch is split among processes
    and accumulation steps: terms summed over this process's images, and terms of the whole batch's class features
    (the same on every process).

    Args:
        kg_weight (`float`, *optional*, defaults to 0): weight of [`kgcoop_loss`].
        kl_weight (`float`, *optional*, defaults to 0): weight of [`kl_to_zero_shot`].
        hand_features (`torch.Tensor`, *optional*): normalised class features of the hand-written prompt, needed by
            both regularisers.
    """

    def __init__(self, kg_weight: float = 0.0, kl_weight: float = 0.0, hand_features: torch.Tensor | None = None):
        if (kg_weight or kl_weight) and hand_features is None:
            raise ValueError("kg_weight and kl_weight need the hand-written prompt's class features (hand_features).")
        self.kg_weight = kg_weight
        self.kl_weight = kl_weight
        self.hand_features = hand_features

    def __call__(self, step: StepOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        """`(per_image, per_batch)`: the sum of the per-image terms over the images, and the per-batch terms."""
        per_image = F.cross_entropy(step.logits, step.labels, reduction="sum")
        per_batch = step.logits.new_zeros(())
        if self.kg_weight:
            per_batch = per_batch + self.kg_weight * kgcoop_loss(step.class_features, self.hand_features)
        if self.kl_weight:
            zero_shot = step.logit_scale * step.image_features @ self.hand_features.T
            per_image = per_image + self.kl_weight * kl_to_zero_shot(step.logits, zero_shot)
        return per_image, per_batch
