"""What a run keeps beside the adapter's parameters, each with its own copy of them (saved in every checkpoint under
its `name`): the epoch kept on held-out images, and PromptSRC's Gaussian average over epochs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


@torch.no_grad()
def copy_into(sources: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
    """Copy each tensor of `sources` into the tensor of `targets` at the same place."""
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source)


class BestEpoch:
    """
    Keeps the adapter that scores best on held-out images (higher accuracy; at equal accuracy, lower loss) among the
    evaluated candidates: the initial one (epoch 0), every `eval_every` epochs, the last (and PromptSRC's average).

    Args:
        params (`list[torch.Tensor]`): the adapter's trainable parameters.
        evaluate (`Callable[[], dict[str, float]]`): the held-out `accuracy` and `loss` of the adapter as it is now.
    """

    name = "best"

    def __init__(self, params: list[torch.Tensor], evaluate: Callable[[], dict[str, float]]) -> None:
        self.params = params
        self.evaluate = evaluate
        self.buffer = [p.detach().clone() for p in params]

    def consider(self, log: dict[str, Any], epoch: int | str) -> dict[str, float]:
        """Evaluate the adapter as it is now as candidate `epoch`; keep it, and say so in `log["best"]`, when it beats
        the best so far. Returns its scores."""
        scores = self.evaluate()
        best = log.get("best")
        if best is None or (scores["accuracy"], -scores["loss"]) > (best["accuracy"], -best["loss"]):
            log["best"] = {"epoch": epoch, **scores}
            copy_into(self.params, self.buffer)
        return scores

    def restore(self) -> None:
        """Put the kept candidate into the adapter."""
        copy_into(self.buffer, self.params)


class GaussianAverage:
    """
    PromptSRC's Gaussian weighted prompt aggregation (Khattak et al., ICCV 2023): the adapter at the end is the mean of
    its parameters after each epoch, weighted by `weights` (see `TrainingArguments.gpa_weights`).

    Args:
        params (`list[torch.Tensor]`): the adapter's trainable parameters.
        weights (`list[float]`): the weight of each epoch, summing to 1.
    """

    name = "average"

    def __init__(self, params: list[torch.Tensor], weights: list[float]) -> None:
        self.params = params
        self.weights = weights
        self.buffer = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def epoch_end(self, epoch: int) -> None:
        """Add the parameters after epoch `epoch` (from 0), weighted."""
        for average, p in zip(self.buffer, self.params, strict=True):
            average.add_(p, alpha=self.weights[epoch])

    def restore(self) -> None:
        """Put the average into the adapter."""
        copy_into(self.buffer, self.params)
