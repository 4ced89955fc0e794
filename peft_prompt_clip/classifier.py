"""Image classification over a fixed set of classes: the class text features are computed once and cached, so each
batch of images costs one pass of the image tower and a matrix product."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import save_file
from torch import nn

from .layer import PromptEmbeddingLayer, find_prompt_layer
from .model import find_text_embeddings, text_family

#: CLIP's hand-written prompt, the zero-shot baseline of CoOp's tables.
CLIP_TEMPLATE = ("a photo of a {}.",)
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


# class features are computed with the model's prompt layer pointed at one adapter; one computation at a time
_TEXT_LOCK = threading.Lock()


def tokenize_prompts(processor: Any, model: nn.Module, texts: list[str]) -> dict[str, torch.Tensor]:
    """Class prompts tokenised as the model's family expects: padded to the longest prompt, or, for families that
    pool at the last position (SigLIP), to the model's full length."""
    embeddings = model.get_submodule(find_text_embeddings(model))
    if text_family(embeddings).pooling == "last":
        length = embeddings.position_embedding.num_embeddings
        return dict(processor.tokenizer(texts, padding="max_length", max_length=length, return_tensors="pt"))
    return dict(processor.tokenizer(texts, padding=True, return_tensors="pt"))


def _features(output) -> torch.Tensor:
    # transformers 4 returns the projected features, 5 an output object holding them as pooler_output
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class PromptClassifier:
    """
    Classify images among `class_names` with a CLIP model, with or without a prompt adapter.

    Args:
        model (`nn.Module`): a `CLIPModel`, or a `PeftModel` wrapping one with a prompt adapter.
        processor: the model's processor (`AutoProcessor.from_pretrained(...)`): tokenizer and image processor.
        class_names (`Sequence[str]`): the classes, in label order.
        templates (`Sequence[str]`, *optional*, defaults to `("{}.",)`): texts with a `{}` for the class name; the
            class feature is the normalised mean over templates (CLIP's prompt ensembling).
        use_adapter (`bool`, *optional*, defaults to `True`): `False` runs the base model (zero-shot baseline) even
            when `model` has an adapter.
        adapter_name (`str`, *optional*): the adapter to classify with; by default the model's active one.

    The class features are cached on first use; call [`refresh`] after training the prompt. Classifiers are
    thread-safe, also several of them on one model with different `adapter_name`s (switching adapters with the
    model's own `set_adapter` while other threads run it is not).
    """

    def __init__(
        self,
        model: nn.Module,
        processor,
        class_names: Sequence[str],
        templates: Sequence[str] = ("{}.",),
        use_adapter: bool = True,
        adapter_name: str | None = None,
    ) -> None:
        if not class_names:
            raise ValueError("class_names is empty: give the names of the classes to classify among.")
        blank = [i for i, n in enumerate(class_names) if not str(n).strip()]
        if blank:
            raise ValueError(f"class_names has empty names at positions {blank}; every class needs a name.")
        repeated = sorted({n for n in class_names if list(class_names).count(n) > 1})
        if repeated:
            raise ValueError(f"class_names repeats {repeated}; every class needs its own name.")
        if any("{}" not in t for t in templates) or not templates:
            raise ValueError(f"Every template needs a '{{}}' for the class name, got {list(templates)}.")
        self.model = model
        self.processor = processor
        self.class_names = list(class_names)
        self.templates = list(templates)
        self.use_adapter = use_adapter
        self.adapter_name = adapter_name
        self._class_features: torch.Tensor | None = None

    @property
    def base_model(self) -> nn.Module:
        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    @torch.no_grad()
    def class_features(self) -> torch.Tensor:
        """Normalised class text features `(num_classes, dim)`, computed once."""
        if self._class_features is None:
            device = self.base_model.logit_scale.device
            layer = find_prompt_layer(self.model)
            per_template = []
            with _TEXT_LOCK, ExitStack() as stack:
                if layer is not None and not self.use_adapter:
                    stack.enter_context(self.model.disable_adapter())
                elif layer is not None and self.adapter_name is not None:
                    stack.enter_context(layer.using_adapter(self.adapter_name))
                n_ctx = layer.prompt_layouts[layer.active_adapters[0]].n_ctx if layer and self.use_adapter else 0
                for template in self.templates:
                    texts = [template.format(name) for name in self.class_names]
                    tokens = {k: v.to(device) for k, v in tokenize_prompts(self.processor, self.model, texts).items()}
                    self._check_lengths(texts, tokens["attention_mask"].sum(-1), n_ctx)
                    features = _features(self.model.get_text_features(**tokens))
                    per_template.append(features / features.norm(dim=-1, keepdim=True))
            mean = torch.stack(per_template).mean(dim=0)
            self._class_features = mean / mean.norm(dim=-1, keepdim=True)
        return self._class_features

    def _check_lengths(self, texts: list[str], lengths: torch.Tensor, n_ctx: int) -> None:
        embeddings = self.base_model.get_submodule(find_text_embeddings(self.base_model))
        limit = embeddings.position_embedding.num_embeddings
        too_long = [t for t, n in zip(texts, lengths.tolist(), strict=True) if n + n_ctx > limit]
        if too_long:
            raise ValueError(
                f"These prompts are too long for the model ({limit} positions, {n_ctx} of them for the learned "
                f"context): {too_long[:5]}. Shorten those class names or templates."
            )

    def refresh(self) -> None:
        """Forget the cached class features (after training, or after `set_adapter`)."""
        self._class_features = None

    @torch.no_grad()
    def logits(self, pixel_values: torch.Tensor, **image_inputs: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities `(num_images, num_classes)`, as `CLIPModel`'s `logits_per_image`. Pass the
        processor's other image outputs too where the model needs them (SigLIP 2: `pixel_attention_mask`,
        `spatial_shapes`): `logits(**processor(images=images, return_tensors="pt"))`."""
        base = self.base_model
        inputs = {k: v.to(base.logit_scale.device) for k, v in {"pixel_values": pixel_values, **image_inputs}.items()}
        image = _features(base.get_image_features(**inputs))
        image = image / image.norm(dim=-1, keepdim=True)
        layer = find_prompt_layer(self.model)
        if layer is not None and self.use_adapter and layer.is_conditional(self.adapter_name):
            text = self._conditional_features(layer, image)
            return base.logit_scale.exp().to(image.dtype) * torch.einsum("bd,bcd->bc", image, text.to(image.dtype))
        text = self.class_features().to(image.dtype)
        return base.logit_scale.exp().to(image.dtype) * image @ text.T

    def _conditional_features(self, layer: PromptEmbeddingLayer, image: torch.Tensor) -> torch.Tensor:
        """CoCoOp: class features for each image `(images, classes, dim)`, the text tower run over image x class
        prompts in chunks of about 256 prompts."""
        if len(self.templates) != 1:
            raise ValueError("A conditional (CoCoOp) adapter classifies with one template, not an ensemble.")
        texts = [self.templates[0].format(name) for name in self.class_names]
        tokens = {k: v.to(image.device) for k, v in tokenize_prompts(self.processor, self.model, texts).items()}
        per_call = max(1, 256 // len(texts))
        parts = []
        with _TEXT_LOCK, ExitStack() as stack:
            if self.adapter_name is not None:
                stack.enter_context(layer.using_adapter(self.adapter_name))
            self._check_lengths(
                texts, tokens["attention_mask"].sum(-1), layer.prompt_layouts[layer.active_adapters[0]].n_ctx
            )
            for start in range(0, len(image), per_call):
                images = image[start : start + per_call]
                with layer.conditioned_on(images):
                    rows = {k: v.repeat(len(images), 1) for k, v in tokens.items()}
                    features = _features(self.model.get_text_features(**rows))
                parts.append((features / features.norm(dim=-1, keepdim=True)).view(len(images), len(texts), -1))
        return torch.cat(parts)

    def predict(self, images: Sequence, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """The `top_k` most probable classes of each image (PIL images or arrays), with their probabilities."""
        probs = self.logits(**self.processor(images=list(images), return_tensors="pt")).float().softmax(dim=-1)
        scores, indices = probs.topk(min(top_k, len(self.class_names)), dim=-1)
        return [
            [(self.class_names[i], s) for i, s in zip(row_i.tolist(), row_s.tolist(), strict=True)]
            for row_i, row_s in zip(indices, scores, strict=True)
        ]

    def save_head(self, path: str | Path) -> None:
        """Save the classifier as a plain linear head on the image features, for deployment without the text tower.

        `adapter-free logits = normalise(image_features) @ weight.T`; the class names are in the file's metadata.
        """
        weight = (self.base_model.logit_scale.exp() * self.class_features()).float().cpu().contiguous()
        save_file({"weight": weight}, str(path), metadata={"class_names": json.dumps(self.class_names)})
