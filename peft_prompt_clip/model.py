"""The PEFT tuner: finds the text embeddings module of a CLIP-family model and puts a prompt layer in its place."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.clip.modeling_clip import CLIPTextEmbeddings
from transformers.models.groupvit.modeling_groupvit import GroupViTTextEmbeddings
from transformers.models.owlvit.modeling_owlvit import OwlViTTextEmbeddings
from transformers.models.siglip.modeling_siglip import SiglipTextEmbeddings

try:
    from transformers.models.siglip2.modeling_siglip2 import Siglip2TextEmbeddings
except ImportError:  # transformers < 4.49
    Siglip2TextEmbeddings = None

from .config import ClassTokenPosition, PromptEmbeddingConfig
from .errors import InvalidAdapterError
from .layer import PromptEmbeddingLayer
from .layout import PromptLayout


@dataclass(frozen=True)
class TextFamily:
    """What the adapter must know of a model family's text tower.

    Args:
        name (`str`): the family, as users know it.
        models (`str`): its transformers classes.
        pooling (`str`): where the text tower pools: `"eos"` (first end-of-text id, or the highest id for legacy
            configs with `eos_token_id == 2`), `"argmax"` (the highest id) or `"last"` (the last position).
        prefix_length (`int`): tokens before the text (a start-of-text token: 1).
    """

    name: str
    models: str
    pooling: str
    prefix_length: int


#: Text embeddings modules the adapter knows how to wrap (found by class), and how their text towers read a prompt.
SUPPORTED_TEXT_EMBEDDINGS: dict[type[nn.Module], TextFamily] = {
    CLIPTextEmbeddings: TextFamily("CLIP", "CLIPModel, CLIPTextModel, CLIPTextModelWithProjection", "eos", 1),
    GroupViTTextEmbeddings: TextFamily("GroupViT", "GroupViTModel, GroupViTTextModel", "eos", 1),
    OwlViTTextEmbeddings: TextFamily("OWL-ViT", "OwlViTModel, OwlViTTextModel", "argmax", 1),
    SiglipTextEmbeddings: TextFamily("SigLIP", "SiglipModel, SiglipTextModel", "last", 0),
}
if Siglip2TextEmbeddings is not None:  # transformers >= 4.49
    SUPPORTED_TEXT_EMBEDDINGS[Siglip2TextEmbeddings] = TextFamily(
        "SigLIP 2", "Siglip2Model, Siglip2TextModel", "last", 0
    )


def text_family(embeddings: nn.Module) -> TextFamily:
    """The family of a (possibly wrapped) text embeddings module."""
    base = embeddings.get_base_layer() if isinstance(embeddings, PromptEmbeddingLayer) else embeddings
    return next(family for cls, family in SUPPORTED_TEXT_EMBEDDINGS.items() if isinstance(base, cls))


INIT_STD = 0.02  # CoOp's random initialisation: normal with std 0.02


def _is_text_embeddings(module: nn.Module) -> bool:
    return isinstance(module, PromptEmbeddingLayer) or isinstance(module, tuple(SUPPORTED_TEXT_EMBEDDINGS))


def find_text_embeddings(model: nn.Module, target_modules: str | None = None) -> str:
    """
    Name of the text embeddings module of `model` that a prompt adapter replaces.

    Args:
        model (`nn.Module`): a CLIP-family model, or its text tower.
        target_modules (`str`, *optional*): a module name, name suffix or regex that picks the module; by default the
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
        picked = [
            n
            for n in named
            if n == target_modules or n.endswith("." + target_modules) or re.fullmatch(target_modules, n)
        ]
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


class PromptEmbeddingModel(BaseTuner):
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
        # the target is found by what it is, and kept out of the saved config, so that one adapter loads into
        # CLIPModel as well as CLIPTextModel, whatever the module layout of the installed transformers
        self._target_key = find_text_embeddings(self.model, peft_config.target_modules)
        return peft_config

    def _check_target_module_exists(self, peft_config: PromptEmbeddingConfig, key: str) -> bool:
        return key == self._target_key

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
        text_config = parent.config
        max_positions = embeddings.position_embedding.num_embeddings
        if peft_config.n_ctx is not None and peft_config.n_ctx + 2 > max_positions:
            raise ValueError(
                f"n_ctx={peft_config.n_ctx} leaves no room for text: the model has max_position_embeddings="
                f"{max_positions}, and a prompt also needs its start and end tokens. Use a smaller n_ctx."
            )
        tokenizer = self._tokenizer(peft_config)
        context = self._initial_context(peft_config, embeddings, tokenizer)
        if peft_config.class_token_position != ClassTokenPosition.END and peft_config.suffix_token_ids is None:
            peft_config.suffix_token_ids = self._suffix_ids(tokenizer)
        layout = _layout(peft_config, text_config, text_family(embeddings))
        meta_net = self._meta_net(peft_config, context) if peft_config.conditional else None
        if isinstance(target, PromptEmbeddingLayer):
            target.update_layer(
                adapter_name, context, layout, inference_mode=peft_config.inference_mode, meta_net=meta_net
            )
            return
        new_module = PromptEmbeddingLayer(
            embeddings, parent, adapter_name, context, layout, peft_config.inference_mode, meta_net
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _meta_net(self, config: PromptEmbeddingConfig, context: torch.Tensor) -> nn.Module:
        """CoCoOp's meta-net, image feature -> context bias: Linear(d, d/r), ReLU, Linear(d/r, width); seeded."""
        image_dim = getattr(getattr(self.model, "config", None), "projection_dim", None)
        if image_dim is None or not hasattr(self.model, "get_image_features"):
            raise ValueError(
                "conditional (CoCoOp) context needs the image features of a model with an image tower, such as "
                f"CLIPModel; {type(self.model).__name__} has none."
            )
        hidden = max(1, image_dim // config.meta_net_reduction)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            meta_net = nn.Sequential(nn.Linear(image_dim, hidden), nn.ReLU(), nn.Linear(hidden, context.shape[-1]))
        return meta_net.to(context.device)

    def _tokenizer(self, config: PromptEmbeddingConfig) -> PreTrainedTokenizerBase | None:
        needs_tokenizer = config.ctx_init is not None or (
            config.class_token_position != ClassTokenPosition.END and config.suffix_token_ids is None
        )
        source = config.tokenizer_name_or_path or getattr(self.model, "name_or_path", None)
        if not needs_tokenizer or not source:
            return None
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as exc:
            warnings.warn(f"Could not load a tokenizer from {source!r} ({exc}).", stacklevel=2)
            return None

    @staticmethod
    def _suffix_ids(tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
        if tokenizer is None:
            warnings.warn(
                "No tokenizer was found to tokenise CoOp's period, so a trailing '.' stays with the text instead of "
                "after the context. Pass tokenizer_name_or_path, or suffix_token_ids explicitly.",
                stacklevel=2,
            )
            return []
        return tokenizer(".", add_special_tokens=False)["input_ids"]

    @staticmethod
    def _initial_context(
        config: PromptEmbeddingConfig, embeddings: nn.Module, tokenizer: PreTrainedTokenizerBase | None
    ) -> torch.Tensor:
        weight = embeddings.token_embedding.weight
        words = None
        if config.ctx_init is not None:
            if tokenizer is None:
                warnings.warn(
                    f"ctx_init={config.ctx_init!r} needs a tokenizer and none was found, so the context starts "
                    "random. Pass tokenizer_name_or_path, or load the base model from a folder or repo that has one.",
                    stacklevel=2,
                )
            else:
                ids = tokenizer(config.ctx_init, add_special_tokens=False)["input_ids"]
                if config.n_ctx is not None and len(ids) > config.n_ctx:
                    raise ValueError(
                        f"ctx_init={config.ctx_init!r} is {len(ids)} tokens, more than n_ctx={config.n_ctx}; "
                        f"raise n_ctx to at least {len(ids)} or leave it unset."
                    )
                with torch.no_grad():
                    words = embeddings.token_embedding(torch.tensor(ids, device=weight.device)).float().cpu()
        if config.n_ctx is None:
            config.n_ctx = 16 if words is None else len(words)
        shape = (config.num_classes,) if config.class_specific else ()
        generator = torch.Generator().manual_seed(config.init_seed)
        context = torch.randn(*shape, config.n_ctx, weight.shape[1], generator=generator) * INIT_STD
        if words is not None:
            context[..., config.n_ctx - len(words) :, :] = words
        # the context stays float32 whatever the base model's dtype: the updates of a few thousand parameters are
        # small, and bf16/fp16 would round them away; it is cast to the embeddings' dtype in the forward
        return context.to(weight.device)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
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
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PromptEmbeddingConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        own = model.state_dict()
        for key, value in remapped.items():
            if "prompt_embedding_meta_net" in key and key in own and own[key].shape != value.shape:
                raise InvalidAdapterError(
                    f"The adapter's meta-net tensor {key} has shape {tuple(value.shape)}, but this model expects "
                    f"{tuple(own[key].shape)}: the adapter was learned on another base model."
                )
        suffix = f"prompt_embedding_ctx.{adapter_name}"
        expected = {k: v for k, v in own.items() if k.endswith(suffix)}
        saved = [k for k in remapped if "prompt_embedding_ctx" in k and k not in expected]
        if len(expected) == 1 and next(iter(expected)) not in remapped and len(saved) == 1:
            # saved from another layout of the same text tower: CLIPModel vs CLIPTextModel, transformers 4 vs 5
            remapped[next(iter(expected))] = remapped.pop(saved[0])
        for key, param in expected.items():
            if key not in remapped:
                raise InvalidAdapterError(
                    f"The adapter weights hold no learned context for {key}: the adapter file is not a prompt adapter "
                    f"or was saved from another kind of model. Keys found: {sorted(state_dict)}."
                )
            loaded = remapped[key]
            if not loaded.is_floating_point():
                raise InvalidAdapterError(
                    f"The learned context in the adapter file has dtype {loaded.dtype}; expected floats."
                )
            if loaded.shape != param.shape:
                raise InvalidAdapterError(
                    f"The adapter's context has shape {tuple(loaded.shape)}, but this model expects "
                    f"{tuple(param.shape)} "
                    f"(n_ctx={config.n_ctx}, text width {param.shape[-1]}). The adapter was learned on a base model "
                    f"with text width {loaded.shape[-1]} ({config.base_model_name_or_path or 'unknown'}); load it "
                    "into that model."
                )
        return remapped


def _layout(config: PromptEmbeddingConfig, text_config, family: TextFamily) -> PromptLayout:
    eos = text_config.eos_token_id
    # transformers keeps CLIP's legacy argmax pooling for configs saying eos_token_id == 2
    pooling = "argmax" if family.pooling == "eos" and eos == 2 else family.pooling
    suffix = tuple(config.suffix_token_ids or ())
    candidates = [getattr(text_config, "bos_token_id", None), 0, 1, 2, 3, 4]
    placeholder = next(
        i
        for i in candidates
        if i is not None
        and i < text_config.vocab_size
        and i != eos
        and i not in suffix
        and (pooling != "argmax" or i < eos)
    )
    return PromptLayout(
        n_ctx=config.n_ctx,
        position=ClassTokenPosition(config.class_token_position),
        suffix_token_ids=suffix,
        eos_token_id=eos,
        placeholder_id=placeholder,
        pooling=pooling,
        prefix_length=family.prefix_length,
    )
