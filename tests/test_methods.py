"""Training deep and multi-modal prompts: vision prompts are learned through the prompted image tower (never from
cached features), PromptSRC's terms and its Gaussian aggregation over epochs do what the paper says, and the presets
give the papers' settings."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import write_image_folder
from peft import get_peft_model
from test_cli import run
from test_trainer import CLASSES, teacher_data
from transformers import AutoProcessor, CLIPConfig, CLIPModel

from peft_prompt_clip import InvalidCheckpointError, PromptClassifier, PromptEmbeddingConfig, load_prompt_model
from peft_prompt_clip.hub import model_card
from peft_prompt_clip.layer import find_prompt_layer
from peft_prompt_clip.methods import METHODS, method_settings
from peft_prompt_clip.options import IMAGENET_TEMPLATES
from peft_prompt_clip.training import PromptTrainer, TrainingArguments
from peft_prompt_clip.training.features import TrainingImages
from peft_prompt_clip.training.losses import PromptLoss, StepOutputs, l1_to_frozen


def prompted_student(clip_dir, **fields):
    config = PromptEmbeddingConfig(n_ctx=2, class_names=CLASSES, **fields)
    return get_peft_model(CLIPModel.from_pretrained(clip_dir).eval(), config), AutoProcessor.from_pretrained(clip_dir)


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fields", [{"vision_n_ctx": 2, "prompt_depth": 2}, {"coupled": True, "prompt_depth": 2}])
def test_vision_prompts_learn_through_the_prompted_image_tower(clip_dir, tmp_path, monkeypatch, fields):
    def no_cache(self, views=None):
        raise AssertionError("image features of a vision-prompted adapter must not be cached")

    monkeypatch.setattr(TrainingImages, "cached", no_cache)
    data = teacher_data(clip_dir, n=48)
    model, processor = prompted_student(clip_dir, **fields)
    before = adapter_tensors(model)
    args = TrainingArguments(output_dir=str(tmp_path), epochs=3, batch_size=16, optimizer="adamw", lr=0.05)
    args.augment = False  # even without augmentation: the features depend on the adapter
    trainer = PromptTrainer(model, processor, data, args)
    assert trainer.images.prompted
    summary = trainer.train()
    after = adapter_tensors(model)
    vision = [n for n in after if "vision_ctx" in n or "coupling" in n]
    assert vision and all(not torch.equal(before[n], after[n]) for n in after)
    assert math.isfinite(summary["loss"])
    # the saved adapter classifies with its prompted image tower
    loaded = load_prompt_model(CLIPModel.from_pretrained(clip_dir).eval(), tmp_path)
    classifier = PromptClassifier(loaded, processor, CLASSES)
    pixels = processor(images=data.images[:4], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        with_prompts = classifier.logits(pixels)
    with pytest.raises(ValueError, match="has vision prompts: its class features fit the image features of its own"):
        classifier.save_head(tmp_path / "head.safetensors")
    with torch.no_grad():
        layer = find_prompt_layer(loaded)  # the text side alone differs
        layer.prompt_variants["default"] = tuple(v for v in layer.prompt_variants["default"] if not v.prompts_images)
        assert not torch.allclose(classifier.logits(pixels), with_prompts)


@pytest.mark.parametrize("mapped", [False, True], ids=["in memory", "a mapped file"])
def test_a_prompted_run_decodes_each_image_once_and_learns_the_same_adapter(clip_dir, tmp_path, monkeypatch, mapped):
    """Without augmentation a prompted tower's inputs and the frozen tower's features are the same every epoch: each
    image is decoded once and its frozen features computed once, and the adapter learned is today's."""
    import peft_prompt_clip.data as data_module
    import peft_prompt_clip.training.cache as cache
    from peft_prompt_clip.encoder import PromptEncoder

    monkeypatch.setattr(cache, "MEMORY_BYTES", 0 if mapped else cache.MEMORY_BYTES)
    decoded, frozen_images, opened, encoded = [], [], data_module.open_image, PromptEncoder.image_features

    def open_image(source):
        decoded.append(source)
        return opened(source)

    def image_features(self, inputs, adapter_name=None, enabled=True):
        if not enabled:
            frozen_images.append(len(next(iter(inputs.values()))))
        return encoded(self, inputs, adapter_name, enabled)

    caching, has = [], cache.RowCache.has  # today's way, without: every step decodes and runs the frozen tower
    monkeypatch.setattr(cache.RowCache, "has", lambda self, indices: bool(caching) and has(self, indices))
    monkeypatch.setattr(data_module, "open_image", open_image)
    monkeypatch.setattr(PromptEncoder, "image_features", image_features)
    data, held_out = teacher_data(clip_dir, n=20), teacher_data(clip_dir, n=9, seed=1)
    recipe = {"epochs": 3, "batch_size": 8, "eval_every": 1, "scl_text_weight": 25.0, "scl_image_weight": 10.0}

    def run(folder, cached):
        model, processor = prompted_student(clip_dir, vision_n_ctx=2, prompt_depth=2, vision_prompt_depth=2)
        args = TrainingArguments(str(folder), augment=False, kl_weight=0.5, **recipe)
        trainer = PromptTrainer(model, processor, data, args, eval_data=held_out)
        caching[:], decoded[:], frozen_images[:] = [True] if cached else [], [], []
        trainer.train()
        return trainer, adapter_tensors(model), len(decoded), sum(frozen_images)

    before, learned_before, decodes_before, frozen_before = run(tmp_path / "before", cached=False)
    trainer, learned, decodes, frozen = run(tmp_path / "after", cached=True)
    evaluations = 1 + 3  # the start and every epoch, the prompted tower on the held-out images
    assert decodes_before == 3 * 20 + evaluations * 9 + 9  # + the held-out images' frozen features, once
    assert decodes == 20 + 9
    assert frozen_before == 3 * 20 + 9 and frozen == 20 + 9
    assert learned.keys() == learned_before.keys()
    for name, tensor in learned.items():
        torch.testing.assert_close(tensor, learned_before[name], rtol=0, atol=1e-6)
    assert trainer.images.inputs.tables["pixel_values"].mapped == mapped
    assert trainer.images.frozen.mapped == mapped and trainer.images.held_out_inputs.has(range(9))
    assert not list((tmp_path / "after").glob(".image-cache-*"))  # a mapped table leaves no file behind


def test_promptsrc_terms():
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    hand = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    image, frozen = (torch.nn.functional.normalize(torch.randn(2, 8), dim=-1) for _ in range(2))
    assert torch.allclose(l1_to_frozen(text, hand), (text - hand).abs().mean(-1))
    logits = 10 * image @ text.T
    step = StepOutputs(logits, torch.tensor([0, 1]), text, image, torch.tensor(10.0), frozen)
    ce = torch.nn.functional.cross_entropy(logits, step.labels, reduction="sum")
    per_image, per_batch = PromptLoss(hand_features=hand, scl_text_weight=25.0, scl_image_weight=10.0)(step)
    torch.testing.assert_close(per_batch, 25.0 * (text - hand).abs().mean())
    torch.testing.assert_close(per_image, ce + 10.0 * (image - frozen).abs().mean(-1).sum())
    # the zero-shot logits of the KL term come from the frozen image features, not the prompted ones
    per_image, _ = PromptLoss(kl_weight=1.0, hand_features=hand)(step)
    zero_shot = (10 * frozen @ hand.T).log_softmax(-1)
    kl = (zero_shot.exp() * (zero_shot - logits.log_softmax(-1))).sum()
    torch.testing.assert_close(per_image, ce + kl)


def test_gaussian_prompt_aggregation_saves_the_weighted_mean(clip_dir, tmp_path, monkeypatch):
    import peft_prompt_clip.training.trainer as trainer_module

    epochs_seen = []
    save = trainer_module.save_checkpoint

    def record(path, params, *rest):
        epochs_seen.append([p.detach().clone() for p in params])
        save(path, params, *rest)

    monkeypatch.setattr(trainer_module, "save_checkpoint", record)
    data = teacher_data(clip_dir, n=32)
    model, processor = prompted_student(clip_dir, prompt_depth=2, vision_n_ctx=2)
    args = TrainingArguments(
        output_dir=str(tmp_path), epochs=4, batch_size=16, lr=0.5, augment=False, gpa_mean=2.5, gpa_std=1.0
    )
    args.scl_text_weight, args.scl_image_weight = 25.0, 10.0
    trainer = PromptTrainer(model, processor, data, args)
    trainer.train()
    weights = [math.exp(-((e - 2.5) ** 2) / 2) for e in range(1, 5)]
    weights = [w / sum(weights) for w in weights]
    assert weights[1] == weights[2] > weights[0] == weights[3]
    final = [p.detach() for p in trainer.params]
    for i, param in enumerate(final):
        expected = sum(w * epoch[i] for w, epoch in zip(weights, epochs_seen, strict=True))
        torch.testing.assert_close(param, expected, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(param, epochs_seen[-1][i])  # not the last epoch's
    with pytest.raises(ValueError, match="gives no weight to any of the 4 epochs"):
        TrainingArguments(output_dir=".", gpa_mean=400.0, gpa_std=1.0).gpa_weights(4)
    # the weights are normalised over the epochs: resuming with another number of them would scale the prompts
    monkeypatch.setattr(trainer_module, "save_checkpoint", save)
    args.epochs, args.resume = 6, True
    with pytest.raises(InvalidCheckpointError, match="epochs: 4 there, 6 here"):
        PromptTrainer(model, processor, data, args).train()


@pytest.mark.parametrize("model", ["clip_dir", "legacy_clip_dir"])  # legacy: pooled at the highest id
def test_words_of_ctx_init_past_n_ctx_stay_fixed_before_the_class_name(model, request, tmp_path):
    """MaPLe's and IVLP's prompt: 2 learned tokens from "a photo of a", then "of a" as words. At the start, a CoOp
    context so made is those words: its class features are the base model's for "a photo of a {}." exactly."""
    clip_dir = request.getfixturevalue(model)
    processor = AutoProcessor.from_pretrained(clip_dir)
    ids = processor.tokenizer("a photo of a", add_special_tokens=False)["input_ids"]
    zero_shot = PromptClassifier(CLIPModel.from_pretrained(clip_dir).eval(), processor, CLASSES, ["a photo of a {}."])
    config = PromptEmbeddingConfig(n_ctx=2, ctx_init="a photo of a", class_names=CLASSES)
    model = get_peft_model(CLIPModel.from_pretrained(clip_dir).eval(), config)
    assert config.fixed_token_ids == ids[2:] and model.peft_config["default"].n_ctx == 2
    learned = PromptClassifier(model, processor, CLASSES)
    torch.testing.assert_close(learned.class_features(), zero_shot.class_features(), atol=1e-6, rtol=0)
    model.save_pretrained(tmp_path)  # the fixed ids travel with the adapter: no tokenizer needed to load it
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fixed_token_ids"] == ids[2:]
    loaded = load_prompt_model(CLIPModel.from_pretrained(clip_dir).eval(), tmp_path)
    torch.testing.assert_close(PromptClassifier(loaded, processor, CLASSES).class_features(), learned.class_features())
    adapter, _ = method_settings("maple", num_classes=len(CLASSES))
    assert (adapter["n_ctx"], adapter["ctx_init"]) == (2, "a photo of a")
    # a run's resume fingerprint holds the fixed words; without any, it is what checkpoints before the field held
    from peft_prompt_clip.data import LabeledImages
    from peft_prompt_clip.training.record import fingerprint

    data, args = LabeledImages(CLASSES, [None], [0]), TrainingArguments(str(tmp_path))
    assert fingerprint(config, args, 1, data, None)["fixed_token_ids"] == ids[2:]
    plain = get_peft_model(CLIPModel.from_pretrained(clip_dir), PromptEmbeddingConfig(n_ctx=4, class_names=CLASSES))
    assert fingerprint(plain.peft_config["default"], args, 1, data, None)["fixed_token_ids"] is None
    with pytest.raises(ValueError, match="the words past the context stay fixed right after it, before the text"):
        get_peft_model(CLIPModel.from_pretrained(clip_dir), PromptEmbeddingConfig(n_ctx=2, ctx_init="a photo of a",
                       class_token_position="front"))  # fmt: skip
    with pytest.raises(ValueError, match=r"fixed_token_ids=\[99999\] are not all words of this text model"):
        get_peft_model(CLIPModel.from_pretrained(clip_dir), PromptEmbeddingConfig(n_ctx=2, fixed_token_ids=[99999]))


def test_presets_are_the_papers():
    adapter, training = method_settings("promptsrc", num_classes=10)
    assert adapter == {**METHODS["promptsrc"].adapter} and adapter["prompt_depth"] == 9
    assert training["kl_weight"] == pytest.approx(0.1) and training["scl_text_weight"] == 25.0
    assert (training["gpa_mean"], training["lr"], training["batch_size"], training["epochs"]) == (15.0, 0.0025, 4, 20)
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3, "num_attention_heads": 4}
    text = {**vision, "num_hidden_layers": 12}
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision))
    adapter, training = method_settings("maple", num_classes=10, model=clip)
    assert adapter["prompt_depth"] == 3 and adapter["coupled"]  # MaPLe's depth is both towers'
    assert method_settings("ivlp", num_classes=10, model=clip)[0]["prompt_depth"] == 9
    assert (training["lr"], training["batch_size"], training["epochs"]) == (0.0035, 4, 2)
    _, scaled = method_settings("promptsrc", num_classes=10, epochs=40)  # the Gaussian follows the epochs
    assert (scaled["epochs"], scaled["gpa_mean"], scaled["gpa_std"]) == (40, 30.0, 2.0)
    with pytest.raises(ValueError, match="Unknown method 'vpt'; choose one of coop, cocoop"):
        method_settings("vpt", 3)


def test_cli_flags_override_the_preset():
    from peft_prompt_clip.cli import build_parser
    from peft_prompt_clip.commands import method_fields

    def fields(*flags):
        args = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--output", "o", *flags])
        return method_fields(args, 10, None)

    adapter, training = fields("--method", "promptsrc", "--n-ctx", "2", "--epochs", "40", "--lr", "0.01")
    assert adapter["n_ctx"] == 2 and "ctx_init" not in adapter  # "a photo of a" fits 4 vectors, not 2
    assert (training["epochs"], training["gpa_mean"], training["lr"], training["kl_weight"]) == (40, 30.0, 0.01, 0.1)
    adapter, _ = fields("--method", "maple", "--no-coupled", "--vision-n-ctx", "2")
    assert adapter["coupled"] is False and adapter["vision_n_ctx"] == 2 and adapter["prompt_depth"] == 9
    adapter, _ = fields("--method", "ivlp", "--vision-n-ctx", "0")
    assert adapter["vision_n_ctx"] == 0 and "vision_prompt_depth" not in adapter
    PromptEmbeddingConfig(**adapter)  # valid: deep text prompts alone
    adapter, training = fields("--method", "promptsrc", "--gpa-mean", "3", "--hand-template", "imagenet")
    assert training["gpa_mean"] == 3.0 and TrainingArguments("o", **training).hand_template == list(IMAGENET_TEMPLATES)
    assert fields() == ({}, {})  # CoOp: the library's defaults


def test_a_run_on_few_images_takes_at_least_min_steps(capsys):
    """MaPLe's and IVLP's 2 epochs in batches of 4 are 80 steps on 160 images, too few to learn (measured in
    benchmarks/cli_presets.py): unless --epochs is given, a run takes MIN_STEPS steps at least, and says so."""
    from peft_prompt_clip.cli import build_parser
    from peft_prompt_clip.commands import _default_epochs
    from peft_prompt_clip.data import LabeledImages
    from peft_prompt_clip.options import MIN_STEPS
    from peft_prompt_clip.training import bounded_epochs

    assert MIN_STEPS == 400 and bounded_epochs(2, 160, 4, steps=None) == 10 and bounded_epochs(2, 161, 4) == 10
    assert bounded_epochs(200, 160, 32) == 200  # CoOp's recipe: 1,000 steps
    assert bounded_epochs(2, 6, 4) == 20  # 2 steps an epoch: raised 10x at most, not to 200 epochs
    # steps, not batches: 2 and 4 batches a step are 20 steps an epoch
    assert bounded_epochs(2, 160, 4, accumulation=2) == 20 and bounded_epochs(2, 160, 2, accumulation=4) == 20
    assert bounded_epochs(20, 160, 4, accumulation=4) == 40  # 10 optimizer steps an epoch

    def epochs(*flags: str, images: int = 160) -> int:
        args = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--output", "o", *flags])
        data = LabeledImages([str(c) for c in range(10)], [None] * images, [n % 10 for n in range(images)])
        _default_epochs(args, data, most=None)
        return args.epochs

    assert epochs("--method", "maple") == 10
    assert "epochs: 10, 400 optimizer steps (the recipe's 2 epochs of 160 images in batches of 4 take 80; a run " \
        "takes at least 400 steps (10x the recipe's epochs at most) unless --epochs is given)" \
        in capsys.readouterr().out  # fmt: skip
    assert epochs("--method", "ivlp", "--batch-size", "16") == 20 and capsys.readouterr()  # not 40: 10x at most
    assert epochs("--method", "maple", "--epochs", "2") == 2  # given: as given
    assert epochs("--method", "maple", images=16_000) == 2  # the paper's ImageNet: 8,000 steps
    assert epochs("--method", "promptsrc") == 20 and epochs() == 200 and not capsys.readouterr().out
    _, training = method_settings("promptsrc", 10, epochs=epochs("--method", "promptsrc", images=40))
    assert training["epochs"] == 40 and training["gpa_mean"] == 30.0  # the Gaussian follows the raised epochs


def test_cli_method_preset_with_an_override(clip_dir, tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=4)
    out = tmp_path / "maple"
    result = run(
        "train", "--model", clip_dir, "--data", images, "--output", out, "--method", "maple", "--epochs", "1",
        "--n-ctx", "3",
    )  # fmt: skip
    assert "method: MaPLe (MaPLe adapter)" in result.stdout and "prompt_depth=2" in result.stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["coupled"], config["prompt_depth"], config["n_ctx"], config["vision_n_ctx"]) == (True, 2, 3, 3)
    test = write_image_folder(tmp_path / "test", per_class=2)
    evaluated = run("eval", "--adapter", out, "--data", test, "--base-to-novel")
    assert "learned" in evaluated.stdout and "novel" in evaluated.stdout
    interpreted = run("interpret", "--adapter", out)  # the input context's nearest words
    assert "shared:" in interpreted.stdout and "ctx  3:" in interpreted.stdout
    card = model_card(out, "user/maple-demo", base_model="openai/clip-vit-base-patch32")
    assert "MaPLe, 3 learned context vectors" in card and "- maple" in card
    assert "3 vision tokens in the first 2 layers of the image tower (each a map of that layer's text tokens)" in card
