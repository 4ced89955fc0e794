"""The cost of deep and multi-modal prompts (MaPLe, PromptSRC) at ViT-B/32 size (random weights), in one process:

- training step time (forward, backward, SGD update; batches of 4 images as their recipes, 10 and 100 classes) and
  peak GPU memory of CoOp (16 context vectors, cached image features, as the trainer runs it), MaPLe and PromptSRC
  through `PromptTrainer.step`, and of a hand-rolled MaPLe as the reference repos build it: every prompt padded to
  77 tokens and the deep prompts concatenated into the sequence by copying it before every layer, in both towers;
- the floor: a forward of the text tower (100 class prompts) and of the image tower (32 images) with deep prompts
  against the same forward with the same number of plain learned tokens at the input only (CoOp's context; vision
  tokens appended once): the per-layer writing must cost at most 10%;
- adapter file sizes against their raw parameters;
- mixed precision: MaPLe's class and image features under bf16 and fp16 autocast against float32, and (on CUDA)
  the training steps under bf16 autocast.

Writes benchmarks/results/deep_prompts.json (the device is recorded; CUDA when present).

Run: python benchmarks/deep_prompts.py   (about 10 minutes on 2 CPU cores; --repeats 3 for a quick look)
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import DEVICE, device_name, interleaved_medians
from peft import get_peft_model
from shared_prefix import processor_and_clip

from peft_prompt_clip import PromptEmbeddingConfig
from peft_prompt_clip.data import LabeledImages
from peft_prompt_clip.encoder import PromptEncoder, features_of
from peft_prompt_clip.layer import find_prompt_layer
from peft_prompt_clip.methods import method_settings
from peft_prompt_clip.training import PromptTrainer, TrainingArguments

IMAGES = 4  # MaPLe's and PromptSRC's batch


def trainer_for(method: str, classes: int) -> PromptTrainer:
    """A trainer of `method`'s preset on its own copy of the model (the same random weights)."""
    processor, clip = processor_and_clip()
    adapter, recipe = method_settings(method, classes, clip)
    adapter.pop("ctx_init", None)  # the benchmark's tokenizer has no English words; random init costs the same
    if method == "coop":
        adapter = {"n_ctx": 16}
    model = get_peft_model(clip, PromptEmbeddingConfig(**adapter), adapter_name=method)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8) for _ in range(IMAGES)]
    data = LabeledImages([f"class {i}" for i in range(classes)], images, [i % classes for i in range(IMAGES)])
    recipe.pop("epochs", None)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), epochs=1, augment=False, **recipe)
    return PromptTrainer(model, processor, data, args)


def training_step(trainer: PromptTrainer):
    order = list(range(len(trainer.data)))
    cached = None if trainer.images.prompted else trainer.images.cached()

    def step():
        features, frozen = (cached, None) if cached is not None else trainer.images.of(order)
        trainer.step(features, trainer.labels, len(order), frozen)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


def run_layer(layer, x, mask):
    if "causal_attention_mask" in inspect.signature(layer.forward).parameters:  # transformers 4
        return layer(x, None, mask)[0]
    out = layer(x, mask)
    return out[0] if isinstance(out, tuple) else out


def reference_maple_step(trainer: PromptTrainer):
    """MaPLe as its repository runs it, with this adapter's own tensors: prompts padded to 77, the sequence rebuilt
    with `torch.cat` before every prompted layer of both towers."""
    clip = trainer.encoder.base
    layer = find_prompt_layer(trainer.model)
    name, n = trainer.adapter_name, trainer.model.peft_config[trainer.adapter_name].n_ctx
    tokens = trainer.class_tokens["input_ids"]
    eos_id = trainer.encoder.eos_token_id
    ids = torch.full((tokens.shape[0], 77), eos_id, device=DEVICE)  # CLIP's tokenize pads to 77
    ids[:, 0] = tokens[:, 0]
    ids[:, 1 + n : 1 + n + tokens.shape[1] - 1] = tokens[:, 1:]
    eos = (ids[:, 1 + n :] == eos_id).int().argmax(-1) + 1 + n
    text, vision = clip.text_model, clip.vision_model
    causal = torch.full((77, 77), torch.finfo(torch.float32).min, device=DEVICE).triu(1)[None, None]
    pixels = torch.randn(IMAGES, 3, 224, 224, device=DEVICE)
    labels = trainer.labels

    def step():
        ctx = layer.prompt_embedding_ctx[name]
        deep = layer.prompt_embedding_deep_ctx[name]
        x = text.embeddings.token_embedding(ids)
        x = torch.cat([x[:, :1], ctx.expand(len(x), -1, -1), x[:, 1 + n :]], dim=1)
        x = x + text.embeddings.position_embedding.weight
        for i, block in enumerate(text.encoder.layers):
            if 1 <= i <= deep.shape[0]:
                x = torch.cat([x[:, :1], deep[i - 1].expand(len(x), -1, -1), x[:, 1 + n :]], dim=1)
            x = run_layer(block, x, causal)
        class_features = clip.text_projection(text.final_layer_norm(x)[torch.arange(len(x)), eos])
        y = vision.embeddings(pixels)
        y = torch.cat([y, layer.vision_context(name, 0).expand(len(y), -1, -1)], dim=1)
        y = vision.pre_layrnorm(y)
        for i, block in enumerate(vision.encoder.layers):
            if 1 <= i < layer.vision_depth(name):
                y = torch.cat([y[:, :-n], layer.vision_context(name, i).expand(len(y), -1, -1)], dim=1)
            y = run_layer(block, y, None)
        image_features = clip.visual_projection(vision.post_layernorm(y[:, 0]))
        logits = 100 * F.normalize(image_features, dim=-1) @ F.normalize(class_features, dim=-1).T
        F.cross_entropy(logits, labels).backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


def forwards(repeats: int) -> dict[str, float]:
    """The floor: text and image forwards with deep prompts against plain tokens of the same count."""
    processor, clip = processor_and_clip()
    deep = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=4, prompt_depth=9, vision_n_ctx=4, vision_prompt_depth=9))
    deep.add_adapter("plain", PromptEmbeddingConfig(n_ctx=4, vision_n_ctx=4))
    encoder = PromptEncoder(deep, processor)
    own = PromptEncoder(deep, processor, share_prefix=False)
    tokens = encoder.tokenize([f"class {i}." for i in range(100)], "default")
    pixels = {"pixel_values": torch.randn(32, 3, 224, 224, device=DEVICE)}

    def text(enc, name):
        return lambda: enc.class_features(tokens, name)

    def image(name):
        return lambda: features_of(encoder.image_features(pixels, name))

    with torch.no_grad():
        return interleaved_medians(
            {
                "text, deep (depth 9)": text(encoder, "default"),
                "text, plain": text(encoder, "plain"),
                "text, deep, model's own forward": text(own, "default"),
                "text, plain, model's own forward": text(own, "plain"),
                "image, deep (depth 9)": image("default"),
                "image, plain": image("plain"),
            },
            repeats,
        )


def autocast_agreement() -> dict[str, dict[str, float | bool]]:
    """MaPLe's features (100 classes, 32 images) under bf16 and fp16 autocast against float32."""
    processor, clip = processor_and_clip()
    model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=2, prompt_depth=9, coupled=True))
    encoder = PromptEncoder(model, processor)
    tokens = encoder.tokenize([f"class {i}." for i in range(100)])
    pixels = {"pixel_values": torch.randn(32, 3, 224, 224, device=DEVICE)}
    agreement = {}
    with torch.no_grad():
        text, image = encoder.class_features(tokens), encoder.image_features(pixels)
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast(DEVICE.type, dtype=dtype):
                low_text, low_image = encoder.class_features(tokens), encoder.image_features(pixels)
            agreement[str(dtype).removeprefix("torch.")] = {
                "text features, max abs difference": float((low_text - text).abs().max()),
                "image features, max abs difference": float((low_image - image).abs().max()),
                "finite": bool(low_text.isfinite().all() and low_image.isfinite().all()),
            }
    return agreement


def bf16(step):
    def run():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "deep_prompts.json"))
    args = parser.parse_args()
    results = {"device": device_name(), "torch": torch.__version__, "python": platform.python_version()}

    floor = forwards(args.repeats)
    results["forward seconds"] = floor
    results["floor ratios"] = {
        "text, deep / plain": floor["text, deep (depth 9)"] / floor["text, plain"],
        "text, deep / plain, model's own forward": floor["text, deep, model's own forward"]
        / floor["text, plain, model's own forward"],
        "image, deep / plain": floor["image, deep (depth 9)"] / floor["image, plain"],
    }
    print(json.dumps(results["floor ratios"], indent=1))
    results["autocast agreement (MaPLe, depth 9)"] = autocast_agreement()
    print(json.dumps(results["autocast agreement (MaPLe, depth 9)"], indent=1))

    for classes in (10, 100):
        steps, memory, sizes = {}, {}, {}
        for method in ("coop", "maple", "promptsrc"):
            trainer = trainer_for(method, classes)
            steps[method] = training_step(trainer)
            if method == "maple":
                steps["maple, reference repos' way (pad to 77, cat per layer)"] = reference_maple_step(trainer)
            folder = Path(tempfile.mkdtemp())
            trainer.model.save_pretrained(folder, selected_adapters=[method])
            saved = next(folder.rglob("adapter_model.safetensors"))
            raw = sum(p.numel() * 4 for p in trainer.params)
            sizes[method] = {"file bytes": saved.stat().st_size, "raw parameter bytes": raw}
        if DEVICE.type == "cuda":
            steps.update({f"{name}, bf16 autocast": bf16(step) for name, step in list(steps.items())})
        for name, step in steps.items():  # peak memory of each step alone
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                memory[name] = torch.cuda.max_memory_allocated() / 2**30
        times = interleaved_medians(steps, args.repeats)
        results[f"{classes} classes"] = {
            "step seconds": times,
            "step time / CoOp": {k: v / times["coop"] for k, v in times.items()},
            "step time / reference MaPLe": {
                k: v / times["maple, reference repos' way (pad to 77, cat per layer)"] for k, v in times.items()
            },
            "peak GPU memory GiB": memory or "n/a (CPU)",
            "adapter sizes": sizes,
        }
        print(json.dumps(results[f"{classes} classes"], indent=1))
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
