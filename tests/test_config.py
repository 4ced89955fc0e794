"""PromptEmbeddingConfig: PEFT's config conventions, validation messages that say what to fix, JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest
from peft import PeftConfig

from peft_prompt_clip import ClassTokenPosition, PromptEmbeddingConfig


def test_every_field_has_help():
    own = [
        f
        for f in dataclasses.fields(PromptEmbeddingConfig)
        if f.name not in {f.name for f in dataclasses.fields(PeftConfig)}
    ]
    assert {f.name for f in own} >= {"n_ctx", "ctx_init", "init_seed", "class_token_position", "class_specific"}
    assert all(f.metadata.get("help") for f in own)


def test_json_round_trip(tmp_path):
    config = PromptEmbeddingConfig(n_ctx=8, class_token_position="front", class_specific=True, class_names=["a", "b"])
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["class_token_position"] == "front" and raw["peft_type"] == "PEFT_PROMPT_CLIP"
    again = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(again, PromptEmbeddingConfig)
    assert again.to_dict() == config.to_dict()
    assert again.class_token_position is ClassTokenPosition.FRONT


def test_unknown_keys_load_with_a_warning(tmp_path):
    PromptEmbeddingConfig(n_ctx=4).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, "from_the_future": 1}))
    with pytest.warns(UserWarning, match="from_the_future"):
        config = PeftConfig.from_pretrained(tmp_path)
    assert config.n_ctx == 4


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(n_ctx=0), ValueError, "n_ctx must be at least 1"),
        (dict(n_ctx=2.5), TypeError, "n_ctx must be an integer"),
        (dict(n_ctx=True), TypeError, "n_ctx must be an integer"),
        (dict(ctx_init="  "), ValueError, "ctx_init must be non-empty words"),
        (dict(init_seed="1"), TypeError, "init_seed must be an integer"),
        (dict(class_token_position="start"), ValueError, "must be one of 'end', 'middle', 'front'"),
        (dict(class_specific=True), ValueError, "set num_classes or class_names"),
        (dict(class_names=[]), ValueError, "class_names is empty"),
        (dict(class_names=["cat", ""]), ValueError, r"empty names at positions \[1\]"),
        (dict(class_names=["cat", "dog", "cat"]), ValueError, r"repeats 'cat' \(positions 0 and 2, spaces aside\)"),
        (dict(class_names="cat"), TypeError, "class_names must be a list of strings"),
        (dict(class_names=["a", "b"], num_classes=3), ValueError, "num_classes=3 disagrees with the 2 class_names"),
        (dict(num_classes=0), ValueError, "num_classes must be a positive integer"),
        (dict(suffix_token_ids=[-1]), ValueError, "suffix_token_ids must be a list of token ids"),
        (dict(target_modules=["a", "b"]), TypeError, "target_modules must be one module name"),
    ],
)
def test_validation_says_what_to_fix(kwargs, error, message):
    with pytest.raises(error, match=message):
        PromptEmbeddingConfig(**kwargs)


def test_num_classes_comes_from_class_names():
    assert PromptEmbeddingConfig(class_specific=True, class_names=["a", "b", "c"]).num_classes == 3
