"""Learning without labels: the distillation term against a hand computation, the teacher's logits computed once per
image and resumed after a kill, self-training's selection, and a student learning a teacher of another family."""

from __future__ import annotations

import math
import re

import pytest
import torch
from peft import get_peft_model
from test_trainer import CLASSES, args, context, teacher_data
from transformers import AutoModel, AutoProcessor, CLIPModel

from peft_prompt_clip import PromptClassifier, PromptEmbeddingConfig, PromptTrainer, Teacher, pseudo_labeled
from peft_prompt_clip.distill import CHUNK
from peft_prompt_clip.tiny import save_tiny_siglip
from peft_prompt_clip.training.losses import PromptLoss, StepOutputs, distillation_kl


def test_the_distillation_term_is_the_tempered_kl_from_the_teacher():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [-2.0, 0.0, 2.0]])
    for t in (1.0, 2.0):
        expected = 0.0
        for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
            p = [math.exp(v / t) for v in t_row]
            q = [math.exp(v / t) for v in s_row]
            p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
            expected += t * t * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        assert distillation_kl(student, teacher, t).item() == pytest.approx(expected, rel=1e-6)
    step = StepOutputs(student, torch.tensor([2, 0]), torch.zeros(3, 4), torch.zeros(2, 4), torch.tensor(1.0))
    step = StepOutputs(**{**step.__dict__, "teacher_logits": teacher})
    per_image, _ = PromptLoss(label_weight=0.0, temperature=2.0, distill_weight=0.5)(step)
    assert per_image.item() == pytest.approx(0.5 * distillation_kl(student, teacher, 2.0).item())
    with pytest.raises(ValueError, match="no term"):
        PromptLoss(label_weight=0.0)
    # labelled shots mixed in: the cross-entropy on the images whose labels are true, the KL on all
    labeled = StepOutputs(**{**step.__dict__, "labeled": torch.tensor([False, True])})
    per_image, _ = PromptLoss(label_weight=2.0, temperature=2.0, distill_weight=0.5)(labeled)
    ce_of_second = -student[1].log_softmax(-1)[0].item()  # its label is 0
    assert per_image.item() == pytest.approx(2.0 * ce_of_second + 0.5 * distillation_kl(student, teacher, 2.0).item())


@pytest.fixture(scope="module")
def images(clip_dir):
    return teacher_data(clip_dir, n=CHUNK * 2 + 8).images  # three chunks, the last one short


@pytest.fixture
def teacher(clip_dir):
    """A prompt adapter's classifier on the tiny CLIP, counting the images it classifies."""
    model = get_peft_model(
        CLIPModel.from_pretrained(clip_dir).eval(),
        PromptEmbeddingConfig(n_ctx=4, class_specific=True, class_names=CLASSES, init_seed=9),
    )
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).normal_(
            0, 1.0, generator=torch.Generator().manual_seed(3)
        )
    classifier = PromptClassifier(model, AutoProcessor.from_pretrained(clip_dir), CLASSES)
    classifier.seen = 0
    logits = classifier.logits

    def counted(**inputs):
        classifier.seen += len(inputs["pixel_values"])
        return logits(**inputs)

    classifier.logits = counted
    return Teacher(classifier, "tiny clip, a class-specific prompt")


def test_the_teacher_runs_once_per_image_and_resumes_after_a_kill(teacher, images, tmp_path):
    expected = teacher.logits(images)
    assert expected.shape == (len(images), len(CLASSES)) and teacher.classifier.seen == len(images)
    counted = teacher.classifier.logits
    calls = []

    def dies_on_the_second_chunk(**inputs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return counted(**inputs)

    teacher.classifier.seen = 0
    teacher.classifier.logits = dies_on_the_second_chunk
    with pytest.raises(KeyboardInterrupt):
        teacher.logits(images, cache=tmp_path / "cache")
    teacher.classifier.logits = counted
    assert teacher.classifier.seen == CHUNK
    resumed = teacher.logits(images, cache=tmp_path / "cache")
    assert teacher.classifier.seen == len(images)  # the first chunk came from the cache
    assert torch.equal(resumed, expected)
    again = teacher.logits(images, cache=tmp_path / "cache")
    assert teacher.classifier.seen == len(images) and torch.equal(again, expected)  # all from the cache
    fewer = teacher.logits(images[:0:-1], cache=tmp_path / "cache")  # one removed, the rest reversed
    assert teacher.classifier.seen == len(images) and torch.equal(fewer, expected[1:].flip(0))
    changed = [images[0][::-1].copy(), *images[1:]]  # one image replaced
    assert torch.equal(teacher.logits(changed, cache=tmp_path / "cache")[1:], expected[1:])
    assert teacher.classifier.seen == len(images) + 1  # only the new one ran
    with pytest.raises(ValueError, match="caches another teacher's logits"):
        Teacher(teacher.classifier, "another teacher").logits(images, cache=tmp_path / "cache")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no teacher cache"):
        teacher.logits(images, cache=tmp_path / "other")


def test_each_cached_view_is_taught_by_the_teachers_logits_of_that_crop(clip_dir, teacher, images, tmp_path):
    """With cached augmented views, the teacher classifies each view's crop (the student's: the same random stream)
    once, cached apart from the whole image, and every step pairs an image's features with the teacher's logits of
    the view those features are of."""
    from test_trainer import student

    from peft_prompt_clip.data import image_inputs
    from peft_prompt_clip.training import view_seeds

    few, seeds = images[:20], view_seeds(1, 3)
    per_view = torch.stack([teacher.logits(few, cache=tmp_path / "cache", augment_seed=seed) for seed in seeds])
    assert teacher.classifier.seen == 3 * len(few)
    again = teacher.logits(few, cache=tmp_path / "cache", augment_seed=seeds[2])
    assert teacher.classifier.seen == 3 * len(few) and torch.equal(again, per_view[2])  # from the cache
    whole = teacher.logits(few, cache=tmp_path / "cache")
    assert teacher.classifier.seen == 4 * len(few)  # a crop's row is not the image's
    assert all((whole - crops).abs().max() > 1e-3 for crops in per_view)
    data = pseudo_labeled(few, CLASSES, whole)
    crops = image_inputs(teacher.classifier.processor, data, range(len(few)), augment_seed=seeds[1])
    torch.testing.assert_close(per_view[1], teacher.classifier.logits(**crops))  # the student's crops of view 1

    model, processor = student(clip_dir)
    recipe = dict(epochs=3, batch_size=8, augment=True, augment_views=3, distill_weight=1.0, label_weight=0.0)
    trainer = PromptTrainer(model, processor, data, args(tmp_path / "run", **recipe), teacher_logits=per_view)
    pairs, step = [], trainer.step

    def spy(features, labels, count, frozen=None, teacher_rows=None, labeled=None):
        pairs.append((features.detach().clone(), teacher_rows.clone()))
        return step(features, labels, count, frozen, teacher_rows, labeled)

    trainer.step = spy
    trainer.train()
    cache, used = trainer.images.cache, set()
    for features, teacher_rows in pairs:
        for row, taught in zip(features, teacher_rows, strict=True):
            (view, index), *others = (cache == row).all(-1).nonzero().tolist()
            assert not others and torch.equal(taught, per_view[view, index])
            used.add(view)
    assert used == {0, 1, 2}
    with pytest.raises(ValueError, match=r"or \(views, images, classes\) = \(3, 20, 6\)"):
        PromptTrainer(model, processor, data, args(tmp_path / "bad", **recipe), teacher_logits=per_view[:2])


def test_self_training_keeps_the_most_confident_guesses_of_each_class():
    logits = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 0.0], [0.0, 0.1]])
    everything = pseudo_labeled(list("abcde"), ["x", "y"], logits)
    assert everything.labels == [0, 0, 1, 0, 1] and everything.images == list("abcde")
    chosen = pseudo_labeled(list("abcde"), ["x", "y"], logits, per_class=1)
    assert chosen.images == ["c", "d"] and chosen.labels == [1, 0]  # in their order, one per class
    with pytest.raises(ValueError, match=r"logits must be \(images, classes\) = \(4, 2\)"):
        pseudo_labeled(list("abcd"), ["x", "y"], logits)


def against_teacher(model, processor, data, teacher_logits) -> tuple[float, float]:
    """The student's mean KL from the teacher, and how often their top classes agree."""
    inputs = processor(images=data.images, return_tensors="pt")
    with torch.no_grad():
        logits = PromptClassifier(model, processor, data.class_names).logits(**inputs).float()
    agreement = (logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item()
    return distillation_kl(logits, teacher_logits, 1.0).item() / len(data), agreement


def test_a_student_of_another_family_learns_the_teacher_without_labels(teacher, images, tmp_path):
    """A SigLIP student of a CLIP teacher (the class names are the link): the KL to the teacher falls, and the labels
    are not used at all with label_weight 0 (any labels give the same adapter)."""
    folder = save_tiny_siglip(tmp_path / "siglip")
    processor = AutoProcessor.from_pretrained(folder)
    teacher_logits = teacher.logits(images)
    data = pseudo_labeled(images, CLASSES, teacher_logits)
    recipe = dict(epochs=4, label_weight=0.0, distill_weight=1.0, distill_temperature=2.0)
    contexts = []
    for labels in (data.labels, [(y + 1) % len(CLASSES) for y in data.labels]):
        data.labels = labels
        model = get_peft_model(AutoModel.from_pretrained(folder).eval(), PromptEmbeddingConfig(n_ctx=4))
        before = against_teacher(model, processor, data, teacher_logits)
        recipe_here = args(tmp_path / str(len(contexts)), **recipe)
        PromptTrainer(model, processor, data, recipe_here, teacher_logits=teacher_logits).train()
        contexts.append(context(model))
    assert torch.equal(contexts[0], contexts[1])
    (kl, agreement), (kl_before, agreement_before) = against_teacher(model, processor, data, teacher_logits), before
    assert kl < 0.9 * kl_before and agreement > agreement_before + 0.2


def test_teacher_logits_are_checked(clip_dir, tmp_path):
    from test_trainer import student

    data = teacher_data(clip_dir, n=8)
    model, processor = student(clip_dir)
    with pytest.raises(ValueError, match="distill_weight needs the teacher's logits"):
        PromptTrainer(model, processor, data, args(tmp_path, distill_weight=1.0))
    with pytest.raises(ValueError, match="no loss term uses them"):
        PromptTrainer(model, processor, data, args(tmp_path), teacher_logits=torch.zeros(8, len(CLASSES)))
    with pytest.raises(
        ValueError, match=r"must be \(images, classes\) = \(8, 6\) for the training data, got \(8, 5\)"
    ):
        PromptTrainer(model, processor, data, args(tmp_path, distill_weight=1.0), teacher_logits=torch.zeros(8, 5))


def test_resume_with_a_teacher_is_exact_and_refuses_another_teacher(clip_dir, teacher, images, tmp_path, monkeypatch):
    from test_trainer import student

    import peft_prompt_clip.training.trainer as trainer_module
    from peft_prompt_clip import InvalidCheckpointError

    logits = teacher.logits(images[:40])
    data = pseudo_labeled(images[:40], CLASSES, logits)
    recipe = dict(optimizer="sgd", lr=0.5, distill_weight=1.0, label_weight=0.5)
    model, processor = student(clip_dir)
    PromptTrainer(model, processor, data, args(tmp_path / "full", **recipe), teacher_logits=logits).train()
    full = context(model)
    save = trainer_module.save_checkpoint

    def save_then_die(path, params, optimizer, epoch, *rest):
        save(path, params, optimizer, epoch, *rest)
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_die)
    model, processor = student(clip_dir)
    with pytest.raises(KeyboardInterrupt):
        PromptTrainer(model, processor, data, args(tmp_path / "cut", **recipe), teacher_logits=logits).train()
    monkeypatch.setattr(trainer_module, "save_checkpoint", save)
    model, processor = student(clip_dir)
    with pytest.raises(InvalidCheckpointError, match="teacher"):
        PromptTrainer(
            model, processor, data, args(tmp_path / "cut", resume=True, **recipe), teacher_logits=logits + 1
        ).train()
    PromptTrainer(model, processor, data, args(tmp_path / "cut", resume=True, **recipe), teacher_logits=logits).train()
    assert torch.equal(context(model), full)


def test_distill_from_the_command_line(clip_dir, images, tmp_path):
    """`distill` on a nested folder of unlabeled images, a CLIP prompt adapter teaching a SigLIP student: the notes
    say what was used, the teacher runs once (a resumed run reads its cache), and the student is an adapter."""
    import json

    from PIL import Image
    from test_cli import run

    teacher_dir = tmp_path / "teacher"
    model = get_peft_model(
        CLIPModel.from_pretrained(clip_dir).eval(),
        PromptEmbeddingConfig(n_ctx=4, class_specific=True, class_names=CLASSES, init_seed=9),
    )
    model.save_pretrained(teacher_dir)
    folder = tmp_path / "unlabeled"
    for n, image in enumerate(images[:40]):
        path = folder / ("some folder" if n % 2 else "") / f"{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    student = save_tiny_siglip(tmp_path / "siglip")
    out = tmp_path / "student"
    common = ("--teacher", teacher_dir, "--model", student, "--data", folder, "--output", out)
    result = run("distill", *common, "--epochs", "2", "--batch-size", "12", "--n-ctx", "2")
    assert f"unlabeled images: 40 image files under {folder}; the folders they are in are not used" in result.stdout
    teacher_line = re.search(r"teacher: (.*), 6 classes\n", result.stdout).group(1)
    assert teacher_line.startswith(f"{teacher_dir} (a CoOp with class-specific context (CSC) adapter, ")
    assert "train: 36 images; held out: 4 images" in result.stdout
    assert "early stopping: off (--early-stop); all 2 epochs run" in result.stdout  # not yet measured for distill
    assert "agreement with the teacher on 4 held-out images: student zero-shot" in result.stdout
    cached = sorted((out / "teacher-cache").glob("logits-*.safetensors"))
    assert len(cached) == 1 and (out / "adapter_model.safetensors").is_file()
    log = json.loads((out / "training_log.json").read_text())
    assert log["data"]["teacher"].startswith(str(teacher_dir)) and len(log["data"]["images"]) == 40  # held out too
    stamp = cached[0].stat().st_mtime_ns
    run("distill", *common, "--epochs", "3", "--batch-size", "12", "--n-ctx", "2", "--resume")
    assert cached[0].stat().st_mtime_ns == stamp  # the teacher's logits came from the cache
    wrong = run("distill", *common[:-1], tmp_path / "other", "--classes", "cat,dog", check=False)
    assert wrong.returncode == 2 and "was learned for the classes" in wrong.stderr
    for flags, message in [
        (("--val-images", "-1"), "--val-images must be from 0 to 39 (of 40 images), got -1"),
        (("--self-train", "0"), "--self-train takes the K >= 1 most confident images per class, got 0"),
    ]:
        bad = run("distill", *common, "--overwrite", *flags, check=False)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    onto = run("distill", *common[:-1], teacher_dir, check=False)
    assert (
        onto.returncode == 2 and f"would write into --teacher {teacher_dir}, which this command reads" in onto.stderr
    )
    Image.fromarray(images[0][::-1].copy()).save(folder / "0.png")  # an image replaced under the same name
    stamps = {p: p.stat().st_mtime_ns for p in (out / "teacher-cache").glob("logits-*.safetensors")}
    run("distill", *common, "--epochs", "1", "--batch-size", "12", "--n-ctx", "2", "--overwrite")  # labels differ
    added = [p for p in (out / "teacher-cache").glob("logits-*.safetensors") if p not in stamps]
    assert len(added) == 1 and all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # the new image alone ran
    views = run(
        "distill", *common, "--epochs", "1", "--n-ctx", "2", "--augment", "--augment-views", "2", "--overwrite"
    )
    crops = [p for p in (out / "teacher-cache").glob("logits-*.safetensors") if p not in stamps and p not in added]
    assert len(crops) == 2 and "learn the teacher's logits of the whole images" not in views.stdout  # one per view
    fresh = run("distill", *common[:-1], tmp_path / "fresh", "--epochs", "1", "--n-ctx", "2", "--augment")
    assert "note: the student's crops learn the teacher's logits of the whole images" in fresh.stdout
    unnamed = run("distill", "--teacher", clip_dir, *common[2:-1], tmp_path / "other", check=False)
    assert unnamed.returncode == 2 and "is a model, which knows no classes: pass --classes" in unnamed.stderr
    another = ("--teacher", clip_dir, "--classes", ",".join(CLASSES), *common[2:], "--epochs", "1", "--n-ctx", "2")
    refused = run("distill", *another, "--val-images", "0", check=False)
    assert refused.returncode == 2 and "holds a run" in refused.stderr
    run("distill", *another, "--val-images", "0", "--overwrite")  # the run replaced, its teacher's cache too
    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\nred car\n")
    self_trained = run(
        "distill", "--teacher", clip_dir, "--classes", names, *common[2:-1], tmp_path / "self", "--self-train", "3",
        "--epochs", "1", "--val-images", "0",
    )  # fmt: skip
    assert re.search(r"teacher: .* zero-shot with 7 template\(s\): \['.*'\], 3 classes\n", self_trained.stdout)
    chosen = int(re.search(r"train: (\d+) images; held out: 0 images", self_trained.stdout).group(1))
    assert 3 <= chosen <= 9  # the teacher's 3 most confident guesses of each class it guessed


def test_many_class_names_on_the_command_line_are_names_not_a_path():
    from peft_prompt_clip.commands import _class_names

    names = [f"ankle boot {n}" for n in range(100)]  # longer than a file name may be
    assert _class_names(",".join(names)) == names


def test_distill_from_a_dataset_reports_accuracy_on_eval_data(clip_dir, images, tmp_path, monkeypatch):
    """A saved Hugging Face dataset as unlabeled images (its train split, its image column; its labels unused, and
    the note says so), and --eval-data: the teacher's accuracy there is its classifier's, the student's are eval's."""
    import json

    import datasets
    import numpy as np
    from PIL import Image
    from test_cli import run

    from peft_prompt_clip.data import load_data
    from peft_prompt_clip.evaluation import evaluate
    from peft_prompt_clip.loading import load_prompt_model

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    features = datasets.Features({"picture": datasets.Image(), "kind": datasets.ClassLabel(names=CLASSES)})
    rows = {"picture": [Image.fromarray(np.asarray(image)) for image in images[:30]], "kind": [0] * 30}
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)})
    splits["test"] = splits["train"].select(range(3))
    splits.save_to_disk(str(tmp_path / "saved"))
    for n, image in enumerate(images[100:136]):  # other images, each class's
        path = tmp_path / "labeled" / CLASSES[n % len(CLASSES)] / f"{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    teacher_dir = tmp_path / "teacher"
    config = PromptEmbeddingConfig(n_ctx=4, class_names=CLASSES, init_seed=9)
    get_peft_model(CLIPModel.from_pretrained(clip_dir).eval(), config).save_pretrained(teacher_dir)
    common = ("--teacher", teacher_dir, "--model", clip_dir, "--data", tmp_path / "saved", "--epochs", "2")
    result = run("distill", *common, "--output", tmp_path / "student", "--eval-data", tmp_path / "labeled")
    assert f"unlabeled images: 30 rows of {tmp_path / 'saved'}, its 'train' split, column 'picture'; its other " in (
        result.stdout
    )
    assert "columns (kind) are not used" in result.stdout and "train: 27 images; held out: 3 images" in result.stdout
    zero_shot, kept = map(
        float, re.search(r"student zero-shot ([\d.]+), kept prompt ([\d.]+)", result.stdout).groups()
    )
    assert ("warning: the kept prompt agrees with the teacher less" in result.stdout) == (kept < zero_shot)
    model = load_prompt_model(CLIPModel.from_pretrained(clip_dir).eval(), teacher_dir)
    data = load_data(tmp_path / "labeled")  # sorted folder order, not the teacher's
    teacher_top1 = evaluate(PromptClassifier(model, AutoProcessor.from_pretrained(clip_dir), data.class_names), data)
    table = dict(re.findall(r"^(teacher|zero-shot|learned prompt) +([\d.]+)$", result.stdout, re.MULTILINE))
    assert float(table["teacher"]) == pytest.approx(teacher_top1["top1"], abs=1e-3)
    student = load_prompt_model(CLIPModel.from_pretrained(clip_dir).eval(), tmp_path / "student")
    learned = evaluate(PromptClassifier(student, AutoProcessor.from_pretrained(clip_dir), data.class_names), data)
    assert float(table["learned prompt"]) == pytest.approx(learned["top1"], abs=1e-3)
    shots = run(
        "distill", *common, "--output", tmp_path / "mixed", "--labeled", tmp_path / "labeled", "--classes",
        ",".join(CLASSES),
    )  # fmt: skip
    assert f"--labeled: 36 labelled images from {tmp_path / 'labeled'}" in shots.stdout
    assert "train: 63 images; held out: 3 images" in shots.stdout  # 27 unlabeled and the 36 shots
    log = json.loads((tmp_path / "mixed" / "training_log.json").read_text())
    assert str(tmp_path / "labeled" / "cat" / "0.png") in log["data"]["images"]
    (tmp_path / "labeled" / "cat").rename(tmp_path / "cats")  # a class fewer
    fewer = run("distill", *common, "--output", tmp_path / "other", "--eval-data", tmp_path / "labeled", check=False)
    assert fewer.returncode == 2 and "give labelled images of the teacher's classes (or run" in fewer.stderr
    (tmp_path / "labeled" / "horse").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "labeled" / "horse" / "0.png")
    other = run("distill", *common, "--output", tmp_path / "other", "--labeled", tmp_path / "labeled", check=False)
    assert other.returncode == 2 and "give labelled images of some of the teacher's classes." in other.stderr


def test_a_run_on_many_images_is_bounded_in_steps():
    from peft_prompt_clip.training import bounded_epochs

    assert bounded_epochs(200, 9000, 32) == 36  # 10,000 unlabeled images less the held-out tenth: 36 x 282 steps
    assert bounded_epochs(200, 900, 32) == 200  # 29 steps an epoch: the recipe's epochs
    assert bounded_epochs(10, 10**7, 32) == 1
