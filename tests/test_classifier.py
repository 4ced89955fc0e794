"""PromptClassifier: cached class features give CLIP's own logits; zero-shot, ensembles, top-k, exported head."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import get_peft_model
from PIL import Image
from safetensors import safe_open
from transformers import AutoProcessor

from peft_prompt_clip import PromptEmbeddingConfig
from peft_prompt_clip.classifier import PromptClassifier
from peft_prompt_clip.options import IMAGENET_TEMPLATES

CLASSES = ["cat", "dog", "x-ray", "red car"]


@pytest.fixture
def processor(clip_dir):
    return AutoProcessor.from_pretrained(clip_dir)


@pytest.fixture
def adapted(clip):
    model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=4))
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).normal_(0, 1.0)
    return model


def test_logits_equal_clip_forward(adapted, processor):
    pixels = torch.rand(3, 3, 30, 30)
    classifier = PromptClassifier(adapted, processor, CLASSES)
    texts = processor.tokenizer([f"{c}." for c in CLASSES], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = adapted(**texts, pixel_values=pixels).logits_per_image
        torch.testing.assert_close(classifier.logits(pixels), expected, atol=1e-5, rtol=1e-5)
        with adapted.disable_adapter():
            base = adapted(**texts, pixel_values=pixels).logits_per_image
    zero_shot = PromptClassifier(adapted, processor, CLASSES, use_adapter=False)
    torch.testing.assert_close(zero_shot.logits(pixels), base, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base, expected, atol=1e-3)


def test_class_features_are_computed_once(adapted, processor):
    calls = []
    projection = adapted.get_base_model().text_projection  # once per pass of the text tower, on either path
    handle = projection.register_forward_hook(lambda *args: calls.append(1))
    classifier = PromptClassifier(adapted, processor, CLASSES, templates=IMAGENET_TEMPLATES[:3])
    for _ in range(3):
        classifier.logits(torch.rand(2, 3, 30, 30))
    assert len(calls) == 3  # one text-tower pass per template, then none
    classifier.refresh()
    classifier.logits(torch.rand(2, 3, 30, 30))
    assert len(calls) == 6
    handle.remove()


def test_template_ensemble_is_the_normalised_mean(clip, processor):
    templates = IMAGENET_TEMPLATES[:2]
    ensemble = PromptClassifier(clip, processor, CLASSES, templates=templates).class_features()
    singles = [PromptClassifier(clip, processor, CLASSES, templates=[t]).class_features() for t in templates]
    mean = torch.stack(singles).mean(0)
    torch.testing.assert_close(ensemble, mean / mean.norm(dim=-1, keepdim=True))


def test_predict_top_k_from_images(clip, processor):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(2)]
    classifier = PromptClassifier(clip, processor, CLASSES)
    predictions = classifier.predict(images, top_k=3)
    assert len(predictions) == 2 and all(len(p) == 3 for p in predictions)
    for p in predictions:
        scores = [s for _, s in p]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
        assert {name for name, _ in p} <= set(CLASSES)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    assert [p[0][0] for p in predictions] == [CLASSES[i] for i in classifier.logits(pixels).argmax(-1).tolist()]


def test_exported_head_reproduces_the_logits(adapted, processor, tmp_path):
    classifier = PromptClassifier(adapted, processor, CLASSES)
    classifier.save_head(tmp_path / "head.safetensors")
    with safe_open(tmp_path / "head.safetensors", "pt") as f:
        weight = f.get_tensor("weight")
        assert json.loads(f.metadata()["class_names"]) == CLASSES
    pixels = torch.rand(2, 3, 30, 30)
    with torch.no_grad():
        image = adapted.get_base_model().get_image_features(pixel_values=pixels)
        image = image if isinstance(image, torch.Tensor) else image.pooler_output
    logits = (image / image.norm(dim=-1, keepdim=True)) @ weight.T
    torch.testing.assert_close(logits, classifier.logits(pixels), atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_clear(clip, processor):
    with pytest.raises(ValueError, match="class_names is empty"):
        PromptClassifier(clip, processor, [])
    with pytest.raises(ValueError, match=r"needs one '\{\}'"):
        PromptClassifier(clip, processor, CLASSES, templates=["a photo"])


def test_duplicate_and_too_long_class_names(clip, processor):
    with pytest.raises(ValueError, match=r"empty names at positions \[1\]"):
        PromptClassifier(clip, processor, ["cat", "  "])
    with pytest.raises(ValueError, match=r"class_names repeats 'cat' \(positions 0 and 2, spaces aside\)"):
        PromptClassifier(clip, processor, ["cat", "dog", "cat"])
    model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=8))
    classifier = PromptClassifier(model, processor, ["cat", "a small red car " * 4])
    with pytest.raises(
        ValueError,
        match=r"prompts: \['a small red car a small.*plus 8 context tokens need \d+ positions, but the model "
        r"has max_position_embeddings=24",
    ):
        classifier.class_features()
