"""The shared prefix of class prompts, encoded once: the same features and gradients as the model's own forward, for
CLIP, GroupViT and OWL-ViT, end and middle positions, CoCoOp, templates without an adapter, and in chunks; and the
model's own forward where nothing is shared (class-specific context, the front position, SigLIP)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from test_families import full_model
from transformers import AutoTokenizer, CLIPModel

from peft_prompt_clip import PromptEmbeddingConfig, PromptEmbeddingLayer, PromptEncoder, PromptTrainer

CLASSES = ["cat", "dog", "x-ray", "red car", "ship", "a small frog"]


def prompted(model, **config):
    model = get_peft_model(model.eval(), PromptEmbeddingConfig(n_ctx=4, init_seed=1, **config))
    layer = next(m for m in model.modules() if isinstance(m, PromptEmbeddingLayer))
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0)
    return model


def both_ways(model, tokenizer, texts, images=None, chunk_size=None, adapter=True):
    """Features and the trainable parameters' gradients of a loss on them, with and without prefix sharing."""
    results = []
    for share in (True, False):
        encoder = PromptEncoder(model, tokenizer, share_prefix=share)
        tokens = encoder.tokenize(texts, enabled=adapter)
        if share:
            assert encoder._prefix_plan(tokens, encoder.adapter(enabled=adapter)) is not None, "nothing was shared"
        features = encoder.class_features(tokens, enabled=adapter, image_features=images, chunk_size=chunk_size)
        params = [p for p in model.parameters() if p.requires_grad]
        if params:
            weights = torch.linspace(-1, 1, features.numel()).view_as(features)
            grads = torch.autograd.grad((features * weights).sum(), params)
        else:
            grads = []
        results.append((features.detach(), [g.detach() for g in grads]))
    (shared, shared_grads), (plain, plain_grads) = results
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    for a, b in zip(shared_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=0)
    return shared


@pytest.mark.parametrize("position", ["end", "middle"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_clip_shared_context(clip_dir, tokenizer, position, chunk_size):
    model = prompted(CLIPModel.from_pretrained(clip_dir), class_token_position=position)
    both_ways(model, tokenizer, [f"{c}." for c in CLASSES], chunk_size=chunk_size)


@pytest.mark.parametrize("family", ["groupvit", "owlvit"])
def test_other_causal_families(family, clip_dir):
    torch.manual_seed(0)
    model = prompted(full_model(family))
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    both_ways(model, tokenizer, [f"{c}." for c in CLASSES])


@pytest.mark.parametrize("chunk_size", [None, 12])
def test_cocoop_shares_each_images_prefix(clip_dir, tokenizer, chunk_size):
    model = prompted(CLIPModel.from_pretrained(clip_dir), conditional=True, meta_net_reduction=2)
    images = F.normalize(torch.randn(5, 16), dim=-1)
    features = both_ways(model, tokenizer, [f"{c}." for c in CLASSES], images=images, chunk_size=chunk_size)
    assert features.shape == (5, len(CLASSES), 16)


def test_templates_of_the_base_model(clip_dir, tokenizer):
    model = CLIPModel.from_pretrained(clip_dir).eval().requires_grad_(False)
    both_ways(model, tokenizer, [f"a photo of a {c}." for c in CLASSES], adapter=False)


@pytest.mark.parametrize(
    "config",
    [dict(class_specific=True, num_classes=6), dict(class_prompt_layer=1), dict(class_token_position="front")],
    ids=["csc", "tcp", "front"],
)
def test_nothing_shared_takes_the_models_forward(clip_dir, tokenizer, config):
    model = prompted(CLIPModel.from_pretrained(clip_dir), **config)
    encoder = PromptEncoder(model, tokenizer)
    assert encoder._prefix_plan(encoder.tokenize([f"{c}." for c in CLASSES]), "default") is None


def test_siglip_is_not_causal(clip_dir):
    encoder = PromptEncoder(prompted(full_model("siglip")), AutoTokenizer.from_pretrained(clip_dir))
    assert encoder.tower is None


def test_legacy_argmax_pooling(legacy_clip_dir):
    model = prompted(CLIPModel.from_pretrained(legacy_clip_dir))
    both_ways(model, AutoTokenizer.from_pretrained(legacy_clip_dir), [f"{c}." for c in CLASSES])


def test_training_learns_the_same_adapter_either_way(clip_dir, tmp_path):
    from test_trainer import args, context, student, teacher_data

    data = teacher_data(clip_dir, n=24, class_specific=False)
    learned = []
    for share in (True, False):
        _, processor = student(clip_dir)
        model = get_peft_model(CLIPModel.from_pretrained(clip_dir).eval(), PromptEmbeddingConfig(n_ctx=4))
        PromptTrainer(model, processor, data, args(tmp_path / str(share), epochs=3, share_prefix=share)).train()
        learned.append(context(model))
    torch.testing.assert_close(learned[0], learned[1], atol=1e-5, rtol=0)
    untrained = get_peft_model(CLIPModel.from_pretrained(clip_dir).eval(), PromptEmbeddingConfig(n_ctx=4))
    assert (learned[0] - context(untrained)).abs().max() > 1e-2
