"""Image classification over a fixed set of classes: the class text features are computed once and cached, so each
batch of images costs one pass of the image tower and a matrix product."""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .config import check_class_names
from .encoder import PromptEncoder
from .options import CLIP_TEMPLATE, IMAGENET_TEMPLATES, describe_templates  # noqa: F401 (their home until 0.1)


class PromptClassifier:
    """
    Classify images among `class_names` with a CLIP model, with or without a prompt adapter.

    Args:
        model (`nn.Module`): a `CLIPModel`, or a `PeftModel` wrapping one with a prompt adapter.
        processor: the model's processor (`AutoProcessor.from_pretrained(...)`): tokenizer and image processor.
        class_names (`Sequence[str]`): the classes, in label order.
        templates (`Sequence[str]`, *optional*, defaults to `("{}.",)`): texts with one `{}` for the class name (other
            braces doubled, `{{`); the class feature is the normalised mean over templates (CLIP's prompt ensembling).
        use_adapter (`bool`, *optional*, defaults to `True`): `False` runs the base model (zero-shot baseline) even
            when `model` has an adapter.
        adapter_name (`str`, *optional*): the adapter to classify with; by default the model's active one.
        chunk_size (`int`, *optional*, defaults to 256): at most this many prompts per call of the text tower (None:
            all at once).
        share_prefix (`bool`, *optional*, defaults to `True`): encode the words all prompts of a template share once
            (see [`PromptEncoder`]).

    The class features are cached on first use; call [`refresh`] after training the prompt. Classifiers are
    thread-safe, also several of them on one model with different `adapter_name`s and beside other threads' plain
    forwards: the adapter travels with each call (see [`prompt_options`]). Switching the model's active adapter with
    PEFT's `set_adapter` while other threads run it changes it for them too, as in PEFT.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        class_names: Sequence[str],
        templates: Sequence[str] = ("{}.",),
        use_adapter: bool = True,
        adapter_name: str | None = None,
        chunk_size: int | None = 256,
        share_prefix: bool = True,
    ) -> None:
        check_class_names(list(class_names))
        bad = [t for t in templates if not _one_slot(t)]
        if bad or not templates:
            raise ValueError(
                f"Every template needs one '{{}}' for the class name (other braces doubled: '{{{{', '}}}}'), got "
                f"{bad or list(templates)}."
            )
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(
                f"chunk_size must be a positive number of prompts, or None for all at once; got {chunk_size!r}."
            )
        self.model = model
        self.processor = processor
        self.class_names = list(class_names)
        self.templates = list(templates)
        self.use_adapter = use_adapter
        self.adapter_name = adapter_name
        self.chunk_size = chunk_size
        self.encoder = PromptEncoder(model, processor, share_prefix=share_prefix)
        self._class_features: torch.Tensor | None = None

    @property
    def adapter(self) -> str | None:
        """The adapter this classifier uses now (None: the base model, zero-shot)."""
        return self.encoder.adapter(self.adapter_name, self.use_adapter)

    def _tokens(self, template: str, adapter_name: str | None) -> dict[str, torch.Tensor]:
        texts = [template.format(name) for name in self.class_names]
        return self.encoder.tokenize(texts, adapter_name, adapter_name is not None)

    @torch.no_grad()
    def class_features(self) -> torch.Tensor:
        """Normalised class text features `(num_classes, dim)`, the mean over templates; computed once."""
        features = self._class_features  # read once: another thread may refresh() meanwhile
        if features is None:
            name = self.adapter
            if self.encoder.is_conditional(name):
                raise ValueError(
                    f"Adapter {name!r} is conditional (CoCoOp): its class features depend on the image; use "
                    "logits() or predict()."
                )
            per_template = [
                self.encoder.class_features(
                    self._tokens(t, name),
                    name,
                    name is not None,
                    chunk_size=self.chunk_size,
                    class_names=self.class_names,
                )
                for t in self.templates
            ]
            mean = torch.stack(per_template).mean(dim=0)
            features = self._class_features = mean / mean.norm(dim=-1, keepdim=True)
        return features

    def refresh(self) -> None:
        """Forget the cached class features (after training, or after `set_adapter`)."""
        self._class_features = None

    @torch.no_grad()
    def logits(self, pixel_values: torch.Tensor, **image_inputs: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities `(num_images, num_classes)`, as `CLIPModel`'s `logits_per_image`. Pass the
        processor's other image outputs too where the model needs them (SigLIP 2: `pixel_attention_mask`,
        `spatial_shapes`): `logits(**processor(images=images, return_tensors="pt"))`."""
        name = self.adapter
        image = self.encoder.image_features({"pixel_values": pixel_values, **image_inputs}, name, name is not None)
        return self.image_logits(image)

    @torch.no_grad()
    def image_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities `(num_images, num_classes)` of normalised image features computed already by
        the image tower this classifier uses (the adapter's, when it has vision prompts; else the base model's)."""
        name = self.adapter
        if self.encoder.is_conditional(name):
            if len(self.templates) != 1:
                raise ValueError("A conditional (CoCoOp) adapter classifies with one template, not an ensemble.")
            text = self.encoder.class_features(
                self._tokens(self.templates[0], name), name, image_features=image_features, chunk_size=self.chunk_size
            )
        else:
            text = self.class_features()
        return self.encoder.logits(image_features, text.to(image_features.dtype))

    def predict(self, images: Sequence, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """The `top_k` most probable classes of each image (PIL images, or arrays and tensors as the processor takes
        them), with their probabilities."""
        if not len(images):
            raise ValueError("predict() got no images; pass a list of PIL images or arrays.")
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}.")
        empty = [i for i, image in enumerate(images) if 0 in getattr(image, "shape", getattr(image, "size", ()))]
        if empty:
            raise ValueError(f"predict() got images without pixels (width or height 0) at positions {empty[:10]}.")
        probs = self.logits(**self.processor(images=list(images), return_tensors="pt")).float().softmax(dim=-1)
        scores, indices = probs.topk(min(top_k, len(self.class_names)), dim=-1)
        return [
            [(self.class_names[i], s) for i, s in zip(row_i.tolist(), row_s.tolist(), strict=True)]
            for row_i, row_s in zip(indices, scores, strict=True)
        ]

    def save_head(self, path: str | Path) -> None:
        """Save the classifier as a plain linear head on the image features, for deployment without the text tower.

        `adapter-free logits = normalise(image_features) @ weight.T`; the class names are in the file's metadata.

        Raises:
            `ValueError`: for an adapter with vision prompts, whose class features only fit its prompted image tower.
        """
        if self.encoder.prompts_images(self.adapter):
            raise ValueError(
                f"Adapter {self.adapter!r} has vision prompts: its class features fit the image features of its own "
                "prompted image tower, not the base model's, so a head on plain image features would be wrong. Deploy "
                "the adapter (PromptClassifier) instead."
            )
        weight = (self.encoder.base.logit_scale.exp() * self.class_features()).float().cpu().contiguous()
        save_file({"weight": weight}, str(path), metadata={"class_names": json.dumps(self.class_names)})


def _one_slot(template: Any) -> bool:
    """Whether `template` is a string with exactly one empty `{}` field and nothing else to format."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except (ValueError, TypeError):  # an unmatched brace, or no string
        return False
    return fields == [""]
