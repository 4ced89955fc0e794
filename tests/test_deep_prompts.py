"""Deep text prompts, vision prompts, IVLP and MaPLe: features equal a forward built by hand from the model's own
layers with the prompts written in at each layer (CLIP and SigLIP), gradients reach the adapter alone,
`disable_adapter()` and `unload()` give the base model back in both towers, and adapters round-trip through
save/load."""

from __future__ import annotations

import inspect

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, OwlViTConfig, OwlViTModel, SiglipConfig, SiglipModel

from peft_prompt_clip import InvalidAdapterError, PromptEmbeddingConfig, PromptEncoder, prompt_options
from peft_prompt_clip.encoder import features_of
from peft_prompt_clip.layer import find_prompt_layer

BOS, EOS, PAD, DOT = 97, 98, 1, 7
TEXTS = [[11, 12, DOT], [13, DOT], [14, 15, 16, DOT]]
TOWER = {"intermediate_size": 37, "num_hidden_layers": 3, "num_attention_heads": 4}
VISION = {**TOWER, "hidden_size": 24, "image_size": 30, "patch_size": 6}  # not the text width: MaPLe maps between


def clip_model() -> CLIPModel:
    torch.manual_seed(0)
    text = {**TOWER, "hidden_size": 32, "vocab_size": 99, "max_position_embeddings": 24}
    text.update(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=16)).eval()


def owlvit_model() -> OwlViTModel:
    torch.manual_seed(0)
    text = {**TOWER, "hidden_size": 32, "vocab_size": 99, "max_position_embeddings": 24}
    text.update(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return OwlViTModel(OwlViTConfig(text_config=text, vision_config=VISION, projection_dim=16)).eval()


def siglip_model() -> SiglipModel:
    torch.manual_seed(0)
    text = {**TOWER, "hidden_size": 32, "vocab_size": 99, "max_position_embeddings": 16}
    text.update(bos_token_id=None, eos_token_id=EOS, pad_token_id=EOS)
    return SiglipModel(SiglipConfig(text_config=text, vision_config=VISION)).eval()


FAMILIES = {"clip": clip_model, "owlvit": owlvit_model, "siglip": siglip_model}
METHODS = {
    "deep-text": {"n_ctx": 3, "prompt_depth": 3},
    "vision": {"n_ctx": 3, "vision_n_ctx": 2, "vision_prompt_depth": 3},
    "ivlp": {"n_ctx": 3, "prompt_depth": 2, "vision_n_ctx": 2, "vision_prompt_depth": 3},
    "maple": {"n_ctx": 2, "prompt_depth": 3, "coupled": True},
}


def text_inputs(family: str) -> dict[str, torch.Tensor]:
    if family == "siglip":  # no start token; end-of-text, then padding to the model's 16 positions
        return {"input_ids": torch.tensor([t + [EOS] * (16 - len(t)) for t in TEXTS])}
    rows = [[BOS, *t, EOS] for t in TEXTS]
    length = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (length - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": (torch.arange(length) < torch.tensor([[len(r)] for r in rows])).long()}


def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(1))


def run_layer(layer: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if "causal_attention_mask" in inspect.signature(layer.forward).parameters:  # transformers 4
        return layer(x, None, mask)[0]
    out = layer(x, mask)
    return out[0] if isinstance(out, tuple) else out


def reference_text(model, family: str, ids: torch.Tensor, ctx: torch.Tensor, deep: list[torch.Tensor]) -> torch.Tensor:
    """The prompt built by hand: context at the input, each deep layer's tokens written over the context's positions
    before that layer, the model's own layers, norm, pooling and projection."""
    tower = model.text_model
    n = ctx.shape[0]
    token = tower.embeddings.token_embedding
    if family == "siglip":  # ctx text [EOS] [pad]: the context takes the place of the last padding
        x = torch.cat([ctx.expand(len(ids), -1, -1), token(ids[:, : ids.shape[1] - n])], dim=1)
        slots, mask = slice(0, n), None
    else:  # [SOS] ctx text [EOS] [pad]: causal, so the padding after the end-of-text token is never seen by it
        x = torch.cat([token(ids[:, :1]), ctx.expand(len(ids), -1, -1), token(ids[:, 1:])], dim=1)
        slots = slice(1, 1 + n)
        mask = torch.full((x.shape[1], x.shape[1]), torch.finfo(x.dtype).min).triu(1)
        mask = mask.expand(len(ids), 1, -1, -1)  # transformers 4's OWL-ViT wants the batch's size
    x = x + tower.embeddings.position_embedding.weight[: x.shape[1]]
    for i, layer in enumerate(tower.encoder.layers):
        if 1 <= i <= len(deep):
            x = x.clone()
            x[:, slots] = deep[i - 1]
        x = run_layer(layer, x, mask)
    x = tower.final_layer_norm(x)
    if family == "siglip":
        return tower.head(x[:, -1])
    eos = (ids == EOS).int().argmax(-1) + n
    return model.text_projection(x[torch.arange(len(ids)), eos])


def reference_image(model, family: str, pixel_values: torch.Tensor, tokens: list[torch.Tensor]) -> torch.Tensor:
    """The image tower by hand: the vision tokens appended after the embeddings, each deep layer's written over them
    before that layer; the class token (CLIP, OWL-ViT) or the attention head over the patch tokens alone (SigLIP)
    pools."""
    tower = model.vision_model
    x = tower.embeddings(pixel_values)
    m = tokens[0].shape[0]
    x = torch.cat([x, tokens[0].expand(len(x), -1, -1)], dim=1)
    if family != "siglip":
        x = (tower.pre_layrnorm if family == "clip" else tower.pre_layernorm)(x)
    for i, layer in enumerate(tower.encoder.layers):
        if 1 <= i < len(tokens):
            x = torch.cat([x[:, :-m], tokens[i].expand(len(x), -1, -1)], dim=1)
        x = run_layer(layer, x, None)
    if family == "siglip":
        return tower.head(tower.post_layernorm(x)[:, :-m])
    return model.visual_projection(tower.post_layernorm(x[:, 0]))


def prompted(family: str, method: str) -> tuple[PeftModel, torch.nn.Module]:
    """A prompted model whose every adapter tensor is far from its initialisation, and the base model's copy."""
    base = FAMILIES[family]()
    reference = FAMILIES[family]().requires_grad_(False)  # frozen as the prompted model's (same attention kernels)
    model = get_peft_model(base, PromptEmbeddingConfig(**METHODS[method]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "prompt_embedding_" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return model, reference


def vision_tokens(layer, depth: int) -> list[torch.Tensor]:
    return [layer.vision_context("default", i) for i in range(depth)]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_with_a_forward_built_by_hand(family, method):
    model, reference = prompted(family, method)
    layer = find_prompt_layer(model)
    config = model.peft_config["default"]
    ctx = layer.prompt_embedding_ctx["default"].detach()
    deep = list(layer.prompt_embedding_deep_ctx["default"].detach()) if config.prompt_depth > 1 else []
    inputs = text_inputs(family)
    with torch.no_grad():
        ours = features_of(model.get_text_features(**inputs))
        expected = reference_text(reference, family, inputs["input_ids"], ctx, deep)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
        image = features_of(model.get_image_features(pixel_values=pixels()))
        if config.prompts_images:
            tokens = [t.detach() for t in vision_tokens(layer, config.vision_prompt_depth)]
            assert len(tokens) == (config.prompt_depth if config.coupled else config.vision_prompt_depth)
            torch.testing.assert_close(image, reference_image(reference, family, pixels(), tokens), atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(image, features_of(reference.get_image_features(pixel_values=pixels())))
        # the reference is sensitive: without the deep tokens (or the vision tokens) the features differ
        if deep:
            assert (reference_text(reference, family, inputs["input_ids"], ctx, []) - ours).abs().max() > 1e-3
        if config.prompts_images:
            assert (image - features_of(reference.get_image_features(pixel_values=pixels()))).abs().max() > 1e-3


@pytest.mark.parametrize("position", ["end", "middle"])
def test_shared_prefix_path_writes_deep_prompts_exactly(position):
    """The encoder's shared-prefix path (the context's slots split between prefix and each prompt's own tokens for
    the middle position) gives the model's own forward's features and gradients."""
    config = PromptEmbeddingConfig(n_ctx=12, prompt_depth=3, class_token_position=position, suffix_token_ids=[DOT])
    model = get_peft_model(clip_model(), config)
    layer = find_prompt_layer(model)
    with torch.no_grad():
        layer.prompt_embedding_deep_ctx["default"].normal_(0, 0.5)
    tokens = text_inputs("clip")
    shared, own = PromptEncoder(model, None), PromptEncoder(model, None, share_prefix=False)
    assert shared._prefix_plan(tokens, "default") is not None  # the shared path is really taken
    grads = []
    for encoder in (shared, own):
        model.zero_grad()
        features = encoder.class_features(tokens, chunk_size=2)
        features.pow(3).sum().backward()
        grads.append(layer.prompt_embedding_deep_ctx["default"].grad.clone())
        if encoder is shared:
            first = features.detach()
    torch.testing.assert_close(first, features.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("method", ["ivlp", "maple"])
def test_gradients_reach_only_the_adapter(method):
    model, _ = prompted("clip", method)
    model.train()
    encoder = PromptEncoder(model, None)
    image = encoder.image_features({"pixel_values": pixels()})
    logits = encoder.logits(image, encoder.class_features(text_inputs("clip")))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    adapter = {n for n, p in model.named_parameters() if "prompt_embedding_" in n}
    assert trained == adapter and adapter
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in adapter)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in adapter)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_disable_and_unload_give_the_base_model_back(family):
    model, reference = prompted(family, "maple")
    inputs = text_inputs(family)
    with torch.no_grad():
        base_text = features_of(reference.get_text_features(**inputs))
        base_image = features_of(reference.get_image_features(pixel_values=pixels()))
        with model.disable_adapter():
            assert torch.equal(features_of(model.get_text_features(**inputs)), base_text)
            assert torch.equal(features_of(model.get_image_features(pixel_values=pixels())), base_image)
        with prompt_options(enabled=False):  # per call, this thread only
            assert torch.equal(features_of(model.get_image_features(pixel_values=pixels())), base_image)
        assert not torch.equal(features_of(model.get_image_features(pixel_values=pixels())), base_image)
        towers = [model.base_model.model.text_model, model.base_model.model.vision_model]
        unloaded = model.unload()
        assert torch.equal(features_of(unloaded.get_text_features(**inputs)), base_text)
        assert torch.equal(features_of(unloaded.get_image_features(pixel_values=pixels())), base_image)
    hooked = [m for tower in towers for m in tower.modules() if m._forward_pre_hooks or m._forward_hooks]
    assert not hooked
    assert not any("prompt_embedding" in n for n, _ in unloaded.named_parameters())


@pytest.mark.parametrize("method", list(METHODS))
def test_save_load_round_trip(method, tmp_path):
    model, _ = prompted("clip", method)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    trainable = sum(p.numel() for n, p in model.named_parameters() if "prompt_embedding_" in n)
    assert sum(t.numel() for t in saved.values()) == trainable
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < trainable * 4 + 4096  # raw floats + header
    loaded = PeftModel.from_pretrained(clip_model(), tmp_path).eval()
    inputs = text_inputs("clip")
    with torch.no_grad():
        for get in (lambda m: m.get_text_features(**inputs), lambda m: m.get_image_features(pixel_values=pixels())):
            torch.testing.assert_close(features_of(get(loaded)), features_of(get(model)), atol=0, rtol=0)


@pytest.mark.parametrize("method", ["maple", "ivlp"])
def test_an_adapter_loads_under_another_name(method, tmp_path):
    """PEFT keeps the saved adapter's name inside module keys (`prompt_embedding_coupling.<name>.0.weight`)."""
    model, _ = prompted("clip", method)
    model.save_pretrained(tmp_path)
    inputs = text_inputs("clip")
    loaded = PeftModel.from_pretrained(clip_model(), tmp_path, adapter_name="other").eval()
    loaded.load_adapter(tmp_path, adapter_name="third")
    with torch.no_grad():
        for name in ("other", "third"):
            loaded.set_adapter(name)
            torch.testing.assert_close(
                features_of(loaded.get_image_features(pixel_values=pixels())),
                features_of(model.get_image_features(pixel_values=pixels())),
            )
            torch.testing.assert_close(
                features_of(loaded.get_text_features(**inputs)), features_of(model.get_text_features(**inputs))
            )


def test_an_image_forward_inside_a_text_forward_leaves_the_text_call_alone():
    model, _ = prompted("clip", "maple")
    inputs = text_inputs("clip")
    with torch.no_grad():
        expected = features_of(model.get_text_features(**inputs))
        layer = model.base_model.model.text_model.encoder.layers[0]

        def image_forward(*_):
            model.get_image_features(pixel_values=pixels())

        hook = layer.register_forward_hook(image_forward)
        try:
            nested = features_of(model.get_text_features(**inputs))
        finally:
            hook.remove()
    torch.testing.assert_close(nested, expected, atol=0, rtol=0)


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_a_forward_that_skipped_a_layers_hooks_is_an_error(tower):
    """What transformers 4's encoder layers do under torch.compile (their hooks dropped): the tower's end hook sees
    that a layer's hook did not run and says so, rather than return features without the deeper tokens."""
    model, _ = prompted("clip", "ivlp")
    towers = model.base_model.model
    layers = (towers.text_model if tower == "text" else towers.vision_model).encoder.layers
    hooks = dict(layers[1]._forward_pre_hooks)
    layers[1]._forward_pre_hooks.clear()  # as dynamo runs a layer it compiled on its own
    forward = {
        "text": lambda: model.get_text_features(**text_inputs("clip")),
        "vision": lambda: model.get_image_features(pixel_values=pixels()),
    }[tower]
    with torch.no_grad(), pytest.raises(RuntimeError, match=f"ran the {tower} tower without the prompt hooks"):
        forward()
    layers[1]._forward_pre_hooks.update(hooks)
    with torch.no_grad():
        forward()  # the failed call left nothing behind
        with prompt_options(enabled=False):
            layers[1]._forward_pre_hooks.clear()
            forward()  # the base model's towers write nothing, so miss nothing


def test_two_adapters_each_with_its_own_towers():
    model, reference = prompted("clip", "maple")
    model.add_adapter("coop", PromptEmbeddingConfig(n_ctx=2))
    encoder = PromptEncoder(model, None)
    with torch.no_grad():
        base_image = features_of(reference.get_image_features(pixel_values=pixels()))
        assert torch.equal(encoder.image_features({"pixel_values": pixels()}, "coop"), _norm(base_image))
        maple = encoder.image_features({"pixel_values": pixels()}, "default")
        assert not torch.allclose(maple, _norm(base_image))
        model.set_adapter("coop")
        assert torch.equal(encoder.image_features({"pixel_values": pixels()}), _norm(base_image))
        torch.testing.assert_close(encoder.image_features({"pixel_values": pixels()}, "default"), maple)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def test_bad_configs_name_the_fix():
    with pytest.raises(ValueError, match="prompt_depth=4, but the text tower has 3 layers"):
        get_peft_model(clip_model(), PromptEmbeddingConfig(n_ctx=2, prompt_depth=4))
    with pytest.raises(ValueError, match="vision_prompt_depth=5, but the image tower has 3 layers"):
        get_peft_model(clip_model(), PromptEmbeddingConfig(n_ctx=2, vision_n_ctx=2, vision_prompt_depth=5))
    with pytest.raises(ValueError, match="need a model with an image tower"):
        get_peft_model(CLIPTextModel(clip_model().config.text_config), PromptEmbeddingConfig(n_ctx=2, coupled=True))
    with pytest.raises(ValueError, match="vision_n_ctx and vision_prompt_depth are n_ctx and prompt_depth"):
        PromptEmbeddingConfig(n_ctx=2, coupled=True, vision_n_ctx=4)
    with pytest.raises(ValueError, match="class-specific context and deep text prompts do not combine"):
        PromptEmbeddingConfig(n_ctx=2, prompt_depth=2, class_specific=True, num_classes=3)
    with pytest.raises(ValueError, match="set vision_n_ctx"):
        PromptEmbeddingConfig(n_ctx=2, vision_prompt_depth=3)
    # deep text prompts alone work on a text tower
    text_only = get_peft_model(
        CLIPTextModel(clip_model().config.text_config), PromptEmbeddingConfig(n_ctx=2, prompt_depth=3)
    )
    assert text_only.get_nb_trainable_parameters()[0] == 3 * 2 * 32


def test_an_adapter_saved_before_deep_prompts_still_loads(tmp_path):
    """An adapter_config.json of the previous release has none of the new fields: they take their defaults."""
    import json

    model = get_peft_model(clip_model(), PromptEmbeddingConfig(n_ctx=3))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for field in ("prompt_depth", "vision_n_ctx", "vision_prompt_depth", "coupled"):
        del config[field]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(clip_model(), tmp_path)
    assert loaded.peft_config["default"].method == "CoOp"
    with torch.no_grad():
        torch.testing.assert_close(
            features_of(loaded.get_text_features(**text_inputs("clip"))),
            features_of(model.get_text_features(**text_inputs("clip"))),
        )


def test_an_adapter_file_without_its_vision_prompts_is_refused(tmp_path):
    from safetensors.torch import save_file

    model, _ = prompted("clip", "ivlp")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "vision" not in k}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(InvalidAdapterError, match="1 prompt_embedding_vision_ctx"):
        PeftModel.from_pretrained(clip_model(), tmp_path)
