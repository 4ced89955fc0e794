"""The parts a prompt adapter is made of, one class each, in the shape of PEFT's `LoraVariant`: the shared context
(CoOp), class-specific context (CSC), CoCoOp's meta-net, deep text tokens, vision tokens, MaPLe's coupling and TCP's
class-aware tokens. A variant owns its config fields (their checks), its tensors (creation, initialisation, the checks
of a saved file) and the tokens it writes; [`PromptEmbeddingLayer`] holds the variants of each adapter and asks them,
in both of the paths that encode prompts (its hooks, and the encoder's shared prefix)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidAdapterError

if TYPE_CHECKING:
    from .config import PromptEmbeddingConfig
    from .layer import PromptEmbeddingLayer, PromptOptions, VisionTower

INIT_STD = 0.02  # CoOp's random initialisation (and VPT's, MaPLe's, PromptSRC's): normal with std 0.02
CONTEXT = "prompt_embedding_ctx"  # the store of the context, which every adapter has


@dataclass
class Build:
    """What a variant's creation reads of the model it is added to.

    Args:
        config ([`PromptEmbeddingConfig`]): the adapter's completed config.
        model (`nn.Module`): the whole model.
        embeddings (`nn.Module`): the text embeddings module (its token table sets the width and the device).
        text_layers (`Sequence[nn.Module]`): the text tower's encoder layers.
        vision ([`VisionTower`], *optional*): the image tower, when the model has one of a supported family.
        init_ids (`list[int]`, *optional*): the token ids of `ctx_init`.
    """

    config: PromptEmbeddingConfig
    model: nn.Module
    embeddings: nn.Module
    text_layers: Sequence[nn.Module]
    vision: VisionTower | None = None
    init_ids: list[int] | None = None

    def __post_init__(self) -> None:
        # the tensors past the context draw from one stream of their own, in the order of VARIANTS, so that adding
        # depth leaves the context as it was
        self.stream = torch.Generator().manual_seed(self.config.init_seed + 1)

    @property
    def width(self) -> int:
        return self.embeddings.token_embedding.weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.embeddings.token_embedding.weight.device

    @contextmanager
    def drawing(self) -> Iterator[None]:
        """Run torch's global random generator (which `nn.Linear` initialises from) from the stream, and advance it."""
        with torch.random.fork_rng(devices=[]):
            torch.random.set_rng_state(self.stream.get_state())
            yield
            self.stream.set_state(torch.random.get_rng_state())

    def module(self, module: nn.Module) -> nn.Module:
        """`module`, made on the CPU (the same seeded values on any device), on the model's device; left on the meta
        device where `low_cpu_mem_usage` put its parameters (the loaded weights are then assigned in their place)."""
        return module if any(p.is_meta for p in module.parameters()) else module.to(self.device)


class PromptVariant:
    """One part of a prompt adapter. Subclasses set the class attributes and override what they do; everything is a
    classmethod, as in PEFT's `LoraVariant`, and reads the adapter's tensors from the layer by the adapter's name.

    Attributes:
        title (`str`): what users call the part, in messages.
        store (`str`): the layer's attribute holding the part's tensor or module per adapter (the saved keys' part).
        is_module (`bool`): the part is a module (an `nn.ModuleDict` store), not one tensor (an `nn.ParameterDict`).
        fields (`tuple[str, ...]`): the config fields the part reads (the CLI's flags for it).
        alone (`bool`): the part writes tokens per class or per image, and combines with the shared context only.
        per_class (`bool`): the tokens it writes differ per class prompt (a prefix shared by the prompts ends before
            the context).
        conditional (`bool`): its tokens depend on the image (the class features need the image features).
        deep (`bool`): it writes tokens before text layers past the input (`text_tokens`).
        prepare_texts (`bool`): it needs something of each call's texts (`prepare`).
        prompts_images (`bool`): it writes tokens into the image tower.
        bound (`str`, *optional*): the tower its tokens go into, `"text"` or `"vision"`, whose own embeddings bound
            the length of the tokens a loaded file can make it write (see `longest_token` and `MAX_TOKEN_SCALE`).
    """

    title: ClassVar[str]
    store: ClassVar[str]
    is_module: ClassVar[bool] = False
    fields: ClassVar[tuple[str, ...]] = ()
    alone: ClassVar[bool] = False
    per_class: ClassVar[bool] = False
    conditional: ClassVar[bool] = False
    deep: ClassVar[bool] = False
    prepare_texts: ClassVar[bool] = False
    prompts_images: ClassVar[bool] = False
    bound: ClassVar[str | None] = None

    @classmethod
    def applies(cls, config: PromptEmbeddingConfig) -> bool:
        """Whether an adapter with `config` has this part."""
        raise NotImplementedError

    @classmethod
    def settle_config(cls, config: PromptEmbeddingConfig) -> None:
        """Refuse values of the part's fields that do not go together (their types are checked by the config), and set
        the fields the part determines from the others (MaPLe's vision fields are its text ones)."""

    @classmethod
    def create(cls, build: Build) -> torch.Tensor | nn.Module:
        """The part's initial tensor or module for the model of `build`."""
        raise NotImplementedError

    @classmethod
    def tensor_count(cls, config: PromptEmbeddingConfig) -> int:
        """How many tensors the part saves."""
        return 1

    @classmethod
    def check_tensors(
        cls, tensors: Mapping[str, torch.Tensor], config: PromptEmbeddingConfig, where: str, width: int
    ) -> None:
        """Refuse saved tensors of this part whose shapes disagree with `config` (`width`: the context's)."""

    @classmethod
    def longest_token(cls, tensors: Mapping[str, torch.Tensor], text_token: float) -> float:
        """The length of the longest token the part's loaded `tensors` can write (an upper bound): by default they are
        the tokens; a map bounds it by its weights (`text_token`: the longest of the text tokens it may map)."""
        return max(float(t.detach().float().norm(dim=-1).max()) for t in tensors.values())

    @classmethod
    def input_context(
        cls, layer: PromptEmbeddingLayer, name: str, context: torch.Tensor | None, batch: int, options: PromptOptions
    ) -> torch.Tensor | None:
        """The context written into the text tower's input, given the one of the parts before it: `(n_ctx, width)`
        for all texts, or `(batch, n_ctx, width)`."""
        return context

    @classmethod
    def prepare(
        cls, layer: PromptEmbeddingLayer, name: str, input_ids: torch.Tensor, mask: torch.Tensor | None
    ) -> Any:
        """What the part needs of a call's texts `(batch, length)` (before the context is inserted), computed once
        per call of the text tower and passed to `text_tokens`."""
        return None

    @classmethod
    def text_tokens(cls, layer: PromptEmbeddingLayer, name: str, index: int, prepared: Any) -> torch.Tensor | None:
        """The tokens `(n_ctx, width)`, or per text `(batch, n_ctx, width)`, that replace the hidden states at the
        context's positions before text layer `index` (>= 1); None where the part writes none."""
        return None

    @classmethod
    def vision_tokens(cls, layer: PromptEmbeddingLayer, name: str, index: int) -> torch.Tensor | None:
        """The tokens `(vision_n_ctx, vision width)` of image layer `index` (0: appended after the embeddings)."""
        return None

    @classmethod
    def vision_depth(cls, layer: PromptEmbeddingLayer, name: str) -> int:
        """How many image layers get the part's tokens."""
        return 0


class _Context(PromptVariant):
    store = CONTEXT
    bound = "text"

    @classmethod
    def shape(cls, config: PromptEmbeddingConfig) -> tuple[int, ...]:
        raise NotImplementedError

    @classmethod
    def create(cls, build: Build) -> torch.Tensor:
        """CoOp's initialisation: normal (std 0.02, seeded by `init_seed`), the last vectors set to the token
        embeddings of `ctx_init`. It stays float32 whatever the base model's dtype: the updates of a few thousand
        parameters are small, and bf16/fp16 would round them away; it is cast to the embeddings' dtype in the
        forward."""
        config = build.config
        generator = torch.Generator().manual_seed(config.init_seed)
        context = torch.randn(*cls.shape(config), config.n_ctx, build.width, generator=generator) * INIT_STD
        if build.init_ids:
            ids = torch.tensor(build.init_ids, device=build.device)
            with torch.no_grad():
                words = build.embeddings.token_embedding(ids).float().cpu()
            context[..., config.n_ctx - len(words) :, :] = words
        return context.to(build.device)

    @classmethod
    def check_tensors(
        cls, tensors: Mapping[str, torch.Tensor], config: PromptEmbeddingConfig, where: str, width: int
    ) -> None:
        for context in tensors.values():
            shape = cls.shape(config)
            if context.dim() != len(shape) + 2 or tuple(context.shape[:-1]) != (*shape, config.n_ctx):
                what = f"num_classes={config.num_classes}, " if config.class_specific else ""
                raise InvalidAdapterError(
                    f"The context in {where} has shape {tuple(context.shape)}, but adapter_config.json says "
                    f"{what}n_ctx={config.n_ctx} (class_specific={config.class_specific}): the files do not belong "
                    "together."
                )


class SharedContext(_Context):
    """CoOp's context: `n_ctx` vectors shared by every class prompt."""

    title = "shared context"
    fields = ("n_ctx", "ctx_init", "class_token_position")

    @classmethod
    def applies(cls, config: PromptEmbeddingConfig) -> bool:
        return not config.class_specific

    @classmethod
    def shape(cls, config: PromptEmbeddingConfig) -> tuple[int, ...]:
        return ()

    @classmethod
    def input_context(
        cls, layer: PromptEmbeddingLayer, name: str, context: torch.Tensor | None, batch: int, options: PromptOptions
    ) -> torch.Tensor:
        return layer.prompt_embedding_ctx[name]


class ClassContext(_Context):
    """CoOp's class-specific context (CSC): `n_ctx` vectors of each class's own."""

    title = "class-specific context"
    fields = ("class_specific",)
    alone = per_class = True

    @classmethod
    def applies(cls, config: PromptEmbeddingConfig) -> bool:
        return config.class_specific

    @classmethod
    def settle_config(cls, config: PromptEmbeddingConfig) -> None:
        if config.num_classes is None:
            raise ValueError("class_specific=True learns one context per class: set num_classes or class_names.")

    @classmethod
    def shape(cls, config: PromptEmbeddingConfig) -> tuple[int, ...]:
        return (config.num_classes,)

    @classmethod
    def input_context(
        cls, layer: PromptEmbeddingLayer, name: str, context: torch.Tensor | None, batch: int, options: PromptOptions
    ) -> torch.Tensor:
        context = layer.prompt_embedding_ctx[name]
        total = context.shape[0]
        if options.classes is not None:
            context = context[options.classes.to(context.device)]
        if context.shape[0] != batch:
            raise ValueError(
                f"This adapter has class-specific context for {total} classes, so it needs the texts of all {total} "
                f"classes in class order (or of the classes named by prompt_options(classes=...)), got {batch} texts."
            )
        return context


class MetaNet(PromptVariant):
    """CoCoOp's meta-net (Zhou et al., CVPR 2022): each image's feature is mapped to a bias added to every context
    vector: Linear(d, d/r), ReLU, Linear(d/r, width)."""

    title = "conditional context (CoCoOp)"
    store = "prompt_embedding_meta_net"
    is_module = alone = conditional = True
    fields = ("conditional", "meta_net_reduction")
    bound = "text"

    @classmethod
    def longest_token(cls, tensors: Mapping[str, torch.Tensor], text_token: float) -> float:
        return text_token + _map_bound(tensors, 1.0, chained=True)  # the context, plus its bias of an image feature

    @classmethod
    def applies(cls, config: PromptEmbeddingConfig) -> bool:
        return config.conditional

    @classmethod
    def create(cls, build: Build) -> nn.Module:
        image_dim = getattr(getattr(build.model, "config", None), "projection_dim", None)
        if image_dim is None or not hasattr(build.model, "get_image_features"):
            raise ValueError(
                "conditional (CoCoOp) context needs the image features of a model with an image tower, such as "
                f"CLIPModel; {type(build.model).__name__} has none."
            )
        hidden = max(1, image_dim // build.config.meta_net_reduction)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(build.config.init_seed)
            meta_net = nn.Sequential(nn.Linear(image_dim, hidden), nn.ReLU(), nn.Linear(hidden, build.width))
        return build.module(meta_net)

    @classmethod
    def tensor_count(cls, config: PromptEmbeddingConfig) -> int:
        return 4  # two Linear layers, weights and biases

    @classmethod
    def input_context(
        cls, layer: PromptEmbeddingLayer, name: str, context: torch.Tensor | None, batch: int, options: PromptOptions
    ) -> torch.Tensor:
        if options.condition is None:
            raise ValueError(
                f"Adapter {name!r} is conditional (CoCoOp): its context depends on the image, so text features alone "
                "are undefined. Classify with PromptClassifier, encode with PromptEncoder.class_features(tokens, "
                "image_features=...), or pass the image features with prompt_options(condition=...)."
            )
        # the texts are all classes for image 0, then image 1, ...; each image's bias shifts the context
        images = options.condition.shape[0]
        if batch % images:
            raise ValueError(f"{batch} texts cannot be split evenly among {images} conditioning images.")
        bias = layer.prompt_embedding_meta_net[name](options.condition.to(context.dtype))
        return context[None] + bias.repeat_interleave(batch // images, dim=0)[:, None, :]


class DeepText(PromptVariant):
    """Deep text prompts (VPT-deep, IVLP, MaPLe, PromptSRC): before each of the next `prompt_depth - 1` text layers,
    that layer's own `n_ctx` tokens replace the hidden states at the context's positions."""

    title = "deep text prompts"
    store = "prompt_embedding_deep_ctx"
    fields = ("prompt_depth",)
    deep = True
    bound = "text"

    @classmethod
    def applies(cls, config: PromptEmbeddingConfig) -> bool:
        return config.prompt_depth > 1

    @classmethod
    def create(cls, build: Build) -> torch.Tensor:
        config, layers = build.config, len(build.text_layers)
        if config.prompt_depth > layers:
            raise ValueError(
                f"prompt_depth={config.prompt_depth}, but the text tower has {layers} layers; use at most {layers}."
            )
        shape = (config.prompt_depth - 1, config.n_ctx, build.width)
        return (torch.randn(*shape, generator=build.stream) * INIT_STD).to(build.device)

    @classmethod
    def check_tensors(
        cls, tensors: Mapping[str, torch.Tensor], config: PromptEmbeddingConfig, where: str, width: int
    ) -> None:
        expected = (config.prompt_depth - 1, config.n_ctx, width)
        for deep in tensors.values():
            if tuple(deep.shape) != expected:
                raise InvalidAdapterError(
                    f"The deep prompts in {where} have shape {tuple(deep.shape)}, but adapter_config.json says "
                    f"prompt_depth={config.prompt_depth}, n_ctx={config.n_ctx} (expected {expected})."
                )

    @classmethod
    def text_tokens(cls, layer: PromptEmbeddingLayer, name: str, index: int, prepared: Any) -> torch.Tensor | None:
        deep = layer.prompt_embedding_deep_ctx[name]
        return deep[index - 1] if index <= deep.shape[0] else None


def _check_vision_depth(build: Build, depth: int, field: str) -> None:
    layers = len(build.vision.layers)
    if depth > layers:
        raise ValueError(f"{field}={depth}, but the image tower has {layers} layers; use at most {layers}.")


class VisionTokens(PromptVariant):
    """Vision prompts (VPT, IVLP, PromptSRC): `vision_n_ctx` tokens appended to the image tower's sequence, replaced
    before each of the next `vision_prompt_depth - 1` layers by that layer's own."""

    title = "vision prompts"
    store = "prompt_embedding_vision_ctx"
    fields = ("vision_n_ctx", "vision_prompt_depth")
    prompts_images = True
    bound = "vision"

    @classmethod
    def applies(cls, config: PromptEmbeddingConfig) -> bool:
        return config.vision_n_ctx > 0 and not config.coupled

    @classmethod
    def create(cls, build: Build) -> torch.Tensor:
        config = build.config
        _check_vision_depth(build, config.vision_prompt_depth, "vision_prompt_depth")
        _check_vision_count(build, config.vision_n_ctx)
        shape = (config.vision_prompt_depth, config.vision_n_ctx, build.vision.embeddings.embed_dim)
        return (torch.randn(*shape, generator=build.stream) * INIT_STD).to(build.device)

    @classmethod
    def check_tensors(
        cls, tensors: Mapping[str, torch.Tensor], config: PromptEmbeddingConfig, where: str, width: int
    ) -> None:
        for vision in tensors.values():
            if vision.dim() != 3 or tuple(vision.shape[:2]) != (config.vision_prompt_depth, config.vision_n_ctx):
                raise InvalidAdapterError(
                    f"The vision prompts in {where} have shape {tuple(vision.shape)}, but adapter_config.json says "
                    f"vision_prompt_depth={config.vision_prompt_depth}, vision_n_ctx={config.vision_n_ctx}."
                )

    @classmethod
    def vision_tokens(cls, layer: PromptEmbeddingLayer, name: str, index: int) -> torch.Tensor | None:
        tokens = layer.prompt_embedding_vision_ctx[name]
        return tokens[index] if index < tokens.shape[0] else None

    @classmethod
    def vision_depth(cls, layer: PromptEmbeddingLayer, name: str) -> int:
        return layer.prompt_embedding_vision_ctx[name].shape[0]


class Coupling(PromptVariant):
    """MaPLe's coupling (Khattak et al., CVPR 2023): the vision tokens of each layer are a learned linear map of that
    layer's text tokens (the context for layer 0, the deep prompts after it)."""

    title = "coupled vision prompts (MaPLe)"
    store = "prompt_embedding_coupling"
    is_module = prompts_images = True
    fields = ("coupled",)
    bound = "vision"

    @classmethod
    def longest_token(cls, tensors: Mapping[str, torch.Tensor], text_token: float) -> float:
        return _map_bound(tensors, text_token, chained=False)  # a map per layer, of that layer's text tokens

    @classmethod
    def applies(cls, config: PromptEmbeddingConfig) -> bool:
        return config.coupled

    @classmethod
    def settle_config(cls, config: PromptEmbeddingConfig) -> None:
        if config.vision_n_ctx not in (0, config.n_ctx) or config.vision_prompt_depth not in (1, config.prompt_depth):
            raise ValueError(
                f"coupled (MaPLe) maps each text layer's tokens to that layer's vision tokens, so vision_n_ctx and "
                f"vision_prompt_depth are n_ctx and prompt_depth; got vision_n_ctx={config.vision_n_ctx}, "
                f"vision_prompt_depth={config.vision_prompt_depth}. Leave them unset."
            )
        config.vision_prompt_depth = config.prompt_depth
        if config.n_ctx is not None:
            config.vision_n_ctx = config.n_ctx

    @classmethod
    def create(cls, build: Build) -> nn.Module:
        _check_vision_depth(build, build.config.prompt_depth, "prompt_depth")
        _check_vision_count(build, build.config.n_ctx)
        width, vision_width = build.width, build.vision.embeddings.embed_dim
        with build.drawing():
            coupling = nn.ModuleList(nn.Linear(width, vision_width) for _ in range(build.config.prompt_depth))
        return build.module(coupling)

    @classmethod
    def tensor_count(cls, config: PromptEmbeddingConfig) -> int:
        return 2 * config.prompt_depth  # a Linear per layer

    @classmethod
    def vision_tokens(cls, layer: PromptEmbeddingLayer, name: str, index: int) -> torch.Tensor | None:
        maps = layer.prompt_embedding_coupling[name]
        if index >= len(maps):
            return None
        text = layer.prompt_embedding_ctx[name] if index == 0 else layer.text_tokens(name, index, {})
        return maps[index](text)

    @classmethod
    def vision_depth(cls, layer: PromptEmbeddingLayer, name: str) -> int:
        return len(layer.prompt_embedding_coupling[name])


class ClassTokens(PromptVariant):
    """TCP's class-aware tokens (Yao et al., CVPR 2024): before text layer `class_prompt_layer`, the hidden states at
    the context's positions are replaced by `n_ctx` tokens made from the class's own text by a small learned map
    (Linear(width, width/4), ReLU, Linear(width/4, n_ctx * width)), so that they exist for classes never trained on.
    The class's text is embedded by the frozen text tower (its pooled output of the prompt's own text, normalised),
    computed once per call."""

    title = "class-aware tokens (TCP)"
    store = "prompt_embedding_class_tokens"
    is_module = alone = per_class = deep = prepare_texts = True
    fields = ("class_prompt_layer",)
    bound = "text"

    @classmethod
    def longest_token(cls, tensors: Mapping[str, torch.Tensor], text_token: float) -> float:
        return _map_bound(tensors, 1.0, chained=True)  # of a class's normalised text embedding

    @classmethod
    def applies(cls, config: PromptEmbeddingConfig) -> bool:
        return config.class_prompt_layer > 0

    @classmethod
    def create(cls, build: Build) -> nn.Module:
        layer, layers = build.config.class_prompt_layer, len(build.text_layers)
        if layer >= layers:
            raise ValueError(
                f"class_prompt_layer={layer}, but the text tower has {layers} layers (0 to {layers - 1}); use at most "
                f"{layers - 1}."
            )
        with build.drawing():
            net = ClassTokenMap(build.width, build.config.n_ctx, layer)
        return build.module(net)

    @classmethod
    def tensor_count(cls, config: PromptEmbeddingConfig) -> int:
        return 4

    @classmethod
    def prepare(
        cls, layer: PromptEmbeddingLayer, name: str, input_ids: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        return F.normalize(layer.base_text_embeddings(input_ids, mask).float(), dim=-1)

    @classmethod
    def text_tokens(cls, layer: PromptEmbeddingLayer, name: str, index: int, prepared: Any) -> torch.Tensor | None:
        net = layer.prompt_embedding_class_tokens[name]
        return net(prepared) if index == net.layer_index else None


class ClassTokenMap(nn.Sequential):
    """TCP's map from a class's text embedding `(batch, width)` to its tokens `(batch, n_ctx, width)`, and the text
    layer they are written before (from the config, not saved)."""

    def __init__(self, width: int, n_ctx: int, layer_index: int) -> None:
        hidden = max(1, width // 4)
        super().__init__(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, n_ctx * width))
        self.width, self.layer_index = width, layer_index

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        tokens = super().forward(embeddings.to(self[0].weight.dtype))
        return tokens.view(tokens.shape[0], -1, self.width)


def _check_vision_count(build: Build, count: int) -> None:
    """Vision prompts are at most as many as the image tower's own positions: each costs attention over the whole
    sequence in every layer, and a loaded config could ask for any number."""
    positions = build.vision.embeddings.position_embedding.num_embeddings
    if count > positions:
        raise ValueError(
            f"vision_n_ctx={count} is more than the image tower's own {positions} positions; vision prompts use a few "
            "tokens (IVLP and PromptSRC: 4, MaPLe: 2)."
        )


def _map_bound(tensors: Mapping[str, torch.Tensor], length: float, chained: bool) -> float:
    """An upper bound on the output length of the loaded Linear layers `tensors` (`<index>.weight`, `<index>.bias`)
    on inputs of `length`: each layer's spectral norm times its input's length plus its bias's length (a ReLU between
    them shortens nothing); `chained`: applied in turn, else each on the input alone (the longest of them)."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        index, kind = key.rsplit(".", 2)[-2:]
        layers.setdefault(int(index), {})[kind] = tensor.detach().float()
    outputs = []
    for index in sorted(layers):
        weight, bias = layers[index]["weight"], layers[index].get("bias")
        out = float(torch.linalg.matrix_norm(weight, ord=2)) * length + (float(bias.norm()) if bias is not None else 0)
        if chained:
            length = out
        outputs.append(out)
    return outputs[-1] if chained else max(outputs)


#: Every variant, in the order their tensors are created and their input contexts composed.
VARIANTS: tuple[type[PromptVariant], ...] = (
    SharedContext,
    ClassContext,
    MetaNet,
    DeepText,
    VisionTokens,
    Coupling,
    ClassTokens,
)

#: The layer's stores, in order, each with whether it holds modules.
STORES: dict[str, bool] = {v.store: v.is_module for v in VARIANTS}


def variants_of(config: PromptEmbeddingConfig) -> tuple[type[PromptVariant], ...]:
    """The parts of an adapter with `config`."""
    return tuple(v for v in VARIANTS if v.applies(config))


def check_variants(config: PromptEmbeddingConfig) -> None:
    """The checks of the parts of `config` (called by the config): each part's fields (which a part may complete,
    see `PromptVariant.settle_config`), and that a part writing tokens per class or per image is combined with the
    shared context only."""
    parts = variants_of(config)
    for variant in parts:
        variant.settle_config(config)
    others = [v for v in parts if v is not SharedContext]
    alone = [v for v in others if v.alone]
    if alone and len(others) > 1:
        names = " and ".join(v.title for v in others)
        raise ValueError(
            f"{names} do not combine: {alone[0].title} writes tokens per class or per image, with a shared context "
            "only. Keep one of them."
        )


def expected_tensor_counts(config: PromptEmbeddingConfig) -> dict[str, int]:
    """How many tensors an adapter with `config` saves under each of the layer's stores."""
    counts = dict.fromkeys(STORES, 0)
    for variant in variants_of(config):
        counts[variant.store] += variant.tensor_count(config)
    return counts


def check_adapter_tensors(tensors: Mapping[str, torch.Tensor], config: PromptEmbeddingConfig, where: str) -> None:
    """The one check of a saved adapter's tensors against its config, before any of them reaches a model: the
    tensors of its parts, all finite floats, each part's of the shapes its config implies.

    Raises:
        `InvalidAdapterError`: naming the file (`where`) and what is wrong.
    """
    expected = expected_tensor_counts(config)
    found = {store: {k: t for k, t in tensors.items() if k.endswith(store) or f".{store}." in k} for store in STORES}
    if any(len(found[s]) != count for s, count in expected.items()) or len(tensors) != sum(expected.values()):
        wanted = ", ".join(f"{count} {s}" for s, count in expected.items() if count)
        raise InvalidAdapterError(
            f"{where} holds {len(tensors)} tensors ({sorted(tensors)[:6]}); an adapter with this config "
            f"({config.method}) holds {wanted}: the files do not belong together."
        )
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise InvalidAdapterError(f"The tensor {key} in {where} has dtype {tensor.dtype}, not floats.")
        if not bool(tensor.isfinite().all()):
            raise InvalidAdapterError(f"The tensor {key} in {where} holds NaN or infinite values; it cannot be used.")
    width = next(iter(found[CONTEXT].values())).shape[-1]
    for variant in variants_of(config):
        variant.check_tensors(found[variant.store], config, where, width)
