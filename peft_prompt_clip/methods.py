"""The published methods as presets: each paper's adapter settings and training recipe, in the fields of
[`PromptEmbeddingConfig`] and [`TrainingArguments`], so that `train --method maple` (or [`method_settings`] in Python)
starts from what the paper ran, and every field can still be set on top."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from .options import IMAGENET_TEMPLATES, AdapterOptions

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Method:
    """One paper's preset.

    Args:
        name (`str`): the method, as its paper names it.
        paper (`str`): the paper.
        adapter (`dict`): [`PromptEmbeddingConfig`] fields.
        training (`dict`): [`TrainingArguments`] fields (the rest are CoOp's recipe, this package's defaults).
    """

    name: str
    paper: str
    adapter: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)


#: The presets, by the name `--method` takes. The recipes are those of the papers' base-to-novel configurations
#: (ViT-B/16): MaPLe's and PromptSRC's as in the PromptSRC repository's configs. Depths are for 12-layer towers; on a
#: shallower model they are capped at its layer count (see [`method_settings`]). MaPLe's and IVLP's 2 context tokens
#: start from "a photo of a" as in their code: "a photo" is learned, "of a" stays fixed before the class name.
METHODS: dict[str, Method] = {
    "coop": Method("CoOp", "Zhou et al., Learning to Prompt for Vision-Language Models, IJCV 2022"),
    "cocoop": Method(
        "CoCoOp",
        "Zhou et al., Conditional Prompt Learning for Vision-Language Models, CVPR 2022",
        {"n_ctx": 4, "ctx_init": "a photo of a", "conditional": True},
        {"batch_size": 1, "epochs": 10},
    ),
    "kgcoop": Method(
        "KgCoOp",
        "Yao et al., Visual-Language Prompt Tuning with Knowledge-guided Context Optimization, CVPR 2023",
        {"n_ctx": 4, "ctx_init": "a photo of a"},
        {"kg_weight": 8.0},
    ),
    "ivlp": Method(
        "IVLP",
        "Khattak et al., MaPLe: Multi-modal Prompt Learning, CVPR 2023 (its independent V-L prompting baseline)",
        {"n_ctx": 2, "ctx_init": "a photo of a", "prompt_depth": 9, "vision_n_ctx": 2, "vision_prompt_depth": 9},
        {"lr": 0.0035, "batch_size": 4, "epochs": 2},
    ),
    "maple": Method(
        "MaPLe",
        "Khattak et al., MaPLe: Multi-modal Prompt Learning, CVPR 2023",
        {"n_ctx": 2, "ctx_init": "a photo of a", "prompt_depth": 9, "coupled": True},
        {"lr": 0.0035, "batch_size": 4, "epochs": 2},
    ),
    "promptsrc": Method(
        "PromptSRC",
        "Khattak et al., Self-regulating Prompts: Foundational Model Adaptation without Forgetting, ICCV 2023",
        {"n_ctx": 4, "ctx_init": "a photo of a", "prompt_depth": 9, "vision_n_ctx": 4, "vision_prompt_depth": 9},
        {
            "lr": 0.0025,
            "batch_size": 4,
            "epochs": 20,
            "scl_text_weight": 25.0,
            "scl_image_weight": 10.0,
            "hand_template": list(IMAGENET_TEMPLATES),
            "gpa_mean": 15.0,
            "gpa_std": 1.0,
        },
    ),
    "tcp": Method(
        "TCP",
        "Yao et al., TCP: Textual-based Class-aware Prompt tuning for Visual-Language Model, CVPR 2024",
        {"n_ctx": 4, "ctx_init": "a photo of a", "class_prompt_layer": 8},
        {"kg_weight": 8.0},
    ),
}


def method_settings(
    name: str,
    num_classes: int,
    model: nn.Module | None = None,
    epochs: int | None = None,
    given: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    The adapter fields and training fields of the preset `name` for `num_classes` classes, with the fields of `given`
    (adapter or training fields) in place of the preset's: a given `n_ctx` drops the preset's `ctx_init` (its words
    fit its own length) unless `ctx_init` is given too, and `vision_n_ctx=0` drops its vision depth. PromptSRC's
    logit term (KL averaged over images and classes) is `kl_weight = 1 / num_classes` here; given the `model`, the
    preset's depths are capped at its towers' layer counts (the papers' depth 9 is for 12-layer towers, TCP's layer
    8 of 12 at the text tower's last); given `epochs` other than the paper's, the Gaussian of PromptSRC's aggregation
    is scaled with them (mean 15 and std 1 of 20 epochs: 0.75 and 0.05 of them).

    Raises:
        `ValueError`: for an unknown name, listing the known ones.

    Example:

    ```py
    >>> from peft_prompt_clip.methods import method_settings
    >>> adapter, training = method_settings("maple", num_classes=10)
    >>> adapter["prompt_depth"], adapter["coupled"], training["lr"]
    (9, True, 0.0035)

    ```
    """
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    method = METHODS[name]
    adapter, training = dict(method.adapter), dict(method.training)
    if name == "promptsrc":
        training["kl_weight"] = 1.0 / num_classes
    if epochs is not None and "gpa_mean" in training and epochs != training["epochs"]:
        scale = epochs / training["epochs"]
        training.update(gpa_mean=training["gpa_mean"] * scale, gpa_std=training["gpa_std"] * scale)
    if epochs is not None and "epochs" in training:
        training["epochs"] = epochs
    text_layers = vision_layers = None
    if model is not None:
        from .model import find_text_embeddings, find_vision_tower

        text_model = model.get_submodule(find_text_embeddings(model).rpartition(".")[0])
        text_layers = len(text_model.encoder.layers)
        vision = find_vision_tower(model)
        vision_layers = None if vision is None else len(vision.layers)
    coupled = adapter.get("coupled", False)  # MaPLe's depth is that of both towers
    caps = {
        "prompt_depth": [text_layers, vision_layers if coupled else None],
        "vision_prompt_depth": [vision_layers],
        "class_prompt_layer": [None if text_layers is None else text_layers - 1],  # a layer past the input
    }
    for key, layers in caps.items():
        for count in layers:
            if key in adapter and count is not None:
                adapter[key] = min(adapter[key], count)
    given = given or {}
    if "n_ctx" in given and "ctx_init" not in given:
        adapter.pop("ctx_init", None)
    if given.get("vision_n_ctx") == 0:
        adapter.pop("vision_prompt_depth", None)
    adapter_fields = {f.name for f in fields(AdapterOptions)}
    adapter.update({k: v for k, v in given.items() if k in adapter_fields})
    training.update({k: v for k, v in given.items() if k not in adapter_fields})
    return adapter, training
