"""Inference: classify a batch of images over many classes with cached class features (PromptClassifier) against
CLIPModel.forward with the class texts every batch, and the cost of an active adapter in a plain forward.

ViT-B/32-size CLIP with random weights (the compute of the real model) and the tiny offline tokenizer. Medians of
repeats after a warm-up, both sides in the same run. Writes benchmarks/results/inference.json.

Run: python benchmarks/inference.py [--classes 1000] [--images 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch
from common import clip_config, median_seconds
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
    model = get_peft_model(CLIPModel(config).eval(), PromptEmbeddingConfig(n_ctx=16))
    names = [f"class {i}" for i in range(num_classes)]
    pixels = torch.randn(num_images, 3, 224, 224)
    texts = processor.tokenizer([f"{n}." for n in names], padding=True, return_tensors="pt")

    def forward_with_texts():
        with torch.no_grad():
            return model(**texts, pixel_values=pixels).logits_per_image

    classifier = PromptClassifier(model, processor, names)
    classifier.class_features()  # computed once, at start-up
    cached = median_seconds(lambda: classifier.logits(pixels), repeats)
    per_batch_texts = median_seconds(forward_with_texts, repeats)
    torch.testing.assert_close(classifier.logits(pixels), forward_with_texts(), atol=1e-4, rtol=1e-4)

    few = processor.tokenizer(["cat.", "a photo of a dog."], padding=True, return_tensors="pt")

    def plain(disabled: bool):
        def run():
            with torch.no_grad():
                if disabled:
                    with model.disable_adapter():
                        return model(**few, pixel_values=pixels[:1])
                return model(**few, pixel_values=pixels[:1])

        return run

    on = median_seconds(plain(False), repeats * 4)
    off = median_seconds(plain(True), repeats * 4)
    result = {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "classes": num_classes,
        "images": num_images,
        "cached_classifier_s": cached,
        "clip_forward_with_texts_s": per_batch_texts,
        "speedup": per_batch_texts / cached,
        "forward_adapter_on_s": on,
        "forward_adapter_off_s": off,
        "adapter_overhead": on / off,
    }
    print(f"{num_images} images x {num_classes} classes, ViT-B/32 size, {torch.get_num_threads()} threads")
    print(f"  CLIPModel.forward with class texts : {per_batch_texts * 1000:9.1f} ms")
    print(f"  PromptClassifier (cached features) : {cached * 1000:9.1f} ms   speed-up x{result['speedup']:.1f}")
    print(
        f"plain forward, 2 texts + 1 image: adapter on {on * 1000:.1f} ms, off {off * 1000:.1f} ms, "
        f"ratio {result['adapter_overhead']:.3f}"
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
