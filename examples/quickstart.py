"""Learn a prompt end to end, offline, in about a minute on 2 CPU cores.

The base model is a tiny random CLIP built from a config (`peft_prompt_clip.tiny`), loaded with `from_pretrained`
like a real checkpoint. A "teacher" prompt adapter with one random context per class (CoOp's CSC), unknown
to the student, labels random images; a new adapter, starting from "a photo of a", learns its context from those labels
alone. The script prints zero-shot accuracy against learned
accuracy, saves the adapter (a few KB), loads it back through PEFT and checks the outputs are bit-identical.

Run: python examples/quickstart.py [--steps 150] [--output ./quickstart-adapter]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoProcessor, CLIPModel

from peft_prompt_clip import PromptEmbeddingConfig
from peft_prompt_clip.tiny import save_tiny_clip

# PEFT 0.21 calls a transformers 5 method that warns about its own deprecation; nothing for users to do
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")

CLASSES = ["cat", "dog", "bird", "car", "airplane", "ship", "truck", "frog"]


def accuracy(model, inputs, pixels, labels) -> float:
    with torch.no_grad():
        return (model(**inputs, pixel_values=pixels).logits_per_image.argmax(-1) == labels).float().mean().item()


def main(steps: int, output: Path) -> dict[str, float]:
    torch.manual_seed(0)
    base_dir = save_tiny_clip(Path(tempfile.mkdtemp()) / "tiny-clip")
    processor = AutoProcessor.from_pretrained(base_dir)
    inputs = processor(text=[f"{name}." for name in CLASSES], return_tensors="pt", padding=True)
    train_pixels, test_pixels = torch.randn(512, 3, 30, 30), torch.randn(512, 3, 30, 30)

    teacher = get_peft_model(
        CLIPModel.from_pretrained(base_dir).eval(),
        PromptEmbeddingConfig(n_ctx=4, init_seed=1, class_specific=True, class_names=CLASSES),
    )
    with torch.no_grad():
        next(p for p in teacher.parameters() if p.requires_grad).normal_(0, 1.0)
        train_labels = teacher(**inputs, pixel_values=train_pixels).logits_per_image.argmax(-1)
        test_labels = teacher(**inputs, pixel_values=test_pixels).logits_per_image.argmax(-1)

    model = get_peft_model(
        CLIPModel.from_pretrained(base_dir).eval(),
        PromptEmbeddingConfig(ctx_init="a photo of a", class_specific=True, class_names=CLASSES),
    )
    model.print_trainable_parameters()
    zero_shot = accuracy(model, inputs, test_pixels, test_labels)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(steps):
        batch = torch.randint(0, len(train_pixels), (64,))
        logits = model(**inputs, pixel_values=train_pixels[batch]).logits_per_image
        loss = torch.nn.functional.cross_entropy(logits, train_labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    learned = accuracy(model, inputs, test_pixels, test_labels)

    model.save_pretrained(output)
    again = PeftModel.from_pretrained(CLIPModel.from_pretrained(base_dir).eval(), output)
    with torch.no_grad():
        same = torch.equal(
            again(**inputs, pixel_values=test_pixels).logits_per_image,
            model(**inputs, pixel_values=test_pixels).logits_per_image,
        )
    size = os.path.getsize(output / "adapter_model.safetensors")
    print(f"\n{'':22}accuracy on {len(test_labels)} held-out images")
    print(f"{'zero-shot prompt':22}{zero_shot:.3f}")
    print(f"{'learned prompt':22}{learned:.3f}")
    print(f"\nadapter: {output} ({size} bytes), reloaded outputs identical: {same}")
    return {"zero_shot": zero_shot, "learned": learned, "identical": float(same)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--output", type=Path, default=Path("quickstart-adapter"))
    args = parser.parse_args()
    main(args.steps, args.output)
