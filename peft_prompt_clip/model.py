"""The PEFT tuner: finds the text embeddings module of a CLIP-family model and puts a prompt layer in its place."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.clip.modeling_clip import CLIPTextEmbeddings, CLIPVisionEmbeddings
from transformers.models.groupvit.modeling_groupvit import GroupViTTextEmbeddings
from transformers.models.owlvit.modeling_owlvit import OwlViTTextEmbeddings, OwlViTVisionEmbeddings
from transformers.models.siglip.modeling_siglip import (
    SiglipMultiheadAttentionPoolingHead,
    SiglipTextEmbeddings,
    SiglipVisionEmbeddings,
)

try:
    from transformers.models.siglip2.modeling_siglip2 import Siglip2TextEmbeddings
except ImportError:  # transformers < 4.49
    Siglip2TextEmbeddings = None

from .config import PEFT_TYPE, PromptEmbeddingConfig
from .errors import InvalidAdapterError
from .layer import PromptEmbeddingLayer, VisionTower
from .layout import Pooling, PromptLayout
from .options import ClassTokenPosition
from .peft_private import TunerPrivateHooks, register_tuner
from .variants import CONTEXT, Build, check_adapter_tensors, variants_of


@dataclass(frozen=True)
class TextFamily:
    """What the adapter must know of a model family's text tower.

    Args:
        name (`str`): the family, as users know it.
        models (`str`): its transformers classes.
        pooling (`Pooling`): where the text tower pools (CLIP's `EOS` becomes `ARGMAX` for legacy configs with
            `eos_token_id == 2`, as transformers does).
        prefix_length (`int`): tokens before the text (a start-of-text token: 1).
    """

    name: str
    models: str
    pooling: Pooling
    prefix_length: int


#: Text embeddings modules the adapter knows how to wrap (found by class), and how their text towers read a prompt.
SUPPORTED_TEXT_EMBEDDINGS: dict[type[nn.Module], TextFamily] = {
    CLIPTextEmbeddings: TextFamily("CLIP", "CLIPModel, CLIPTextModel, CLIPTextModelWithProjection", Pooling.EOS, 1),
    GroupViTTextEmbeddings: TextFamily("GroupViT", "GroupViTModel, GroupViTTextModel", Pooling.EOS, 1),
    OwlViTTextEmbeddings: TextFamily("OWL-ViT", "OwlViTModel, OwlViTTextModel", Pooling.ARGMAX, 1),
    SiglipTextEmbeddings: TextFamily("SigLIP", "SiglipModel, SiglipTextModel", Pooling.LAST, 0),
}
if Siglip2TextEmbeddings is not None:  # transformers >= 4.49
    SUPPORTED_TEXT_EMBEDDINGS[Siglip2TextEmbeddings] = TextFamily(
        "SigLIP 2", "Siglip2Model, Siglip2TextModel", Pooling.LAST, 0
    )


#: Image towers that vision prompts know (found by their embeddings' class). The vision tokens are appended after the
#: patch tokens; CLIP and OWL-ViT pool at the class token, so the tokens act through attention only, as in VPT, MaPLe
#: and PromptSRC; SigLIP's attention pooling head is given the patch tokens alone, for the same effect. Not supported:
#: GroupViT (its grouping stages merge tokens into groups) and SigLIP 2 (a variable count of patches under a mask).
SUPPORTED_VISION_EMBEDDINGS: dict[type[nn.Module], str] = {
    CLIPVisionEmbeddings: "CLIP",
    OwlViTVisionEmbeddings: "OWL-ViT",
    SiglipVisionEmbeddings: "SigLIP",
}


def find_vision_tower(model: nn.Module) -> VisionTower | None:
    """The image tower of `model` that vision prompts hook into, or None when it has none of a supported family."""
    names = [n for n, m in model.named_modules() if isinstance(m, tuple(SUPPORTED_VISION_EMBEDDINGS))]
    if len(names) != 1:
        return None
    owner = model.get_submodule(names[0].rpartition(".")[0])
    layers = getattr(getattr(owner, "encoder", None), "layers", None)
    if layers is None:
        return None
    head = getattr(owner, "head", None)
    head = head if isinstance(head, SiglipMultiheadAttentionPoolingHead) else None
    return VisionTower(owner, model.get_submodule(names[0]), list(layers), head)


def text_family(embeddings: nn.Module) -> TextFamily:
    """The family of a (possibly wrapped) text embeddings module."""
    base = embeddings.get_base_layer() if isinstance(embeddings, PromptEmbeddingLayer) else embeddings
    return next(family for cls, family in SUPPORTED_TEXT_EMBEDDINGS.items() if isinstance(base, cls))


def _is_text_embeddings(module: nn.Module) -> bool:
    return isinstance(module, PromptEmbeddingLayer) or isinstance(module, tuple(SUPPORTED_TEXT_EMBEDDINGS))


def find_text_embeddings(model: nn.Module, target_modules: str | None = None) -> str:
    """
    Name of the text embeddings module of `model` that a prompt adapter replaces.

    Args:
        model (`nn.Module`): a CLIP-family model, or its text tower.
        target_modules (`str`, *optional*): a module name or name suffix that picks the module; by default the
            one module of a supported class.

    Raises:
        `ValueError`: when no supported module, or more than one, is found.
    """
    candidates = [
        name
        for name, module in model.named_modules()
        if _is_text_embeddings(module) and not name.endswith(".base_layer")
    ]
    if target_modules is not None:
        named = [name for name, _ in model.named_modules()]
        picked = [n for n in named if n == target_modules or n.endswith("." + target_modules)]
        wrong = [n for n in picked if n not in candidates]
        if wrong:
            raise ValueError(
                f"target_modules={target_modules!r} picks {wrong}, which is not a supported text embeddings module. "
                f"Supported: {_supported()}; found here: {candidates or 'none'}."
            )
        candidates = picked
    if not candidates:
        raise ValueError(
            f"No text embeddings module of a supported model family was found in {type(model).__name__}"
            + (f" under target_modules={target_modules!r}" if target_modules else "")
            + f". Supported: {_supported()}."
        )
    if len(candidates) > 1:
        raise ValueError(
            f"Several text embeddings modules were found: {candidates}. Pick one with "
            "PromptEmbeddingConfig(target_modules=...)."
        )
    return candidates[0]


def _supported() -> str:
    return "; ".join(f"{f.name} ({cls.__name__} in {f.models})" for cls, f in SUPPORTED_TEXT_EMBEDDINGS.items())


class PromptEmbeddingModel(TunerPrivateHooks):
    """
    Learned prompt context (CoOp) for a CLIP-family model, as a PEFT tuner.

    The text tower's embeddings module is replaced by a [`PromptEmbeddingLayer`] that reuses it, frozen, and inserts
    the context of the active adapter into every text. Normally created through `peft.get_peft_model` or
    [`get_prompt_model`], not directly.

    Args:
        model (`nn.Module`): a `CLIPModel`, `CLIPTextModel` or `CLIPTextModelWithProjection`.
        config ([`PromptEmbeddingConfig`]): the adapter's configuration.
        adapter_name (`str`, *optional*, defaults to `"default"`): the adapter's name.
        low_cpu_mem_usage (`bool`, *optional*, defaults to `False`): create the context on the meta device.

    Example:

    ```py
    >>> from peft import get_peft_model
    >>> from transformers import CLIPConfig, CLIPModel
    >>> from peft_prompt_clip import PromptEmbeddingConfig
    >>> clip = CLIPModel(CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
    ...     "num_attention_heads": 4, "vocab_size": 99, "bos_token_id": 97, "eos_token_id": 98},
    ...     vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
    ...     "num_attention_heads": 4, "image_size": 30, "patch_size": 2}, projection_dim=16))
    >>> model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=4))
    >>> model.print_trainable_parameters()
    trainable params: 128 || all params: ... || trainable%: ...

    ```
    """

    prefix: str = "prompt_embedding_"
    tuner_layer_cls = PromptEmbeddingLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: PromptEmbeddingConfig, model_config: dict) -> PromptEmbeddingConfig:
        # the target is found by what it is, not by a saved name, so that one adapter loads into CLIPModel as well as
        # CLIPTextModel, whatever the module layout of the installed transformers; this also says clearly when
        # there is none, or several
        peft_config.weights_sha256 = None  # describes the file it was read from, not this model's adapter
        name = find_text_embeddings(self.model, peft_config.target_modules)
        embeddings, text_model = self.model.get_submodule(name), self.model.get_submodule(name.rpartition(".")[0])
        complete_config(peft_config, _tokenizer(peft_config, self.model))
        layout = layout_of(peft_config, embeddings, text_model.config)
        try:  # the shortest prompt: the start and end tokens around an empty text
            layout.check_lengths([text_family(embeddings).prefix_length + 1])
        except ValueError as exc:
            raise ValueError(f"n_ctx={peft_config.n_ctx} leaves no room for text: {exc}") from None
        if hasattr(self.model, "add_model_tags"):  # PEFT's save_pretrained card reads them (push_to_hub's does not)
            self.model.add_model_tags(peft_config.card_tags)
        return peft_config

    def _check_target_module_exists(self, peft_config: PromptEmbeddingConfig, key: str) -> bool:
        module = self.model.get_submodule(key)
        if not _is_text_embeddings(module) or key.endswith(".base_layer"):
            return False
        target = peft_config.target_modules
        return target is None or key == target or key.endswith("." + target)

    def _create_and_replace(
        self,
        peft_config: PromptEmbeddingConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        embeddings = target.get_base_layer() if isinstance(target, PromptEmbeddingLayer) else target
        text_layers = list(parent.encoder.layers)
        vision = find_vision_tower(self.model)
        variants = variants_of(peft_config)
        if any(v.prompts_images for v in variants):
            _check_image_tower(self.model, vision)
        init_ids = _ctx_init_ids(peft_config, _tokenizer(peft_config, self.model))
        if init_ids is not None:
            init_ids = init_ids[: peft_config.n_ctx]  # the rest: fixed_token_ids
        build = Build(peft_config, self.model, embeddings, text_layers, vision, init_ids)
        parts = {variant: variant.create(build) for variant in variants}
        layout = layout_of(peft_config, embeddings, parent.config)
        if isinstance(target, PromptEmbeddingLayer):
            target.update_layer(adapter_name, parts, layout, peft_config.inference_mode)
            return
        new_module = PromptEmbeddingLayer(
            embeddings, parent, adapter_name, parts, layout, peft_config.inference_mode, text_layers, vision
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def unload_layers(self, merge: bool) -> nn.Module:
        """Put the original text embeddings module back (`unload()`); `merge_and_unload()` is refused."""
        for name, module in list(self.model.named_modules()):
            if isinstance(module, PromptEmbeddingLayer):
                if merge:
                    module.merge()  # refuses, with the reason
                parent_name, _, child_name = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), child_name, module.unwrap())
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    @classmethod
    def check_loaded_state(
        cls,
        model: nn.Module,
        config: PromptEmbeddingConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        remapped: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Refuse an adapter's tensors that do not fit `model`, and map a context saved from another layout of the
        same text tower (CLIPModel vs CLIPTextModel, transformers 4 vs 5) to this one's key."""
        check_adapter_tensors(state_dict, config, "the adapter weights")
        own = model.state_dict()
        names = PromptEmbeddingLayer.adapter_layer_names
        mine = [k for k in own if any(k.endswith(f"{n}.{adapter_name}") or f"{n}.{adapter_name}." in k for n in names)]
        # saved from another layout of the same towers (CLIPModel vs CLIPTextModel, transformers 4 vs 5): the keys
        # differ only before the layer's parameter names; PEFT passes on keys it could not map as saved (no adapter)
        # release 0.1.0 saved a module's keys with the adapter name inside (`prompt_embedding_coupling.<saved name>.0.
        # weight`; now `_remove_adapter_name_from_key` leaves it out): drop that name too
        by_tail = {_tail(k).replace(f".{adapter_name}", "", 1): k for k in mine}
        for key in [k for k in remapped if k not in own]:
            tail = _tail(key)
            head, _, rest = tail.partition(".")
            if tail not in by_tail and "." in rest:
                tail = f"{head}.{rest.partition('.')[2]}"
            if tail in by_tail:
                remapped[by_tail[tail]] = remapped.pop(key)
        for key in mine:
            if key not in remapped:
                raise InvalidAdapterError(
                    f"The adapter weights hold nothing for {key}: the adapter file is not a prompt adapter "
                    f"of this kind ({config.method}) or was saved from another kind of model. Keys found: "
                    f"{sorted(state_dict)}."
                )
            loaded, param = remapped[key], own[key]
            if loaded.shape == param.shape:
                continue
            if CONTEXT in key:
                raise InvalidAdapterError(
                    f"The adapter's context has shape {tuple(loaded.shape)}, but this model expects "
                    f"{tuple(param.shape)} (n_ctx={config.n_ctx}, text width {param.shape[-1]}). The adapter was "
                    f"learned on a base model with text width {loaded.shape[-1]} "
                    f"({config.base_model_name_or_path or 'unknown'}); load it into that model."
                )
            raise InvalidAdapterError(
                f"The adapter's tensor {key} has shape {tuple(loaded.shape)}, but this model expects "
                f"{tuple(param.shape)}: the adapter was learned on another base model "
                f"({config.base_model_name_or_path or 'unknown'})."
            )
        _check_magnitudes(config, {key: remapped[key] for key in mine}, model)
        return remapped


def _tail(key: str) -> str:
    """A prompt layer's state-dict key from its parameter name on (`prompt_embedding_ctx.default`)."""
    return key[key.find(PromptEmbeddingModel.prefix) :]


#: A token a loaded adapter writes may be this many times longer than the longest embedding of the tower it goes into
#: (its token embeddings; the image tower's position embeddings), and no more: a finite but far longer one overflows
#: the tower (NaN features, every class scored alike) instead of failing at load. Generous, as a map's bound is an
#: upper one (spectral norms) and learned prompts grow past the embeddings (contexts drawn at std 1 reach 150 times);
#: a LayerNorm overflows in float16 from about 256 * sqrt(width) (5,800 at width 512), in float32 from about 1e19
MAX_TOKEN_SCALE = 1000.0


def _check_magnitudes(config: PromptEmbeddingConfig, tensors: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Refuse an adapter whose parts can write tokens far longer than their tower's own embeddings (see
    `PromptVariant.longest_token`), part by part, the text tokens first (MaPLe's maps take them)."""
    tables = next(m for m in model.modules() if isinstance(m, PromptEmbeddingLayer)).embedding_tables()
    text_token = 0.0
    for variant in variants_of(config):
        if variant.bound is None:
            continue
        mine = {key: t for key, t in tensors.items() if f"{variant.store}." in key}
        longest = variant.longest_token(mine, text_token)
        table = float(tables[variant.bound].detach().float().norm(dim=-1).max())
        if not longest <= MAX_TOKEN_SCALE * table:  # NaN too
            raise InvalidAdapterError(
                f"The adapter's {variant.title} can write a token of length {longest:.3g}, {longest / table:.3g} "
                f"times the longest {variant.bound} embedding of this model ({table:.3g}; at most "
                f"{MAX_TOKEN_SCALE:g} times is accepted): it would overflow the {variant.bound} tower. The file is "
                "damaged or was not learned for this model."
            )
        if variant.bound == "text":
            text_token = max(text_token, longest)


def text_pooling(family: TextFamily, text_config: Any) -> Pooling:
    """Where a text tower of `family` with config `text_config` pools: transformers keeps CLIP's legacy argmax pooling
    for configs saying `eos_token_id == 2`."""
    return Pooling.ARGMAX if family.pooling == Pooling.EOS and text_config.eos_token_id == 2 else family.pooling


def layout_of(config: PromptEmbeddingConfig, embeddings: nn.Module, text_config: Any) -> PromptLayout:
    """Where the context of a completed adapter config goes in the prompts of the text tower of `embeddings`, whose
    config is `text_config`."""
    family = text_family(embeddings)
    eos = text_config.eos_token_id
    pooling = text_pooling(family, text_config)
    suffix, fixed = tuple(config.suffix_token_ids or ()), tuple(config.fixed_token_ids or ())

    # a word: an id the text tower embeds that does not end the text; where the tower pools at the highest id
    # (legacy configs, whose eos_token_id 2 is not the real end token), below the end token, the vocabulary's last
    highest = text_config.vocab_size - 1 if pooling == Pooling.ARGMAX else text_config.vocab_size
    if not all(0 <= i < highest and i != eos for i in fixed):
        raise ValueError(
            f"fixed_token_ids={list(fixed)} are not all words of this text model (vocabulary of "
            f"{text_config.vocab_size}, end-of-text id {eos}): the adapter was made for another tokenizer."
        )
    candidates = [getattr(text_config, "bos_token_id", None), 0, 1, 2, 3, 4]
    placeholder = next(
        i
        for i in candidates
        if i is not None
        and i < text_config.vocab_size
        and i != eos
        and i not in suffix
        and (pooling != Pooling.ARGMAX or i < eos)
    )
    return PromptLayout(
        n_ctx=config.n_ctx,
        position=ClassTokenPosition(config.class_token_position),
        suffix_token_ids=suffix,
        fixed_token_ids=fixed,
        eos_token_id=eos,
        placeholder_id=placeholder,
        max_positions=embeddings.position_embedding.num_embeddings,
        pooling=pooling,
        prefix_length=family.prefix_length,
    )


def _tokenizer(config: PromptEmbeddingConfig, model: nn.Module) -> PreTrainedTokenizerBase | None:
    """The tokenizer for `ctx_init` and CoOp's period, when the config still needs one."""
    needs_tokenizer = config.ctx_init is not None or (
        config.class_token_position != ClassTokenPosition.END and config.suffix_token_ids is None
    )
    source = config.tokenizer_name_or_path or getattr(model, "name_or_path", None)
    if not needs_tokenizer or not source:
        return None
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        warnings.warn(f"Could not load a tokenizer from {source!r} ({exc}).", stacklevel=3)
        return None


def _ctx_init_ids(config: PromptEmbeddingConfig, tokenizer: PreTrainedTokenizerBase | None) -> list[int] | None:
    if config.ctx_init is None or tokenizer is None:
        return None
    return tokenizer(config.ctx_init, add_special_tokens=False)["input_ids"]


def complete_config(config: PromptEmbeddingConfig, tokenizer: PreTrainedTokenizerBase | None) -> None:
    """Fill what a config leaves to the model: `n_ctx` (the token count of `ctx_init`, else 16), `fixed_token_ids`
    (the ids of `ctx_init` past `n_ctx`) and, for the middle and front positions, `suffix_token_ids` (the tokenizer's
    ids of CoOp's period)."""
    ids = _ctx_init_ids(config, tokenizer)
    if config.ctx_init is not None and ids is None:
        warnings.warn(
            f"ctx_init={config.ctx_init!r} needs a tokenizer and none was found, so the context starts random. "
            "Pass tokenizer_name_or_path, or load the base model from a folder or repo that has one.",
            stacklevel=3,
        )
    if config.n_ctx is None:
        config.n_ctx = 16 if ids is None else len(ids)
    if config.fixed_token_ids is None:
        config.fixed_token_ids = [] if ids is None else ids[config.n_ctx :]
    if config.fixed_token_ids and config.class_token_position != ClassTokenPosition.END:
        raise ValueError(
            f"ctx_init={config.ctx_init!r} is {len(ids or ())} tokens, more than n_ctx={config.n_ctx}: the words "
            "past the context stay fixed right after it, before the text, which needs class_token_position='end'; "
            f"with another position, give a ctx_init of at most {config.n_ctx} tokens (e.g. 'a photo'), or raise "
            f"n_ctx to {len(ids or ())} and give ctx_init again."
        )
    if config.coupled:  # MaPLe: each layer's vision tokens are mapped from its text tokens
        config.vision_n_ctx = config.n_ctx
    if config.class_token_position != ClassTokenPosition.END and config.suffix_token_ids is None:
        if tokenizer is None:
            warnings.warn(
                "No tokenizer was found to tokenise CoOp's period, so a trailing '.' stays with the text instead of "
                "after the context. Pass tokenizer_name_or_path, or suffix_token_ids explicitly.",
                stacklevel=3,
            )
        config.suffix_token_ids = [] if tokenizer is None else tokenizer(".", add_special_tokens=False)["input_ids"]


def _check_image_tower(model: nn.Module, vision: VisionTower | None) -> None:
    """Refuse vision prompts where the model has no image tower they can go into."""
    if type(model).__name__ == "OwlViTForObjectDetection":
        raise ValueError(
            "Vision prompts add tokens to the image sequence, whose patch tokens OWL-ViT's detection heads read as a "
            "grid: use them with OwlViTModel (classification), or deep text prompts alone for detection."
        )
    if vision is None:
        supported = ", ".join(SUPPORTED_VISION_EMBEDDINGS.values())
        raise ValueError(
            f"Vision prompts (vision_n_ctx, coupled) need a model with an image tower of a supported family "
            f"({supported}); this model has none. Use prompt_depth alone for deep text prompts."
        )


def register() -> None:
    """Make `get_peft_model`, `PeftModel.from_pretrained` and transformers' adapter loading know the prompt adapter
    (done on import)."""
    register_tuner(PEFT_TYPE, PromptEmbeddingConfig, PromptEmbeddingModel)
