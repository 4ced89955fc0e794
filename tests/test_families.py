"""Other CLIP-family text towers: each family's own pooling rule is respected (CLIP-like first end-of-text token,
OWL-ViT's highest id, SigLIP's last position with fixed-length padding), checked against a prompt built by hand, and
adapters round-trip through save/load."""

from __future__ import annotations

import inspect

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import (
    GroupViTTextConfig,
    GroupViTTextModel,
    OwlViTTextConfig,
    OwlViTTextModel,
    SiglipTextConfig,
    SiglipTextModel,
)

from peft_prompt_clip import PromptEmbeddingConfig, PromptEmbeddingLayer, load_prompt_model

TOWER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=99)
BOS, EOS, DOT = 97, 98, 7
TEXTS = [[11, 12, DOT], [13, DOT], [14, 15, 16]]  # token ids; the period is the suffix
N_CTX = 3


def clip_like(model_cls, config_cls, pad):
    return model_cls(
        config_cls(**TOWER, max_position_embeddings=24, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=pad)
    )


def siglip(model_cls=SiglipTextModel, config_cls=SiglipTextConfig):
    return model_cls(
        config_cls(**TOWER, max_position_embeddings=16, pad_token_id=1, eos_token_id=1, bos_token_id=None)
    )


FAMILIES = {
    "groupvit": lambda: clip_like(GroupViTTextModel, GroupViTTextConfig, pad=1),
    "owlvit": lambda: clip_like(OwlViTTextModel, OwlViTTextConfig, pad=0),
    "siglip": siglip,
}
try:
    from transformers import Siglip2TextConfig, Siglip2TextModel

    FAMILIES["siglip2"] = lambda: siglip(Siglip2TextModel, Siglip2TextConfig)
except ImportError:  # transformers < 4.49
    pass


def is_siglip(name: str) -> bool:
    return name.startswith("siglip")


def inputs(name: str) -> torch.Tensor:
    if is_siglip(name):  # no start token, end-of-text then padding to the model's 16 positions
        return torch.tensor([t + [1] + [1] * (16 - len(t) - 1) for t in TEXTS])
    pad = 0 if name == "owlvit" else 1
    longest = max(len(t) for t in TEXTS) + 2
    return torch.tensor([[BOS, *t, EOS] + [pad] * (longest - len(t) - 2) for t in TEXTS])


def hand_built(tower, ctx: torch.Tensor, name: str, position: str, deep: tuple = ()) -> torch.Tensor:
    """The prompt laid out by hand, through the text tower's layers (each of `deep`'s tokens written over the
    context's positions before layers 1, 2, ...), pooled by the family's rule."""
    text_model = next(m for m in tower.modules() if hasattr(m, "final_layer_norm") and hasattr(m, "encoder"))
    table = text_model.embeddings.token_embedding
    rows, pool, starts = [], [], []
    for i, text in enumerate(TEXTS):
        body, suffix = (text[:-1], text[-1:]) if text[-1] == DOT else (text, [])
        prefix = [] if is_siglip(name) else [BOS]
        embed = lambda ids: table(torch.tensor(ids, dtype=torch.long))  # noqa: E731
        c = ctx[i] if ctx.dim() == 3 else ctx
        if position == "end":
            parts = [embed(prefix), c, embed(text + [EOS if not is_siglip(name) else 1])]
            starts.append(len(prefix))
        else:  # front
            parts = [embed(prefix), embed(body), c, embed(suffix + [EOS if not is_siglip(name) else 1])]
            starts.append(len(prefix) + len(body))
        row = torch.cat(parts)
        eos_at = row.shape[0] - 1
        if is_siglip(name):  # pad to the original length; the context replaced trailing padding
            row = torch.cat([row, embed([1] * (16 - row.shape[0]))])
            pool.append(15)
        else:
            pool.append(eos_at)
        rows.append(row)
    length = max(r.shape[0] for r in rows)
    rows = [torch.cat([r, table.weight[1].expand(length - r.shape[0], -1)]) for r in rows]
    x = torch.stack(rows) + text_model.embeddings.position_embedding.weight[:length]
    causal = torch.full((length, length), torch.finfo(x.dtype).min).triu(1).expand(len(rows), 1, length, length)
    mask = None if is_siglip(name) else causal
    for index, layer in enumerate(text_model.encoder.layers):
        if 1 <= index <= len(deep):
            x = x.clone()
            for row, start in enumerate(starts):
                x[row, start : start + N_CTX] = deep[index - 1]
        if "causal_attention_mask" in inspect.signature(layer.forward).parameters:  # transformers 4, CLIP-like
            x = layer(x, None, mask)[0]
        else:
            x = layer(x, mask)
            x = x[0] if isinstance(x, tuple) else x
    x = text_model.final_layer_norm(x)
    pooled = x[torch.arange(len(rows)), torch.tensor(pool)]
    return text_model.head(pooled) if hasattr(text_model, "head") else pooled


@pytest.mark.parametrize("position", ["end", "front"])
@pytest.mark.parametrize("class_specific", [False, True], ids=["shared", "csc"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_parity_with_a_hand_built_prompt(name, position, class_specific):
    torch.manual_seed(0)
    config = PromptEmbeddingConfig(
        n_ctx=N_CTX, class_token_position=position, suffix_token_ids=[DOT], class_specific=class_specific,
        num_classes=3 if class_specific else None,
    )  # fmt: skip
    model = get_peft_model(FAMILIES[name]().eval(), config)
    layer = next(m for m in model.modules() if isinstance(m, PromptEmbeddingLayer))
    with torch.no_grad():
        layer.prompt_embedding_ctx["default"].normal_(0, 1)
        ours = model(input_ids=inputs(name)).pooler_output
        expected = hand_built(model.get_base_model(), layer.prompt_embedding_ctx["default"], name, position)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    with torch.no_grad(), model.disable_adapter():
        assert not torch.allclose(model(input_ids=inputs(name)).pooler_output, ours, atol=1e-3)


@pytest.mark.parametrize("position", ["end", "front"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_deep_text_prompts_match_a_hand_built_prompt(name, position):
    """Deep text prompts work with every family and class position (CLIP and SigLIP: tests/test_deep_prompts.py)."""
    torch.manual_seed(0)
    config = PromptEmbeddingConfig(n_ctx=N_CTX, prompt_depth=2, class_token_position=position, suffix_token_ids=[DOT])
    model = get_peft_model(FAMILIES[name]().eval(), config)
    layer = next(m for m in model.modules() if isinstance(m, PromptEmbeddingLayer))
    with torch.no_grad():
        layer.prompt_embedding_ctx["default"].normal_(0, 1)
        layer.prompt_embedding_deep_ctx["default"].normal_(0, 1)
        ours = model(input_ids=inputs(name)).pooler_output
        ctx, deep = layer.prompt_embedding_ctx["default"], tuple(layer.prompt_embedding_deep_ctx["default"])
        expected = hand_built(model.get_base_model(), ctx, name, position, deep)
        shallow = hand_built(model.get_base_model(), ctx, name, position)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert (ours - shallow).abs().max() > 1e-3  # the deep tokens matter


@pytest.mark.parametrize("name", list(FAMILIES))
def test_save_load_round_trip(name, tmp_path):
    torch.manual_seed(0)
    base_state = FAMILIES[name]().state_dict()

    def fresh():
        tower = FAMILIES[name]().eval()
        tower.load_state_dict(base_state)
        return tower

    model = get_peft_model(fresh(), PromptEmbeddingConfig(n_ctx=N_CTX))
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).normal_(0, 1)
        expected = model(input_ids=inputs(name)).pooler_output
    model.save_pretrained(tmp_path)
    for again in (PeftModel.from_pretrained(fresh(), tmp_path), load_prompt_model(fresh(), str(tmp_path))):
        with torch.no_grad():
            assert torch.equal(again(input_ids=inputs(name)).pooler_output, expected)


def test_siglip_needs_room_in_its_padding():
    model = get_peft_model(siglip().eval(), PromptEmbeddingConfig(n_ctx=N_CTX))
    unpadded = torch.tensor([[11, 12, 13, 1]])
    with pytest.raises(ValueError, match="padding='max_length'"):
        model(input_ids=unpadded)


def full_model(name: str):
    """A tiny image-text model of the family, with the ids of the tiny CLIP BPE tokenizer (its padding token is its
    end-of-text token, as in SigLIP)."""
    from transformers import GroupViTConfig, GroupViTModel, OwlViTConfig, OwlViTModel, SiglipConfig, SiglipModel

    from peft_prompt_clip.tiny import vocab_and_merges

    eos = len(vocab_and_merges()[0]) - 1
    text = {**TOWER, "vocab_size": eos + 1, "max_position_embeddings": 16, "pad_token_id": eos, "eos_token_id": eos}
    vision = {k: v for k, v in TOWER.items() if k != "vocab_size"} | {"image_size": 30, "patch_size": 6}
    if name == "siglip":
        return SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    if name == "siglip2":
        from transformers import Siglip2Config, Siglip2Model

        vision = {k: v for k, v in vision.items() if k != "image_size"} | {"patch_size": 4, "num_patches": 64}
        return Siglip2Model(Siglip2Config(text_config=text, vision_config=vision))
    text["bos_token_id"] = eos - 1
    if name == "owlvit":
        return OwlViTModel(OwlViTConfig(text_config=text, vision_config=vision, projection_dim=16))
    groups = {"depths": [1, 1], "num_group_tokens": [4, 0], "num_output_groups": [4, 4]}
    config = GroupViTConfig(
        text_config=text, vision_config=vision | groups, projection_dim=16, projection_intermediate_dim=16
    )
    return GroupViTModel(config)


class Siglip2Processor:
    """SigLIP 2's image processor (NaFlex patches: pixel_values, pixel_attention_mask, spatial_shapes) with the tiny
    CLIP BPE tokenizer."""

    def __init__(self, tokenizer):
        try:  # transformers 5: the PIL backend
            from transformers import Siglip2ImageProcessorPil as ImageProcessor
        except ImportError:  # transformers 4
            from transformers import Siglip2ImageProcessor as ImageProcessor
        self.image_processor = ImageProcessor(patch_size=4, max_num_patches=64)
        self.tokenizer = tokenizer

    def __call__(self, images, return_tensors):
        return self.image_processor(images=images, return_tensors=return_tensors)


@pytest.mark.parametrize("name", ["siglip", "siglip2", "owlvit", "groupvit"])
def test_full_model_learns_a_prompt_and_classifies(name, clip_dir, tmp_path):
    """The trainer pads prompts as the family expects, learns a hidden prompt, and the classifier agrees."""
    from transformers import AutoProcessor

    from peft_prompt_clip import PromptClassifier
    from peft_prompt_clip.data import LabeledImages
    from peft_prompt_clip.training import PromptTrainer, TrainingArguments

    torch.manual_seed(0)
    state = full_model(name).state_dict()

    def fresh():
        model = full_model(name).eval()
        model.load_state_dict(state)
        return model

    processor = AutoProcessor.from_pretrained(clip_dir)
    if name == "siglip2":
        processor = Siglip2Processor(processor.tokenizer)
    classes = ["cat", "dog", "bird", "car"]
    teacher = get_peft_model(fresh(), PromptEmbeddingConfig(n_ctx=4, init_seed=9))
    generator = torch.Generator().manual_seed(0)
    images = [(torch.rand(30, 30, 3, generator=generator) * 255).to(torch.uint8).numpy() for _ in range(64)]
    with torch.no_grad():
        next(p for p in teacher.parameters() if p.requires_grad).normal_(0, 1.0, generator=generator)
        labels = (
            PromptClassifier(teacher, processor, classes)
            .logits(**processor(images=images, return_tensors="pt"))
            .argmax(-1)
        )
    data = LabeledImages(classes, images, labels.tolist())

    student = get_peft_model(fresh(), PromptEmbeddingConfig(n_ctx=4))
    recipe = dict(batch_size=16, optimizer="adamw", augment=False, warmup_epochs=0)
    probe = TrainingArguments(output_dir=str(tmp_path / "probe"), epochs=1, lr=0.0, **recipe)
    before = PromptTrainer(student, processor, data, probe).train()
    training = TrainingArguments(output_dir=str(tmp_path / "run"), epochs=30, lr=0.05, **recipe)
    after = PromptTrainer(student, processor, data, training).train()
    assert after["loss"] < 0.85 * before["loss"] and after["accuracy"] >= before["accuracy"], (before, after)
    learned = PromptClassifier(student, processor, classes).logits(**processor(images=images, return_tensors="pt"))
    learned = learned.argmax(-1)
    assert (learned == labels).float().mean() > 0.6
