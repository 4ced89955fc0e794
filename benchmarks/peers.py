"""What a user would pick instead of a prompt, side by side with the presets on the accuracy benchmark: `fashion-clip`
on faded Fashion-MNIST, 16 shots per class, seeds 1-3, test top-1 and base-to-novel (CoCoOp's protocol: 16 shots of
the first 5 classes, accuracy on base and novel test images, harmonic mean).

- a linear probe on the frozen image features (CLIP's: full-batch L-BFGS logistic regression, L2 penalty; the accuracy
  benchmark's own, benchmarks/accuracy.py); it has no text side, so it cannot name novel classes;
- CLIP-LoRA (Zanella & Ben Ayed, CVPR Workshops 2024) with stock PEFT: LoRA of rank 2 (alpha 1, dropout 0.25) on the
  query, key and value projections of every layer of both towers; its recipe: AdamW (lr 2e-4, weight decay 1e-2),
  cosine schedule, batches of 32, 500 x shots iterations; the class prompts "a photo of a {}.";
- full fine-tuning of the text tower: every text-tower parameter (and the text projection), AdamW at lr 1e-5 (weight
  decay 1e-2), otherwise CLIP-LoRA's recipe.

Neither peer is a prompt adapter, so `PromptTrainer` does not drive them: a plain loop here (cross-entropy of the
scaled cosine similarities, as the trainer's). The prompts' rows are the command line's presets as a user runs them
(results/cli_presets.json, which also holds 4 shots per class out to choose the epoch kept). Cost: the median seconds
of a training step here (fashion-clip, batch 32, on this machine), and the trainable parameters' bytes (fp32) at
fashion-clip's size and at ViT-B/32's (random weights, counted).

Writes benchmarks/results/peers.json.

Run: python benchmarks/peers.py   (about 50 minutes on 2 CPU cores; --seeds 1 for a quick look)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accuracy import LINEAR_PROBE, PROCESSOR, linear_probe, load, score
from common import clip_config
from peft import LoraConfig, get_peft_model
from transformers import CLIPModel

from peft_prompt_clip.data import LabeledImages, base_novel, few_shot, image_inputs, select_classes
from peft_prompt_clip.demo import MODEL_DIR
from peft_prompt_clip.encoder import features_of
from peft_prompt_clip.options import CLIP_TEMPLATE

SHOTS, BATCH, STEPS_PER_SHOT = 16, 32, 500
LORA = "CLIP-LoRA (rank 2, q/k/v, both towers)"
TEXT_FT = "full text-tower fine-tuning"


def lora(model: CLIPModel) -> torch.nn.Module:
    config = LoraConfig(r=2, lora_alpha=1, lora_dropout=0.25, target_modules=["q_proj", "k_proj", "v_proj"])
    return get_peft_model(model, config)


def text_tower(model: CLIPModel) -> CLIPModel:
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("text_model.", "text_projection.")))
    return model


PEERS = {LORA: (lora, 2e-4), TEXT_FT: (text_tower, 1e-5)}


def class_features(model: torch.nn.Module, names: list[str]) -> torch.Tensor:
    tokens = PROCESSOR.tokenizer([CLIP_TEMPLATE[0].format(n) for n in names], padding=True, return_tensors="pt")
    return F.normalize(features_of(model.get_text_features(**tokens)), dim=-1)


def image_features(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return F.normalize(features_of(model.get_image_features(pixel_values=pixels)), dim=-1)


def pixels_of(data: LabeledImages) -> torch.Tensor:
    return image_inputs(PROCESSOR, data, range(len(data)))["pixel_values"]


def fine_tune(peer: str, train: LabeledImages, seed: int) -> tuple[torch.nn.Module, float]:
    """`peer` learned on `train` with its recipe; the model and the median seconds of a step."""
    torch.manual_seed(seed)
    make, lr = PEERS[peer]
    model = make(CLIPModel.from_pretrained(MODEL_DIR))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    steps = STEPS_PER_SHOT * SHOTS
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    pixels, labels = pixels_of(train), torch.tensor(train.labels)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    seconds = []
    model.train()  # LoRA's dropout; CLIP has none of its own
    for _ in range(steps):
        start = time.perf_counter()
        if len(order) < BATCH:  # epochs of shuffled batches
            order += torch.randperm(len(train), generator=generator).tolist()
        batch, order = order[:BATCH], order[BATCH:]
        logits = (
            model.logit_scale.exp() * image_features(model, pixels[batch]) @ class_features(model, train.class_names).T
        )
        loss = F.cross_entropy(logits, labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        seconds.append(time.perf_counter() - start)
    return model.eval(), statistics.median(seconds)


@torch.no_grad()
def top1(model: torch.nn.Module, test: LabeledImages) -> float:
    logits = image_features(model, pixels_of(test)) @ class_features(model, test.class_names).T
    return (logits.argmax(-1) == torch.tensor(test.labels)).float().mean().item()


def trainable_bytes(peer: str, model: CLIPModel) -> int:
    if peer == LINEAR_PROBE:
        return (model.config.projection_dim + 1) * 10 * 4  # a head over the 10 classes
    made = PEERS[peer][0](model)
    return sum(p.numel() * 4 for p in made.parameters() if p.requires_grad)


def harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3])
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "peers.json"))
    args = parser.parse_args()
    pool, test = load("faded")
    base, novel = base_novel(pool.class_names)
    results: dict = {"device": "cpu", "torch": torch.__version__, "python": platform.python_version(), "peers": {}}
    for peer in (LINEAR_PROBE, LORA, TEXT_FT):
        rows: dict[str, list[float]] = {"top1": [], "base": [], "novel": [], "HM": [], "seconds per step": []}
        for seed in args.seeds:
            train = few_shot(pool, SHOTS, seed)
            base_train = few_shot(select_classes(pool, base), SHOTS, seed)
            base_test, novel_test = select_classes(test, base), select_classes(test, novel)
            if peer == LINEAR_PROBE:
                start = time.perf_counter()
                rows["top1"].append(score(peer, linear_probe(train), test))
                rows["seconds per step"].append(time.perf_counter() - start)  # the whole fit: one L-BFGS run
                rows["base"].append(score(peer, linear_probe(base_train), base_test))
            else:
                model, step = fine_tune(peer, train, seed)
                rows["top1"].append(top1(model, test))
                rows["seconds per step"].append(step)
                model, _ = fine_tune(peer, base_train, seed)
                rows["base"].append(top1(model, base_test))
                rows["novel"].append(top1(model, novel_test))
                rows["HM"].append(harmonic(rows["base"][-1], rows["novel"][-1]))
            print(peer, seed, {k: v[-1] for k, v in rows.items() if v}, flush=True)
        results["peers"][peer] = {
            k: {"mean": statistics.mean(v), "std": statistics.pstdev(v), "runs": v} for k, v in rows.items() if v
        }
        results["peers"][peer]["bytes"] = {
            "fashion-clip": trainable_bytes(peer, CLIPModel.from_pretrained(MODEL_DIR)),
            "ViT-B/32": trainable_bytes(peer, CLIPModel(clip_config("ViT-B/32"))),
        }
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: {m: v[m] for m in v if m != "runs"} for k, v in results["peers"].items()}, indent=1))


if __name__ == "__main__":
    main()
