"""The default few-shot run end to end: `PromptTrainer.train()` with CoOp's recipe at 16 shots, at ViT-B/32 size
(random weights), on JPEG files of 224 px written to disk (so decoding is real), 16 shots of 10 and of 100 classes, in
one process:

- before (the old default): per-step augmentation with every image decoded and cropped in the training process
  (`num_workers=0`), the image tower on every step;
- now (the default): no augmentation, chosen by benchmarks/augmentation.py; the image features computed once, then
  cached steps;
- per-step augmentation (`--augment`) with one worker process decoding and cropping ahead of the steps (the default
  with CUDA; on CPU the default is none);
- cached augmented views (`--augment --augment-views 8` and 16, at 10 classes: at 100 they would take 12,800 and
  25,600 images through the image tower, half an hour on 2 CPU cores): the views encoded once, then cached steps.

Each variant trains `--epochs` epochs (2 by default); the wall time of a whole run of CoOp's 200 epochs is projected
from them (one-off costs, the views' encoding, counted once). Writes benchmarks/results/default_run.json.

Run: python benchmarks/default_run.py   (about 15 minutes on 2 CPU cores; --classes 10 for a quick look)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import DEVICE, device_name
from peft import get_peft_model
from PIL import Image
from shared_prefix import processor_and_clip

from peft_prompt_clip import PromptEmbeddingConfig
from peft_prompt_clip.data import LabeledImages
from peft_prompt_clip.training import PromptTrainer, TrainingArguments

SHOTS, FULL_EPOCHS = 16, 200  # CoOp's epochs at 16 shots


def image_files(classes: int) -> LabeledImages:
    folder = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for c in range(classes):
        for i in range(SHOTS):
            path = folder / f"{c}-{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(path, quality=90)
            paths.append(str(path))
            labels.append(c)
    return LabeledImages([f"class {c}" for c in range(classes)], paths, labels)


def run(data: LabeledImages, epochs: int, **recipe) -> dict[str, float]:
    """Seconds of the run, and of its one-off pass of the image tower over the images or their views (0 when the
    image tower runs every step)."""
    processor, clip = processor_and_clip()
    model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=16))
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), epochs=epochs, **recipe)
    trainer = PromptTrainer(model, processor, data, args)
    views = 0.0
    encode = trainer.images.cached

    def timed(*a, **k):
        nonlocal views
        start = time.perf_counter()
        result = encode(*a, **k)
        views += time.perf_counter() - start
        return result

    trainer.images.cached = timed
    start = time.perf_counter()
    trainer.train()
    return {"seconds": time.perf_counter() - start, "cache seconds": views}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "default_run.json"))
    args = parser.parse_args()
    variants = {
        "before: per-step augmentation, no workers": {"augment": True, "num_workers": 0},
        "now: the default (no augmentation)": {},
        "per-step augmentation, 1 worker": {"augment": True, "num_workers": 1},
        "augment_views 8": {"augment": True, "augment_views": 8},
        "augment_views 16": {"augment": True, "augment_views": 16},
    }
    results = {"device": device_name(), "torch": torch.__version__, "python": platform.python_version()}
    for classes in args.classes:
        data = image_files(classes)
        rows = {}
        for name, recipe in variants.items():
            if recipe.get("augment_views") and classes > 10:
                continue
            measured = run(data, args.epochs, **recipe)
            per_epoch = (measured["seconds"] - measured["cache seconds"]) / args.epochs
            rows[name] = {
                **measured,
                "seconds per epoch": per_epoch,
                f"projected {FULL_EPOCHS}-epoch run": measured["cache seconds"] + FULL_EPOCHS * per_epoch,
            }
            print(classes, name, json.dumps(rows[name]), flush=True)
        before = rows["before: per-step augmentation, no workers"][f"projected {FULL_EPOCHS}-epoch run"]
        for row in rows.values():
            row["speed-up of the whole run"] = before / row[f"projected {FULL_EPOCHS}-epoch run"]
        results[f"{classes} classes x {SHOTS} shots"] = rows
        results["device type"] = DEVICE.type
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")  # after each class count
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
