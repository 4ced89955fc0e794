"""The shared prompt prefix encoded once, against today's path (every prompt whole through the model's forward) and
against the old floor (the text tower's forward and backward over exactly those whole prompts, from a leaf tensor).

A CoOp training step at ViT-B/32 size (random weights): the trainer's step on cached image features of 32 images
(CoCoOp: 8), forward, backward and an AdamW update, with `share_prefix` on and off, in one process, timed in turn round
after round (medians after a warm-up round). Configurations: a shared context of 16 vectors at 10, 100 and 1000
classes, of 4 vectors at 100 classes, CoCoOp (16 vectors, one prefix per image) at 100 classes, and class-specific
context (nothing is shared: the encoder takes the model's forward by itself). 1000 classes and CoCoOp encode 100 and
200 prompts per call (`class_chunk_size`) in both paths, as memory needs. Also the classifier's class features of the
seven-template ensemble at 1000 classes without an adapter (`"a photo of the large {}."`: the template's words are the
shared prefix). Writes benchmarks/results/shared_prefix.json.

Run: python benchmarks/shared_prefix.py   (about 15 minutes on 2 CPU cores; --only NAME for one configuration)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from alternatives import FixedEmbeddings
from common import DEVICE, clip_config, device_name, interleaved_medians
from peft import get_peft_model
from transformers import AutoProcessor, CLIPModel

from peft_prompt_clip import IMAGENET_TEMPLATES, PromptClassifier, PromptEmbeddingConfig, find_text_embeddings
from peft_prompt_clip.data import LabeledImages
from peft_prompt_clip.encoder import features_of
from peft_prompt_clip.layer import find_prompt_layer
from peft_prompt_clip.tiny import save_tiny_clip, vocab_and_merges
from peft_prompt_clip.training import PromptTrainer, TrainingArguments

# name: (classes, n_ctx, config, images, class_chunk_size, repeats)
CONFIGS = {
    "shared context, n_ctx 16, 10 classes": (10, 16, {}, 32, None, 10),
    "shared context, n_ctx 16, 100 classes": (100, 16, {}, 32, None, 5),
    "shared context, n_ctx 4, 100 classes": (100, 4, {}, 32, None, 5),
    "shared context, n_ctx 16, 1000 classes": (1000, 16, {}, 32, 100, 2),
    "CoCoOp, n_ctx 16, 100 classes": (100, 16, {"conditional": True}, 8, 200, 2),
    "class-specific, n_ctx 16, 100 classes": (100, 16, {"class_specific": True, "num_classes": 100}, 32, None, 5),
}


def processor_and_clip() -> tuple:
    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(save_tiny_clip(Path(tempfile.mkdtemp()) / "tok"))  # its tokenizer
    processor.image_processor.size = {"shortest_edge": 224}
    processor.image_processor.crop_size = {"height": 224, "width": 224}
    vocab, _ = vocab_and_merges()
    config = clip_config("ViT-B/32", bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    return processor, CLIPModel(config).eval().to(DEVICE)


def training_steps(name: str) -> dict[str, Callable[[], None]]:
    classes, n_ctx, extra, count, chunk, _ = CONFIGS[name]
    processor, clip = processor_and_clip()
    state = clip.state_dict()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8) for _ in range(count)]
    data = LabeledImages([f"class {i}" for i in range(classes)], images, [i % classes for i in range(count)])
    steps = {}
    for mode in ("shared prefix", "today"):
        clip = CLIPModel(clip.config).eval().to(DEVICE)
        clip.load_state_dict(state)
        model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=n_ctx, **extra))
        args = TrainingArguments(
            output_dir=tempfile.mkdtemp(), epochs=1, augment=False, class_chunk_size=chunk,
            share_prefix=mode == "shared prefix", optimizer="adamw",
        )  # fmt: skip
        trainer = PromptTrainer(model, processor, data, args)
        cached = trainer.images.cached()

        def step(trainer=trainer, cached=cached) -> None:
            trainer.step(cached, trainer.labels, len(cached))
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

        steps[mode] = step
        if mode == "today" and chunk is None and not extra:
            steps["old floor"] = floor_step(trainer, cached)
    return steps


def floor_step(trainer: PromptTrainer, cached: torch.Tensor) -> Callable[[], None]:
    """The text tower's forward and backward over exactly the trainer's whole prompts, from a leaf tensor."""
    layer = find_prompt_layer(trainer.model)
    tokens = trainer.class_tokens
    ids, mask = layer.prompt_layouts["default"].expand(tokens["input_ids"], tokens["attention_mask"])
    captured = []
    hook = layer.register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        trainer.model.get_text_features(**tokens)
    hook.remove()
    clip = CLIPModel(trainer.model.get_base_model().config).eval().requires_grad_(False).to(DEVICE)
    floor = FixedEmbeddings(captured[0])
    clip.set_submodule(find_text_embeddings(clip), floor)
    optimizer = torch.optim.AdamW([floor.hidden], lr=1e-3)
    labels = trainer.labels

    def step() -> None:
        text = F.normalize(features_of(clip.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)
        F.cross_entropy(clip.logit_scale.exp() * cached @ text.T, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def classifier_features() -> dict[str, Callable[[], None]]:
    """Class features of 1000 classes under the seven-template ensemble, base model."""
    processor, clip = processor_and_clip()
    names = [f"class {i}" for i in range(1000)]
    classifiers = {
        "shared prefix": PromptClassifier(clip, processor, names, IMAGENET_TEMPLATES),
        "today": PromptClassifier(clip, processor, names, IMAGENET_TEMPLATES, share_prefix=False),
    }
    return {mode: (lambda c=c: (c.refresh(), c.class_features())) for mode, c in classifiers.items()}


def main(only: str | None) -> dict:
    rows, ratios = [], {}
    names = [*CONFIGS, "classifier: 1000 classes x 7 templates"]
    for name in names:
        if only and only not in name:
            continue
        if name in CONFIGS:
            steps, repeats = training_steps(name), CONFIGS[name][-1]
        else:
            steps, repeats = classifier_features(), 3
        seconds = interleaved_medians(steps, repeats)
        for mode, value in seconds.items():
            rows.append({"configuration": name, "mode": mode, "seconds": value})
            print(f"{name:45} {mode:14} {value:8.3f} s", flush=True)
        ratios[f"today / shared prefix, {name}"] = seconds["today"] / seconds["shared prefix"]
        if "old floor" in seconds:
            ratios[f"old floor / shared prefix, {name}"] = seconds["old floor"] / seconds["shared prefix"]
        del steps
    for key, value in ratios.items():
        print(f"{key:80} {value:6.2f}")
    result = {"machine": platform.platform(), "device": device_name(), "torch": torch.__version__}
    result |= {"rows": rows, "ratios": ratios}
    out = Path(__file__).parent / "results" / f"shared_prefix{'-' + only.replace(' ', '-') if only else ''}.json"
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the configurations whose name contains this")
    main(parser.parse_args().only)
