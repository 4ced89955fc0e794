"""Inputs: where the context lands in the token sequence, padding, dtypes, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import text_features
from peft import get_peft_model
from transformers import CLIPModel

from peft_prompt_clip import ClassTokenPosition, PromptEmbeddingConfig
from peft_prompt_clip.layout import Pooling, PromptLayout

SOS, EOS, PAD, DOT, P = 90, 99, 0, 7, 50


def layout(position: str, n_ctx: int = 4, argmax: bool = False, max_positions: int = 77) -> PromptLayout:
    return PromptLayout(
        n_ctx=n_ctx,
        position=ClassTokenPosition(position),
        suffix_token_ids=(DOT,),
        eos_token_id=2 if argmax else EOS,
        placeholder_id=P,
        max_positions=max_positions,
        pooling=Pooling.ARGMAX if argmax else Pooling.EOS,
    )


IDS = torch.tensor(
    [
        [SOS, 11, 12, DOT, EOS, PAD, PAD],  # two-token name with the period
        [SOS, 13, EOS, PAD, PAD, PAD, PAD],  # one-token name, no period
        [SOS, DOT, EOS, PAD, PAD, PAD, PAD],  # only the period
    ]
)


@pytest.mark.parametrize(
    "position, expected",
    [
        (
            "end",
            [
                [SOS, P, P, P, P, 11, 12, DOT, EOS],
                [SOS, P, P, P, P, 13, EOS, PAD, PAD],
                [SOS, P, P, P, P, DOT, EOS, PAD, PAD],
            ],
        ),
        (
            "middle",
            [
                [SOS, P, P, 11, 12, P, P, DOT, EOS],
                [SOS, P, P, 13, P, P, EOS, PAD, PAD],
                [SOS, P, P, P, P, DOT, EOS, PAD, PAD],
            ],
        ),
        (
            "front",
            [
                [SOS, 11, 12, P, P, P, P, DOT, EOS],
                [SOS, 13, P, P, P, P, EOS, PAD, PAD],
                [SOS, P, P, P, P, DOT, EOS, PAD, PAD],
            ],
        ),
    ],
)
@pytest.mark.parametrize("argmax", [False, True])
def test_expand_and_locate(position, expected, argmax):
    lay = layout(position, argmax=argmax)
    ids, mask = lay.expand(IDS, (IDS != PAD).long())
    assert ids.tolist() == expected  # padding past the longest prompt is dropped
    assert mask.tolist() == (ids != PAD).long().tolist()
    slots = lay.locate(ids)
    assert (ids.gather(1, slots) == P).all()
    assert sorted(set(slots.flatten().tolist())) == sorted(set(torch.nonzero(ids == P)[:, 1].tolist()))


def test_placeholder_id_in_the_text_is_not_taken_for_context():
    lay = layout("front")
    ids = torch.tensor([[SOS, P, 13, P, DOT, EOS]])  # the text itself contains the placeholder's id
    expanded, _ = lay.expand(ids, None)
    assert expanded.tolist() == [[SOS, P, 13, P, P, P, P, P, DOT, EOS]]
    assert lay.locate(expanded).tolist() == [[4, 5, 6, 7]]


def test_too_long_for_the_positions_is_a_clear_error():
    with pytest.raises(ValueError, match=r"needs 9 positions, but the model has max_position_embeddings=8"):
        layout("end", max_positions=8).expand(IDS, None)


def test_missing_end_of_text_is_a_clear_error():
    with pytest.raises(ValueError, match="must end with the end-of-text token"):
        layout("end").expand(torch.tensor([[SOS, 11, 12]]), None)


def test_padding_to_max_length_gives_the_same_features(clip, tokenizer):
    model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=4))
    texts = ["cat.", "a small red car."]
    with torch.no_grad():
        longest = text_features(model, **tokenizer(texts, padding=True, return_tensors="pt"))
        padded = text_features(model, **tokenizer(texts, padding="max_length", max_length=20, return_tensors="pt"))
    torch.testing.assert_close(longest, padded, atol=1e-6, rtol=0)


def test_text_too_long_with_context_names_the_limit(clip, tokenizer):
    model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=10))
    inputs = tokenizer(["a small red car " * 5], return_tensors="pt", truncation=True, max_length=24)
    with pytest.raises(ValueError, match="max_position_embeddings=24. Shorten the text or use a smaller n_ctx"):
        model.get_text_features(**inputs)


def test_n_ctx_that_leaves_no_room_is_refused(clip):
    with pytest.raises(ValueError, match="n_ctx=23 leaves no room for text"):
        get_peft_model(clip, PromptEmbeddingConfig(n_ctx=23))


def test_class_specific_needs_every_class(clip, tokenizer):
    model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=2, class_specific=True, num_classes=3))
    with pytest.raises(ValueError, match="context for 3 classes, so it needs the texts of all 3 classes"):
        model.get_text_features(**tokenizer(["cat.", "dog."], padding=True, return_tensors="pt"))


def test_position_ids_are_refused(clip, tokenizer):
    model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=2))
    inputs = tokenizer(["cat."], return_tensors="pt")
    with pytest.raises(ValueError, match="position_ids cannot be passed"):
        model.get_text_features(**inputs, position_ids=torch.arange(inputs["input_ids"].shape[1])[None])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_models(clip_dir, tokenizer, dtype):
    """The context stays float32 (trainable, no rounding of small updates) and is cast in the forward."""
    base32 = CLIPModel.from_pretrained(clip_dir).eval()
    model = get_peft_model(CLIPModel.from_pretrained(clip_dir, dtype=dtype).eval(), PromptEmbeddingConfig(n_ctx=4))
    reference = get_peft_model(base32, PromptEmbeddingConfig(n_ctx=4))
    ctx = model.base_model.model.text_model.embeddings.prompt_embedding_ctx["default"]
    assert ctx.dtype == torch.float32
    inputs = tokenizer(["cat.", "a red car."], padding=True, return_tensors="pt")
    out = text_features(model, **inputs)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert ctx.grad is not None and ctx.grad.dtype == torch.float32 and torch.isfinite(ctx.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(out.float(), text_features(reference, **inputs), atol=0.05, rtol=0.05)
