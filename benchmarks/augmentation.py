"""Which augmentation a few-shot prompt should learn with, measured: no augmentation, CoOp's per-step random resized
crop + flip (a fresh crop of every image in every epoch), and cached augmented views (`augment_views` V: the features
of V crops of each image computed once, one drawn per image and epoch) for V in 1, 4, 8, 16.

The accuracy benchmark's setting (fashion-clip, the demo's Fashion-MNIST subset, the demo's recipe: AdamW lr 3e-3,
50 epochs, batches of 32, context from "a photo of a"), CoOp and class-specific context (CSC), 1, 4 and 16 shots,
3 seeds, learned and tested on original and on faded images, with the image tower's passes over the training images
each variant costs (none: 1; per step: one per epoch, 50; views: V). Writes benchmarks/results/augmentation.json.

Run: python benchmarks/augmentation.py   (about 20 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
from accuracy import learn_prompt, load, score

from peft_prompt_clip.data import few_shot

VARIANTS = {
    "none": {"augment": False},
    "per step": {"augment": True},
    **{f"views {v}": {"augment": True, "augment_views": v} for v in (1, 4, 8, 16)},
}


def main(shots_list: list[int], seeds: list[int], methods: list[str]) -> dict:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results: dict = {"machine": platform.platform(), "torch": torch.__version__, "shots": shots_list, "seeds": seeds}
    results["image tower passes"] = {v: r.get("augment_views", 50 if r["augment"] else 1) for v, r in VARIANTS.items()}
    for domain in ("original", "faded"):
        pool, test = load(domain)
        for method in methods:
            for shots in shots_list:
                for variant, recipe in VARIANTS.items():
                    values = []
                    for seed in seeds:
                        model = learn_prompt(method, few_shot(pool, shots, seed=seed), seed, **recipe)
                        values.append(score(method, model, test))
                    row = {"mean": statistics.mean(values), "std": statistics.pstdev(values), "runs": values}
                    results.setdefault(domain, {}).setdefault(method, {}).setdefault(variant, {})[str(shots)] = row
                    print(f"{domain:8} {method:28} {shots:2} shots {variant:9} {row['mean']:.3f} ± {row['std']:.3f}")
    out = Path(__file__).parent / "results" / "augmentation.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=["CoOp", "CoOp, class-specific (CSC)"])
    options = parser.parse_args()
    main(options.shots, options.seeds, options.methods)
