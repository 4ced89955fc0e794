"""Shared fixtures: a tiny CLIP saved like a Hub checkpoint (model, tokenizer, processor) in a temporary folder."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, CLIPModel

from peft_prompt_clip.tiny import save_tiny_clip


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def legacy_clip_dir(tmp_path_factory) -> Path:
    """A tiny CLIP whose config says eos_token_id == 2: transformers then pools at input_ids.argmax()."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip-legacy"), legacy_eos=True)


@pytest.fixture(scope="session")
def tokenizer(clip_dir):
    return AutoTokenizer.from_pretrained(clip_dir)


@pytest.fixture
def clip(clip_dir) -> CLIPModel:
    return CLIPModel.from_pretrained(clip_dir).eval()


def write_image_folder(root: Path, per_class: int) -> Path:
    """`root/{cat,dog,red_car}/*.png`: random 32x24 images, the same for the same arguments."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "red_car"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def text_features(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """Projected text features under transformers 4 (a tensor) and 5 (an output object)."""
    out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def text_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding `embeddings`, `encoder` and `final_layer_norm`, whatever the transformers layout."""
    return next(m for m in model.modules() if hasattr(m, "final_layer_norm") and hasattr(m, "encoder"))


def encode_embeddings(model: torch.nn.Module, prompts: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
    """CoOp's TextEncoder: embeddings + positions -> causal transformer -> final norm -> end-of-text -> projection."""
    tower = text_tower(model)
    length = prompts.shape[1]
    x = prompts + tower.embeddings.position_embedding.weight[:length]
    mask = torch.full((length, length), torch.finfo(x.dtype).min).triu(1)[None, None]
    for layer in tower.encoder.layers:
        if "causal_attention_mask" in inspect.signature(layer.forward).parameters:  # transformers 4
            x = layer(x, None, mask)[0]
        else:
            x = layer(x, mask)
            x = x[0] if isinstance(x, tuple) else x
    x = tower.final_layer_norm(x)
    pooled = x[torch.arange(x.shape[0]), eot_index]
    return model.text_projection(pooled)
