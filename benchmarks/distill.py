"""Learning without labels as a user runs it: `peft-prompt-clip distill` (and `train`, `eval`) as subprocesses.

The student is the embedded `fashion-clip` (0.26 M parameters, pretrained here on original Fashion-MNIST only). The
teacher is a larger CLIP built the same way, by `peft_prompt_clip.demo.pretrain(width=128, layers=6, faded=0.5)`:
1.7 M parameters (both towers 6 layers of width 128), 4 epochs over Fashion-MNIST's 60,000 training images with half
of them shown faded, so that it knows the domain the student never saw, as a larger CLIP knows more of the world.
The task is the demo's domain shift: faded images. The unlabeled images are N (100, 1,000, 10,000) faded images of
Fashion-MNIST's training split, drawn by seed, written as PNG files in one folder; the test images are the accuracy
benchmark's 1,000 faded test images (100 per class, from the test split), in class folders, read by `eval --split
test` (and `distill --eval-data`).

Rows, each over seeds 1, 2, 3 with the command line's defaults:
- student zero-shot, teacher zero-shot (its prompt ensemble, as `distill` uses it) and teacher with a 16-shot CoOp
  adapter (`train --shots 16` on the teacher);
- the student distilled from each teacher on N unlabeled images (`distill --teacher ...`);
- the student self-trained on 10,000 images (`distill --teacher fashion-clip --self-train 16`: its own zero-shot
  guesses, the 16 most confident of each class);
- the student with 16 labelled shots per class (`train --shots 16`, CoOp);
- base-to-novel: distilled from the teacher on 10,000 unlabeled images of the base classes (CoCoOp's first half of
  the sorted class names; `--classes` names them), then `eval --base-to-novel` on all ten.
- PromptKD's projection variant, measured in Python (not shipped): a learned linear map of the student's frozen
  image features onto the teacher's stored class features, trained with the same KL on the same N images; it is a
  head over the teacher's classes, not a prompt, so it needs the teacher's class features to classify.
Cost (`--part cost`, run alone on the machine): training seconds per epoch (the run's log) and peak resident memory
(the process's) of `distill` against CoOp `train` on the same 10,000 images with their labels, the same epochs;
median and range over 3 runs; and one `distill` of the 10,000 images into 100 classes, whole.

Run: python benchmarks/distill.py [--part accuracy|cost] (accuracy: about an hour on 2 CPU cores, plus 15 minutes the
first time to pretrain the teacher, kept in --teacher-dir); writes benchmarks/results/distill.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from cli_presets import write_folders
from PIL import Image

from peft_prompt_clip.data import base_novel
from peft_prompt_clip.demo import CLASSES, MODEL_DIR, demo_data, fade, load_fashion_mnist, pretrain

RESULTS = Path(__file__).parent / "results" / "distill.json"
TEACHER = {"width": 128, "layers": 6, "faded": 0.5}


def cli(*args: object) -> tuple[str, float]:
    """Run `peft-prompt-clip ARGS` as a user does: its standard output and its peak resident memory (MiB)."""
    command = [sys.executable, "-m", "peft_prompt_clip", *map(str, args)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # this process's own peak memory
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if process.returncode:
            raise RuntimeError(f"{' '.join(map(str, args))} failed:\n{err.read()[-2000:]}")
        return out.read(), usage.ru_maxrss / 1024


def write_images(folder: Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """`images` as PNG files in `folder` (flat), or in class folders by `labels`."""
    for n, image in enumerate(images):
        path = folder / ("" if labels is None else CLASSES[labels[n]]) / f"{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    return folder


def table(stdout: str) -> dict[str, float]:
    """The accuracy table `distill --eval-data` prints."""
    return {name: float(v) for name, v in re.findall(r"^(teacher|zero-shot|learned prompt) +([\d.]+)$", stdout, re.M)}


def log_cost(adapter: Path) -> float:
    """Median training seconds per epoch of a run's log."""
    history = json.loads((adapter / "training_log.json").read_text())["history"]
    return statistics.median(e["seconds"] for e in history)


def projection(teacher_dir: Path, images: np.ndarray, test_images: list, test_labels: list[int], seed: int) -> float:
    """PromptKD's projection variant: `logits = scale * normalise(W f) @ teacher class features`, with `f` the
    student's frozen image features, `W` learned with the KL from the teacher's probabilities (temperature 1) on
    `images`; returns the top-1 on the test images."""
    from transformers import AutoProcessor, CLIPModel

    from peft_prompt_clip import PromptClassifier, Teacher
    from peft_prompt_clip.encoder import PromptEncoder
    from peft_prompt_clip.options import IMAGENET_TEMPLATES
    from peft_prompt_clip.training.losses import distillation_kl

    teacher_model = CLIPModel.from_pretrained(teacher_dir).eval()
    classifier = PromptClassifier(
        teacher_model, AutoProcessor.from_pretrained(teacher_dir), CLASSES, IMAGENET_TEMPLATES
    )
    teacher_logits = Teacher(classifier, "teacher").logits(list(images))
    class_features, scale = classifier.class_features(), teacher_model.logit_scale.exp().detach()
    student, processor = CLIPModel.from_pretrained(MODEL_DIR).eval(), AutoProcessor.from_pretrained(MODEL_DIR)
    encoder = PromptEncoder(student, processor)

    @torch.no_grad()
    def features(batch: list) -> torch.Tensor:
        chunks = [batch[k : k + 256] for k in range(0, len(batch), 256)]
        pictures = [[Image.fromarray(np.asarray(image)).convert("RGB") for image in chunk] for chunk in chunks]
        return torch.cat([encoder.image_features(processor(images=c, return_tensors="pt")) for c in pictures])

    train, test = features(list(images)), features(list(test_images))
    torch.manual_seed(seed)
    head = torch.nn.Linear(train.shape[1], class_features.shape[1], bias=False)
    torch.nn.init.eye_(head.weight)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(60):
        for batch in torch.randperm(len(train), generator=generator).split(32):
            logits = scale * torch.nn.functional.normalize(head(train[batch]), dim=-1) @ class_features.T
            loss = distillation_kl(logits, teacher_logits[batch], 1.0) / len(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predicted = (torch.nn.functional.normalize(head(test), dim=-1) @ class_features.T).argmax(-1)
    return (predicted == torch.tensor(test_labels)).float().mean().item()


def accuracy(args: argparse.Namespace, root: Path, add) -> None:
    """The accuracy rows (see the module's docstring)."""
    pool, pool_labels = load_fashion_mnist("train")
    faded_pool = fade(pool)
    base = base_novel(sorted(CLASSES))[0]
    base_ids = np.flatnonzero(np.isin(pool_labels, [CLASSES.index(n) for n in base]))
    faded = write_folders(root, "faded")  # train/ (the 32-image pool per class) and test/ (100 per class)
    _, test = demo_data(fade)
    student, teacher, classes = MODEL_DIR, args.teacher_dir, ",".join(CLASSES)
    for seed in range(1, args.seeds + 1):
        order = np.random.default_rng(seed).permutation(len(pool))
        for name, model in (("student coop 16 shots", student), ("teacher coop 16 shots", teacher)):
            out = root / f"{name}-{seed}".replace(" ", "-")
            cli("train", "--model", model, "--data", faded, "--shots", 16, "--output", out, "--seed", seed, "-q")
            scores = json.loads(cli("eval", "--adapter", out, "--data", faded, "--json", "-q")[0])
            add(name, scores["learned prompt"]["top1"])
            add(f"{name.split()[0]} zero-shot 'a photo of a'", scores["zero-shot"]["top1"])
        for n in args.sizes:
            folder = write_images(root / f"unlabeled-{n}-{seed}", faded_pool[order[:n]])
            teachers = {"teacher zero-shot": teacher, "teacher coop 16 shots": root / f"teacher-coop-16-shots-{seed}"}
            for name, source in teachers.items():
                out = root / f"distilled-{n}-{seed}-{name}".replace(" ", "-")
                stdout, _ = cli(
                    "distill", "--teacher", source, *(("--classes", classes) if source == teacher else ()),
                    "--model", student, "--data", folder, "--output", out, "--eval-data", faded, "--seed", seed,
                )  # fmt: skip
                scores = table(stdout)
                add(f"distilled from {name}, N={n}", scores["learned prompt"])
                if n == args.sizes[-1]:
                    add(f"{name}, as distill runs it (its template ensemble)", scores["teacher"])
            add(f"PromptKD's projection (not shipped), N={n}", projection(teacher, faded_pool[order[:n]], test.images,
                test.labels, seed))  # fmt: skip
        n = args.sizes[-1]
        stdout, _ = cli(
            "distill", "--teacher", student, "--classes", classes, "--model", student, "--data",
            root / f"unlabeled-{n}-{seed}", "--output", root / f"self-{seed}", "--eval-data", faded,
            "--self-train", 16, "--seed", seed,
        )  # fmt: skip
        add(f"self-trained (16 per class), N={n}", table(stdout)["learned prompt"])
        chosen = np.random.default_rng(seed).permutation(base_ids)[:n]  # base-to-novel: base classes' images alone
        folder, out = write_images(root / f"base-{seed}", faded_pool[chosen]), root / f"b2n-{seed}"
        cli(
            "distill", "--teacher", teacher, "--classes", ",".join(base), "--model", student, "--data", folder,
            "--output", out, "--seed", seed, "-q",
        )  # fmt: skip
        scores = json.loads(cli("eval", "--adapter", out, "--data", faded, "--base-to-novel", "--json", "-q")[0])
        for prompt, row in scores["base_to_novel"].items():
            for k, v in row.items():
                add(f"base-to-novel {prompt} {k}, N={n} base images", v)


def cost(args: argparse.Namespace, root: Path, add) -> None:
    """Distillation against CoOp with labels on the same images, the same epochs: seconds per epoch, peak memory."""
    pool, pool_labels = load_fashion_mnist("train")
    n, order = args.sizes[-1], np.random.default_rng(1).permutation(len(pool))
    unlabeled = write_images(root / "unlabeled", fade(pool)[order[:n]])
    labelled = write_images(root / "labelled", fade(pool)[order[:n]], pool_labels[order[:n]])
    for run in range(3):
        out = root / f"distilled-{run}"
        _, memory = cli(
            "distill", "--teacher", args.teacher_dir, "--classes", ",".join(CLASSES), "--model", MODEL_DIR,
            "--data", unlabeled, "--output", out, "-q",
        )  # fmt: skip
        epochs = json.loads((out / "training_log.json").read_text())["epochs"]
        add(f"distill, seconds per epoch, N={n} ({epochs} epochs)", log_cost(out))
        add(f"distill, peak MiB, N={n}", memory)
        out = root / f"coop-{run}"
        _, memory = cli(
            "train", "--model", MODEL_DIR, "--data", labelled, "--output", out, "--epochs", epochs, "-q",
        )  # fmt: skip
        add(f"coop train with the labels, seconds per epoch, N={n}", log_cost(out))
        add(f"coop train with the labels, peak MiB, N={n}", memory)
    # the scale the issue names: 10,000 images of 100 classes (each class name ten ways), the whole run's wall time
    many = [f"{name} {kind}" for name in CLASSES for kind in ("one", "two", "three", "four", "five", "six", "seven",
            "eight", "nine", "ten")]  # fmt: skip
    out = root / "hundred-classes"
    start = time.perf_counter()
    cli(
        "distill", "--teacher", args.teacher_dir, "--classes", ",".join(many), "--model", MODEL_DIR, "--data",
        unlabeled, "--output", out, "-q",
    )  # fmt: skip
    epochs = json.loads((out / "training_log.json").read_text())["epochs"]
    add(f"distill, 100 classes, N={n}: whole run, minutes ({epochs} epochs)", (time.perf_counter() - start) / 60)
    add(f"distill, 100 classes, N={n}: seconds per epoch", log_cost(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["accuracy", "cost"], default="accuracy")
    parser.add_argument("--teacher-dir", type=Path, default=Path(__file__).parent / ".teacher-clip")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    args = parser.parse_args()
    if not (args.teacher_dir / "model.safetensors").is_file():
        print(f"pretraining the teacher into {args.teacher_dir} ({TEACHER})", flush=True)
        pretrain(args.teacher_dir, **TEACHER)
    runs: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        runs.setdefault(key, []).append(value)
        print(f"{key}: {value:.3f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        (accuracy if args.part == "accuracy" else cost)(args, Path(tmp), add)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    name, center = ("median", statistics.median) if args.part == "cost" else ("mean", statistics.mean)
    rows = {key: {name: center(v), "min": min(v), "max": max(v), "runs": v} for key, v in runs.items()}
    results[args.part] = {
        "teacher": TEACHER,
        "sizes": args.sizes,
        "seeds": args.seeds,
        "rows": rows,
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}, {os.cpu_count()} CPUs",
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    for key, row in rows.items():
        print(f"{key:75} {next(iter(row.values())):.3f} ({row['min']:.3f}-{row['max']:.3f})")


if __name__ == "__main__":
    main()
