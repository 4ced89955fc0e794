"""The module that replaces a text tower's embeddings module and holds the learned context of each adapter."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .layout import PromptLayout


def find_prompt_layer(model: nn.Module) -> PromptEmbeddingLayer | None:
    """The prompt layer of `model` (a `PeftModel` or the model it wraps), or None when it has no prompt adapter."""
    return next((m for m in model.modules() if isinstance(m, PromptEmbeddingLayer)), None)


class PromptEmbeddingLayer(nn.Module, BaseTunerLayer):
    """
    Wraps a text embeddings module (such as `CLIPTextEmbeddings`) and writes the active adapter's context vectors into
    the prompt.

    The wrapped module is reused as it is (its token and position tables are neither copied nor trained). A forward
    pre-hook on `owner`, the text model that calls the embeddings, inserts `n_ctx` placeholder tokens into its
    `input_ids` and `attention_mask`, so that the causal mask and the pooling at the end-of-text token follow; this
    module then replaces the placeholders' embeddings with the context. Both steps are stateless, so one model can
    serve concurrent forwards.

    Args:
        base_layer (`nn.Module`): the text embeddings module, with `token_embedding` and `position_embedding`.
        owner (`nn.Module`): the module whose forward takes `input_ids` and calls `base_layer`.
        adapter_name (`str`): name of the first adapter.
        context (`torch.Tensor`): its initial context, `(n_ctx, width)` or `(num_classes, n_ctx, width)`.
        layout (`PromptLayout`): where its context goes.
        inference_mode (`bool`, *optional*, defaults to `False`): whether the context is frozen.
    """

    adapter_layer_names = ("prompt_embedding_ctx", "prompt_embedding_meta_net")
    other_param_names = ("prompt_layouts",)

    def __init__(
        self,
        base_layer: nn.Module,
        owner: nn.Module,
        adapter_name: str,
        context: torch.Tensor,
        layout: PromptLayout,
        inference_mode: bool = False,
        meta_net: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.prompt_embedding_ctx = nn.ParameterDict({})
        self.prompt_embedding_meta_net = nn.ModuleDict({})
        self.prompt_layouts: dict[str, PromptLayout] = {}
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self.max_positions = base_layer.position_embedding.num_embeddings
        self._class_rows: torch.Tensor | None = None
        self._condition: torch.Tensor | None = None
        self._owner_signature = inspect.signature(owner.forward)
        self._owner_var_kwargs = next(
            (p.name for p in self._owner_signature.parameters.values() if p.kind is p.VAR_KEYWORD), None
        )
        self._owner_hook = owner.register_forward_pre_hook(self._expand_inputs, with_kwargs=True)
        self.update_layer(adapter_name, context, layout, inference_mode=inference_mode, meta_net=meta_net)

    def update_layer(
        self,
        adapter_name: str,
        context: torch.Tensor,
        layout: PromptLayout,
        inference_mode: bool = False,
        meta_net: nn.Module | None = None,
    ) -> None:
        """Add (or replace) the context of `adapter_name`, and its CoCoOp meta-net if it has one."""
        self.prompt_embedding_ctx[adapter_name] = nn.Parameter(context)
        if meta_net is not None:
            self.prompt_embedding_meta_net[adapter_name] = meta_net
        self.prompt_layouts[adapter_name] = layout
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _active_name(self) -> str | None:
        if self.disable_adapters or not self.active_adapters:
            return None
        if len(self.active_adapters) > 1:
            raise ValueError(
                f"Only one prompt adapter can be active at a time, got {self.active_adapters}; "
                "call set_adapter() with a single name."
            )
        return self.active_adapters[0]

    def _expand_inputs(self, owner: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        name = self._active_name()
        if name is None:
            return None
        inputs = self._owner_signature.bind_partial(*args, **kwargs).arguments
        inputs.update(inputs.pop(self._owner_var_kwargs, {}))
        input_ids = inputs.get("input_ids")
        if input_ids is None:
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
        inputs["input_ids"], inputs["attention_mask"] = self.prompt_layouts[name].expand(
            input_ids, mask, self.max_positions
        )
        return (), inputs

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        name = self._active_name()
        if name is None or input_ids is None:
            return self.base_layer(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)
        positions = self.prompt_layouts[name].locate(input_ids)
        embeds = self.base_layer.token_embedding(input_ids)
        batch, _, width = embeds.shape
        ctx = self.prompt_embedding_ctx[name]
        if name in self.prompt_embedding_meta_net and self._condition is not None:
            # CoCoOp: the texts are all classes for image 0, then image 1, ...; each image's bias shifts the context
            images = self._condition.shape[0]
            if batch % images:
                raise ValueError(f"{batch} texts cannot be split evenly among {images} conditioning images.")
            bias = self.prompt_embedding_meta_net[name](self._condition.to(ctx.dtype))
            ctx = ctx[None] + bias.repeat_interleave(batch // images, dim=0)[:, None, :]
        elif ctx.dim() == 3 and self._class_rows is not None:
            ctx = ctx[self._class_rows.to(ctx.device)]
        ctx = ctx.to(embeds.dtype)
        if ctx.dim() == 2:
            ctx = ctx.expand(batch, -1, -1)
        elif ctx.shape[0] != batch:
            raise ValueError(
                f"This adapter has class-specific context for {ctx.shape[0]} classes, so it needs the texts of all "
                f"{ctx.shape[0]} classes in class order, got {batch} texts."
            )
        embeds = embeds.scatter(1, positions[..., None].expand(-1, -1, width), ctx)
        return self.base_layer(inputs_embeds=embeds, position_ids=position_ids)

    @contextmanager
    def selecting_classes(self, indices: Sequence[int]) -> Iterator[None]:
        """Within this block, the texts of a batch are the classes `indices` (in that order) rather than all classes:
        class-specific context is taken from those rows. Used to encode many classes in chunks; not thread-safe."""
        self._class_rows = torch.as_tensor(list(indices), dtype=torch.long)
        try:
            yield
        finally:
            self._class_rows = None

    @contextmanager
    def conditioned_on(self, image_features: torch.Tensor) -> Iterator[None]:
        """Within this block, a CoCoOp adapter shifts its context by its meta-net's output for `image_features`
        (`(images, dim)`, normalised); a text batch then holds the class prompts once per image, image-major.
        Not thread-safe by itself."""
        self._condition = image_features
        try:
            yield
        finally:
            self._condition = None

    def is_conditional(self, name: str | None = None) -> bool:
        """Whether adapter `name` (default: the active one) has a CoCoOp meta-net."""
        return (name or self.active_adapters[0]) in self.prompt_embedding_meta_net

    @contextmanager
    def using_adapter(self, name: str) -> Iterator[None]:
        """Within this block, forwards use adapter `name`, without PEFT's `set_adapter` (which also changes which
        parameters train). Not thread-safe by itself: the classifier holds a lock around it."""
        if name not in self.prompt_embedding_ctx:
            raise ValueError(f"No prompt adapter named {name!r}; this model has {list(self.prompt_embedding_ctx)}.")
        previous = self._active_adapter
        self._active_adapter = name
        try:
            yield
        finally:
            self._active_adapter = previous

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
        """Detach from the text model and return the original embeddings module (used by `unload()`)."""
        self._owner_hook.remove()
        return self.base_layer

    def __repr__(self) -> str:
        return "prompt_embedding." + super().__repr__()
