"""Configuration of a prompt adapter: what context is learned, how it starts and where it goes."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from peft import PeftConfig

from .options import AdapterOptions, ClassTokenPosition
from .variants import check_variants


class PromptClipType(str, enum.Enum):
    """The PEFT type of this package's adapters. PEFT's own `PeftType` enum is closed, so the package has its own; it
    is a `str` enum as PEFT's is, so `adapter_config.json` holds the plain name and PEFT and transformers, which read
    `peft_config.peft_type.value`, see a real PEFT type."""

    PEFT_PROMPT_CLIP = "PEFT_PROMPT_CLIP"


#: The PEFT type of this package's adapters, as written in `adapter_config.json`. It names the package on purpose:
#: without `import peft_prompt_clip`, PEFT fails with `KeyError: 'PEFT_PROMPT_CLIP'`, which points at the fix.
PEFT_TYPE = PromptClipType.PEFT_PROMPT_CLIP


@dataclass
class PromptEmbeddingConfig(PeftConfig, AdapterOptions):
    """
    Configuration of a [`PromptEmbeddingModel`]: learned context vectors inserted into the text prompts of a
    CLIP-family model (CoOp, Zhou et al., IJCV 2022).

    Args:
        n_ctx (`int`, *optional*):
            Number of learned context vectors. Defaults to the number of tokens of `ctx_init`, or 16 without it.
        ctx_init (`str`, *optional*):
            Words whose token embeddings initialise the context, e.g. CoOp's `"a photo of a"`. When `n_ctx` is larger
            than their token count, they fill the last context vectors and the others start random; when it is
            smaller, the first `n_ctx` tokens start the context and the rest stay fixed words after it (MaPLe's
            `n_ctx=2` with `"a photo of a"`: the learned "a photo", then "of a" and the class name).
        init_seed (`int`, *optional*, defaults to 0):
            Seed of the random (normal, std 0.02) initialisation, so the same config gives the same adapter.
        class_token_position (`str`, *optional*, defaults to `"end"`):
            `"end"`, `"middle"` or `"front"`: where the text sits relative to the context.
        class_specific (`bool`, *optional*, defaults to `False`):
            One context per class (CoOp's CSC) instead of one shared context. Needs `num_classes` or `class_names`; the
            i-th text of every batch then uses the i-th class's context.
        num_classes (`int`, *optional*):
            Number of classes, for `class_specific`. Taken from `class_names` when they are given.
        class_names (`list[str]`, *optional*):
            The class names the adapter was learned for. They travel with the adapter in `adapter_config.json`.
        suffix_token_ids (`list[int]`, *optional*):
            Token ids that end a text and stay after the context for `"middle"` and `"front"` (CoOp's period). Filled
            from the tokenizer with the ids of `"."` when the adapter is created; `[]` keeps every token with the text.
        fixed_token_ids (`list[int]`, *optional*):
            Token ids between the context and the text, kept as they are: the tokens of `ctx_init` past `n_ctx`,
            filled from the tokenizer when the adapter is created (`[]`: none).
        conditional (`bool`, *optional*, defaults to `False`): CoCoOp (Zhou et al., CVPR 2022): a meta-net maps each
            image's feature to a bias added to every context vector (instance-conditional context). Needs a model
            with an image tower and a shared context.
        meta_net_reduction (`int`, *optional*, defaults to 16): the meta-net's hidden size is the image feature size
            divided by this (CoCoOp's Linear(d, d/16) -> ReLU -> Linear(d/16, width)).
        prompt_depth (`int`, *optional*, defaults to 1): layers of the text tower that get learned tokens at the
            context's positions: the input (the context, as CoOp) and, before each of the next `prompt_depth - 1`
            encoder layers, that layer's own `n_ctx` learned tokens in place of the hidden states (deep prompts, as
            VPT-deep, IVLP, MaPLe and PromptSRC). Deep prompts are shared by all classes.
        vision_n_ctx (`int`, *optional*, defaults to 0): learned tokens appended to the image tower's sequence after
            its embeddings (no position embedding, as VPT); 0 for none. Image features then depend on the adapter.
        vision_prompt_depth (`int`, *optional*, defaults to 1): layers of the image tower with their own vision
            tokens: the appended ones, and before each of the next `vision_prompt_depth - 1` encoder layers, that
            layer's tokens in place of the previous ones.
        coupled (`bool`, *optional*, defaults to `False`): MaPLe (Khattak et al., CVPR 2023): the vision tokens of
            each layer are a learned linear map of that layer's text tokens (its coupling function), not parameters
            of their own; `vision_n_ctx` and `vision_prompt_depth` are then `n_ctx` and `prompt_depth`.
        class_prompt_layer (`int`, *optional*, defaults to 0): TCP (Yao et al., CVPR 2024): before this layer of the
            text tower (TCP: 8 of 12), the hidden states at the context's positions are replaced by `n_ctx` class-aware
            tokens, a learned map of the frozen text tower's embedding of the prompt's own text, so that they exist
            for classes never trained on; 0 for none. Combines with a shared context only.
        target_modules (`str`, *optional*):
            Name (or the end of the name) of the text embeddings module to replace; not a pattern. By default the text
            embeddings of a supported model are found by their class, wherever the model keeps them.
        tokenizer_name_or_path (`str`, *optional*):
            Tokenizer used for `ctx_init` and `suffix_token_ids`. Defaults to the base model's `name_or_path`.
        weights_sha256 (`str`, *optional*):
            Written by this package's saves into `adapter_config.json`: the SHA-256 of the `adapter_model.safetensors`
            saved with it. The loader refuses a pair whose weights differ (an interrupted save). Not kept on a
            model: a config in memory describes no file.

    Example:

    ```py
    >>> from peft_prompt_clip import PromptEmbeddingConfig
    >>> config = PromptEmbeddingConfig(n_ctx=4, class_token_position="middle")
    >>> config.n_ctx, config.class_token_position
    (4, <ClassTokenPosition.MIDDLE: 'middle'>)

    ```
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.n_ctx is not None and (isinstance(self.n_ctx, bool) or not isinstance(self.n_ctx, int)):
            raise TypeError(f"n_ctx must be an integer, got {self.n_ctx!r}.")
        if self.n_ctx is not None and self.n_ctx < 1:
            raise ValueError(f"n_ctx must be at least 1, got {self.n_ctx}.")
        if self.ctx_init is not None and (not isinstance(self.ctx_init, str) or not self.ctx_init.strip()):
            raise ValueError(f"ctx_init must be non-empty words such as 'a photo of a', got {self.ctx_init!r}.")
        for name in ("class_specific", "inference_mode", "conditional", "coupled"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}.")
        for name in ("tokenizer_name_or_path", "base_model_name_or_path", "revision"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string, got {getattr(self, name)!r}.")
        if isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int):
            raise TypeError(f"init_seed must be an integer, got {self.init_seed!r}.")
        if not 0 <= self.init_seed < 2**63:
            raise ValueError(f"init_seed must be between 0 and 2**63 - 1, got {self.init_seed}.")
        try:
            self.class_token_position = ClassTokenPosition(self.class_token_position)
        except ValueError:
            choices = ", ".join(repr(p.value) for p in ClassTokenPosition)
            raise ValueError(
                f"class_token_position must be one of {choices}, got {self.class_token_position!r}."
            ) from None
        if self.class_names is not None:
            check_class_names(self.class_names)
            if self.num_classes is None:
                self.num_classes = len(self.class_names)
            elif self.num_classes != len(self.class_names):
                raise ValueError(
                    f"num_classes={self.num_classes} disagrees with the {len(self.class_names)} class_names; "
                    "drop num_classes or make them agree."
                )
        if self.num_classes is not None and (
            isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1
        ):
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}.")
        if isinstance(self.meta_net_reduction, bool) or not isinstance(self.meta_net_reduction, int):
            raise TypeError(f"meta_net_reduction must be an integer, got {self.meta_net_reduction!r}.")
        if self.meta_net_reduction < 1:
            raise ValueError(f"meta_net_reduction must be at least 1, got {self.meta_net_reduction}.")
        for name, least in (
            ("prompt_depth", 1),
            ("vision_n_ctx", 0),
            ("vision_prompt_depth", 1),
            ("class_prompt_layer", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer, got {value!r}.")
            if value < least:
                raise ValueError(f"{name} must be at least {least}, got {value}.")
        if not self.coupled and self.vision_n_ctx == 0 and self.vision_prompt_depth > 1:
            raise ValueError(
                f"vision_prompt_depth={self.vision_prompt_depth} needs vision tokens: set vision_n_ctx (e.g. 4)."
            )
        check_variants(self)
        for name in ("suffix_token_ids", "fixed_token_ids"):
            ids = getattr(self, name)
            if ids is not None and not (
                isinstance(ids, list)
                and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in ids)
            ):
                raise ValueError(f"{name} must be a list of token ids, got {ids!r}.")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            raise TypeError(f"target_modules must be one module name (a string), got {self.target_modules!r}.")
        if self.weights_sha256 is not None and not (
            isinstance(self.weights_sha256, str) and re.fullmatch(r"[0-9a-f]{64}", self.weights_sha256)
        ):
            raise ValueError(f"weights_sha256 must be 64 hex digits, got {self.weights_sha256!r}.")
        # a module name, never a pattern: a saved adapter's config must not run a regex over the model's modules
        if self.target_modules is not None and not re.fullmatch(r"[\w.-]+", self.target_modules):
            raise ValueError(
                f"target_modules must be a module name or the end of one, such as 'text_model.embeddings' (letters, "
                f"digits, '_', '-' and '.'), got {self.target_modules!r}; patterns are not accepted."
            )

    def claim_classes(self, names: list[str]) -> None:
        """Record that the adapter is learned for the classes `names` (in that order). A class-specific context
        learned for other classes is not silently renamed: that is a `ValueError`."""
        if self.class_specific and self.class_names is not None and self.class_names != names:
            raise ValueError(
                f"This adapter has one context per class for {self.class_names}, but the data's classes are "
                f"{names}. Train it on those classes (in that order), or start a new class-specific adapter."
            )
        if self.class_specific and self.num_classes != len(names):
            raise ValueError(
                f"This adapter has class-specific context for {self.num_classes} classes; the data has {len(names)}."
            )
        self.class_names = names

    @property
    def prompts_images(self) -> bool:
        """Whether the adapter prompts the image tower (its image features depend on the adapter)."""
        return self.vision_n_ctx > 0 or self.coupled

    @property
    def card_tags(self) -> list[str]:
        """The Hub tags of this adapter's model cards (this package's, PEFT's and the Hub's own): the package, the
        kind of tuning, its method's and the task's."""
        method = {"TCP": "tcp", "MaPLe": "maple", "IVLP": "ivlp", "CoCoOp": "cocoop"}.get(self.method, "")
        method = method or ("vpt" if self.vision_n_ctx else "deep-prompts" if self.prompt_depth > 1 else "coop")
        specific = ["class-specific-context"] if self.class_specific else []
        return ["peft-prompt-clip", "prompt-learning", method, *specific, "zero-shot-image-classification"]

    @property
    def method(self) -> str:
        """The method whose adapter this is, by its structure: CoOp, CoOp (CSC), CoCoOp, deep text prompts, vision
        prompts, IVLP (independent deep text and vision prompts), MaPLe (coupled) or TCP (class-aware tokens)."""
        if self.class_prompt_layer:
            return "TCP"
        if self.coupled:
            return "MaPLe"
        if self.vision_n_ctx:
            return "IVLP" if self.prompt_depth > 1 else "CoOp with vision prompts (VPT)"
        if self.prompt_depth > 1:
            return "deep text prompts"
        if self.conditional:
            return "CoCoOp"
        return "CoOp with class-specific context (CSC)" if self.class_specific else "CoOp"


def check_class_names(names: list[str]) -> None:
    """The one check of a list of class names: non-empty, valid text, none blank, none repeated (spaces aside).

    Raises:
        `TypeError` or `ValueError`: naming the offending entries.
    """
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"class_names must be a list of strings, got {names!r}.")
    if not names:
        raise ValueError("class_names is empty: give at least one class name.")
    blank = [i for i, n in enumerate(names) if not n.strip()]
    if blank:
        raise ValueError(f"class_names has empty names at positions {blank}; every class needs a name.")
    unencodable = [i for i, n in enumerate(names) if not _encodable(n)]
    if unencodable:
        raise ValueError(
            f"class_names has names that are no valid text (a lone surrogate) at positions {unencodable[:10]}; "
            "write them as UTF-8 text."
        )
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        words = " ".join(n.split())  # the tokenizer reads "cat", " cat" and "cat " as one word
        if words in seen:
            raise ValueError(
                f"class_names repeats {printable(words)!r} (positions {seen[words]} and {i}, spaces aside); class "
                "names must be unique."
            )
        seen[words] = i


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """`text` with control characters escaped, for printing names that come from untrusted adapters (no newlines, no
    terminal escape sequences)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
