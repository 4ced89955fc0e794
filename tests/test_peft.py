"""The adapter inside PEFT: get_peft_model, several adapters, disable/unload, trainability, text-tower models."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import text_features
from peft import PeftModel, get_peft_model
from PIL import Image
from transformers import CLIPModel, CLIPTextModel, CLIPTextModelWithProjection
from transformers.models.clip.modeling_clip import CLIPTextEmbeddings

import peft_prompt_clip
from peft_prompt_clip import (
    PEFT_TYPE,
    PromptClassifier,
    PromptEmbeddingConfig,
    PromptEmbeddingLayer,
    find_text_embeddings,
    get_prompt_model,
)

TEXTS = ["cat.", "x-ray dog.", "a small red car."]


def encode(tokenizer, texts=TEXTS):
    return tokenizer(texts, padding=True, return_tensors="pt")


def layer_of(model) -> PromptEmbeddingLayer:
    return next(m for m in model.modules() if isinstance(m, PromptEmbeddingLayer))


def test_only_the_context_trains(clip, tokenizer, capsys):
    model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=4))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert list(trainable) == ["base_model.model.text_model.embeddings.prompt_embedding_ctx.default"]
    assert trainable[next(iter(trainable))].shape == (4, 32)
    assert not model.base_model.model.logit_scale.requires_grad
    model.print_trainable_parameters()
    assert "trainable params: 128 ||" in capsys.readouterr().out

    inputs = encode(tokenizer)
    pixels = torch.rand(2, 3, 30, 30)
    out = model(**inputs, pixel_values=pixels)
    out.logits_per_image.logsumexp(-1).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == set(trainable)
    assert trainable[next(iter(trainable))].grad.abs().sum() > 0


def test_base_weights_are_reused_not_copied(clip):
    embeddings = clip.text_model.embeddings
    model = get_prompt_model(clip, PromptEmbeddingConfig(n_ctx=4))
    layer = layer_of(model)
    assert layer.base_layer is embeddings
    assert layer.token_embedding.weight.data_ptr() == embeddings.token_embedding.weight.data_ptr()
    tower = CLIPTextModel(clip.config.text_config)
    token_embedding = tower.get_input_embeddings()
    get_peft_model(tower, PromptEmbeddingConfig(n_ctx=4))
    assert tower.get_input_embeddings() is token_embedding  # reached through the wrapper
    assert sum(p.numel() for p in layer.parameters()) == sum(p.numel() for p in embeddings.parameters()) + 4 * 32


def test_disable_adapter_gives_the_base_model(clip_dir, clip, tokenizer):
    base = CLIPModel.from_pretrained(clip_dir).eval()
    model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=4))
    inputs = encode(tokenizer)
    with torch.no_grad():
        adapted = text_features(model, **inputs)
        with model.disable_adapter():
            disabled = text_features(model, **inputs)
        again = text_features(model, **inputs)
        reference = text_features(base, **inputs)
    assert torch.equal(disabled, reference)
    assert not torch.allclose(adapted, reference)
    assert torch.equal(again, adapted)


def test_unload_gives_back_the_original_module(clip_dir, clip, tokenizer):
    original = clip.text_model.embeddings
    model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=4))
    unloaded = model.unload()
    assert unloaded.text_model.embeddings is original
    assert type(original) is CLIPTextEmbeddings
    assert not hasattr(unloaded, "peft_config")
    inputs = encode(tokenizer)
    with torch.no_grad():  # the pre-hook that inserted the context is gone too
        assert torch.equal(
            text_features(unloaded, **inputs), text_features(CLIPModel.from_pretrained(clip_dir).eval(), **inputs)
        )


def test_merge_is_refused_with_a_reason(clip):
    model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=4))
    with pytest.raises(ValueError, match="no weight update to merge"):
        model.merge_and_unload()


def test_several_adapters(clip, tokenizer):
    model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=4, init_seed=1))
    model.add_adapter("other", PromptEmbeddingConfig(n_ctx=6, init_seed=2, class_token_position="front"))
    inputs = encode(tokenizer)
    with torch.no_grad():
        first = text_features(model, **inputs)
        model.set_adapter("other")
        second = text_features(model, **inputs)
        model.set_adapter("default")
        assert torch.equal(text_features(model, **inputs), first)
    assert not torch.allclose(first, second)
    layer = layer_of(model)
    assert set(layer.prompt_embedding_ctx) == {"default", "other"}
    assert layer.prompt_embedding_ctx["other"].shape == (6, 32)
    # only the active adapter trains
    assert layer.prompt_embedding_ctx["default"].requires_grad
    assert not layer.prompt_embedding_ctx["other"].requires_grad

    model.set_adapter("other")
    model.delete_adapter("default")
    assert set(layer.prompt_embedding_ctx) == {"other"} and set(layer.prompt_layouts) == {"other"}
    with torch.no_grad():
        assert torch.equal(text_features(model, **inputs), second)


def test_same_config_same_adapter(clip_dir):
    one = get_peft_model(CLIPModel.from_pretrained(clip_dir), PromptEmbeddingConfig(n_ctx=4, init_seed=3))
    two = get_peft_model(CLIPModel.from_pretrained(clip_dir), PromptEmbeddingConfig(n_ctx=4, init_seed=3))
    three = get_peft_model(CLIPModel.from_pretrained(clip_dir), PromptEmbeddingConfig(n_ctx=4, init_seed=4))
    ctx = [layer_of(m).prompt_embedding_ctx["default"] for m in (one, two, three)]
    assert torch.equal(ctx[0], ctx[1]) and not torch.equal(ctx[0], ctx[2])
    assert 0.01 < ctx[0].std().item() < 0.03  # normal, std 0.02


def test_ctx_init_starts_from_the_words(clip, tokenizer):
    model = get_peft_model(clip, PromptEmbeddingConfig(ctx_init="a photo of a"))
    assert model.peft_config["default"].n_ctx == 4
    ctx = layer_of(model).prompt_embedding_ctx["default"]
    ids = tokenizer("a photo of a", add_special_tokens=False)["input_ids"]
    assert torch.equal(ctx.data, clip.text_model.embeddings.token_embedding.weight[ids])
    # so the adapter's "cat." equals the plain text "a photo of a cat."
    with torch.no_grad():
        ours = text_features(model, **encode(tokenizer, ["cat."]))
        with model.disable_adapter():
            plain = text_features(model, **encode(tokenizer, ["a photo of a cat."]))
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=0)


def test_ctx_init_fills_the_last_slots_of_a_longer_context(clip, tokenizer):
    model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=6, ctx_init="a photo"))
    ctx = layer_of(model).prompt_embedding_ctx["default"]
    ids = tokenizer("a photo", add_special_tokens=False)["input_ids"]
    assert torch.equal(ctx.data[4:], clip.text_model.embeddings.token_embedding.weight[ids])
    assert ctx.data[:4].abs().max() < 0.2


@pytest.mark.parametrize("model_cls", [CLIPTextModel, CLIPTextModelWithProjection])
def test_text_tower_models(clip_dir, tokenizer, model_cls):
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    full = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=4))
    tower = get_peft_model(model_cls.from_pretrained(clip_dir).eval(), PromptEmbeddingConfig(n_ctx=4))
    inputs = encode(tokenizer)
    with torch.no_grad():
        pooled = tower(**inputs)
        expected_clip = clip.text_model(**inputs).pooler_output  # same weights, same context
    if model_cls is CLIPTextModel:
        torch.testing.assert_close(pooled.pooler_output, expected_clip, atol=1e-6, rtol=0)
    else:
        with torch.no_grad():
            torch.testing.assert_close(pooled.text_embeds, text_features(full, **inputs), atol=1e-6, rtol=0)


def test_positional_input_ids_work(clip_dir, tokenizer):
    tower = get_peft_model(CLIPTextModel.from_pretrained(clip_dir).eval(), PromptEmbeddingConfig(n_ctx=4))
    inputs = encode(tokenizer)
    with torch.no_grad():
        by_position = tower.base_model.model(inputs["input_ids"]).pooler_output
        by_name = tower(input_ids=inputs["input_ids"]).pooler_output
    torch.testing.assert_close(by_position, by_name, atol=0, rtol=0)


def test_find_text_embeddings_by_class_not_path(clip_dir, clip):
    assert find_text_embeddings(clip) == "text_model.embeddings"
    tower = CLIPTextModel.from_pretrained(clip_dir)
    assert isinstance(tower.get_submodule(find_text_embeddings(tower)), CLIPTextEmbeddings)
    with pytest.raises(ValueError, match="not a supported text embeddings module"):
        find_text_embeddings(clip, "vision_model.embeddings")


def test_unsupported_model_names_the_supported_families():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37))
    with pytest.raises(
        ValueError, match=r"No text embeddings module .* Supported: CLIP \(CLIPTextEmbeddings in .*SigLIP"
    ):
        get_peft_model(bert, PromptEmbeddingConfig(n_ctx=4))


def test_registration_is_idempotent():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    peft_prompt_clip.register()
    peft_prompt_clip.register()
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] is PromptEmbeddingConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] is peft_prompt_clip.PromptEmbeddingModel


def test_loading_without_import_names_the_package(clip_dir, tmp_path):
    model = get_peft_model(CLIPModel.from_pretrained(clip_dir), PromptEmbeddingConfig(n_ctx=4))
    model.save_pretrained(tmp_path / "adapter")
    script = (
        "from peft import PeftModel\nfrom transformers import CLIPModel\n"
        f"PeftModel.from_pretrained(CLIPModel.from_pretrained({str(clip_dir)!r}), {str(tmp_path / 'adapter')!r})"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "KeyError: 'PEFT_PROMPT_CLIP'" in result.stderr


@pytest.mark.parametrize(
    "first",
    [
        "import peft_prompt_clip",  # light: PEFT is imported after it
        "import peft\nimport peft_prompt_clip",  # PEFT first
        "from peft_prompt_clip.config import PromptEmbeddingConfig",  # a module of the package imports PEFT
        "import peft_prompt_clip.layer",  # ... one that does not import the tuner
        "from peft_prompt_clip import PromptClassifier",  # a name of the package, loaded on first use
    ],
)
def test_importing_the_package_registers_the_adapter_whatever_imports_peft(first, clip_dir, tmp_path):
    """`import peft_prompt_clip` is light (no torch, no PEFT) and still registers the adapter type before PEFT or
    transformers look it up, whichever module imports PEFT first; then the import hook is gone."""
    model = get_peft_model(CLIPModel.from_pretrained(clip_dir), PromptEmbeddingConfig(n_ctx=4))
    model.save_pretrained(tmp_path / "adapter")
    adapter = str(tmp_path / "adapter")
    script = (
        f"import sys\n{first}\n"
        "light = 'import peft_prompt_clip' == sys.argv[1] and not {'torch', 'peft'} & set(sys.modules)\n"
        "from peft import PeftConfig, PeftModel\nfrom transformers import CLIPModel\n"
        f"config = PeftConfig.from_pretrained({adapter!r})\n"
        f"model = PeftModel.from_pretrained(CLIPModel.from_pretrained({str(clip_dir)!r}), {adapter!r})\n"
        "from peft_prompt_clip import registration\n"
        "print(type(config).__name__, type(model.base_model).__name__, light, registration._FINDER in sys.meta_path)"
    )
    result = subprocess.run([sys.executable, "-c", script, first], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    light = first == "import peft_prompt_clip"
    assert result.stdout.split() == ["PromptEmbeddingConfig", "PromptEmbeddingModel", str(light), "False"]


def test_a_registration_that_fails_warns_and_is_tried_again():
    """A failure to register (here: the tuner's module half imported by another thread) must not fail `import peft`,
    which may be another library's: it warns, and the next use of the package registers."""
    script = """
import importlib, types, warnings
import peft_prompt_clip
from peft_prompt_clip import registration
failed = []
def import_module(name, package=None):
    if name.endswith(".model") and not failed:
        failed.append(name)
        raise ImportError("cannot import name 'PEFT_TYPE' from partially initialized module")
    return importlib.import_module(name, package)
registration.importlib = types.SimpleNamespace(import_module=import_module)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import peft
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING as tuners
before = "PEFT_PROMPT_CLIP" in tuners
peft_prompt_clip.PromptEmbeddingConfig
print(before, "PEFT_PROMPT_CLIP" in tuners, [str(w.message)[:69] for w in caught])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("False True ['peft_prompt_clip could not register its adapter type with PEFT")


def test_reloaded_adapter_is_frozen_unless_trainable(clip_dir, tmp_path):
    model = get_peft_model(CLIPModel.from_pretrained(clip_dir), PromptEmbeddingConfig(n_ctx=4))
    model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(CLIPModel.from_pretrained(clip_dir), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = PeftModel.from_pretrained(CLIPModel.from_pretrained(clip_dir), tmp_path, is_trainable=True)
    assert [n for n, p in trainable.named_parameters() if p.requires_grad] == [
        "base_model.model.text_model.embeddings.prompt_embedding_ctx.default"
    ]


@pytest.fixture
def saved_adapter(clip_dir, tmp_path):
    model = get_peft_model(CLIPModel.from_pretrained(clip_dir).eval(), PromptEmbeddingConfig(n_ctx=4, init_seed=3))
    with torch.no_grad():
        layer_of(model).prompt_embedding_ctx["default"].normal_(0, 1)
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_the_peft_type_is_an_enum_member_saved_as_its_name(saved_adapter):
    model, folder = saved_adapter
    assert model.peft_config["default"].peft_type.value == "PEFT_PROMPT_CLIP"
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "PEFT_PROMPT_CLIP"


def test_transformers_pipeline_loads_the_adapter_folder(saved_adapter, clip_dir):
    from transformers import AutoProcessor, pipeline

    model, folder = saved_adapter
    names = ["cat", "dog", "red car"]
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (30, 30, 3), dtype=np.uint8)) for i in (0, 1)]
    processor = AutoProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        ours = PromptClassifier(model, processor, names).logits(**processor(images=images, return_tensors="pt"))
    pipe = pipeline("zero-shot-image-classification", model=str(folder))
    for probs, result in zip(
        ours.softmax(-1), pipe(images, candidate_labels=names, hypothesis_template="{}."), strict=True
    ):
        scores = {row["label"]: row["score"] for row in result}
        torch.testing.assert_close(torch.tensor([scores[n] for n in names]), probs, atol=1e-5, rtol=0)
    base = PromptClassifier(model, processor, names, use_adapter=False).logits(
        **processor(images=images, return_tensors="pt")
    )
    assert not torch.allclose(ours.softmax(-1), base.softmax(-1), atol=1e-3)  # the pipeline did use the adapter


def test_transformers_from_pretrained_and_load_adapter(saved_adapter, clip_dir, tokenizer):
    model, folder = saved_adapter
    inputs = encode(tokenizer)
    with torch.no_grad():
        expected = text_features(model, **inputs)
        loaded = CLIPModel.from_pretrained(str(folder)).eval()  # transformers finds adapter_config.json
        assert torch.equal(text_features(loaded, **inputs), expected)
        clip = CLIPModel.from_pretrained(clip_dir).eval()
        clip.load_adapter(str(folder))
        assert torch.equal(text_features(clip, **inputs), expected)


def test_mixed_models_refuse_the_type_by_name(clip):
    with pytest.raises(ValueError, match="'PEFT_PROMPT_CLIP' is not compatible with the `PeftMixedModel`"):
        get_peft_model(clip, PromptEmbeddingConfig(n_ctx=4), mixed=True)


def test_the_target_is_decided_by_the_module_alone(clip):
    model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=4))
    tuner = model.base_model  # asked again after injection, in no particular order, with fresh configs
    assert tuner._check_target_module_exists(PromptEmbeddingConfig(), "text_model.embeddings")
    assert not tuner._check_target_module_exists(PromptEmbeddingConfig(), "text_model.encoder")
    assert not tuner._check_target_module_exists(PromptEmbeddingConfig(), "vision_model.embeddings")
    assert not tuner._check_target_module_exists(
        PromptEmbeddingConfig(target_modules="other"), "text_model.embeddings"
    )


def test_the_context_is_float32_on_a_bf16_model_until_the_user_converts_it(clip_dir, tokenizer):
    model = get_peft_model(
        CLIPModel.from_pretrained(clip_dir).to(torch.bfloat16).eval(), PromptEmbeddingConfig(n_ctx=4)
    )
    context = layer_of(model).prompt_embedding_ctx["default"]
    assert context.dtype == torch.float32
    with torch.no_grad():
        assert text_features(model, **encode(tokenizer)).dtype == torch.bfloat16
    model.to(torch.bfloat16)  # nn.Module.to converts every parameter: docs/concepts.md says so
    assert layer_of(model).prompt_embedding_ctx["default"].dtype == torch.bfloat16
