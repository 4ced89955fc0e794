"""Per-call choices travel with the call: threads mixing plain forwards (the active adapter), classifiers of another
adapter or of the base model, and per-call options each get their single-threaded result."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import text_features
from peft import get_peft_model
from transformers import AutoProcessor

from peft_prompt_clip import PromptClassifier, PromptEmbeddingConfig, PromptEmbeddingLayer, prompt_options

CLASSES = ["cat", "dog", "x-ray", "red car"]


@pytest.fixture
def two_adapters(clip, clip_dir):
    model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=4, init_seed=1))
    model.add_adapter("other", PromptEmbeddingConfig(n_ctx=2, init_seed=2, class_token_position="front"))
    layer = next(m for m in model.modules() if isinstance(m, PromptEmbeddingLayer))
    with torch.no_grad():
        for context in layer.prompt_embedding_ctx.values():
            context.normal_(0, 1.0)
    return model, AutoProcessor.from_pretrained(clip_dir)


def test_eight_threads_each_get_their_single_threaded_result(two_adapters):
    model, processor = two_adapters
    tokens = processor.tokenizer(["cat.", "a small red car."], padding=True, return_tensors="pt")

    def plain():  # the model's active adapter, "default"
        return text_features(model, **tokens)

    def options(**choices):
        def run():
            with prompt_options(**choices):
                return text_features(model, **tokens)

        return run

    def classifier(**kwargs):
        def run():
            return PromptClassifier(model, processor, CLASSES, **kwargs).class_features()

        return run

    tasks = {
        "plain": plain,
        "options other": options(adapter_name="other"),
        "options off": options(enabled=False),
        "classifier default": classifier(),
        "classifier other": classifier(adapter_name="other"),
        "classifier off": classifier(use_adapter=False),
    }
    with torch.no_grad():
        expected = {name: task() for name, task in tasks.items()}
    assert not torch.allclose(expected["plain"], expected["options other"], atol=1e-3)
    assert not torch.allclose(expected["plain"], expected["options off"], atol=1e-3)
    assert not torch.allclose(expected["classifier default"], expected["classifier other"], atol=1e-3)
    assert not torch.allclose(expected["classifier default"], expected["classifier off"], atol=1e-3)

    names = [name for name in tasks for _ in range(40)]
    random.Random(0).shuffle(names)

    def work(name: str) -> str | None:
        with torch.no_grad():
            result = tasks[name]()
        return None if torch.allclose(result, expected[name], atol=1e-6, rtol=0) else name

    with ThreadPoolExecutor(max_workers=8) as pool:
        wrong = [name for name in pool.map(work, names) if name is not None]
    assert wrong == []
    assert model.active_adapter == "default" and not model.base_model.model.text_model.embeddings.disable_adapters


def test_prompt_options_name_an_adapter_the_model_has(two_adapters, tokenizer):
    model, _ = two_adapters
    with pytest.raises(ValueError, match=r"No prompt adapter named 'missing'; this model has \['default', 'other'\]"):
        with prompt_options(adapter_name="missing"):
            model.get_text_features(**tokenizer(["cat."], return_tensors="pt"))


def test_a_failed_forward_leaves_no_call_state_behind(two_adapters, tokenizer):
    model, _ = two_adapters
    good = tokenizer(["cat."], return_tensors="pt")
    with torch.no_grad():
        before = text_features(model, **good)
        with pytest.raises(ValueError, match="must end with the end-of-text token"):
            model.get_text_features(input_ids=good["input_ids"][:, :-1])
        with prompt_options(adapter_name="other"), pytest.raises(ValueError):
            model.get_text_features(input_ids=torch.full((1, 30), 5))  # too long for the positions
        assert torch.equal(text_features(model, **good), before)


def test_classifiers_of_two_adapters_under_threads(two_adapters):
    model, processor = two_adapters
    pixels = torch.rand(4, 3, 30, 30)
    classifiers = {
        name: PromptClassifier(model, processor, CLASSES, adapter_name=name) for name in ("default", "other")
    }
    expected = {name: c.logits(pixels) for name, c in classifiers.items()}
    assert not torch.allclose(expected["default"], expected["other"], atol=1e-3)

    def work(i: int) -> bool:
        name = ("default", "other")[i % 2]
        classifier = classifiers[name]
        classifier.refresh()  # recompute the class features while other threads do the same for the other adapter
        return torch.allclose(classifier.logits(pixels), expected[name], atol=1e-5)

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(work, range(64)))
    assert model.active_adapter == "default"  # the classifiers never switched the model's adapter
