"""Training: it learns, it resumes exactly, chunked class encoding has the exact gradient, checkpoints are atomic."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from routes import DTYPE
from safetensors.torch import load_file
from transformers import AutoProcessor, CLIPModel

from peft_prompt_clip import PromptClassifier, PromptEmbeddingConfig, TrainingDivergedError, evaluate
from peft_prompt_clip.data import LabeledImages
from peft_prompt_clip.options import CLIP_TEMPLATE
from peft_prompt_clip.training import LOG_NAME, PromptTrainer, TrainingArguments, coop_epochs
from peft_prompt_clip.training.checkpoints import CHECKPOINT_NAME, load_checkpoint

CLASSES = ["cat", "dog", "bird", "car", "ship", "frog"]


def teacher_data(clip_dir, n=96, seed=0, class_specific=True) -> LabeledImages:
    """Random images labelled by a hidden prompt (one context per class by default): a task a prompt can learn and
    zero-shot cannot."""
    processor = AutoProcessor.from_pretrained(clip_dir)
    teacher = get_peft_model(
        CLIPModel.from_pretrained(clip_dir).eval(),
        PromptEmbeddingConfig(n_ctx=4, class_specific=class_specific, class_names=CLASSES, init_seed=9),
    )
    generator = torch.Generator().manual_seed(seed)
    images = [(torch.rand(30, 30, 3, generator=generator) * 255).to(torch.uint8).numpy() for _ in range(n)]
    texts = processor.tokenizer([f"{c}." for c in CLASSES], padding=True, return_tensors="pt")
    with torch.no_grad():
        next(p for p in teacher.parameters() if p.requires_grad).normal_(0, 1.0, generator=generator)
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        labels = teacher(**texts, pixel_values=pixels).logits_per_image.argmax(-1).tolist()
    return LabeledImages(CLASSES, images, labels)


def split_off(data: LabeledImages, n: int) -> tuple[LabeledImages, LabeledImages]:
    """The first `n` images, and the rest (labelled by the same hidden prompt)."""
    return data.subset(range(n)), data.subset(range(n, len(data)))


def student(clip_dir, **kwargs):
    config = PromptEmbeddingConfig(n_ctx=4, class_specific=True, class_names=CLASSES, **kwargs)
    return get_peft_model(CLIPModel.from_pretrained(clip_dir).eval(), config), AutoProcessor.from_pretrained(clip_dir)


def context(model) -> torch.Tensor:
    return next(p for p in model.parameters() if p.requires_grad).detach().clone()


def args(tmp_path, **kwargs) -> TrainingArguments:
    defaults = dict(output_dir=str(tmp_path), epochs=4, batch_size=16, optimizer="adamw", lr=0.05, augment=False)
    return TrainingArguments(**{**defaults, **kwargs})


def test_coop_epochs_by_shots():
    assert [coop_epochs(s) for s in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]


def test_learning_rate_schedule_is_coops():
    a = TrainingArguments(output_dir=".", lr=0.002)
    assert a.learning_rate(0, 10) == 1e-5
    assert a.learning_rate(1, 10) == pytest.approx(0.5 * 0.002 * (1 + torch.cos(torch.tensor(torch.pi / 10)).item()))
    assert a.learning_rate(5, 10) == pytest.approx(0.001)


def test_worker_processes_give_the_same_adapter(clip_dir, tmp_path):
    """Decoding and augmentation in 2 worker processes or in the training process: the same crops, bit-identical
    context (each image's crop is drawn from a stream of its own); evaluation alike."""
    from peft_prompt_clip import evaluate

    data = teacher_data(clip_dir, n=40)
    contexts, scores = [], []
    for workers in (0, 2):
        model, processor = student(clip_dir)
        recipe = args(tmp_path / str(workers), epochs=2, augment=True, batch_size=8, num_workers=workers)
        PromptTrainer(model, processor, data, recipe).train()
        contexts.append(context(model))
        classifier = PromptClassifier(model, processor, CLASSES)
        scores.append(evaluate(classifier, data, batch_size=16, num_workers=workers))
    assert torch.equal(contexts[0], contexts[1])
    assert scores[0] == scores[1]
    # an image that fails to decode in a worker is reported by its file name
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad = LabeledImages(CLASSES, [*data.images[:15], str(broken)], [*data.labels[:15], 0])
    recipe = args(tmp_path / "broken", epochs=1, augment=True, batch_size=4, num_workers=2)
    with pytest.raises(Exception, match="broken.png"):
        PromptTrainer(model, processor, bad, recipe).train()
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
        TrainingArguments(output_dir=".", num_workers=-1)


def test_cached_augmented_views(clip_dir, tmp_path, monkeypatch):
    """The image tower runs once per view before training, never in a step; each view is the augmentation the trainer
    would draw with its seed, and each epoch draws one view per image."""
    data = teacher_data(clip_dir, n=20)
    model, processor = student(clip_dir)
    trainer = PromptTrainer(model, processor, data, args(tmp_path, epochs=3, augment=True, augment_views=2))
    views = trainer.images.cached(2)
    assert views.shape[:2] == (2, 20) and not torch.allclose(views[0], views[1])
    single, _ = trainer.images.of([7], "1-view1")
    torch.testing.assert_close(views[1, 7], single[0], atol=1e-5, rtol=1e-5)
    assert {trainer.images.view_of(e, i) for e in range(3) for i in range(20)} == {0, 1}
    calls = []
    encode = trainer.encoder.image_features
    monkeypatch.setattr(trainer.encoder, "image_features", lambda *a, **k: calls.append(1) or encode(*a, **k))
    trainer.train()
    assert len(calls) == 2  # one batch of 20 images per view, none per step


def test_training_learns(clip_dir, tmp_path):
    data = teacher_data(clip_dir)
    model, processor = student(clip_dir)
    before = PromptTrainer(model, processor, data, args(tmp_path / "probe", epochs=1, lr=0.0)).train()["accuracy"]
    summary = PromptTrainer(model, processor, data, args(tmp_path / "run", epochs=8)).train()
    assert summary["accuracy"] > before + 0.3, (before, summary)
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / CHECKPOINT_NAME).is_file()


@pytest.mark.parametrize(
    "extra",
    [
        {"augment": False},
        {"augment": True},
        {"augment": True, "augment_views": 3},
        {"augment": False, "gpa_mean": 2.5},
        {"augment": False, "eval_every": 1},
        {"augment": False, "gpa_mean": 2.5, "eval_every": 3},
    ],
    ids=["cached", "augment", "views", "gpa", "validation", "gpa+validation"],
)
def test_resume_gives_the_uninterrupted_result(clip_dir, tmp_path, extra, monkeypatch):
    """Also with PromptSRC's aggregation over epochs, whose running average travels in the checkpoint, and with
    held-out images, whose best candidate so far and log travel in it."""
    import peft_prompt_clip.training.trainer as trainer_module

    data, held_out = split_off(teacher_data(clip_dir, n=72), 48)
    held_out = held_out if "eval_every" in extra else None
    recipe = dict(optimizer="sgd", lr=0.5, **extra)
    model, processor = student(clip_dir)
    PromptTrainer(model, processor, data, args(tmp_path / "full", **recipe), eval_data=held_out).train()
    full = context(model)

    save = trainer_module.save_checkpoint

    def save_then_die(path, params, optimizer, epoch, *rest):
        save(path, params, optimizer, epoch, *rest)
        if epoch == 2:
            raise KeyboardInterrupt  # the process dies right after its second checkpoint

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_die)
    model, processor = student(clip_dir)
    with pytest.raises(KeyboardInterrupt):
        PromptTrainer(model, processor, data, args(tmp_path / "cut", **recipe), eval_data=held_out).train()
    monkeypatch.setattr(trainer_module, "save_checkpoint", save)
    model, processor = student(clip_dir)  # a fresh model: only the checkpoint carries over
    PromptTrainer(model, processor, data, args(tmp_path / "cut", resume=True, **recipe), eval_data=held_out).train()
    assert torch.equal(context(model), full)
    assert not torch.equal(context(model), context(student(clip_dir)[0]))
    logs = [json.loads((tmp_path / run / LOG_NAME).read_text()) for run in ("cut", "full")]
    for log in logs:  # all but the epochs' wall times
        assert all(entry.pop("seconds") >= 0 for entry in log["history"])
    assert logs[0] == logs[1]
    if held_out:
        name = "last/adapter_model.safetensors"
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()


# transformers 4 builds CLIP's causal mask with an overflow in float64 (routes.DTYPE), so there the checks run in
# float32, where 1e-6 is relative to the gradient's size (it reaches ~20 here, and float32 keeps ~7 digits)
FLOAT64 = DTYPE == torch.float64


@pytest.mark.parametrize("regularisers", [{}, {"kg_weight": 8.0, "kl_weight": 1.0}], ids=["coop", "kgcoop+kl"])
def test_chunked_class_encoding_has_the_exact_gradient(clip_dir, tmp_path, regularisers):
    data = teacher_data(clip_dir, n=16)
    grads = []
    for chunk in (None, 4, 1):
        model, processor = student(clip_dir)
        if FLOAT64:
            model.double()
        trainer = PromptTrainer(model, processor, data, args(tmp_path, class_chunk_size=chunk, **regularisers))
        features = trainer.images.cached()
        assert features.dtype == (torch.float64 if FLOAT64 else torch.float32)
        trainer.step(features, trainer.labels, len(data))
        grads.append(next(p for p in model.parameters() if p.requires_grad).grad.clone())
    assert grads[0].abs().sum() > 0
    atol = 1e-6 if FLOAT64 else 1e-6 * grads[0].abs().max().item()
    torch.testing.assert_close(grads[1], grads[0], atol=atol, rtol=0)
    torch.testing.assert_close(grads[2], grads[0], atol=atol, rtol=0)


def test_checkpoint_write_is_atomic(clip_dir, tmp_path, monkeypatch):
    import peft_prompt_clip.training.checkpoints as checkpoints_module

    data = teacher_data(clip_dir, n=16)
    real, seen = checkpoints_module.save_file, []

    def full_disk_at_the_second_epoch(tensors, path, metadata=None):
        seen.append((tmp_path / CHECKPOINT_NAME).read_bytes() if seen else b"")
        if len(seen) == 2:
            raise OSError("No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoints_module, "save_file", full_disk_at_the_second_epoch)
    model, processor = student(clip_dir)
    trainer = PromptTrainer(model, processor, data, args(tmp_path, epochs=2))
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == seen[1]  # the first epoch's checkpoint, whole
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    params = [torch.zeros(6, 4, 32, requires_grad=True)]
    optimizer = torch.optim.AdamW(params)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME, params, optimizer, trainer.run)[0] == 1


def test_held_out_images_choose_the_epoch_kept(clip_dir, tmp_path, monkeypatch):
    """The adapter saved (and left in the model) is the evaluated candidate with the best held-out accuracy, the
    initial context (epoch 0) included; the end of training's is saved in last/; the log's numbers are the library's
    own evaluation's."""
    import peft_prompt_clip.training.trainer as trainer_module

    seen = {}
    save = trainer_module.save_checkpoint

    def record(path, params, optimizer, epoch, *rest):
        seen[epoch] = context(model)
        save(path, params, optimizer, epoch, *rest)

    monkeypatch.setattr(trainer_module, "save_checkpoint", record)
    data, held_out = split_off(teacher_data(clip_dir, n=72), 48)
    model, processor = student(clip_dir)
    seen[0] = context(model)
    trainer = PromptTrainer(model, processor, data, args(tmp_path / "run", epochs=6, eval_every=2), eval_data=held_out)
    summary = trainer.train()
    log = json.loads((tmp_path / "run" / LOG_NAME).read_text())
    evaluated = {0: log["initial"], **{e["epoch"]: e for e in log["history"] if "eval_accuracy" in e}}
    assert sorted(evaluated) == [0, 2, 4, 6] and len(log["history"]) == 6
    key = {
        e: (v.get("eval_accuracy", v.get("accuracy")), -v.get("eval_loss", v.get("loss")))
        for e, v in evaluated.items()
    }
    best = max(sorted(key), key=lambda e: key[e])  # the first of equals
    assert log["best"]["epoch"] == best == summary["eval"]["best"]["epoch"]
    assert torch.equal(next(iter(load_file(tmp_path / "run" / "adapter_model.safetensors").values())), seen[best])
    assert torch.equal(
        next(iter(load_file(tmp_path / "run" / "last" / "adapter_model.safetensors").values())), seen[6]
    )
    assert torch.equal(context(model), seen[best])
    learned = evaluate(PromptClassifier(model, processor, CLASSES), held_out)["top1"]
    hand_written = PromptClassifier(model, processor, CLASSES, CLIP_TEMPLATE, use_adapter=False)
    zero_shot = evaluate(hand_written, held_out)["top1"]
    assert log["best"]["accuracy"] == pytest.approx(learned) and log["zero_shot"]["accuracy"] == pytest.approx(
        zero_shot
    )

    # held-out labels that the initial prompt gets all right and that training moves away from: epoch 0 is kept
    with torch.no_grad():
        labels = (
            PromptClassifier(student(clip_dir)[0], processor, CLASSES)
            .logits(**processor(images=held_out.images, return_tensors="pt"))
            .argmax(-1)
        )
    own = LabeledImages(CLASSES, held_out.images, labels.tolist())
    model, processor = student(clip_dir)
    initial = args(tmp_path / "initial", epochs=4, early_stop=False)  # every epoch, to see the end fall behind
    summary = PromptTrainer(model, processor, data, initial, eval_data=own).train()
    assert summary["eval"]["initial"]["accuracy"] == 1.0 and summary["eval"]["best"]["epoch"] == 0
    assert summary["eval"]["last"]["accuracy"] < 1.0
    assert torch.equal(context(model), seen[0])
    with pytest.raises(ValueError, match="eval_data must hold images of the training data's classes"):
        PromptTrainer(model, processor, data, args(tmp_path / "x"), eval_data=LabeledImages(["a", "b"], [0], [0]))
    # more epochs may follow on resume (the evaluation schedule follows them)
    more = args(tmp_path / "initial", epochs=6, resume=True, early_stop=False)
    more = PromptTrainer(model, processor, data, more, eval_data=own)
    assert [e["epoch"] for e in json.loads((tmp_path / "initial" / LOG_NAME).read_text())["history"]] == [1, 2, 3, 4]
    more.train()
    assert [e["epoch"] for e in json.loads((tmp_path / "initial" / LOG_NAME).read_text())["history"]] == [*range(1, 7)]


@pytest.mark.parametrize(
    "adapter",
    [{"conditional": True, "class_specific": False}, {"prompt_depth": 2, "vision_n_ctx": 2, "class_specific": False}],
    ids=["cocoop", "ivlp"],
)
def test_the_trainers_evaluation_is_the_librarys(clip_dir, tmp_path, adapter):
    """The held-out accuracy that chooses the epoch (per-image class features for CoCoOp, the prompted image tower for
    vision prompts) is what `evaluate` reports for the same adapter."""
    data, held_out = split_off(teacher_data(clip_dir, n=72), 48)
    config = PromptEmbeddingConfig(n_ctx=4, class_names=CLASSES, meta_net_reduction=4, **adapter)
    model = get_peft_model(CLIPModel.from_pretrained(clip_dir).eval(), config)
    processor = AutoProcessor.from_pretrained(clip_dir)
    trainer = PromptTrainer(model, processor, data, args(tmp_path), eval_data=held_out)
    expected = evaluate(PromptClassifier(model, processor, CLASSES), held_out)["top1"]
    assert trainer.evaluate()["accuracy"] == pytest.approx(expected)
    hand_written = PromptClassifier(model, processor, CLASSES, CLIP_TEMPLATE, use_adapter=False)
    zero_shot = evaluate(hand_written, held_out)["top1"]
    assert trainer.evaluate(zero_shot=True)["accuracy"] == pytest.approx(zero_shot)


def test_trainer_refuses_a_frozen_adapter(clip_dir, tmp_path):
    model, processor = student(clip_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="is_trainable=True"):
        PromptTrainer(model, processor, teacher_data(clip_dir, n=8), args(tmp_path))


def test_bf16_mixed_precision_keeps_a_float32_context(clip_dir, tmp_path):
    # in its own process: Accelerate keeps one mixed-precision setting per process
    script = f"""
import math, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_trainer import args, student, teacher_data
from peft_prompt_clip.training import PromptTrainer
data = teacher_data({str(clip_dir)!r}, n=16)
model, processor = student({str(clip_dir)!r})
summary = PromptTrainer(model, processor, data, args({str(tmp_path)!r}, epochs=2, mixed_precision="bf16")).train()
ctx = next(p for p in model.parameters() if p.requires_grad)
assert ctx.dtype == torch.float32 and torch.isfinite(ctx).all() and math.isfinite(summary["loss"])
print("ok", summary["accuracy"])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_gradient_accumulation_equals_the_larger_batch(clip_dir, tmp_path):
    data = teacher_data(clip_dir, n=48)
    contexts = []
    for batch_size, accumulation in ((16, 1), (8, 2)):
        model, processor = student(clip_dir)
        if FLOAT64:  # float64, so that 1e-6 measures the method, not the order of float32 sums
            model.double()
        recipe = args(tmp_path / f"{batch_size}", epochs=3, optimizer="sgd", lr=0.5, batch_size=batch_size)
        recipe.gradient_accumulation_steps = accumulation
        PromptTrainer(model, processor, data, recipe).train()
        contexts.append(context(model))
    torch.testing.assert_close(contexts[1], contexts[0], atol=1e-6 if FLOAT64 else 1e-4, rtol=0)
    assert (contexts[0] - context(student(clip_dir)[0]).to(contexts[0].dtype)).abs().max() > 0.01


def test_tensorboard_logging(clip_dir, tmp_path):
    pytest.importorskip("tensorboard")
    model, processor = student(clip_dir)
    PromptTrainer(
        model, processor, teacher_data(clip_dir, n=16), args(tmp_path, epochs=2, report_to="tensorboard")
    ).train()
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def poisoned_trainer(model, processor, data, arguments, poisoned: set[int]) -> PromptTrainer:
    """A trainer whose cached image features of the images `poisoned` are NaN, as after an overflow."""
    trainer = PromptTrainer(model, processor, data, arguments)
    cached = trainer.images.cached

    def poison(views=None):
        features = cached(views)
        features[sorted(poisoned)] = float("nan")
        return features

    trainer.images.cached = poison
    return trainer


def test_non_finite_steps_are_skipped(clip_dir, tmp_path):
    data = teacher_data(clip_dir, n=48)
    model, processor = student(clip_dir)
    trainer = poisoned_trainer(model, processor, data, args(tmp_path, epochs=2), {0})  # one batch per epoch: NaN
    with pytest.warns(UserWarning, match=r"Skipped 1 of 3 steps of epoch 1 whose loss was NaN"):
        summary = trainer.train()
    assert summary["skipped_steps"] == 1 and math.isfinite(summary["loss"])
    assert torch.isfinite(context(model)).all() and not torch.equal(context(model), context(student(clip_dir)[0]))


def test_divergence_stops_and_keeps_the_last_good_checkpoint(clip_dir, tmp_path):
    data = teacher_data(clip_dir, n=16)
    model, processor = student(clip_dir)
    PromptTrainer(model, processor, data, args(tmp_path, epochs=1)).train()
    good = (tmp_path / CHECKPOINT_NAME).read_bytes()
    adapter = (tmp_path / "adapter_model.safetensors").read_bytes()
    model, processor = student(clip_dir)
    trainer = poisoned_trainer(model, processor, data, args(tmp_path, epochs=3, resume=True), set(range(16)))
    with pytest.raises(TrainingDivergedError, match="the checkpoint of epoch 1 is kept"):
        trainer.train()
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == good
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == adapter


def _cosine_to_hand(model, processor) -> float:
    learned = PromptClassifier(model, processor, CLASSES).class_features()
    hand = PromptClassifier(model, processor, CLASSES, ["a photo of a {}."], use_adapter=False).class_features()
    return (learned * hand).sum(-1).mean().item()


def test_kgcoop_keeps_class_features_near_the_hand_written_ones(clip_dir, tmp_path):
    data = teacher_data(clip_dir)
    cosines = {}
    for weight in (0.0, 50.0):
        model, processor = student(clip_dir, ctx_init="a photo of a")
        PromptTrainer(model, processor, data, args(tmp_path / str(weight), epochs=8, kg_weight=weight)).train()
        cosines[weight] = _cosine_to_hand(model, processor)
    assert cosines[50.0] > cosines[0.0] + 0.05, cosines


def test_kl_to_zero_shot_keeps_predictions_near_zero_shot(clip_dir, tmp_path):
    data = teacher_data(clip_dir)
    processor = AutoProcessor.from_pretrained(clip_dir)
    pixels = processor(images=data.images, return_tensors="pt")["pixel_values"]
    agreement = {}
    for weight in (0.0, 50.0):
        model, processor = student(clip_dir, ctx_init="a photo of a")
        PromptTrainer(model, processor, data, args(tmp_path / str(weight), epochs=8, kl_weight=weight)).train()
        learned = PromptClassifier(model, processor, CLASSES).logits(pixels).argmax(-1)
        zero_shot = PromptClassifier(model, processor, CLASSES, ["a photo of a {}."], use_adapter=False)
        agreement[weight] = (learned == zero_shot.logits(pixels).argmax(-1)).float().mean().item()
    assert agreement[50.0] > agreement[0.0] + 0.2, agreement


def test_resuming_a_finished_run_saves_the_adapter(clip_dir, tmp_path):
    data = teacher_data(clip_dir, n=16)
    model, processor = student(clip_dir)
    PromptTrainer(model, processor, data, args(tmp_path, epochs=2)).train()
    learned = context(model)
    (tmp_path / "adapter_model.safetensors").unlink()  # as if killed after the last checkpoint, before the save
    model, processor = student(clip_dir)
    summary = PromptTrainer(model, processor, data, args(tmp_path, epochs=2, resume=True)).train()
    assert summary["loss"] is None and torch.equal(context(model), learned)
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_a_class_specific_adapter_is_not_renamed_by_other_data(clip_dir, tmp_path):
    data = teacher_data(clip_dir, n=12)
    renamed = LabeledImages([f"{c}s" for c in CLASSES], data.images, data.labels)
    model, processor = student(clip_dir)
    with pytest.raises(ValueError, match=r"one context per class for \['cat', 'dog'.*but the data's classes are"):
        PromptTrainer(model, processor, renamed, args(tmp_path))
    assert model.peft_config["default"].class_names == CLASSES
    shared = get_peft_model(CLIPModel.from_pretrained(clip_dir).eval(), PromptEmbeddingConfig(n_ctx=4))
    PromptTrainer(shared, processor, renamed, args(tmp_path))  # a shared context is learned for the data's classes
    assert shared.peft_config["default"].class_names == renamed.class_names


def test_a_checkpoint_of_another_run_or_tampered_is_refused(clip_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from peft_prompt_clip import InvalidCheckpointError

    data = teacher_data(clip_dir, n=16)
    processor = AutoProcessor.from_pretrained(clip_dir)

    def shared():  # a shared context: it may learn other class names, so only the checkpoint can refuse them
        return get_peft_model(CLIPModel.from_pretrained(clip_dir).eval(), PromptEmbeddingConfig(n_ctx=4))

    PromptTrainer(shared(), processor, data, args(tmp_path, epochs=2)).train()
    path = tmp_path / CHECKPOINT_NAME

    def resume(**changes):
        model = shared()
        PromptTrainer(model, processor, changes.pop("data", data), args(tmp_path, resume=True, **changes)).train()

    with pytest.raises(InvalidCheckpointError, match="optimizer: 'adamw' there, 'sgd' here"):
        resume(epochs=2, optimizer="sgd")
    renamed = LabeledImages([f"{c}s" for c in CLASSES], data.images, data.labels)
    with pytest.raises(InvalidCheckpointError, match="class_names: \\['cat'.* there, \\['cats'"):
        resume(epochs=2, data=renamed)
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for tampered, message in (
        ({**metadata, "epoch": "-5"}, "says -5 epochs are done"),
        ({k: v for k, v in metadata.items() if k != "run"}, "damaged or was made by an older version"),
        ({**metadata, "scalars": '{"0.step": 1e999}'}, "damaged or was made|malformed optimizer value"),
    ):
        save_file(tensors, str(path), metadata=tampered)
        with pytest.raises(InvalidCheckpointError, match=message):
            resume(epochs=2)


def test_the_resume_fingerprint_holds_every_field_not_named_resumable(clip_dir, tmp_path):
    """The fingerprint is derived from the whole config and arguments: a field added later (TCP's class_prompt_layer,
    left off the earlier hand-written list) is part of it, and a run that differs in it is refused by name."""
    from dataclasses import fields

    from peft_prompt_clip import InvalidCheckpointError
    from peft_prompt_clip.training.record import RESUMABLE_ARGUMENTS, RESUMABLE_CONFIG_FIELDS

    data = teacher_data(clip_dir, n=16, class_specific=False)
    processor = AutoProcessor.from_pretrained(clip_dir)

    def tcp(layer):
        config = PromptEmbeddingConfig(n_ctx=4, class_prompt_layer=layer)
        return get_peft_model(CLIPModel.from_pretrained(clip_dir).eval(), config)

    trainer = PromptTrainer(tcp(1), processor, data, args(tmp_path, epochs=1))
    config_fields = {f.name for f in fields(PromptEmbeddingConfig)} - RESUMABLE_CONFIG_FIELDS
    arguments = {f.name for f in fields(TrainingArguments)} - RESUMABLE_ARGUMENTS - {"patience"}  # in "early_stop"
    assert config_fields | arguments <= set(trainer.run)
    trainer.train()
    with pytest.raises(InvalidCheckpointError, match="class_prompt_layer: 1 there, 0 here"):
        PromptTrainer(tcp(0), processor, data, args(tmp_path, epochs=2, resume=True)).train()


def test_a_run_stops_once_held_out_evaluations_stop_gaining(clip_dir, tmp_path):
    """Early stopping: after `patience` evaluations without a held-out gain the run ends, keeping the best candidate;
    a resumed stopped run stays stopped; turning it off is another run (the fingerprint); off, every epoch runs."""
    from peft_prompt_clip import InvalidCheckpointError

    data, held_out = split_off(teacher_data(clip_dir, n=72), 48)
    model, processor = student(clip_dir)
    start = context(model)
    # nothing is learned (lr 0, no warm-up): no evaluation gains on the initial prompt
    still = {"epochs": 20, "eval_every": 2, "lr": 0.0, "warmup_epochs": 0, "patience": 2}
    summary = PromptTrainer(model, processor, data, args(tmp_path / "run", **still), eval_data=held_out).train()
    assert summary["stopped"] == {"epoch": 4, "patience": 2, "best": 0} and summary["eval"]["best"]["epoch"] == 0
    history = json.loads((tmp_path / "run" / LOG_NAME).read_text())["history"]
    assert [e["epoch"] for e in history] == [1, 2, 3, 4] and torch.equal(context(model), start)
    again = PromptTrainer(model, processor, data, args(tmp_path / "run", resume=True, **still), eval_data=held_out)
    assert again.train()["stopped"]["epoch"] == 4  # nothing more to train
    assert len(json.loads((tmp_path / "run" / LOG_NAME).read_text())["history"]) == 4
    off = args(tmp_path / "run", resume=True, early_stop=False, **still)
    with pytest.raises(InvalidCheckpointError, match="early_stop: 2 there, None here.*--no-early-stop where it had"):
        PromptTrainer(model, processor, data, off, eval_data=held_out).train()
    # a run that ended at its ceiling without a gain, resumed for more epochs: it stops at the next evaluation (every
    # 2 epochs now), not at an epoch without one
    ended = {**still, "epochs": 2, "eval_every": None}
    PromptTrainer(model, processor, data, args(tmp_path / "more", **ended), eval_data=held_out).train()
    more = args(tmp_path / "more", **{**ended, "epochs": 20}, resume=True)
    assert PromptTrainer(model, processor, data, more, eval_data=held_out).train()["stopped"]["epoch"] == 4
    summary = PromptTrainer(
        model, processor, data, args(tmp_path / "all", early_stop=False, **still), eval_data=held_out
    ).train()
    assert "stopped" not in summary
    assert len(json.loads((tmp_path / "all" / LOG_NAME).read_text())["history"]) == 20
    # off without held-out images (nothing to stop on) and under PromptSRC's average over every epoch
    assert PromptTrainer(model, processor, data, args(tmp_path / "x")).patience is None
    averaged = args(tmp_path / "x", gpa_mean=2.0)
    assert PromptTrainer(model, processor, data, averaged, eval_data=held_out).patience is None
    with pytest.raises(ValueError, match="patience must be at least 1"):
        args(tmp_path, patience=0)
