"""Accuracy of a classifier on labelled images: top-1, top-5, per class, and CoCoOp's base-to-novel harmonic mean."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .classifier import PromptClassifier
from .data import LabeledImages, base_novel, default_workers, image_batches, select_classes
from .options import CLIP_TEMPLATE
from .progress import progress


@torch.no_grad()
def evaluate(
    classifier: PromptClassifier, data: LabeledImages, batch_size: int = 64, num_workers: int | None = None
) -> dict[str, Any]:
    """
    Top-1 and top-5 accuracy (top-k with fewer than 5 classes), accuracy per class and the confusion counts
    (`[true, predicted, images]` for each pair that occurs) of `classifier` on `data` (whose classes must be the
    classifier's, in the same order); the images are decoded by `num_workers` worker processes ahead of the model
    (default: with CUDA half the CPUs, at most 4; none on CPU).
    """
    if list(data.class_names) != list(classifier.class_names):
        raise ValueError(
            "The data's classes differ from the classifier's; build the classifier with data.class_names."
        )
    if not len(data):
        raise ValueError("evaluate() got no images: the data is empty.")
    labels = torch.tensor(data.labels)
    top1, top5 = torch.zeros(len(data), dtype=torch.bool), torch.zeros(len(data), dtype=torch.bool)
    predicted = torch.zeros(len(data), dtype=torch.long)
    k = min(5, len(data.class_names))
    batches = [list(range(start, min(start + batch_size, len(data)))) for start in range(0, len(data), batch_size)]
    workers = default_workers() if num_workers is None else num_workers
    inputs = image_batches(classifier.processor, data, batches, num_workers=workers)
    for indices, batch in progress(zip(batches, inputs, strict=True), total=len(batches), desc="evaluating"):
        logits = classifier.logits(**batch).float().cpu()
        best = logits.topk(k, dim=-1).indices
        predicted[indices] = best[:, 0]
        top1[indices] = best[:, 0] == labels[indices]
        top5[indices] = (best == labels[indices, None]).any(dim=-1)
    per_class = {name: _fraction(top1[labels == y]) for y, name in enumerate(data.class_names) if (labels == y).any()}
    pairs, counts = torch.stack([labels, predicted], dim=1).unique(dim=0, return_counts=True)
    return {
        "top1": _fraction(top1),
        "top5": _fraction(top5),
        "per_class": per_class,
        "n": len(data),
        "class_names": list(data.class_names),  # what the confusion counts' indices name
        "confusion": [[t, p, c] for (t, p), c in zip(pairs.tolist(), counts.tolist(), strict=True)],
    }


def _fraction(hits: torch.Tensor) -> float:
    """The share of true values among `hits`, counted exactly (9 of 40 is 0.225, not float32's 0.22499999...)."""
    return int(hits.sum()) / len(hits)


def against_zero_shot(
    model: Any,
    processor: Any,
    data: LabeledImages,
    templates: str | Sequence[str] = CLIP_TEMPLATE,
    base_to_novel: bool = False,
) -> dict[str, Any]:
    """
    [`evaluate`] of the adapter's learned prompt (`"learned prompt"`) and of the zero-shot prompt(s) `templates` on
    the base model (`"zero-shot"`) on `data`. With `base_to_novel`, each on CoCoOp's base and novel halves of the
    classes instead: `"base_to_novel"` holds each prompt's top-1 on both and their harmonic mean, `"details"` the
    evaluations of each half.
    """

    def both(part: LabeledImages) -> dict[str, dict[str, Any]]:
        zero_shot = PromptClassifier(model, processor, part.class_names, templates, use_adapter=False)
        return {
            "zero-shot": evaluate(zero_shot, part),
            "learned prompt": evaluate(PromptClassifier(model, processor, part.class_names), part),
        }

    if not base_to_novel:
        return both(data)
    base_names, novel_names = base_novel(data.class_names)
    parts = {"base": both(select_classes(data, base_names)), "novel": both(select_classes(data, novel_names))}
    rows = {}
    for prompt in ("zero-shot", "learned prompt"):
        base, novel = parts["base"][prompt]["top1"], parts["novel"][prompt]["top1"]
        rows[prompt] = {"base": base, "novel": novel, "HM": harmonic_mean(base, novel)}
    return {"base_to_novel": rows, "details": parts}


def harmonic_mean(base: float, novel: float) -> float:
    """CoCoOp's summary of base-to-novel generalisation: `2 * base * novel / (base + novel)`."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)
