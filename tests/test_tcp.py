"""TCP's class-aware tokens (Yao et al., CVPR 2024): each prompt's own tokens, a learned map of the frozen text tower's
embedding of its text, written before a middle text layer; they exist for classes never trained on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from test_deep_prompts import FAMILIES, text_inputs
from transformers import AutoProcessor, CLIPModel

from peft_prompt_clip import PromptClassifier, PromptEmbeddingConfig, load_prompt_model
from peft_prompt_clip.encoder import features_of
from peft_prompt_clip.layer import find_prompt_layer


@pytest.mark.parametrize("family", list(FAMILIES))
def test_class_tokens_are_the_map_of_each_texts_frozen_embedding(family):
    model = get_peft_model(FAMILIES[family](), PromptEmbeddingConfig(n_ctx=3, class_prompt_layer=2))
    layer = find_prompt_layer(model)
    text_model = model.get_base_model().text_model
    tokens = text_inputs(family)
    with torch.no_grad():
        for param in layer.prompt_embedding_class_tokens["default"].parameters():
            param.normal_(0, 0.5)  # far from the initial map, so that a wrong input shows
        with model.disable_adapter():
            frozen = text_model(**tokens).pooler_output
        expected = layer.prompt_embedding_class_tokens["default"](F.normalize(frozen, dim=-1))
    seen = {}

    def capture(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]

    handle = text_model.encoder.layers[2].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model.get_text_features(**tokens)
    finally:
        handle.remove()
    layout = layer.prompt_layouts["default"]
    ids, _ = layout.expand(tokens["input_ids"], tokens.get("attention_mask"))
    slots = layout.locate(ids)
    written = seen["hidden"].gather(1, slots[..., None].expand(-1, -1, seen["hidden"].shape[-1]))
    torch.testing.assert_close(written, expected, atol=1e-6, rtol=0)
    assert (expected[0] - expected[1]).abs().max() > 1e-2  # each text its own tokens


def test_gradients_reach_the_map_and_the_context():
    model = get_peft_model(FAMILIES["clip"](), PromptEmbeddingConfig(n_ctx=3, class_prompt_layer=1))
    features_of(model.get_text_features(**text_inputs("clip"))).pow(2).sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    adapter = {n for n, p in model.named_parameters() if "prompt_embedding_" in n}
    assert trained == adapter and any("class_tokens" in n for n in adapter)


def test_novel_classes_are_classified_without_saved_names(clip_dir, tmp_path):
    """Unlike class-specific context (CSC), TCP's tokens come from the class's text: any class names work."""
    model = get_peft_model(
        CLIPModel.from_pretrained(clip_dir).eval(), PromptEmbeddingConfig(n_ctx=4, class_prompt_layer=1)
    )
    model.save_pretrained(tmp_path)
    loaded = load_prompt_model(CLIPModel.from_pretrained(clip_dir).eval(), tmp_path)
    processor = AutoProcessor.from_pretrained(clip_dir)
    pixels = torch.rand(2, 3, 30, 30)
    with torch.no_grad():
        logits = PromptClassifier(loaded, processor, ["zebra", "teapot", "violin"]).logits(pixels)
        base = PromptClassifier(loaded.get_base_model(), processor, ["zebra", "teapot", "violin"])
        with loaded.disable_adapter():
            zero_shot = base.logits(pixels)
    assert logits.shape == (2, 3) and (logits - zero_shot).abs().max() > 1e-4


@pytest.mark.parametrize(
    "fields",
    [{"class_specific": True, "num_classes": 3}, {"prompt_depth": 2}, {"vision_n_ctx": 2}, {"conditional": True}],
)
def test_class_tokens_combine_with_a_shared_context_only(fields):
    with pytest.raises(ValueError, match=r"class-aware tokens \(TCP\) do not combine|and class-aware tokens \(TCP\)"):
        PromptEmbeddingConfig(n_ctx=2, class_prompt_layer=1, **fields)


def test_the_layer_must_lie_in_the_text_tower():
    with pytest.raises(ValueError, match="class_prompt_layer=3, but the text tower has 3 layers"):
        get_peft_model(FAMILIES["clip"](), PromptEmbeddingConfig(n_ctx=2, class_prompt_layer=3))
