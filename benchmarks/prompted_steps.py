"""Vision-prompted training steps in the trainer's real loop, as the CLI trains: image files decoded and preprocessed
by the processor, `PromptTrainer.train` at ViT-B/32 size (random weights), 10 and 100 classes, batches of 4 (the
recipes'), without augmentation (the default). Methods: MaPLe, PromptSRC, and PromptSRC's prompts without its
regularisers (IVLP with 4 + 4 tokens, depth 9 + 9: the floor of PromptSRC's step, whose terms only compare with
features that never change).

Each is run before (the cache off: every step decodes its images and runs the frozen image tower, as the trainer did
until the cache) and after (each image decoded, and its frozen features computed, in the first epoch only), and
profiled: decoding and preprocessing, the frozen tower, and the rest (the prompted towers' forward and backward, the
update). A run is 3 epochs of 4 steps; the step times are those of epochs 2 and 3 (after the cache is filled; the
first epoch's are recorded too). Rounds repeat everything, so that every ratio has a spread.

Writes benchmarks/results/prompted_steps.json.

Run: python benchmarks/prompted_steps.py   (about 15 minutes on 2 CPU cores; --rounds 1 for a quick look)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import DEVICE, device_name
from peft import get_peft_model
from PIL import Image
from shared_prefix import processor_and_clip
from transformers import CLIPModel

import peft_prompt_clip.data as data_module
import peft_prompt_clip.training.cache as cache
from peft_prompt_clip import PromptEmbeddingConfig
from peft_prompt_clip.data import LabeledImages
from peft_prompt_clip.encoder import PromptEncoder
from peft_prompt_clip.methods import method_settings
from peft_prompt_clip.training import PromptTrainer, TrainingArguments

IMAGES, EPOCHS = 16, 3  # 4 steps of 4 images an epoch
REGULARISERS = ("scl_text_weight", "scl_image_weight", "kl_weight", "hand_template", "gpa_mean", "gpa_std")


def image_files(root: Path, classes: int) -> LabeledImages:
    """`IMAGES` photo-sized JPEG files (500 x 375, smooth with noise) of `classes` classes, by path."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    paths = []
    for i in range(IMAGES):
        base = np.stack([(x * (i + 1)) % 256, (y * 3 + i * 17) % 256, (x + y) % 256], -1)
        noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        paths.append(root / f"{i}.jpg")
        Image.fromarray(noisy).save(paths[-1], quality=90)
    return LabeledImages([f"class {c}" for c in range(classes)], paths, [i % classes for i in range(IMAGES)])


class Profile:
    """Seconds spent decoding and preprocessing, and in the frozen image tower, per epoch, and each epoch's steps."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float | list[float]]] = []

    def add(self, phase: str, seconds: float) -> None:
        self.epochs[-1][phase] += seconds

    def install(self, patch: dict) -> None:
        profile, inputs, features = self, data_module.image_inputs, PromptEncoder.image_features
        epoch = PromptTrainer._train_epoch

        def image_inputs(*args, **kwargs):
            start = time.perf_counter()
            result = inputs(*args, **kwargs)
            profile.add("decode", time.perf_counter() - start)
            return result

        def image_features(self, inputs, adapter_name=None, enabled=True):
            start = time.perf_counter()
            result = features(self, inputs, adapter_name, enabled)
            if not enabled:
                profile.add("frozen", time.perf_counter() - start)
            return result

        def train_epoch(self, number, bar):
            profile.epochs.append({"decode": 0.0, "frozen": 0.0})
            stats = epoch(self, number, bar)
            profile.epochs[-1]["steps"] = stats.step_seconds
            return stats

        patch.update({
            (data_module, "image_inputs"): image_inputs,
            (PromptEncoder, "image_features"): image_features,
            (PromptTrainer, "_train_epoch"): train_epoch,
        })  # fmt: skip


def run(method: str, classes: int, cached: bool, data, processor, state) -> dict[str, float]:
    """One run of `method` (3 epochs); its steps' seconds, profiled."""
    clip = CLIPModel(state["config"]).eval().to(DEVICE)
    clip.load_state_dict(state["weights"])
    adapter, recipe = method_settings("promptsrc" if method == "ivlp 4+4" else method, classes, clip)
    adapter.pop("ctx_init", None)  # the benchmark's tokenizer has no English words; random init costs the same
    recipe.pop("epochs")
    if method == "ivlp 4+4":
        recipe = {k: v for k, v in recipe.items() if k not in REGULARISERS}
    model = get_peft_model(clip, PromptEmbeddingConfig(**adapter))
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), epochs=EPOCHS, augment=False, **recipe)
    trainer = PromptTrainer(model, processor, data, args)
    profile, patch, has = Profile(), {}, cache.RowCache.has
    profile.install(patch)
    if not cached:
        patch[(cache.RowCache, "has")] = lambda self, indices: False
    saved = {(owner, name): getattr(owner, name) for owner, name in patch}
    for (owner, name), value in patch.items():
        setattr(owner, name, value)
    try:
        trainer.train()
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)
    assert cache.RowCache.has is has
    steady = profile.epochs[1:]
    steps = [s for e in steady for s in e["steps"]]
    count = len(steps)
    decode, frozen = (sum(e[k] for e in steady) / count for k in ("decode", "frozen"))
    step = statistics.median(steps)
    return {
        "step": step,
        "first epoch step": statistics.median(profile.epochs[0]["steps"]),
        "decode and preprocess": decode,
        "frozen tower": frozen,
        "rest": sum(steps) / count - decode - frozen,
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "prompted_steps.json"))
    args = parser.parse_args()
    results: dict = {"device": device_name(), "torch": torch.__version__, "python": platform.python_version()}
    processor, clip = processor_and_clip()
    state = {"config": clip.config, "weights": clip.state_dict()}
    runs = [(m, mode) for m in ("maple", "promptsrc", "ivlp 4+4") for mode in ("before", "after")]
    for classes in (10, 100):
        data = image_files(Path(tempfile.mkdtemp()), classes)
        rounds = []
        for round_ in range(args.rounds):
            rounds.append(
                {f"{m}, {mode}": run(m, classes, mode == "after", data, processor, state) for m, mode in runs}
            )
            print(classes, "classes, round", round_ + 1, json.dumps(rounds[-1], indent=1), flush=True)
        ratios = {
            f"{a} / {b}": [r[a]["step"] / r[b]["step"] for r in rounds]
            for a, b in (
                ("promptsrc, after", "ivlp 4+4, after"),
                ("promptsrc, before", "ivlp 4+4, after"),
                ("promptsrc, after", "promptsrc, before"),
                ("maple, after", "maple, before"),
            )
        }
        results[f"{classes} classes"] = {
            "seconds (median over rounds)": {
                name: {k: statistics.median(r[name][k] for r in rounds) for k in rounds[0][name]} for name in rounds[0]
            },
            "ratios": {name: spread(values) for name, values in ratios.items()},
            "rounds": rounds,
        }
        print(json.dumps(results[f"{classes} classes"]["ratios"], indent=1), flush=True)
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
