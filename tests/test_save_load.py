"""Saving and loading: a few-KB safetensors file, PEFT's config format, bit-identical round trips, clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import text_features
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPTextConfig, CLIPTextModel

from peft_prompt_clip import InvalidAdapterError, PromptEmbeddingConfig, PromptEmbeddingLayer, load_prompt_model
from peft_prompt_clip.tiny import save_tiny_clip

CLASSES = ["cat", "dog", "x-ray"]

CONFIGS = {
    "shared-end": dict(n_ctx=4),
    "words-middle": dict(ctx_init="a photo of a", class_token_position="middle"),
    "csc-front": dict(n_ctx=3, class_specific=True, class_names=CLASSES, class_token_position="front"),
}


def context_of(model) -> torch.nn.ParameterDict:
    return next(m for m in model.modules() if isinstance(m, PromptEmbeddingLayer)).prompt_embedding_ctx


def perturbed(model):
    """Move the context far from its initialisation, so that a save that drops or re-initialises it cannot pass."""
    with torch.no_grad():
        for p in context_of(model).values():
            p.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_bit_identical(clip_dir, tokenizer, tmp_path, name, recwarn):
    model = perturbed(
        get_peft_model(CLIPModel.from_pretrained(clip_dir).eval(), PromptEmbeddingConfig(**CONFIGS[name]))
    )
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PEFT_PROMPT_CLIP"
    assert saved["base_model_name_or_path"] == str(clip_dir)
    assert saved["peft_version"]
    assert saved["n_ctx"] == model.peft_config["default"].n_ctx
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert list(weights) == ["base_model.model.text_model.embeddings.prompt_embedding_ctx"]

    inputs = tokenizer([c + "." for c in CLASSES], padding=True, return_tensors="pt")
    pixels = torch.rand(2, 3, 30, 30)
    again = PeftModel.from_pretrained(CLIPModel.from_pretrained(clip_dir).eval(), tmp_path)
    with torch.no_grad():
        assert torch.equal(
            again(**inputs, pixel_values=pixels).logits_per_image,
            model(**inputs, pixel_values=pixels).logits_per_image,
        )
    assert torch.equal(context_of(again)["default"], context_of(model)["default"])
    assert not [w for w in recwarn if "missing adapter keys" in str(w.message).lower()]


def test_class_names_travel_with_the_adapter(clip_dir, tmp_path):
    model = get_peft_model(CLIPModel.from_pretrained(clip_dir), PromptEmbeddingConfig(**CONFIGS["csc-front"]))
    model.save_pretrained(tmp_path)
    again = load_prompt_model(CLIPModel.from_pretrained(clip_dir), str(tmp_path))
    config = again.peft_config["default"]
    assert config.class_names == CLASSES and config.num_classes == 3 and config.class_specific
    assert config.suffix_token_ids == model.peft_config["default"].suffix_token_ids != []


def test_file_is_the_raw_context_plus_a_small_header(tmp_path):
    """16 x 512 fp32 is 32 KiB; the file must be within 2 KiB of it."""
    config = CLIPTextConfig(
        hidden_size=512,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=8,
        vocab_size=100,
        bos_token_id=98,
        eos_token_id=99,
    )
    model = get_peft_model(CLIPTextModel(config), PromptEmbeddingConfig(n_ctx=16))
    model.save_pretrained(tmp_path)
    size = os.path.getsize(tmp_path / "adapter_model.safetensors")
    raw = 16 * 512 * 4
    assert raw <= size <= raw + 2048, size
    assert not [f for f in os.listdir(tmp_path) if f.startswith(("model", "pytorch_model"))]


def test_adapter_moves_between_clip_and_its_text_tower(clip_dir, tokenizer, tmp_path):
    model = perturbed(get_peft_model(CLIPModel.from_pretrained(clip_dir).eval(), PromptEmbeddingConfig(n_ctx=4)))
    model.save_pretrained(tmp_path)
    tower = load_prompt_model(CLIPTextModel.from_pretrained(clip_dir).eval(), str(tmp_path))
    inputs = tokenizer(["cat.", "a red car."], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            tower(**inputs).pooler_output, model.base_model.model.text_model(**inputs).pooler_output, atol=0, rtol=0
        )


def test_another_width_is_a_clear_error(clip_dir, tmp_path):
    model = get_peft_model(CLIPModel.from_pretrained(clip_dir), PromptEmbeddingConfig(n_ctx=4))
    model.save_pretrained(tmp_path / "adapter")
    wide = CLIPModel.from_pretrained(save_tiny_clip(tmp_path / "wide", hidden=48))
    with pytest.raises(ValueError, match=r"shape \(4, 32\), but this model expects \(4, 48\).*text width 32"):
        PeftModel.from_pretrained(wide, tmp_path / "adapter")
    with pytest.raises(ValueError, match="text width 32"):
        load_prompt_model(CLIPModel.from_pretrained(tmp_path / "wide"), str(tmp_path / "adapter"))


def test_another_n_ctx_in_the_file_is_a_clear_error(clip_dir, tmp_path):
    get_peft_model(CLIPModel.from_pretrained(clip_dir), PromptEmbeddingConfig(n_ctx=4)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "n_ctx": 5}))
    with pytest.raises(InvalidAdapterError, match=r"shape \(4, 32\), but adapter_config.json says n_ctx=5"):
        load_prompt_model(CLIPModel.from_pretrained(clip_dir), str(tmp_path))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "corrupt or truncated"),
        (lambda p: p.write_bytes(b"\x00" * 64), "corrupt or truncated"),
        (lambda p: p.write_bytes(b""), "corrupt or truncated"),
    ],
    ids=["truncated", "garbage", "empty"],
)
def test_damaged_weights_are_a_clear_error(clip_dir, tmp_path, damage, message):
    """The package's loader names the damaged file; PEFT's own (SECURITY.md says which to use) reads it first."""
    get_peft_model(CLIPModel.from_pretrained(clip_dir), PromptEmbeddingConfig(n_ctx=4)).save_pretrained(tmp_path)
    damage(tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"{tmp_path / 'adapter_model.safetensors'} is {message}"):
        load_prompt_model(CLIPModel.from_pretrained(clip_dir), str(tmp_path))
    with pytest.raises(Exception) as peft_error:  # noqa: B017 - whatever PEFT raises, it does not name the file
        PeftModel.from_pretrained(CLIPModel.from_pretrained(clip_dir), str(tmp_path))
    assert "adapter_model.safetensors" not in str(peft_error.value)


def test_foreign_or_broken_config_is_a_clear_error(clip_dir, tmp_path):
    lora = get_peft_model(CLIPModel.from_pretrained(clip_dir), LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="'LORA' adapter, not a prompt adapter"):
        load_prompt_model(CLIPModel.from_pretrained(clip_dir), str(tmp_path / "lora"))
    get_peft_model(CLIPModel.from_pretrained(clip_dir), PromptEmbeddingConfig(n_ctx=4)).save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_prompt_model(CLIPModel.from_pretrained(clip_dir), str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "adapter_config.json").write_text("{}")
        load_prompt_model(CLIPModel.from_pretrained(clip_dir), str(tmp_path / "b"))
    with pytest.raises(FileNotFoundError, match="No adapter folder"):
        load_prompt_model(CLIPModel.from_pretrained(clip_dir), str(tmp_path / "missing"))


def test_load_a_second_adapter_into_a_peft_model(clip_dir, tokenizer, tmp_path):
    first = perturbed(get_peft_model(CLIPModel.from_pretrained(clip_dir).eval(), PromptEmbeddingConfig(n_ctx=4)))
    first.save_pretrained(tmp_path / "first")
    second = perturbed(get_peft_model(CLIPModel.from_pretrained(clip_dir).eval(), PromptEmbeddingConfig(n_ctx=2)))
    second.save_pretrained(tmp_path / "second")
    model = load_prompt_model(CLIPModel.from_pretrained(clip_dir).eval(), str(tmp_path / "first"))
    model = load_prompt_model(model, str(tmp_path / "second"), adapter_name="second")
    inputs = tokenizer(["cat."], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(text_features(model, **inputs), text_features(second, **inputs))
        model.set_adapter("default")
        assert torch.equal(text_features(model, **inputs), text_features(first, **inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_cpu_mem_usage_loading(clip_dir, tmp_path, dtype):
    model = perturbed(get_peft_model(CLIPModel.from_pretrained(clip_dir), PromptEmbeddingConfig(n_ctx=4)))
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(
        CLIPModel.from_pretrained(clip_dir, dtype=dtype), tmp_path, low_cpu_mem_usage=True
    )
    loaded = context_of(again)["default"]
    assert loaded.device.type == "cpu" and loaded.dtype == torch.float32
    assert torch.equal(loaded, context_of(model)["default"])
