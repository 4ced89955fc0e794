"""The adapter's text features equal CoOp's prompt built by hand (PromptLearner + TextEncoder), for every layout."""

from __future__ import annotations

import pytest
import torch
from conftest import encode_embeddings, text_features, text_tower
from peft import get_peft_model
from transformers import AutoTokenizer, CLIPModel

from peft_prompt_clip import PromptEmbeddingConfig

CLASSES = ["cat", "x-ray", "red car", "airplane", "x"]  # "x" is CoOp's own placeholder word
N_CTX = 4


def coop_features(model, tokenizer, ctx: torch.Tensor, position: str) -> torch.Tensor:
    """CoOp's PromptLearner.forward, written from the paper's code structure: 'X X X X {name}.' is tokenised, its
    embedding split into prefix (SOS), the context slots and suffix (class tokens, '.', EOS, padding)."""
    prompts = [" ".join(["X"] * N_CTX) + " " + name + "." for name in CLASSES]
    name_lens = [len(tokenizer(name, add_special_tokens=False)["input_ids"]) for name in CLASSES]
    tokenized = tokenizer(prompts, padding="max_length", max_length=text_tower(model).config.max_position_embeddings)
    ids = torch.tensor(tokenized["input_ids"])
    with torch.no_grad():
        embedding = text_tower(model).embeddings.token_embedding(ids)
    prefix, suffix = embedding[:, :1], embedding[:, 1 + N_CTX :]
    ctx = ctx if ctx.dim() == 3 else ctx.expand(len(CLASSES), -1, -1)
    half = N_CTX // 2
    rows = []
    for i, name_len in enumerate(name_lens):
        class_i, suffix_i = suffix[i : i + 1, :name_len], suffix[i : i + 1, name_len:]
        ctx_i = ctx[i : i + 1]
        parts = {
            "end": [prefix[i : i + 1], ctx_i, suffix[i : i + 1]],
            "middle": [prefix[i : i + 1], ctx_i[:, :half], class_i, ctx_i[:, half:], suffix_i],
            "front": [prefix[i : i + 1], class_i, ctx_i, suffix_i],
        }[position]
        rows.append(torch.cat(parts, dim=1))
    eot = ids.argmax(dim=-1)  # CoOp pools at the highest id, the end-of-text token
    return encode_embeddings(model, torch.cat(rows), eot)


@pytest.mark.parametrize("class_specific", [False, True], ids=["shared", "csc"])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("legacy", [False, True], ids=["eos-id", "argmax-eos"])
def test_coop_parity(clip_dir, legacy_clip_dir, position, class_specific, legacy):
    folder = legacy_clip_dir if legacy else clip_dir
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = PromptEmbeddingConfig(
        n_ctx=N_CTX, class_token_position=position, class_specific=class_specific, class_names=CLASSES
    )
    model = get_peft_model(CLIPModel.from_pretrained(folder).eval(), config)
    ctx = model.base_model.model.text_model.embeddings.prompt_embedding_ctx["default"]
    with torch.no_grad():
        ctx.normal_(0, 1.0)  # far from the initialisation, so that a misplaced vector changes the features
        inputs = tokenizer([name + "." for name in CLASSES], padding=True, return_tensors="pt")
        ours = text_features(model, inputs["input_ids"], inputs["attention_mask"])
        expected = coop_features(model.get_base_model(), tokenizer, ctx.detach(), position)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_parity_catches_a_misplaced_context(clip_dir, tokenizer):
    """The reference is sensitive: the `end` layout's features differ from CoOp's `front` prompt."""
    model = get_peft_model(CLIPModel.from_pretrained(clip_dir).eval(), PromptEmbeddingConfig(n_ctx=N_CTX))
    ctx = model.base_model.model.text_model.embeddings.prompt_embedding_ctx["default"]
    with torch.no_grad():
        ctx.normal_(0, 1.0)
        inputs = tokenizer([name + "." for name in CLASSES], padding=True, return_tensors="pt")
        ours = text_features(model, inputs["input_ids"], inputs["attention_mask"])
        front = coop_features(model.get_base_model(), tokenizer, ctx.detach(), "front")
    assert (ours - front).abs().max() > 1e-2
