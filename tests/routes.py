"""The methods of the route matrix (tests/test_routes.py): each method's adapter on the tiny CLIP and its training
recipe. A new method joins every route with one line in `METHODS`.

Run as a script, alone or under `accelerate launch`, it trains every method's adapter for a few steps:
`python routes.py CLIP_DIR OUT` saves them to `OUT/<method>/`, and each process writes `OUT/ranks/<rank>.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import PeftModel, get_peft_model
from transformers import AutoProcessor, CLIPModel

from peft_prompt_clip import LabeledImages, PromptEmbeddingConfig, PromptTrainer, TrainingArguments
from peft_prompt_clip.methods import method_settings

CLASSES = ["cat", "dog", "red car"]

#: method -> (its preset in `methods.py`, adapter fields on top)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "coop": ("coop", {"n_ctx": 4}),
    "csc": ("coop", {"n_ctx": 4, "class_specific": True, "class_names": CLASSES}),
    "cocoop": ("cocoop", {}),
    "kgcoop": ("kgcoop", {}),
    "ivlp": ("ivlp", {}),
    "maple": ("maple", {}),
    "promptsrc": ("promptsrc", {}),
    "tcp": ("tcp", {}),
}

#: a short run of any method: its preset's terms, with steps enough to move every tensor
EPOCHS = 3
RECIPE = {"epochs": EPOCHS, "batch_size": 4, "optimizer": "sgd", "lr": 0.05, "warmup_epochs": 0, "seed": 1}


#: float64 where transformers allows it (transformers 4 builds CLIP's causal mask with an overflow in float64), so that
#: runs which sum the same gradients in another order (several processes) agree to far below the tests' 1e-6
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
DTYPE = torch.float64 if TRANSFORMERS_5 else torch.float32


def settings(method: str, model: torch.nn.Module) -> tuple[PromptEmbeddingConfig, dict[str, Any]]:
    """The method's adapter config for `model` (depths capped at its layers) and its training fields."""
    preset, extra = METHODS[method]
    adapter, training = method_settings(preset, len(CLASSES), model, epochs=EPOCHS)
    return PromptEmbeddingConfig(**{**adapter, **extra}), training


def adapted(method: str, clip_dir: str | Path, seed: int = 1) -> PeftModel:
    """The method's adapter on the tiny CLIP with every tensor moved off its initial value (seeded), so that a route
    that drops or re-initialises any of them cannot pass."""
    model = CLIPModel.from_pretrained(clip_dir).eval()
    model = get_peft_model(model, settings(method, model)[0])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def images(count: int, seed: int = 0) -> LabeledImages:
    """Random 30x30 images, labelled in turn."""
    generator = torch.Generator().manual_seed(seed)
    pixels = [(torch.rand(30, 30, 3, generator=generator) * 255).to(torch.uint8).numpy() for _ in range(count)]
    return LabeledImages(CLASSES, pixels, [i % len(CLASSES) for i in range(count)])


def train(method: str, clip_dir: str | Path, output: str | Path, **overrides: Any) -> PeftModel:
    """A short training run of the method (its preset's terms and aggregation) on 12 images; returns the model."""
    model = CLIPModel.from_pretrained(clip_dir).eval()
    config, training = settings(method, model)
    model = get_peft_model(model, config).to(DTYPE)
    args = TrainingArguments(**{**training, **RECIPE, "output_dir": str(output), **overrides})
    PromptTrainer(model, AutoProcessor.from_pretrained(clip_dir), images(12), args).train()
    return model


if __name__ == "__main__":
    from accelerate import Accelerator

    clip_dir, out = sys.argv[1], Path(sys.argv[2])
    state = Accelerator()  # the launch's settings (ACCELERATE_USE_CPU), read as the trainer's Accelerator reads them
    rank, processes = state.process_index, state.num_processes
    for name in METHODS:
        train(name, clip_dir, out / name)
    (out / "ranks").mkdir(parents=True, exist_ok=True)
    (out / "ranks" / f"{rank}.json").write_text(json.dumps({"processes": processes}))
    state.wait_for_everyone()  # then leave the process group together: a rank leaving alone may abort in gloo
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
