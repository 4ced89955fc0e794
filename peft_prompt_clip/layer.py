"""The module that replaces a text tower's embeddings module and holds the learned context of each adapter, and the
per-call options of a forward (which adapter, which class rows, which conditioning images)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .layout import PromptLayout, write_at
from .peft_private import set_active_adapter
from .variants import STORES, PromptVariant


@dataclass(frozen=True)
class PromptOptions:
    """Choices for one forward of the text tower; see [`prompt_options`]."""

    adapter_name: str | None = None
    enabled: bool = True
    classes: torch.Tensor | None = None
    condition: torch.Tensor | None = None


# the options of the forwards run in this thread or asyncio task: a ContextVar is per thread and per task by design
_DEFAULT_OPTIONS = PromptOptions()
_OPTIONS: ContextVar[PromptOptions] = ContextVar("peft_prompt_clip_options", default=_DEFAULT_OPTIONS)


@contextmanager
def prompt_options(
    adapter_name: str | None = None,
    enabled: bool = True,
    classes: Sequence[int] | torch.Tensor | None = None,
    condition: torch.Tensor | None = None,
) -> Iterator[None]:
    """
    Per-call choices for the text forwards run inside this block, in this thread (or asyncio task) only: other
    threads running the same model at the same time are not affected, unlike PEFT's `set_adapter` and
    `disable_adapter`, which change the model for everyone.

    Args:
        adapter_name (`str`, *optional*): the adapter whose context is used; by default the model's active one.
        enabled (`bool`, *optional*, defaults to `True`): `False` runs the base model's text tower, no context.
        classes (`Sequence[int]`, *optional*): class-specific context: the texts of a batch are these classes, in this
            order, rather than all classes.
        condition (`torch.Tensor`, *optional*): CoCoOp: normalised image features `(images, dim)`; the texts of a batch
            are then the class prompts once per image, image-major, each shifted by its image's meta-net bias.

    Example:

    ```py
    >>> from peft_prompt_clip import prompt_options
    >>> with prompt_options(enabled=False):
    ...     pass  # model.get_text_features(...) here is the base model's, in this thread only

    ```
    """
    rows = None if classes is None else torch.as_tensor(classes, dtype=torch.long)
    token = _OPTIONS.set(PromptOptions(adapter_name, enabled, rows, condition))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


@dataclass(frozen=True)
class _Call:
    """One forward of a tower, resolved once by the pre-hook on the tower and read by the hooks inside it."""

    layer: PromptEmbeddingLayer
    adapter_name: str | None  # None: the base model's tower, no prompts
    options: PromptOptions
    previous: _Call | None
    tower: str = "text"  # "text" or "vision"
    slots: torch.Tensor | None = None  # text: the context's positions `(batch, n_ctx)` in the expanded prompts
    prepared: Mapping[type, Any] = field(default_factory=dict)  # text: what the adapter's parts need of the texts
    visited: list[int] = field(default_factory=list)  # the tower's layers whose hooks ran in this call


@dataclass(frozen=True)
class VisionTower:
    """The parts of an image tower that vision prompts hook into (found by class in `model.py`).

    Args:
        owner (`nn.Module`): the vision transformer, whose forward runs the others.
        embeddings (`nn.Module`): its patch and position embeddings; the vision tokens are appended to its output.
        layers (`Sequence[nn.Module]`): its encoder layers.
        head (`nn.Module`, *optional*): an attention pooling head over all tokens (SigLIP), which the vision tokens
            are kept out of.
    """

    owner: nn.Module
    embeddings: nn.Module
    layers: Sequence[nn.Module]
    head: nn.Module | None = None


_CALL: ContextVar[_Call | None] = ContextVar("peft_prompt_clip_call", default=None)

#: The hooks run eagerly under `torch.compile`: which adapter a call uses, and what it writes, is decided per call (by
#: `prompt_options`, `set_adapter`, adapters added after compiling), which compiled code would not re-check
_eager = torch.compiler.disable


def find_prompt_layer(model: nn.Module) -> PromptEmbeddingLayer | None:
    """The prompt layer of `model` (a `PeftModel` or the model it wraps), or None when it has no prompt adapter."""
    return next((m for m in model.modules() if isinstance(m, PromptEmbeddingLayer)), None)


class PromptEmbeddingLayer(nn.Module, BaseTunerLayer):
    """
    Wraps a text embeddings module (such as `CLIPTextEmbeddings`) and writes each adapter's prompt tokens: the parts of
    an adapter are [`PromptVariant`]s (shared or class-specific context, CoCoOp's meta-net, deep text tokens, vision
    tokens, MaPLe's coupling, TCP's class-aware tokens), whose tensors this layer holds, one store per part keyed by
    adapter name, and whose tokens it writes through [`text_tokens`] and [`vision_context`], the one writer that the
    encoder's shared-prefix path uses too.

    The wrapped module is reused as it is (its token and position tables are neither copied nor trained). A forward
    pre-hook on `owner`, the text model that calls the embeddings, resolves which adapter the call uses (the one named
    by [`prompt_options`], else the active one) and inserts `n_ctx` placeholder tokens into its `input_ids` and
    `attention_mask`, so that the causal mask and the pooling at the end-of-text token follow; this module's forward
    then replaces the placeholders' embeddings with that adapter's context. The resolved call lives in a `ContextVar`
    for the duration of the text model's forward, so concurrent forwards in other threads never see it.

    Deeper tokens are written by hooks added when the layer is created (so that `torch.compile` after switching
    adapters sees them): a forward pre-hook on each of the text tower's encoder layers replaces the hidden states at
    the context's positions with that layer's tokens; in the image tower, a forward hook on the embeddings appends
    the vision tokens, a pre-hook on each encoder layer replaces them with that layer's, and a pre-hook on an
    attention pooling head (SigLIP) keeps them out of the pooling. The image tower's call is resolved by a pre-hook on
    the vision transformer, as the text's.

    Args:
        base_layer (`nn.Module`): the text embeddings module, with `token_embedding` and `position_embedding`.
        owner (`nn.Module`): the module whose forward takes `input_ids` and calls `base_layer`.
        adapter_name (`str`): name of the first adapter.
        parts (`Mapping[type[PromptVariant], torch.Tensor | nn.Module]`): its parts' initial tensors or modules.
        layout (`PromptLayout`): where its context goes.
        inference_mode (`bool`, *optional*, defaults to `False`): whether its tensors are frozen.
        text_layers (`Sequence[nn.Module]`, *optional*): the text tower's encoder layers, for deep prompts.
        vision (`VisionTower`, *optional*): the image tower, for vision prompts.
    """

    adapter_layer_names = tuple(STORES)
    other_param_names = ("prompt_layouts", "prompt_variants")

    def __init__(
        self,
        base_layer: nn.Module,
        owner: nn.Module,
        adapter_name: str,
        parts: Mapping[type[PromptVariant], torch.Tensor | nn.Module],
        layout: PromptLayout,
        inference_mode: bool = False,
        text_layers: Sequence[nn.Module] = (),
        vision: VisionTower | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        for store, is_module in STORES.items():
            setattr(self, store, nn.ModuleDict({}) if is_module else nn.ParameterDict({}))
        self.prompt_layouts: dict[str, PromptLayout] = {}
        self.prompt_variants: dict[str, tuple[type[PromptVariant], ...]] = {}
        set_active_adapter(self, adapter_name)
        self.merged_adapters = []
        self._owner_call = owner.__call__  # a plain reference: the text model is not a submodule of its embeddings
        self._owner_signature = inspect.signature(owner.forward)
        self._owner_var_kwargs = next(
            (p.name for p in self._owner_signature.parameters.values() if p.kind is p.VAR_KEYWORD), None
        )
        self._hooks = [
            owner.register_forward_pre_hook(self._begin_call, with_kwargs=True),
            owner.register_forward_hook(partial(self._end_call, "text"), always_call=True),
        ]
        self._text_layers = list(text_layers)
        self._vision = vision
        self._hook_text_layers()
        if vision is not None:
            self._hook_vision_tower()
        self.update_layer(adapter_name, parts, layout, inference_mode)

    def update_layer(
        self,
        adapter_name: str,
        parts: Mapping[type[PromptVariant], torch.Tensor | nn.Module],
        layout: PromptLayout,
        inference_mode: bool = False,
    ) -> None:
        """Add (or replace) adapter `adapter_name`, made of `parts`: each variant's initial tensor or module."""
        if any(v.prompts_images for v in parts) and self._vision is None:
            raise ValueError("Vision prompts need a model with an image tower of a supported family.")
        for store in self.adapter_layer_names:  # a replaced adapter keeps nothing of its predecessor
            if adapter_name in getattr(self, store):
                del getattr(self, store)[adapter_name]
        for variant, value in parts.items():
            getattr(self, variant.store)[adapter_name] = value if variant.is_module else nn.Parameter(value)
        self.prompt_variants[adapter_name] = tuple(parts)
        self.prompt_layouts[adapter_name] = layout
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _hook_text_layers(self) -> None:
        for index, layer in enumerate(self._text_layers):
            if index:  # the input's tokens are the context, written by this module's forward
                self._hooks.append(layer.register_forward_pre_hook(partial(self._deep_text, index), with_kwargs=True))

    def _hook_vision_tower(self) -> None:
        tower = self._vision
        self._hooks += [
            tower.owner.register_forward_pre_hook(self._begin_vision_call),
            tower.owner.register_forward_hook(partial(self._end_call, "vision"), always_call=True),
            tower.embeddings.register_forward_hook(self._append_vision),
        ]
        for index, layer in enumerate(tower.layers):
            if index:
                hook = partial(self._deep_vision, index)
                self._hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        if tower.head is not None:
            self._hooks.append(tower.head.register_forward_pre_hook(self._drop_vision, with_kwargs=True))

    def resolve(self, options: PromptOptions | None = None) -> str | None:
        """The adapter a forward with `options` (default: this thread's [`prompt_options`]) uses, or None for the
        base model: the one the options name, else the model's single active adapter unless adapters are disabled."""
        options = _OPTIONS.get() if options is None else options
        if not options.enabled:
            return None
        if options.adapter_name is not None:
            if options.adapter_name not in self.prompt_embedding_ctx:
                known = list(self.prompt_embedding_ctx)
                raise ValueError(f"No prompt adapter named {options.adapter_name!r}; this model has {known}.")
            return options.adapter_name
        if self.disable_adapters or not self.active_adapters:
            return None
        if len(self.active_adapters) > 1:
            raise ValueError(
                f"Only one prompt adapter can be active at a time, got {self.active_adapters}; "
                "call set_adapter() with a single name, or name one per call with prompt_options(adapter_name=...)."
            )
        return self.active_adapters[0]

    def embedding_tables(self) -> dict[str, torch.Tensor]:
        """The embeddings of each tower this layer writes tokens into, whose lengths bound a loaded adapter's tokens:
        the text tower's token embeddings, and the image tower's position embeddings where it has one."""
        tables = {"text": self.token_embedding.weight}
        if self._vision is not None:
            tables["vision"] = self._vision.embeddings.position_embedding.weight
        return tables

    def is_conditional(self, adapter_name: str) -> bool:
        """Whether adapter `adapter_name`'s context depends on the image (CoCoOp)."""
        return any(v.conditional for v in self.prompt_variants[adapter_name])

    def prompts_images(self, adapter_name: str) -> bool:
        """Whether adapter `adapter_name` has vision prompts (its image features depend on it)."""
        return any(v.prompts_images for v in self.prompt_variants[adapter_name])

    def per_class(self, adapter_name: str) -> bool:
        """Whether adapter `adapter_name` writes other tokens into each class's prompt (CSC, TCP)."""
        return any(v.per_class for v in self.prompt_variants[adapter_name])

    def writes_deep(self, adapter_name: str) -> bool:
        """Whether adapter `adapter_name` writes tokens before text layers past the input."""
        return any(v.deep for v in self.prompt_variants[adapter_name])

    def prepare(self, adapter_name: str, input_ids: torch.Tensor, mask: torch.Tensor | None) -> dict[type, Any]:
        """What the adapter's parts need of a call's texts `(batch, length)`, before the context is inserted."""
        variants = self.prompt_variants[adapter_name]
        return {v: v.prepare(self, adapter_name, input_ids, mask) for v in variants if v.prepare_texts}

    def base_text_embeddings(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The base text tower's pooled output `(batch, width)` of texts `input_ids` (no adapter, no gradient)."""
        with torch.no_grad(), prompt_options(enabled=False):
            output = self._owner_call(input_ids=input_ids, attention_mask=mask)
        return output.pooler_output if hasattr(output, "pooler_output") else output[1]

    def text_tokens(self, adapter_name: str, index: int, prepared: Mapping[type, Any]) -> torch.Tensor | None:
        """The tokens the adapter writes at the context's positions before text layer `index` (>= 1): `(n_ctx,
        width)`, or per text `(batch, n_ctx, width)`; None where it writes none. `prepared`: [`prepare`]'s."""
        for variant in self.prompt_variants[adapter_name]:
            tokens = variant.text_tokens(self, adapter_name, index, prepared.get(variant))
            if tokens is not None:
                return tokens
        return None

    @_eager
    def _begin_call(self, owner: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        options = _OPTIONS.get()
        previous = self._enclosing("text")
        name = self.resolve(options)
        inputs = self._owner_signature.bind_partial(*args, **kwargs).arguments
        inputs.update(inputs.pop(self._owner_var_kwargs, {}))
        input_ids = inputs.get("input_ids")
        if name is None or input_ids is None:  # every call of the owner sets its own state: a pass-through here
            _CALL.set(_Call(self, None, options, previous))
            return None
        if inputs.get("position_ids") is not None:
            raise ValueError(
                "position_ids cannot be passed with an active prompt adapter: the adapter inserts its context and "
                "numbers the positions itself. Drop position_ids, or run under disable_adapter()."
            )
        input_ids = input_ids.view(-1, input_ids.shape[-1])
        mask = inputs.get("attention_mask")
        if mask is not None:
            mask = mask.view(-1, mask.shape[-1])
        layout = self.prompt_layouts[name]
        prepared = self.prepare(name, input_ids, mask)
        inputs["input_ids"], inputs["attention_mask"] = layout.expand(input_ids, mask)
        slots = layout.locate(inputs["input_ids"]) if self.writes_deep(name) else None
        _CALL.set(_Call(self, name, options, previous, "text", slots, prepared))
        return (), inputs

    @_eager
    def _begin_vision_call(self, owner: nn.Module, args: tuple) -> None:
        previous = self._enclosing("vision")
        options = _OPTIONS.get()
        name = self.resolve(options)
        if name is not None and not self.prompts_images(name):
            name = None  # this adapter leaves the image tower as it is
        _CALL.set(_Call(self, name, options, previous, "vision"))

    def _enclosing(self, tower: str) -> _Call | None:
        """The call a new call of `tower` runs inside: the current one, unless it is this layer's call of the same
        tower left by a forward interrupted past its end hook (torch runs always_call hooks on Exception, not on
        KeyboardInterrupt); a call of the other tower in progress encloses this one, and stays."""
        previous = _CALL.get()
        if previous is not None and previous.layer is self and previous.tower == tower:
            return previous.previous
        return previous

    def _current(self, tower: str) -> _Call | None:
        """This layer's call of `tower` in progress, if it uses an adapter."""
        call = _CALL.get()
        if call is None or call.layer is not self or call.tower != tower or call.adapter_name is None:
            return None
        return call

    @_eager
    def _deep_text(self, index: int, layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        call = self._current("text")
        if call is None:
            return None
        call.visited.append(index)
        tokens = self.text_tokens(call.adapter_name, index, call.prepared)
        if tokens is None:
            return None
        return _with_hidden(args, kwargs, lambda h: write_at(h, call.slots, tokens))

    @_eager
    def _append_vision(self, embeddings: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        call = self._current("vision")
        if call is None:
            return None
        tokens = self.vision_context(call.adapter_name, 0).to(output.dtype)
        return torch.cat([output, tokens.expand(output.shape[0], -1, -1)], dim=1)

    @_eager
    def _deep_vision(self, index: int, layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        call = self._current("vision")
        if call is None:
            return None
        call.visited.append(index)
        if index >= self.vision_depth(call.adapter_name):
            return None
        tokens = self.vision_context(call.adapter_name, index)
        count = tokens.shape[0]
        return _with_hidden(
            args, kwargs, lambda h: torch.cat([h[:, :-count], tokens.to(h.dtype).expand(h.shape[0], -1, -1)], dim=1)
        )

    @_eager
    def _drop_vision(self, head: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        call = self._current("vision")
        if call is None:
            return None
        count = self.vision_context(call.adapter_name, 0).shape[0]
        return _with_hidden(args, kwargs, lambda h: h[:, :-count])

    def vision_depth(self, adapter_name: str) -> int:
        """How many layers of the image tower get the adapter's vision tokens (0 without vision prompts)."""
        return max(v.vision_depth(self, adapter_name) for v in self.prompt_variants[adapter_name])

    def vision_context(self, adapter_name: str, index: int) -> torch.Tensor:
        """The vision tokens `(vision_n_ctx, vision width)` of image layer `index` (0: appended after the
        embeddings): the adapter's own, or for MaPLe the coupling map of that layer's text tokens."""
        for variant in self.prompt_variants[adapter_name]:
            tokens = variant.vision_tokens(self, adapter_name, index)
            if tokens is not None:
                return tokens
        raise ValueError(f"Adapter {adapter_name!r} has no vision tokens for image layer {index}.")

    @_eager
    def _end_call(self, tower: str, owner: nn.Module, args: tuple, output: Any) -> None:
        call = _CALL.get()
        if call is None or call.layer is not self or call.tower != tower:
            return
        _CALL.set(call.previous)
        if output is not None and call.adapter_name is not None and self._skipped_layers(call):  # None: it raised
            raise RuntimeError(
                f"torch.compile ran the {tower} tower without the prompt hooks of some of its layers (seen with "
                "transformers 4, whose encoder layers dynamo compiles on their own), so the deeper tokens of adapter "
                f"{call.adapter_name!r} were not written. Upgrade to transformers >= 5, or run this "
                "model uncompiled."
            )

    def _skipped_layers(self, call: _Call) -> bool:
        """Whether a call that writes tokens past a tower's input ran without the hooks of some of its layers."""
        if call.tower == "text":
            return call.slots is not None and len(call.visited) < len(self._text_layers) - 1
        return self.vision_depth(call.adapter_name) > 1 and len(call.visited) < len(self._vision.layers) - 1

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        call = _CALL.get()
        if call is None or call.layer is not self or call.adapter_name is None or input_ids is None:
            return self.base_layer(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)
        embeds = self.embed(input_ids, call.adapter_name, call.options)
        return self.base_layer(inputs_embeds=embeds, position_ids=position_ids)

    def embed(self, input_ids: torch.Tensor, adapter_name: str, options: PromptOptions) -> torch.Tensor:
        """Token embeddings `(batch, length, width)` of ids expanded by the adapter's layout, with its context in the
        context slots (position embeddings not yet added)."""
        positions = self.prompt_layouts[adapter_name].locate(input_ids)
        embeds = self.base_layer.token_embedding(input_ids)
        return write_at(embeds, positions, self.context(adapter_name, embeds.shape[0], options))

    def context(self, adapter_name: str, batch: int, options: PromptOptions) -> torch.Tensor:
        """The context of each of `batch` texts, `(batch, n_ctx, width)`, for the call's class rows or images: each of
        the adapter's parts in turn makes it from the one before (CoCoOp's meta-net shifts the shared context)."""
        if options.condition is not None and not self.is_conditional(adapter_name):
            raise ValueError(f"Adapter {adapter_name!r} is not conditional: drop the conditioning image features.")
        context = None
        for variant in self.prompt_variants[adapter_name]:
            context = variant.input_context(self, adapter_name, context, batch, options)
        return context.expand(batch, -1, -1) if context.dim() == 2 else context

    def __getattr__(self, name: str) -> Any:
        # the text model reaches into its embeddings (get_input_embeddings() returns `embeddings.token_embedding`)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "A prompt adapter adds tokens to the input; it has no weight update to merge. Use unload() to get the "
            "base model back, or keep the adapter (it costs a few tokens per prompt)."
        )

    def unwrap(self) -> nn.Module:
        """Detach from the towers and return the original embeddings module (used by `unload()`)."""
        for hook in self._hooks:
            hook.remove()
        return self.base_layer

    def __repr__(self) -> str:
        return "prompt_embedding." + super().__repr__()


def _with_hidden(args: tuple, kwargs: dict[str, Any], change: Any) -> tuple:
    """A layer's inputs with its hidden states (the first argument, or `hidden_states`) changed by `change`."""
    if args:
        return (change(args[0]), *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else "hidden_state"
    return args, {**kwargs, key: change(kwargs[key])}
