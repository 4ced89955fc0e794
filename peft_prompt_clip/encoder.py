"""One way in and out of the towers of a CLIP-family model, with or without a prompt adapter: tokenising class prompts
as the family expects, normalised text features (all classes, chunks of classes, or per image for CoCoOp) and image
features, and the scaled similarities between them. The trainer, the classifier, evaluation and the benchmarks all
encode through [`PromptEncoder`]."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layer import PromptEmbeddingLayer, PromptOptions, find_prompt_layer, prompt_options
from .layout import Pooling, end_of_text_index, write_at
from .model import find_text_embeddings, text_family, text_pooling
from .prefix import CausalTextTower, DeepWrite, common_prefix_length

#: Encode a shared prefix once only when that saves at least this share of the token positions: below it, the
#: separate prefix pass costs about what it saves (measured in benchmarks/shared_prefix.py)
MIN_PREFIX_SAVING = 0.25


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Features, losses and similarities in float32 under mixed precision (float64 stays float64)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def features_of(output: Any) -> torch.Tensor:
    """The projected features of `get_text_features` / `get_image_features`: transformers 4 returns them, 5 an output
    object holding them as `pooler_output`."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class PromptEncoder:
    """
    Text and image features of a CLIP-family model, created once per model.

    Knows the model's family (how prompts are padded and pooled, how many positions they may take) and its prompt
    layer, if any. Every method takes the per-call choices (which adapter, or none) as arguments; nothing is stored
    on the model, so one model serves several encoders and threads at once.

    Class prompts that begin with the same tokens (a shared context at the end position, the first half at the
    middle position, a template's words) are encoded with that beginning computed once, in causal text towers
    (CLIP, GroupViT, OWL-ViT): the same features and gradients with several times less work (see
    [`CausalTextTower`]). Per-class tokens (CSC, TCP), the front position and SigLIP take the model's own forward.

    Args:
        model (`nn.Module`): a CLIP-family model (`CLIPModel`, `SiglipModel`, ...), or a `PeftModel` wrapping one with
            a prompt adapter.
        processor: the model's processor or tokenizer.
        share_prefix (`bool`, *optional*, defaults to `True`): encode a prefix shared by class prompts once where
            that is exact and saves work; `False` always runs the model's own forward (for comparison).

    Example:

    ```py
    >>> import tempfile
    >>> from pathlib import Path
    >>> from transformers import AutoProcessor, CLIPModel
    >>> from peft_prompt_clip import PromptEncoder
    >>> from peft_prompt_clip.tiny import save_tiny_clip
    >>> folder = save_tiny_clip(Path(tempfile.mkdtemp()))
    >>> encoder = PromptEncoder(CLIPModel.from_pretrained(folder), AutoProcessor.from_pretrained(folder))
    >>> encoder.class_features(encoder.tokenize(["cat.", "dog."])).shape
    torch.Size([2, 16])

    ```
    """

    def __init__(self, model: nn.Module, processor: Any, share_prefix: bool = True) -> None:
        self.model = model
        self.base = model.get_base_model() if isinstance(model, PeftModel) else model
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.layer = find_prompt_layer(model)
        name = find_text_embeddings(self.base)
        self.embeddings = self.base.get_submodule(name)
        text_model = self.base.get_submodule(name.rpartition(".")[0])
        self.family = text_family(self.embeddings)
        self.pooling = text_pooling(self.family, text_model.config)
        self.eos_token_id = text_model.config.eos_token_id
        self.max_positions = self.embeddings.position_embedding.num_embeddings
        causal = self.family.pooling != Pooling.LAST  # SigLIP's text tower attends both ways
        self.tower = CausalTextTower.of(self.base, text_model) if share_prefix and causal else None

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    def adapter(self, adapter_name: str | None = None, enabled: bool = True) -> str | None:
        """The adapter that calls with these choices use: `adapter_name`, else the model's active one; None for the
        base model (`enabled=False`, adapters disabled, or no prompt adapter)."""
        if self.layer is None:
            if adapter_name is not None and enabled:
                raise ValueError(f"The model has no prompt adapter, so none named {adapter_name!r}.")
            return None
        return self.layer.resolve(PromptOptions(adapter_name, enabled))

    def is_conditional(self, adapter_name: str | None) -> bool:
        """Whether the (resolved) adapter's context depends on the image (CoCoOp)."""
        return adapter_name is not None and self.layer.is_conditional(adapter_name)

    def prompts_images(self, adapter_name: str | None) -> bool:
        """Whether the (resolved) adapter has vision prompts: its image features depend on it, so they cannot be
        computed once without it."""
        return adapter_name is not None and self.layer.prompts_images(adapter_name)

    def tokenize(
        self, texts: Sequence[str], adapter_name: str | None = None, enabled: bool = True
    ) -> dict[str, torch.Tensor]:
        """`texts` tokenised as the family expects (padded to the longest, or to the model's length for families that
        pool at the last position), on the model's device, checked to fit with the adapter's context. Special tokens
        spelled inside a text are read as text.

        Raises:
            `ValueError`: naming the texts too long for the model once the context is added.
        """
        # text is text: a special token spelled inside a class name ('<|endoftext|>') is read as its characters
        padding = (
            {"padding": "max_length", "max_length": self.max_positions}
            if self.family.pooling == Pooling.LAST
            else {"padding": True}
        )
        tokens = self.tokenizer(list(texts), split_special_tokens=True, return_tensors="pt", **padding)
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        name = self.adapter(adapter_name, enabled)
        if name is not None:
            layout = self.layer.prompt_layouts[name]
            ids = tokens["input_ids"]
            lengths = (layout.end_of_text_index(ids) + 1).tolist()
            layout.check_lengths(lengths, list(texts), padded=ids.shape[-1])
        return tokens

    def text_features(
        self,
        tokens: Mapping[str, torch.Tensor],
        adapter_name: str | None = None,
        enabled: bool = True,
        classes: Sequence[int] | None = None,
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalised features `(texts, dim)` of one pass of the text tower (at least float32); the arguments after
        `tokens` are those of [`prompt_options`]."""
        with prompt_options(adapter_name, enabled, classes, condition):
            return _normalized(features_of(self.base.get_text_features(**tokens)))

    def class_features(
        self,
        tokens: Mapping[str, torch.Tensor],
        adapter_name: str | None = None,
        enabled: bool = True,
        image_features: torch.Tensor | None = None,
        chunk_size: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """
        Normalised features of the class prompts `tokens`, at most `chunk_size` prompts per call of the text tower.
        `class_names` are the classes of the prompts, in order: a class-specific adapter gives each prompt the context
        of its class, found by name (any subset of its classes, in any order), and needs them when it saved its class
        names.

        Returns `(classes, dim)`, or `(images, classes, dim)` for a conditional (CoCoOp) adapter, whose context is
        shifted per image by `image_features` (`(images, dim)`, normalised): its prompts are the classes once per
        image, `chunk_size // classes` images per call. With autograd on and several chunks, each chunk is run again
        in the backward pass (activation checkpointing): the gradient is exact and only one chunk's activations are
        held at a time.
        """
        name = self.adapter(adapter_name, enabled)  # resolved once: every chunk uses the same adapter
        indices = self.adapter_classes(name, class_names)
        indices = list(range(tokens["input_ids"].shape[0])) if indices is None else indices
        classes = len(indices)
        conditional = self.is_conditional(name)
        if conditional and image_features is None:
            raise ValueError(
                f"Adapter {name!r} is conditional (CoCoOp): its class features depend on the image; pass "
                "image_features."
            )
        plan = self._prefix_plan(tokens, name)
        if not conditional:
            if plan is None:

                def run(start: int, stop: int) -> torch.Tensor:
                    rows = {k: v[start:stop] for k, v in tokens.items()}
                    return self.text_features(rows, name, name is not None, classes=indices[start:stop])

            else:
                ids, eos, shared, slots = plan
                prefix = self._embedded(ids[:1], name, classes=indices[:1])[:, :shared]
                first = self._deep_write(name, slots, shared, 0, 1, prefix=True)
                states = self.tower.prefix_states(prefix, first)

                def run(start: int, stop: int) -> torch.Tensor:
                    rows = self._embedded(ids[start:stop], name, classes=indices[start:stop])[:, shared:]
                    deep = self._deep_write(name, slots, shared, start, stop, prefix=False)
                    return _normalized(self.tower.features(rows, states, eos[start:stop] - shared, deep))

            return _chunked(run, classes, chunk_size or classes)
        images = image_features.shape[0]
        if plan is None:

            def run_images(start: int, stop: int) -> torch.Tensor:
                rows = {k: v.repeat(stop - start, 1) for k, v in tokens.items()}
                features = self.text_features(rows, name, condition=image_features[start:stop])
                return features.view(stop - start, classes, -1)

        else:  # one prefix per image: the image's context is shared by its class prompts
            ids, eos, shared, _ = plan  # CoCoOp has no deep prompts
            prefixes = self._embedded(ids[:1].repeat(images, 1), name, condition=image_features)[:, :shared]
            states = self.tower.prefix_states(prefixes)

            def run_images(start: int, stop: int) -> torch.Tensor:
                count = stop - start
                rows = self._embedded(ids.repeat(count, 1), name, condition=image_features[start:stop])[:, shared:]
                mine = [(k[start:stop], v[start:stop]) for k, v in states]
                features = self.tower.features(rows, mine, eos.repeat(count) - shared)
                return _normalized(features).view(count, classes, -1)

        return _chunked(run_images, images, max(1, (chunk_size or classes * images) // classes))

    def adapter_classes(self, adapter_name: str | None, class_names: Sequence[str] | None) -> list[int] | None:
        """For a class-specific adapter that saved its class names, the adapter's index of each of `class_names`;
        None for other adapters, and for one without saved names (its prompts are then its classes, in its order).

        Raises:
            `ValueError`: when the names are missing, or name a class the adapter has no context for.
        """
        if adapter_name is None or self.layer.prompt_embedding_ctx[adapter_name].dim() != 3:
            return None
        config = getattr(self.model, "peft_config", {}).get(adapter_name)
        known = getattr(config, "class_names", None)
        if known is None:
            return None
        if class_names is None:
            raise ValueError(
                f"Adapter {adapter_name!r} has one context per class ({known}): pass class_names, the class of each "
                "prompt, so that every prompt gets its own class's context."
            )
        missing = [n for n in class_names if n not in known]
        if missing:
            raise ValueError(
                f"Adapter {adapter_name!r} has one context per class for {known}; it has none for {missing}. Classify "
                "among its classes, or use a shared-context adapter."
            )
        return [known.index(n) for n in class_names]

    def _prefix_plan(
        self, tokens: Mapping[str, torch.Tensor], adapter_name: str | None
    ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None] | None:
        """`(ids, end-of-text index, shared length, context slots)` of the class prompts `tokens` as the text tower
        sees them (the adapter's context slots inserted; slots for deep prompts only), when encoding their shared
        prefix once is exact and saves enough work; None otherwise."""
        if self.tower is None or (adapter_name is not None and self.layer.per_class(adapter_name)):
            return None  # per-class tokens (CSC, TCP) differ from the context's first slot on: little is shared
        ids, slots = tokens["input_ids"], None
        if adapter_name is None:
            eos = end_of_text_index(ids, self.pooling, self.eos_token_id)
            shared = common_prefix_length(ids)
        else:
            layout = self.layer.prompt_layouts[adapter_name]
            ids, _ = layout.expand(ids, tokens.get("attention_mask"))
            eos = layout.end_of_text_index(ids)
            shared = common_prefix_length(ids)
            if self.layer.writes_deep(adapter_name):
                slots = layout.locate(ids)
        shared = min(shared, int(eos.min()))  # every prompt keeps at least its end-of-text token
        if slots is not None and not bool(((slots < shared).sum(1) == (slots[0] < shared).sum()).all()):
            return None  # the prefix must hold the same context slots in every prompt
        rows, length = ids.shape
        if shared * (rows - 1) < MIN_PREFIX_SAVING * rows * length:
            return None
        return ids, eos, shared, slots

    def _deep_write(
        self,
        adapter_name: str | None,
        slots: torch.Tensor | None,
        shared: int,
        start: int,
        stop: int,
        prefix: bool,
    ) -> DeepWrite | None:
        """How the shared-prefix path writes the tokens of the adapter's text layers past the input (the layer's
        `text_tokens`, as its hooks do): in the prefix, those at the context slots before `shared`; in the rows
        `start:stop` of the suffixes, the others, at their positions past the prefix (tokens shared by all prompts:
        per-class ones take the model's own forward)."""
        if slots is None:
            return None
        inside = int((slots[0] < shared).sum())  # the context's first `inside` vectors lie in the prefix
        where = slots[:1, :inside] if prefix else slots[start:stop, inside:] - shared
        part = slice(0, inside) if prefix else slice(inside, None)
        if where.shape[1] == 0:  # none of the context here (the end position's suffixes): nothing to copy
            return None

        def write(index: int, hidden: torch.Tensor) -> torch.Tensor:
            tokens = self.layer.text_tokens(adapter_name, index, {}) if index else None
            return hidden if tokens is None else write_at(hidden, where, tokens[part])

        return write

    def _embedded(
        self,
        ids: torch.Tensor,
        adapter_name: str | None,
        classes: Sequence[int] | None = None,
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings, positions added, of prompts `ids` as the adapter's layout expanded them."""
        if adapter_name is None:  # the wrapped module itself: no call state of any forward can reach it
            base = self.embeddings.get_base_layer() if isinstance(self.embeddings, PromptEmbeddingLayer) else None
            return (base or self.embeddings)(input_ids=ids)
        rows = None if classes is None else torch.as_tensor(classes, dtype=torch.long)
        embeds = self.layer.embed(ids, adapter_name, PromptOptions(adapter_name, True, rows, condition))
        return self.layer.base_layer(inputs_embeds=embeds)

    def image_features(
        self, inputs: Mapping[str, torch.Tensor], adapter_name: str | None = None, enabled: bool = True
    ) -> torch.Tensor:
        """Normalised image features `(images, dim)` (at least float32) of the processor's outputs `inputs`
        (`pixel_values`, and for SigLIP 2 `pixel_attention_mask` and `spatial_shapes`), with the adapter's vision
        prompts if it has them (the arguments after `inputs` are those of [`prompt_options`])."""
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with prompt_options(adapter_name, enabled):
            return _normalized(features_of(self.base.get_image_features(**inputs)))

    def logits(self, image_features: torch.Tensor, class_features: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities `(images, classes)`, as `CLIPModel`'s `logits_per_image`, for class features
        `(classes, dim)` or per image `(images, classes, dim)`."""
        scale = at_least_fp32(self.base.logit_scale.exp())
        if class_features.dim() == 3:
            return scale * torch.einsum("bd,bcd->bc", image_features, class_features)
        return scale * image_features @ class_features.T


def _normalized(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(at_least_fp32(features), dim=-1)


def _chunked(run: Callable[[int, int], torch.Tensor], total: int, size: int) -> torch.Tensor:
    """`run(start, stop)` over `[0, total)` in chunks of `size`, concatenated; checkpointed when autograd is on."""
    if size >= total:
        return run(0, total)
    starts = range(0, total, size)
    if torch.is_grad_enabled():
        parts = [checkpoint(run, s, min(s + size, total), use_reentrant=False) for s in starts]
    else:
        parts = [run(s, min(s + size, total)) for s in starts]
    return torch.cat(parts)
