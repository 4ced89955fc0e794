"""Inference: classify a batch of images over many classes with cached class features (PromptClassifier) against
CLIPModel.forward with the class texts every batch, and the cost of an active adapter in a plain forward: against
the same forward with the adapter disabled, and against a hand-written prompt of the same length (16 more words), the
adapter's own overhead.

ViT-B/32-size CLIP with random weights (the compute of the real model) and the tiny offline tokenizer, on CUDA when
present, else CPU. Medians of repeats after a warm-up, all sides in the same run (the plain forwards interleaved).
Writes benchmarks/results/inference.json.

Run: python benchmarks/inference.py [--classes 1000] [--images 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
from common import DEVICE, clip_config, device_name, interleaved_medians, median_seconds
from peft import get_peft_model
from transformers import AutoProcessor, CLIPModel

from peft_prompt_clip import PromptEmbeddingConfig
from peft_prompt_clip.classifier import PromptClassifier
from peft_prompt_clip.tiny import save_tiny_clip, vocab_and_merges


def main(num_classes: int, num_images: int, repeats: int) -> dict:
    torch.manual_seed(0)
    folder = save_tiny_clip(Path(tempfile.mkdtemp()) / "tok")  # for its tokenizer
    processor = AutoProcessor.from_pretrained(folder)
    vocab, _ = vocab_and_merges()  # the tiny tokenizer's special ids, in a full-size vocabulary
    config = clip_config("ViT-B/32", bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    model = get_peft_model(CLIPModel(config).eval().to(DEVICE), PromptEmbeddingConfig(n_ctx=16))
    names = [f"class {i}" for i in range(num_classes)]
    pixels = torch.randn(num_images, 3, 224, 224, device=DEVICE)
    texts = processor.tokenizer([f"{n}." for n in names], padding=True, return_tensors="pt").to(DEVICE)

    def forward_with_texts():
        with torch.no_grad():
            return model(**texts, pixel_values=pixels).logits_per_image

    classifier = PromptClassifier(model, processor, names)
    classifier.class_features()  # computed once, at start-up
    cached = median_seconds(lambda: classifier.logits(pixels), repeats)
    per_batch_texts = median_seconds(forward_with_texts, repeats)
    torch.testing.assert_close(classifier.logits(pixels), forward_with_texts(), atol=1e-4, rtol=1e-4)

    texts = ["cat.", "a photo of a dog."]
    short = processor.tokenizer(texts, padding=True, return_tensors="pt").to(DEVICE)
    # the same texts after 16 hand-written words: as long as the adapter makes the short ones
    long = processor.tokenizer([" ".join(["a"] * 16) + " " + t for t in texts], padding=True, return_tensors="pt")
    long = long.to(DEVICE)

    def plain(tokens, adapter: bool):
        def run():
            with torch.no_grad(), nullcontext() if adapter else model.disable_adapter():
                return model(**tokens, pixel_values=pixels[:1])

        return run

    forwards = interleaved_medians(
        {"on": plain(short, True), "off": plain(short, False), "off_same_length": plain(long, False)}, repeats * 4
    )
    on, off, same = forwards["on"], forwards["off"], forwards["off_same_length"]
    result = {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "device": device_name(),
        "classes": num_classes,
        "images": num_images,
        "cached_classifier_s": cached,
        "clip_forward_with_texts_s": per_batch_texts,
        "speedup": per_batch_texts / cached,
        "forward_adapter_on_s": on,
        "forward_adapter_off_s": off,
        "forward_hand_written_same_length_s": same,
        "adapter_on_over_off": on / off,
        "adapter_overhead": on / same,
    }
    print(f"{num_images} images x {num_classes} classes, ViT-B/32 size, {device_name()}")
    print(f"  CLIPModel.forward with class texts : {per_batch_texts * 1000:9.1f} ms")
    print(f"  PromptClassifier (cached features) : {cached * 1000:9.1f} ms   speed-up x{result['speedup']:.1f}")
    print(
        f"plain forward, 2 texts + 1 image: adapter on {on * 1000:.1f} ms, off {off * 1000:.1f} ms, "
        f"off with 16 hand-written words more {same * 1000:.1f} ms; overhead {result['adapter_overhead']:.3f}"
    )
    out = Path(__file__).parent / "results" / "inference.json"
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    main(args.classes, args.images, args.repeats)
