"""Interpretation: a context made of known word embeddings is read back as those words, shared and per class."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model

from peft_prompt_clip import PromptEmbeddingConfig, PromptEmbeddingLayer
from peft_prompt_clip.interpret import nearest_words


def set_context(model, tokenizer, words_per_row: list[str]) -> None:
    layer = next(m for m in model.modules() if isinstance(m, PromptEmbeddingLayer))
    table = layer.token_embedding.weight
    rows = [table[tokenizer(words, add_special_tokens=False)["input_ids"]] for words in words_per_row]
    with torch.no_grad():
        context = layer.prompt_embedding_ctx["default"]
        context.copy_(torch.stack(rows).reshape(context.shape) + 1e-4)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_shared_context_reads_back_its_words(clip, tokenizer, metric):
    model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=4))
    set_context(model, tokenizer, ["a photo of the"])
    result = nearest_words(model, tokenizer, k=3, metric=metric)
    assert list(result) == ["shared"]
    assert [position[0][0] for position in result["shared"]] == ["a", "photo", "of", "the"]
    first = result["shared"][0]
    assert len(first) == 3 and (first[0][1] <= first[1][1] if metric == "euclidean" else first[0][1] >= first[1][1])


def test_class_specific_context_per_class(clip, tokenizer):
    config = PromptEmbeddingConfig(n_ctx=2, class_specific=True, class_names=["cat", "dog"])
    model = get_peft_model(clip, config)
    set_context(model, tokenizer, ["small red", "large blue"])
    result = nearest_words(model, tokenizer, k=1)
    assert {name: [p[0][0] for p in positions] for name, positions in result.items()} == {
        "cat": ["small", "red"],
        "dog": ["large", "blue"],
    }


def test_interpret_command(clip, tokenizer, clip_dir, tmp_path):
    model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=4))
    set_context(model, tokenizer, ["a photo of the"])
    model.save_pretrained(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "peft_prompt_clip", "interpret", "--adapter", str(tmp_path), "--top-k", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ctx  2: photo (" in result.stdout and result.stdout.splitlines()[1] == "shared:"
    assert result.stdout.startswith("the vocabulary tokens nearest to each learned context vector (in brackets: "
                                    "Euclidean distance, smaller is nearer)")  # fmt: skip
