"""Training step of the prompt trainer at ViT-B/32 size (random weights): time with cached image features against
running the image tower each step (augmentation), and peak memory of a many-class step with and without chunked
class encoding. Each configuration runs in its own process, so its peak resident memory is its own.

Run: python benchmarks/training_step.py   (about 10 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import clip_config, median_seconds
from peft import get_peft_model
from transformers import AutoProcessor, CLIPModel

from peft_prompt_clip import PromptEmbeddingConfig
from peft_prompt_clip.data import LabeledImages
from peft_prompt_clip.tiny import save_tiny_clip, vocab_and_merges
from peft_prompt_clip.trainer import PromptTrainer, TrainingArguments

CONFIGS = [  # (name, classes, augment, class_chunk_size, repeats)
    ("100 classes, cached image features", 100, False, None, 5),
    ("100 classes, image tower every step", 100, True, None, 5),
    ("1000 classes, all prompts at once", 1000, False, None, 1),
    ("1000 classes, chunks of 100 (exact)", 1000, False, 100, 1),
]


def one(classes: int, augment: bool, chunk: int | None, repeats: int) -> dict:
    torch.manual_seed(0)
    folder = save_tiny_clip(Path(tempfile.mkdtemp()) / "tok")
    processor = AutoProcessor.from_pretrained(folder)
    processor.image_processor.size = {"shortest_edge": 224}
    processor.image_processor.crop_size = {"height": 224, "width": 224}
    vocab, _ = vocab_and_merges()
    config = clip_config("ViT-B/32", bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    model = get_peft_model(CLIPModel(config).eval(), PromptEmbeddingConfig(n_ctx=16))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8) for _ in range(32)]
    data = LabeledImages([f"class {i}" for i in range(classes)], images, [i % classes for i in range(32)])
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), epochs=1, augment=augment, class_chunk_size=chunk)
    trainer = PromptTrainer(model, processor, data, args)
    chunks = trainer._text_chunks()
    labels = torch.tensor(data.labels)
    cached = None if augment else trainer._cached_image_features()
    order = list(range(len(data)))

    def step():
        features = trainer._image_features(order, "bench") if augment else cached
        trainer._step(chunks, features, labels, len(order))
        model.zero_grad(set_to_none=True)

    seconds = median_seconds(step, repeats)
    return {"seconds_per_step": seconds, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> list[dict]:
    rows = []
    for name, classes, augment, chunk, repeats in CONFIGS:
        command = [sys.executable, __file__, "--one", json.dumps([classes, augment, chunk, repeats])]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append({"config": name, **json.loads(result.stdout.strip().splitlines()[-1])})
        print(
            f"{name:40} {rows[-1]['seconds_per_step']:8.2f} s/step   peak RSS {rows[-1]['peak_rss_gib']:6.2f} GiB",
            flush=True,
        )
    cached, every_step = rows[0]["seconds_per_step"], rows[1]["seconds_per_step"]
    print(f"cached image features: {every_step / cached:.2f}x faster per step than the image tower every step")
    print(f"chunked class encoding: peak memory {rows[3]['peak_rss_gib'] / rows[2]['peak_rss_gib']:.2f}x of unchunked")
    out = Path(__file__).parent / "results" / "training_step.json"
    out.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.one:
        print(json.dumps(one(*json.loads(options.one))))
    else:
        main()
