"""Training step of the prompt trainer at ViT-B/32 size (random weights): time with cached image features against
running the image tower each step (augmentation), peak memory of a many-class step with and without chunked class
encoding, and CoCoOp batched over images x classes against CoCoOp's per-image loop, on CUDA when present, else
CPU. Each configuration runs in its own process, so its peak memory (resident on CPU, allocated on CUDA) is its own.

Run: python benchmarks/training_step.py   (about 10 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import DEVICE, clip_config, device_name, median_seconds, peak_memory_gib
from peft import get_peft_model
from transformers import AutoProcessor, CLIPModel

from peft_prompt_clip import PromptEmbeddingConfig
from peft_prompt_clip.data import LabeledImages
from peft_prompt_clip.tiny import save_tiny_clip, vocab_and_merges
from peft_prompt_clip.training import PromptTrainer, TrainingArguments

CONFIGS = [  # (name, classes, augment, class_chunk_size, repeats, mode)
    ("100 classes, cached image features", 100, False, None, 5, "coop"),
    ("100 classes, image tower every step", 100, True, None, 5, "coop"),
    ("1000 classes, all prompts at once", 1000, False, None, 1, "coop"),
    ("1000 classes, chunks of 100 (exact)", 1000, False, 100, 1, "coop"),
    ("CoCoOp 10 classes, per-image loop", 10, False, None, 3, "cocoop-loop"),
    ("CoCoOp 10 classes, batched", 10, False, None, 3, "cocoop"),
    ("CoCoOp 10 classes, batched, 40 prompts/call", 10, False, 40, 3, "cocoop"),
]


def one(classes: int, augment: bool, chunk: int | None, repeats: int, mode: str) -> dict:
    torch.manual_seed(0)
    folder = save_tiny_clip(Path(tempfile.mkdtemp()) / "tok")
    processor = AutoProcessor.from_pretrained(folder)
    processor.image_processor.size = {"shortest_edge": 224}
    processor.image_processor.crop_size = {"height": 224, "width": 224}
    vocab, _ = vocab_and_merges()
    config = clip_config("ViT-B/32", bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    conditional = mode.startswith("cocoop")
    clip = CLIPModel(config).eval().to(DEVICE)
    model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=16, conditional=conditional))
    rng = np.random.default_rng(0)
    count = 16 if conditional else 32
    images = [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8) for _ in range(count)]
    data = LabeledImages([f"class {i}" for i in range(classes)], images, [i % classes for i in range(count)])
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), epochs=1, augment=augment, class_chunk_size=chunk)
    trainer = PromptTrainer(model, processor, data, args)
    labels = trainer.labels
    cached = None if augment else trainer.images.cached()
    order = list(range(len(data)))

    def step():
        features, frozen = trainer.images.of(order, "bench") if augment else (cached, None)
        trainer.step(features, labels, len(order), frozen)
        model.zero_grad(set_to_none=True)

    def per_image_loop():  # CoCoOp's own trainer: the text encoder once per image, one backward for the batch
        encoder, tokens = trainer.encoder, trainer.class_tokens
        logits = []
        for i in range(len(order)):
            text = encoder.text_features(tokens, condition=cached[i : i + 1])
            logits.append(encoder.logits(cached[i : i + 1], text)[0])
        torch.nn.functional.cross_entropy(torch.stack(logits), labels).backward()
        model.zero_grad(set_to_none=True)

    if mode == "cocoop-loop":
        step = per_image_loop

    seconds = median_seconds(step, repeats)
    return {"seconds_per_step": seconds, "peak_memory_gib": peak_memory_gib()}


def main(only: str | None = None) -> list[dict]:
    rows = {}
    for name, classes, augment, chunk, repeats, mode in CONFIGS:
        if only and only not in name:
            continue
        command = [sys.executable, __file__, "--one", json.dumps([classes, augment, chunk, repeats, mode])]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        rows[name] = {"config": name, **json.loads(result.stdout.strip().splitlines()[-1])}
        print(
            f"{name:45} {rows[name]['seconds_per_step']:8.2f} s/step   peak {rows[name]['peak_memory_gib']:6.2f} GiB"
        )

    def ratio(a: str, b: str, key: str = "seconds_per_step") -> float | None:
        return rows[a][key] / rows[b][key] if a in rows and b in rows else None

    ratios = {
        "cache_speedup": ratio("100 classes, image tower every step", "100 classes, cached image features"),
        "chunked_memory": ratio(
            "1000 classes, chunks of 100 (exact)", "1000 classes, all prompts at once", "peak_memory_gib"
        ),
        "cocoop_batched_speedup": ratio("CoCoOp 10 classes, per-image loop", "CoCoOp 10 classes, batched"),
        "cocoop_chunked_speedup": ratio(
            "CoCoOp 10 classes, per-image loop", "CoCoOp 10 classes, batched, 40 prompts/call"
        ),
        "cocoop_chunked_memory": ratio(
            "CoCoOp 10 classes, batched, 40 prompts/call", "CoCoOp 10 classes, per-image loop", "peak_memory_gib"
        ),
    }
    for key, value in ratios.items():
        if value is not None:
            print(f"{key:24} {value:.2f}x")
    out = Path(__file__).parent / "results" / f"training_step{'-' + only.lower() if only else ''}.json"
    meta = {"machine": platform.platform(), "device": device_name(), "torch": torch.__version__}
    out.write_text(json.dumps({**meta, "rows": list(rows.values()), "ratios": ratios}, indent=2))
    return list(rows.values())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--only", help="run only the configurations whose name contains this, e.g. CoCoOp")
    options = parser.parse_args()
    if options.one:
        print(json.dumps(one(*json.loads(options.one))))
    else:
        main(options.only)
