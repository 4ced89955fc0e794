"""The image features a run learns from, by the strategy its adapter and arguments call for:

- cached (the default, without augmentation): the frozen image tower's features of every training image, computed
  once;
- cached views (`augment_views`): the features of that many augmented views of each image, computed once; each epoch
  draws one view per image;
- per step (`augment` without views): the frozen tower on each step's fresh crops, without autograd;
- prompted (vision prompts): the adapter's image tower every step, with autograd, and the frozen tower's features
  too where a loss term compares with them; without augmentation, each image is decoded and preprocessed once and the
  frozen tower's features computed once (see [`InputCache`]); the held-out images' inputs too.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch

from ..data import LabeledImages, image_batches, image_inputs
from ..encoder import PromptEncoder
from .arguments import TrainingArguments
from .cache import InputCache, RowCache

#: Images per call of the image tower when features are computed ahead (caches, evaluation)
CHUNK = 64


def check_training_data(data: LabeledImages, held_out: LabeledImages | None) -> None:
    """A run's images: at least two classes, and held-out images (if any) of the same classes in the same order."""
    if not len(data):
        raise ValueError("train_data is empty.")
    if len(data.class_names) < 2:
        raise ValueError(
            f"Training needs at least two classes to tell apart, got {data.class_names}; a prompt learned on one "
            "class has nothing to learn (its loss is 0)."
        )
    if held_out is not None and (list(held_out.class_names) != list(data.class_names) or not len(held_out)):
        raise ValueError(
            "eval_data must hold images of the training data's classes, in the same order "
            f"({data.class_names}); it has {len(held_out)} images of {held_out.class_names}."
        )


def view_seeds(seed: int, views: int) -> list[str]:
    """The augmentation seeds of the `views` cached augmented views of each training image (`augment_views`): view
    `v` of image `i` is its crop drawn from the stream `"{seed}-view{v}-{i}"` (see [`image_inputs`])."""
    return [f"{seed}-view{v}" for v in range(views)]


def check_teacher_logits(
    logits: torch.Tensor | None, data: LabeledImages, needed: bool, views: int | None
) -> torch.Tensor | None:
    """A teacher's logits of `data`'s images, checked: one row per image and one column per class, finite, or with
    cached augmented views (`views`), optionally one such table per view; refused where no loss term uses them,
    required where one does."""
    if logits is None:
        if needed:
            raise ValueError("distill_weight needs the teacher's logits of the training images: pass teacher_logits.")
        return None
    if not needed:
        raise ValueError("teacher_logits are given, but no loss term uses them: set distill_weight above 0.")
    shape = (len(data), len(data.class_names))
    if tuple(logits.shape) not in (shape, (views, *shape)):
        per_view = f", or (views, images, classes) = {(views, *shape)}" if views else ""
        raise ValueError(
            f"teacher_logits must be (images, classes) = {shape}{per_view} for the training data, got "
            f"{tuple(logits.shape)}."
        )
    if not torch.isfinite(logits).all():
        raise ValueError("teacher_logits hold NaN or infinite values.")
    return logits.detach()


def check_labeled(labeled: torch.Tensor | None, data: LabeledImages, label_weight: float) -> torch.Tensor | None:
    """Which of `data`'s labels are true, checked: a boolean per image, some true, and a cross-entropy to use them."""
    if labeled is None:
        return None
    labeled = torch.as_tensor(labeled)
    if labeled.dtype != torch.bool or tuple(labeled.shape) != (len(data),):
        raise ValueError(f"labeled must be {len(data)} booleans (one per training image), got {tuple(labeled.shape)}.")
    if not labeled.any() or not label_weight:
        raise ValueError("labeled names no image with a label, or label_weight is 0: nothing would use the labels.")
    return labeled


class TrainingImages:
    """
    The image features of a run's training images, and of its held-out images.

    Args:
        encoder ([`PromptEncoder`]): the run's encoder.
        processor: the model's processor.
        data ([`LabeledImages`]): the training images.
        args ([`TrainingArguments`]): the recipe (`augment`, `augment_views`, `seed`, `batch_size`, `num_workers`).
        adapter_name (`str`): the adapter learned.
        needs_frozen (`bool`): a loss term compares with the frozen image tower's features.
        autocast (`Callable`): the run's mixed-precision context.
        held_out ([`LabeledImages`], *optional*): held-out images of the same classes, to score the adapter on.
        epochs (`int`, *optional*, defaults to 1): the run's epochs; with more than one, what does not change from
            epoch to epoch is computed once (see [`InputCache`]).
    """

    def __init__(
        self,
        encoder: PromptEncoder,
        processor: Any,
        data: LabeledImages,
        args: TrainingArguments,
        adapter_name: str,
        needs_frozen: bool,
        autocast: Callable[[], AbstractContextManager],
        held_out: LabeledImages | None = None,
        epochs: int = 1,
    ) -> None:
        check_training_data(data, held_out)
        self.encoder = encoder
        self.processor = processor
        self.data = data
        self.held_out = held_out
        self.held_out_frozen: torch.Tensor | None = None
        self.args = args
        self.adapter_name = adapter_name
        self.prompted = encoder.prompts_images(adapter_name)
        self.needs_frozen = needs_frozen
        self.autocast = autocast
        self.views = args.augment_views if args.augment else None
        self.cache: torch.Tensor | None = None
        self.pin_memory = encoder.device.type == "cuda"
        # a prompted tower runs on every step's inputs: without augmentation they are the same every epoch
        unaugmented = self.prompted and not args.augment and epochs > 1
        self.inputs = InputCache(processor, data, args.output_dir) if unaugmented else None
        self.frozen = RowCache(len(data), args.output_dir) if unaugmented and needs_frozen else None
        self.held_out_inputs = (
            InputCache(processor, held_out, args.output_dir) if self.prompted and held_out is not None else None
        )

    @property
    def cached_views(self) -> int | None:
        """How many cached augmented views of each image the epochs draw from (`augment_views`, where the features are
        computed once); None where each epoch sees the images themselves or fresh crops."""
        return self.views if self.cacheable else None

    @property
    def cacheable(self) -> bool:
        """Whether the features are computed once (no vision prompts; no augmentation, or views of it)."""
        return not self.prompted and (not self.args.augment or self.views is not None)

    def batches(self, data: LabeledImages, batches: list[list[int]], seed: str | None = None) -> Iterator[dict]:
        """The image tower's inputs of `data`'s `batches` of indices, decoded ahead (see [`image_batches`])."""
        return image_batches(self.processor, data, batches, seed, self.args.num_workers, self.pin_memory)

    def of(self, indices: list[int], augment_seed: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised features of the training images `indices`, augmented with `augment_seed` when given (see
        [`features`])."""
        return self.features(image_inputs(self.processor, self.data, indices, augment_seed=augment_seed))

    def features(
        self, inputs: dict[str, torch.Tensor], indices: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(features, frozen)` of the image tower's `inputs`: the frozen tower's and None; with vision prompts, the
        prompted tower's (with autograd) and the frozen ones where a loss term compares with them (else None; computed
        once per training image where the inputs of `indices` are the same every epoch)."""
        with self.autocast():
            frozen = None
            if self.frozen is not None and indices is not None and self.frozen.has(indices):
                frozen = self.frozen.get(indices)
            elif not self.prompted or self.needs_frozen:
                with torch.no_grad():
                    frozen = self.encoder.image_features(inputs, enabled=False)
                if self.frozen is not None and indices is not None:
                    self.frozen.put(indices, frozen)
            if not self.prompted:
                return frozen, None
            return self.encoder.image_features(inputs, self.adapter_name), frozen

    def cached(self, views: int | None = None) -> torch.Tensor:
        """Features of every training image from the frozen image tower, computed in chunks: unaugmented `(images,
        dim)`, or of `views` augmented views of each `(views, images, dim)` (see [`view_seeds`])."""
        order = list(range(len(self.data)))
        seeds = [None] if views is None else view_seeds(self.args.seed, views)
        chunks = [order[i : i + CHUNK] for i in range(0, len(order), CHUNK)]
        parts = []
        with torch.no_grad(), self.autocast():
            for seed in seeds:
                for inputs in self.batches(self.data, chunks, seed):
                    parts.append(self.encoder.image_features(inputs, enabled=False))
        features = torch.cat(parts)
        return features if views is None else features.view(views, len(order), -1)

    def prepare(self) -> None:
        """Compute the cache, where the features are computed once."""
        if self.cacheable and self.cache is None:
            self.cache = self.cached(self.views)

    def order(self, epoch: int) -> list[list[int]]:
        """Epoch `epoch`'s batches of training image indices: a shuffle of its own per (seed, epoch)."""
        order = list(range(len(self.data)))
        random.Random(f"{self.args.seed}-{epoch}").shuffle(order)
        size = self.args.batch_size
        return [order[i : i + size] for i in range(0, len(order), size)]

    @torch.no_grad()
    def held_out_features(self, prompted: bool) -> torch.Tensor:
        """Normalised features of every held-out image: the frozen image tower's (computed once), or with `prompted`
        the adapter's (computed on each call: it changes as the adapter learns)."""
        if not prompted and self.held_out_frozen is not None:
            return self.held_out_frozen
        count = len(self.held_out)
        chunks = [list(range(i, min(i + CHUNK, count))) for i in range(0, count, CHUNK)]
        options = {"adapter_name": self.adapter_name} if prompted else {"enabled": False}
        with self.autocast():
            if self.held_out_inputs is not None:  # a prompted tower's: the same inputs at every evaluation
                batches = self.held_out_inputs.batches(chunks, self.args.num_workers, self.pin_memory)
            else:
                batches = self.batches(self.held_out, chunks)
            features = torch.cat([self.encoder.image_features(inputs, **options) for inputs in batches])
        if not prompted:
            self.held_out_frozen = features
        return features

    def view_of(self, epoch: int, index: int) -> int:
        """Which cached augmented view of training image `index` epoch `epoch` uses: drawn from a stream of its own
        per (seed, epoch, image), so that any process or resumed run draws the same."""
        return random.Random(f"{self.args.seed}-{epoch}-view-{index}").randrange(self.views)

    def epoch(self, epoch: int, shares: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """`(features, frozen)` of each non-empty share of epoch `epoch`'s batches, in order (after [`prepare`])."""
        shares = [share for share in shares if share]
        if self.inputs is not None:  # a prompted tower's unaugmented inputs: decoded in the first epoch, then read
            inputs = self.inputs.batches(shares, self.args.num_workers, self.pin_memory)
            for share, share_inputs in zip(shares, inputs, strict=True):
                yield self.features(share_inputs, share)
            return
        if self.cache is None:  # the epoch's images, decoded and augmented ahead by the workers
            seed = f"{self.args.seed}-{epoch}" if self.args.augment else None
            for inputs in self.batches(self.data, shares, seed):
                yield self.features(inputs)
            return
        for share in shares:
            yield self.rows(self.cache, epoch, share), None

    def rows(self, table: torch.Tensor, epoch: int, share: list[int]) -> torch.Tensor:
        """The rows of `share` of a per-image `table` (features, a teacher's logits) in epoch `epoch`: of `(images,
        ...)` the image's, of per-view `(views, images, ...)` its cached augmented view's of that epoch (see
        [`view_of`])."""
        if table.dim() == 3:
            return table[[self.view_of(epoch, i) for i in share], share]
        return table[share]
