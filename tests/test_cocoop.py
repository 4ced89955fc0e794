"""CoCoOp: a meta-net shifts the context per image. Batched over images x classes it equals CoCoOp's per-image
prompt built by hand; it trains (exactly, in chunks), saves with its meta-net and classifies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import encode_embeddings, text_tower
from peft import PeftModel, get_peft_model
from test_trainer import FLOAT64, args, teacher_data
from transformers import AutoProcessor, CLIPModel, CLIPTextModel

from peft_prompt_clip import (
    PromptClassifier,
    PromptEmbeddingConfig,
    PromptEmbeddingLayer,
    PromptEncoder,
    load_prompt_model,
    prompt_options,
)
from peft_prompt_clip.training import PromptTrainer

CLASSES = ["cat", "dog", "bird", "car", "ship", "frog"]


def cocoop(clip_dir, **kwargs):
    model = get_peft_model(
        CLIPModel.from_pretrained(clip_dir).eval(), PromptEmbeddingConfig(n_ctx=4, conditional=True, **kwargs)
    )
    layer = next(m for m in model.modules() if isinstance(m, PromptEmbeddingLayer))
    return model, layer, AutoProcessor.from_pretrained(clip_dir)


def test_batched_equals_coocops_per_image_prompt(clip_dir, tokenizer):
    model, layer, _ = cocoop(clip_dir, meta_net_reduction=2)  # 8 hidden units (1 with CoCoOp's 16 at this width)
    with torch.no_grad():
        layer.prompt_embedding_ctx["default"].normal_(0, 1)
        for p in layer.prompt_embedding_meta_net["default"].parameters():
            p.normal_(0, 2.0)
    images = F.normalize(torch.randn(3, 16), dim=-1)
    tokens = tokenizer([f"{c}." for c in CLASSES], padding=True, return_tensors="pt")
    with torch.no_grad(), prompt_options(condition=images):
        rows = {k: v.repeat(3, 1) for k, v in tokens.items()}
        batched = model.get_text_features(**rows)
        batched = (batched if isinstance(batched, torch.Tensor) else batched.pooler_output).view(3, len(CLASSES), -1)
    with torch.no_grad():  # the encoder's one way to the same features, normalised
        encoder = PromptEncoder(model, tokenizer)
        encoded = encoder.class_features(dict(tokens), image_features=images, chunk_size=len(CLASSES))
    torch.testing.assert_close(encoded, F.normalize(batched, dim=-1), atol=1e-6, rtol=0)
    # CoCoOp's forward, one image at a time: ctx_shifted = ctx + meta_net(image); [SOS] ctx_shifted class . [EOS]
    base = model.get_base_model()
    ids = tokens["input_ids"]
    with torch.no_grad():
        embedding = text_tower(base).embeddings.token_embedding(ids)
        for i, image in enumerate(images):
            shifted = layer.prompt_embedding_ctx["default"] + layer.prompt_embedding_meta_net["default"](image)
            prompts = torch.cat([embedding[:, :1], shifted.expand(len(CLASSES), -1, -1), embedding[:, 1:]], dim=1)
            eot = ids.argmax(-1) + 4  # the end-of-text token, moved by the 4 context vectors
            expected = encode_embeddings(base, prompts, eot)
            torch.testing.assert_close(batched[i], expected, atol=1e-5, rtol=0)
    # each image has its own prompt: the context slots of image 0's and image 1's prompts differ
    embedded = []
    text_model = text_tower(base)
    text_model.embeddings.register_forward_hook(
        lambda module, args, kwargs, out: embedded.append(out), with_kwargs=True
    )
    with torch.no_grad(), prompt_options(condition=images):
        model.get_text_features(**{k: v.repeat(3, 1) for k, v in tokens.items()})
    embedded = embedded[0].view(3, len(CLASSES), -1, embedded[0].shape[-1])
    assert (embedded[0, :, 1:5] - embedded[1, :, 1:5]).abs().min() > 0 and torch.equal(
        embedded[0, :, 5:], embedded[1, :, 5:]
    )


def test_cocoop_learns_saves_and_classifies(clip_dir, tmp_path):
    data = teacher_data(clip_dir, class_specific=False)  # a shared hidden prompt: CoCoOp can represent it
    model, layer, processor = cocoop(clip_dir)
    before = PromptTrainer(model, processor, data, args(tmp_path / "probe", epochs=1, lr=0.0)).train()
    summary = PromptTrainer(model, processor, data, args(tmp_path / "run", epochs=8)).train()
    assert summary["loss"] < 0.6 * before["loss"] and summary["accuracy"] >= max(before["accuracy"], 0.75), summary

    pixels = processor(images=data.images[:8], return_tensors="pt")["pixel_values"]
    logits = PromptClassifier(model, processor, CLASSES).logits(pixels)
    again = load_prompt_model(CLIPModel.from_pretrained(clip_dir).eval(), str(tmp_path / "run"))
    assert isinstance(again, PeftModel)
    assert torch.equal(PromptClassifier(again, processor, CLASSES).logits(pixels), logits)


def test_chunked_cocoop_step_has_the_exact_gradient(clip_dir, tmp_path):
    data = teacher_data(clip_dir, n=12)
    grads = []
    for chunk in (None, 12, 6):  # all prompts at once, two images per call, one image per call
        model, layer, processor = cocoop(clip_dir)
        if FLOAT64:
            model.double()
        trainer = PromptTrainer(model, processor, data, args(tmp_path, class_chunk_size=chunk))
        trainer.step(trainer.images.cached(), trainer.labels, len(data))
        grads.append(torch.cat([p.grad.flatten() for p in trainer.params]))
    atol = 1e-6 if FLOAT64 else 1e-6 * grads[0].abs().max().item()
    assert grads[0].abs().sum() > 0
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], atol=atol, rtol=0)


def test_cocoop_needs_an_image_tower_and_a_shared_context(clip_dir):
    with pytest.raises(ValueError, match="needs the image features of a model with an image tower"):
        get_peft_model(CLIPTextModel.from_pretrained(clip_dir), PromptEmbeddingConfig(n_ctx=4, conditional=True))
    with pytest.raises(ValueError, match=r"class-specific context and conditional context \(CoCoOp\) do not combine"):
        PromptEmbeddingConfig(conditional=True, class_specific=True, num_classes=3)


def test_a_conditional_adapter_without_images_is_a_clear_error(clip_dir, tokenizer):
    model, _, processor = cocoop(clip_dir)
    tokens = tokenizer(["cat.", "dog."], padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match="is conditional \\(CoCoOp\\): its context depends on the image"):
        model.get_text_features(**tokens)
    with pytest.raises(ValueError, match="depend on the image; use logits\\(\\) or predict\\(\\)"):
        PromptClassifier(model, processor, ["cat", "dog"]).class_features()
    with model.disable_adapter():  # the base model needs no image
        model.get_text_features(**tokens)
