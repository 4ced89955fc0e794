"""The command line's default recipe, measured: CoOp's recipe as `train` runs it when given nothing but data and shots
(SGD lr 0.002, cosine, one warm-up epoch, batches of 32, 50/100/200 epochs by shots, no augmentation), with the
context's initialisation and the choice of the epoch kept as the variables:

- 16 random context vectors, the last epoch kept (CoOp's paper; this package's default before this benchmark);
- the same, keeping the epoch with the best accuracy on held-out shots (min(shots, 4) per class, never among the
  training shots; the initial context is a candidate), the last epoch's saved beside it;
- the context initialised from "a photo of a" (4 vectors: with the class name at the end, the zero-shot prompt),
  last epoch;
- "a photo of a" and the best held-out epoch (the zero-shot prompt is then a candidate: epoch 0).

On the accuracy benchmark's model and data (`fashion-clip`, Fashion-MNIST's original and faded images; a pool of 32
training images per class, 100 test images per class), 1, 4 and 16 shots, 3 seeds, mean and std of the test top-1.

Run: python benchmarks/default_recipe.py   (about 8 minutes on 2 CPU cores; --shots 16 --seeds 1 for a quick look)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch
from accuracy import LEARNED_ON, MODEL_DIR, PROCESSOR, ZERO_SHOT, load, score, summary, zero_shot
from transformers import CLIPModel

from peft_prompt_clip import PromptEmbeddingConfig, get_prompt_model
from peft_prompt_clip.data import few_shot, hold_out
from peft_prompt_clip.training import PromptTrainer, TrainingArguments

VARIANTS: dict[str, tuple[dict, bool]] = {  # name -> (PromptEmbeddingConfig fields, best held-out epoch)
    "16 random vectors, last epoch (CoOp)": ({"n_ctx": 16}, False),
    "16 random vectors, best held-out epoch": ({"n_ctx": 16}, True),
    "'a photo of a', last epoch": ({"ctx_init": "a photo of a"}, False),
    "'a photo of a', best held-out epoch": ({"ctx_init": "a photo of a"}, True),
}


def run(variant: str, pool, shots: int, seed: int, test) -> dict:
    adapter, validate = VARIANTS[variant]
    train, rest = hold_out(pool, shots, seed=seed)
    held_out = few_shot(rest, min(shots, 4), seed=seed) if validate else None
    config = PromptEmbeddingConfig(class_names=list(train.class_names), init_seed=seed, **adapter)
    model = get_prompt_model(CLIPModel.from_pretrained(MODEL_DIR).eval(), config)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), seed=seed)  # the CLI's defaults
    summary_ = PromptTrainer(model, PROCESSOR, train, args, eval_data=held_out).train()
    kept = summary_["eval"]["best"]["epoch"] if validate else summary_["epochs"]
    return {"top1": score("CoOp", model, test), "epoch": kept}


def main(shots_list: list[int], seeds: list[int]) -> dict:
    torch.set_num_threads(2)
    results: dict = {"machine": platform.processor() or platform.machine(), "shots": shots_list, "seeds": seeds}
    for domain in LEARNED_ON:
        pool, test = load(domain)
        rows = {name: {"any": summary([zero_shot(list(t), test)])} for name, t in list(ZERO_SHOT.items())[:1]}
        for variant in VARIANTS:
            rows[variant] = {}
            for shots in shots_list:
                runs = [run(variant, pool, shots, seed, test) for seed in seeds]
                rows[variant][str(shots)] = {
                    **summary([r["top1"] for r in runs]),
                    "epochs": [r["epoch"] for r in runs],
                }
                cell = rows[variant][str(shots)]
                print(f"{domain:8} {variant:40} {shots:2} shots {cell['mean']:.3f} ± {cell['std']:.3f} "
                      f"(epochs kept {cell['epochs']})", flush=True)  # fmt: skip
        results[domain] = rows
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    options = parser.parse_args()
    results = main(options.shots, options.seeds)
    out = Path(__file__).parent / "results" / "default_recipe.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out}")
