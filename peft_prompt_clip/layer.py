"""The module that replaces a text tower's embeddings module and holds the learned context of each adapter, and the
per-call options of a forward (which adapter, which class rows, which conditioning images)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import PromptEmbeddingConfig
from .errors import InvalidAdapterError
from .layout import PromptLayout, write_at
from .peft_private import set_active_adapter


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
    Wraps a text embeddings module (such as `CLIPTextEmbeddings`) and writes an adapter's context vectors into the
    prompt.

    The wrapped module is reused as it is (its token and position tables are neither copied nor trained). A forward
    pre-hook on `owner`, the text model that calls the embeddings, resolves which adapter the call uses (the one named
    by [`prompt_options`], else the active one) and inserts `n_ctx` placeholder tokens into its `input_ids` and
    `attention_mask`, so that the causal mask and the pooling at the end-of-text token follow; this module's forward
    then replaces the placeholders' embeddings with that adapter's context. The resolved call lives in a `ContextVar`
    for the duration of the text model's forward, so concurrent forwards in other threads never see it.

    Deep and vision prompts (IVLP, MaPLe, PromptSRC) are held here too, with hooks that write them in: a forward
    pre-hook on each of the text tower's encoder layers replaces the hidden states at the context's positions with
    that layer's tokens; in the image tower, a forward hook on the embeddings appends the vision tokens, a pre-hook on
    each encoder layer replaces them with that layer's, and a pre-hook on an attention pooling head (SigLIP) keeps
    them out of the pooling. The image tower's call is resolved by a pre-hook on the vision transformer, as the
    text's.

    Args:
        base_layer (`nn.Module`): the text embeddings module, with `token_embedding` and `position_embedding`.
        owner (`nn.Module`): the module whose forward takes `input_ids` and calls `base_layer`.
        adapter_name (`str`): name of the first adapter.
        context (`torch.Tensor`): its initial context, `(n_ctx, width)` or `(num_classes, n_ctx, width)`.
        layout (`PromptLayout`): where its context goes.
        inference_mode (`bool`, *optional*, defaults to `False`): whether the context is frozen.
        text_layers (`Sequence[nn.Module]`, *optional*): the text tower's encoder layers, for deep prompts.
        vision (`VisionTower`, *optional*): the image tower, for vision prompts.
        meta_net (`nn.Module`, *optional*): CoCoOp's meta-net, image feature -> context bias.
        deep (`torch.Tensor`, *optional*): deep text prompts `(prompt_depth - 1, n_ctx, width)`.
        vision_ctx (`torch.Tensor`, *optional*): vision prompts `(vision_prompt_depth, vision_n_ctx, vision width)`.
        coupling (`nn.ModuleList`, *optional*): MaPLe's per-layer maps, text tokens -> vision tokens.
    """

    adapter_layer_names = (
        "prompt_embedding_ctx",
        "prompt_embedding_meta_net",
        "prompt_embedding_deep_ctx",
        "prompt_embedding_vision_ctx",
        "prompt_embedding_coupling",
    )
    other_param_names = ("prompt_layouts",)

    def __init__(
        self,
        base_layer: nn.Module,
        owner: nn.Module,
        adapter_name: str,
        context: torch.Tensor,
        layout: PromptLayout,
        inference_mode: bool = False,
        text_layers: Sequence[nn.Module] = (),
        vision: VisionTower | None = None,
        meta_net: nn.Module | None = None,
        deep: torch.Tensor | None = None,
        vision_ctx: torch.Tensor | None = None,
        coupling: nn.ModuleList | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.prompt_embedding_ctx = nn.ParameterDict({})
        self.prompt_embedding_meta_net = nn.ModuleDict({})
        self.prompt_embedding_deep_ctx = nn.ParameterDict({})
        self.prompt_embedding_vision_ctx = nn.ParameterDict({})
        self.prompt_embedding_coupling = nn.ModuleDict({})
        self.prompt_layouts: dict[str, PromptLayout] = {}
        set_active_adapter(self, adapter_name)
        self.merged_adapters = []
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
        self.update_layer(adapter_name, context, layout, inference_mode, meta_net, deep, vision_ctx, coupling)

    def update_layer(
        self,
        adapter_name: str,
        context: torch.Tensor,
        layout: PromptLayout,
        inference_mode: bool = False,
        meta_net: nn.Module | None = None,
        deep: torch.Tensor | None = None,
        vision_ctx: torch.Tensor | None = None,
        coupling: nn.ModuleList | None = None,
    ) -> None:
        """Add (or replace) the context of `adapter_name`, and its CoCoOp meta-net, deep text prompts, vision prompts
        and MaPLe coupling if it has them."""
        for store in self.adapter_layer_names[1:]:  # a replaced adapter keeps nothing of its predecessor
            if adapter_name in getattr(self, store):
                del getattr(self, store)[adapter_name]
        self.prompt_embedding_ctx[adapter_name] = nn.Parameter(context)
        if meta_net is not None:
            self.prompt_embedding_meta_net[adapter_name] = meta_net
        if deep is not None:
            self.prompt_embedding_deep_ctx[adapter_name] = nn.Parameter(deep)
        if vision_ctx is not None:
            self.prompt_embedding_vision_ctx[adapter_name] = nn.Parameter(vision_ctx)
        if coupling is not None:
            self.prompt_embedding_coupling[adapter_name] = coupling
        if (vision_ctx is not None or coupling is not None) and self._vision is None:
            raise ValueError("Vision prompts need a model with an image tower of a supported family.")
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

    def is_conditional(self, adapter_name: str) -> bool:
        """Whether adapter `adapter_name` has a CoCoOp meta-net (its context depends on the image)."""
        return adapter_name in self.prompt_embedding_meta_net

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
        inputs["input_ids"], inputs["attention_mask"] = layout.expand(input_ids, mask)
        slots = layout.locate(inputs["input_ids"]) if name in self.prompt_embedding_deep_ctx else None
        _CALL.set(_Call(self, name, options, previous, "text", slots))
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
        deep = None if call is None else self.prompt_embedding_deep_ctx.get(call.adapter_name)
        if deep is None or index > deep.shape[0]:
            return None
        return _with_hidden(args, kwargs, lambda h: write_at(h, call.slots, deep[index - 1]))

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
        if call is None or index >= self.vision_depth(call.adapter_name):
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

    def prompts_images(self, adapter_name: str) -> bool:
        """Whether adapter `adapter_name` has vision prompts (its image features depend on it)."""
        return adapter_name in self.prompt_embedding_vision_ctx or adapter_name in self.prompt_embedding_coupling

    def vision_depth(self, adapter_name: str) -> int:
        """How many layers of the image tower get the adapter's vision tokens (0 without vision prompts)."""
        if adapter_name in self.prompt_embedding_coupling:
            return len(self.prompt_embedding_coupling[adapter_name])
        if adapter_name in self.prompt_embedding_vision_ctx:
            return self.prompt_embedding_vision_ctx[adapter_name].shape[0]
        return 0

    def vision_context(self, adapter_name: str, index: int) -> torch.Tensor:
        """The vision tokens `(vision_n_ctx, vision width)` of image layer `index`: the adapter's own, or for MaPLe
        the coupling map of that layer's text tokens (the context for layer 0, the deep prompts after it)."""
        if adapter_name in self.prompt_embedding_coupling:
            if index == 0:
                text = self.prompt_embedding_ctx[adapter_name]
            else:
                text = self.prompt_embedding_deep_ctx[adapter_name][index - 1]
            return self.prompt_embedding_coupling[adapter_name][index](text)
        return self.prompt_embedding_vision_ctx[adapter_name][index]

    @_eager
    def _end_call(self, tower: str, owner: nn.Module, args: tuple, output: Any) -> None:
        call = _CALL.get()
        if call is not None and call.layer is self and call.tower == tower:
            _CALL.set(call.previous)

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
        """The context of each of `batch` texts, `(batch, n_ctx, width)`, for the call's class rows or images."""
        ctx = self.prompt_embedding_ctx[adapter_name]
        if self.is_conditional(adapter_name):
            if options.condition is None:
                raise ValueError(
                    f"Adapter {adapter_name!r} is conditional (CoCoOp): its context depends on the image, so text "
                    "features alone are undefined. Classify with PromptClassifier, encode with "
                    "PromptEncoder.class_features(tokens, image_features=...), or pass the image features with "
                    "prompt_options(condition=...)."
                )
            # the texts are all classes for image 0, then image 1, ...; each image's bias shifts the context
            images = options.condition.shape[0]
            if batch % images:
                raise ValueError(f"{batch} texts cannot be split evenly among {images} conditioning images.")
            bias = self.prompt_embedding_meta_net[adapter_name](options.condition.to(ctx.dtype))
            return ctx[None] + bias.repeat_interleave(batch // images, dim=0)[:, None, :]
        if options.condition is not None:
            raise ValueError(f"Adapter {adapter_name!r} is not conditional: drop the conditioning image features.")
        if ctx.dim() == 2:
            return ctx.expand(batch, -1, -1)
        if options.classes is not None:
            ctx = ctx[options.classes.to(ctx.device)]
        if ctx.shape[0] != batch:
            total = self.prompt_embedding_ctx[adapter_name].shape[0]
            raise ValueError(
                f"This adapter has class-specific context for {total} classes, so it needs the texts of all {total} "
                f"classes in class order (or of the classes named by prompt_options(classes=...)), got {batch} texts."
            )
        return ctx

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


def expected_tensor_counts(config: PromptEmbeddingConfig) -> dict[str, int]:
    """How many tensors an adapter with `config` saves under each of the layer's parameter names."""
    return {
        "prompt_embedding_ctx": 1,
        "prompt_embedding_meta_net": 4 if config.conditional else 0,  # CoCoOp: two Linear layers, weights and biases
        "prompt_embedding_deep_ctx": 1 if config.prompt_depth > 1 else 0,
        "prompt_embedding_vision_ctx": 1 if config.vision_n_ctx and not config.coupled else 0,
        "prompt_embedding_coupling": 2 * config.prompt_depth if config.coupled else 0,  # a Linear per layer
    }


def check_adapter_tensors(tensors: Mapping[str, torch.Tensor], config: PromptEmbeddingConfig, where: str) -> None:
    """The one check of a saved adapter's tensors against its config, before any of them reaches a model: the
    tensors its config implies (context; CoCoOp's meta-net; deep, vision prompts and MaPLe's coupling), all finite
    floats, the context and the deep prompts of the configured shapes.

    Raises:
        `InvalidAdapterError`: naming the file (`where`) and what is wrong.
    """
    expected = expected_tensor_counts(config)
    found = {name: [k for k in tensors if k.endswith(name) or f".{name}." in k] for name in expected}
    if any(len(found[n]) != count for n, count in expected.items()) or len(tensors) != sum(expected.values()):
        wanted = ", ".join(f"{count} {n}" for n, count in expected.items() if count)
        raise InvalidAdapterError(
            f"{where} holds {len(tensors)} tensors ({sorted(tensors)[:6]}); an adapter with this config "
            f"({config.method}) holds {wanted}: the files do not belong together."
        )
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise InvalidAdapterError(f"The tensor {key} in {where} has dtype {tensor.dtype}, not floats.")
        if not bool(tensor.isfinite().all()):
            raise InvalidAdapterError(f"The tensor {key} in {where} holds NaN or infinite values; it cannot be used.")
    context = tensors[found["prompt_embedding_ctx"][0]]
    shape = (config.num_classes,) if config.class_specific else ()
    if context.dim() != len(shape) + 2 or tuple(context.shape[:-1]) != (*shape, config.n_ctx):
        what = f"num_classes={config.num_classes}, " if config.class_specific else ""
        raise InvalidAdapterError(
            f"The context in {where} has shape {tuple(context.shape)}, but adapter_config.json says "
            f"{what}n_ctx={config.n_ctx} (class_specific={config.class_specific}): the files do not belong together."
        )
    for key in found["prompt_embedding_deep_ctx"]:
        deep = tensors[key]
        if tuple(deep.shape) != (config.prompt_depth - 1, config.n_ctx, context.shape[-1]):
            raise InvalidAdapterError(
                f"The deep prompts in {where} have shape {tuple(deep.shape)}, but adapter_config.json says "
                f"prompt_depth={config.prompt_depth}, n_ctx={config.n_ctx} (expected "
                f"{(config.prompt_depth - 1, config.n_ctx, context.shape[-1])})."
            )
    for key in found["prompt_embedding_vision_ctx"]:
        vision = tensors[key]
        if vision.dim() != 3 or tuple(vision.shape[:2]) != (config.vision_prompt_depth, config.vision_n_ctx):
            raise InvalidAdapterError(
                f"The vision prompts in {where} have shape {tuple(vision.shape)}, but adapter_config.json says "
                f"vision_prompt_depth={config.vision_prompt_depth}, vision_n_ctx={config.vision_n_ctx}."
            )
