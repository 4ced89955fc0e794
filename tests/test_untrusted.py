"""Untrusted adapter files: random configs, truncated and bit-flipped safetensors. Loading either works or raises
InvalidAdapterError with a message; nothing else escapes, nothing hangs, and nothing is unpickled."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from transformers import CLIPModel

from peft_prompt_clip import InvalidAdapterError, PromptEmbeddingConfig, load_prompt_model
from peft_prompt_clip.loading import read_adapter_config
from peft_prompt_clip.tiny import clip_config

FIELDS = [
    "n_ctx", "ctx_init", "init_seed", "class_token_position", "class_specific", "num_classes", "class_names",
    "suffix_token_ids", "fixed_token_ids", "target_modules", "tokenizer_name_or_path", "inference_mode", "task_type",
    "base_model_name_or_path", "revision", "peft_version", "auto_mapping", "weights_sha256",
]  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=10,
)
SETTINGS = settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(CLIPModel(clip_config()), PromptEmbeddingConfig(n_ctx=4, class_names=["cat", "dog"]))
    model.save_pretrained(folder)
    return folder


@SETTINGS
@given(values=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), JSON, max_size=6))
def test_random_configs_load_or_fail_clearly(tmp_path_factory, values):
    folder = tmp_path_factory.mktemp("config")
    (folder / "adapter_config.json").write_text(json.dumps({**values, "peft_type": "PEFT_PROMPT_CLIP"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = read_adapter_config(folder)
        except InvalidAdapterError as exc:
            assert "adapter_config.json" in str(exc)
            return
    assert isinstance(config, PromptEmbeddingConfig)
    assert config.n_ctx is None or (isinstance(config.n_ctx, int) and config.n_ctx >= 1)


@SETTINGS
@given(content=st.binary(max_size=64) | JSON.map(lambda v: json.dumps(v).encode()))
def test_random_config_files_fail_clearly(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("config")
    (folder / "adapter_config.json").write_bytes(content)
    try:
        read_adapter_config(folder)
    except InvalidAdapterError:
        return
    pytest.fail("a config without peft_type PEFT_PROMPT_CLIP was accepted")


@SETTINGS
@given(data=st.data())
def test_damaged_weights_load_or_fail_clearly(tmp_path_factory, saved, data):
    folder = tmp_path_factory.mktemp("damaged")
    shutil.copytree(saved, folder, dirs_exist_ok=True)
    weights = folder / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            position = data.draw(st.integers(0, len(raw) - 1), label="byte")
            raw[position] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    weights.write_bytes(bytes(raw))
    model = CLIPModel(clip_config()).eval()
    try:
        loaded = load_prompt_model(model, str(folder))
    except InvalidAdapterError:
        return
    context = next(p for n, p in loaded.named_parameters() if "prompt_embedding_ctx" in n)
    assert context.shape == (4, 32) and torch.isfinite(context).all()


def test_loading_never_unpickles(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called on an adapter file")

    monkeypatch.setattr(torch, "load", refuse)
    load_prompt_model(CLIPModel(clip_config()).eval(), str(saved))
