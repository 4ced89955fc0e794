"""Accuracy of the prompt-learning methods, offline, with the project's small pretrained CLIP (`fashion-clip`, the
demo's model) on Fashion-MNIST (the demo's embedded subset: a pool of 32 training images per class, 100 test images
per class).

This stands in for the ImageNet and 11-dataset tables of the CoOp, CoCoOp and KgCoOp papers, which need pretrained
weights that cannot be downloaded here. It measures the same things on a model that was pretrained on the
original Fashion-MNIST domain:

- few-shot: 1/2/4/8/16 shots per class, 3 seeds (mean and std), learning on the original images and on a domain
  shift the model never saw (faded, low-contrast scans): zero-shot with one template and with the model's template
  ensemble, CoOp (shared context with the class at the end, middle or front; class-specific context), CoCoOp,
  KgCoOp, and a linear probe on the image features;
- base-to-novel (CoCoOp's protocol), on original and on faded images: 16 shots of the first 5 classes, accuracy on
  base and novel classes, and their harmonic mean;
- domain generalisation (CoOp's protocol): learned on 16 shots of the original images, tested on faded, inverted
  and rotated ones.

Every prompt is learned with the demo's recipe (AdamW, lr 3e-3, 50 epochs, batches of 32, no augmentation; context
initialised from "a photo of a"); KgCoOp adds its regulariser with weight 8.0, as in its paper. IVLP, MaPLe and
PromptSRC take their papers' prompts (2, 2 and 4 context vectors, "a photo" for 2) at the depth of this model's towers
(3 layers; the papers' 9 of 12), and PromptSRC its terms (L1 weights 25 and 10, KL weight 1 / classes, the template
ensemble of the model's pretraining captions as its textual diversity) and its Gaussian aggregation, scaled from its
20 epochs to these 50 (mean at epoch 37.5, std 2.5); TCP its class-aware tokens before text layer 2 of 3 (the paper's
8 of 12) and KgCoOp's term (weight 8.0); the recipe stays the demo's, so that the rows differ by method alone.

Run: python benchmarks/accuracy.py   (about 30 minutes on 2 CPU cores; --shots 16 --seeds 1 for a quick look;
--methods MaPLe PromptSRC [--shots 16] to run only those methods and keep the other rows of results/accuracy.json)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoProcessor, CLIPModel

from peft_prompt_clip import PromptEmbeddingConfig, get_prompt_model
from peft_prompt_clip.classifier import PromptClassifier
from peft_prompt_clip.data import LabeledImages, base_novel, few_shot, image_inputs, select_classes
from peft_prompt_clip.demo import CLASSES, MODEL_DIR, PRETRAIN_TEMPLATES, demo_data, fade
from peft_prompt_clip.encoder import PromptEncoder
from peft_prompt_clip.evaluation import evaluate, harmonic_mean
from peft_prompt_clip.options import CLIP_TEMPLATE
from peft_prompt_clip.training import PromptTrainer, TrainingArguments

warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")

DOMAINS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "original": lambda x: x,
    "faded": fade,
    "inverted": lambda x: 255 - x,
    "rotated": lambda x: np.ascontiguousarray(np.rot90(x, axes=(-2, -1))),
}
# name -> (PromptEmbeddingConfig fields, TrainingArguments fields)
PROMPT_METHODS: dict[str, tuple[dict, dict]] = {
    "CoOp": ({}, {}),
    "CoOp, class in the middle": ({"class_token_position": "middle"}, {}),
    "CoOp, class in front": ({"class_token_position": "front"}, {}),
    "CoOp, class-specific (CSC)": ({"class_specific": True}, {}),
    "CoCoOp": ({"conditional": True}, {}),
    "KgCoOp": ({}, {"kg_weight": 8.0}),
    "IVLP": ({"n_ctx": 2, "ctx_init": "a photo", "prompt_depth": 3, "vision_n_ctx": 2, "vision_prompt_depth": 3}, {}),
    "MaPLe": ({"n_ctx": 2, "ctx_init": "a photo", "prompt_depth": 3, "coupled": True}, {}),
    "PromptSRC": (
        {"n_ctx": 4, "prompt_depth": 3, "vision_n_ctx": 4, "vision_prompt_depth": 3},
        {"scl_text_weight": 25.0, "scl_image_weight": 10.0, "kl_weight": "1/classes"}
        | {"gpa_mean": 37.5, "gpa_std": 2.5},
    ),
    "TCP": ({"class_prompt_layer": 2}, {"kg_weight": 8.0}),
}
ZERO_SHOT = {"zero-shot, 'a photo of a {}.'": CLIP_TEMPLATE, "zero-shot, template ensemble": PRETRAIN_TEMPLATES}
LINEAR_PROBE = "linear probe"
LEARNED_ON = ("original", "faded")  # the domains prompts are learned on
PROCESSOR = AutoProcessor.from_pretrained(MODEL_DIR)
BASE = CLIPModel.from_pretrained(MODEL_DIR).eval()  # zero-shot and linear probes; each prompt gets a fresh copy


def load(domain: str) -> tuple[LabeledImages, LabeledImages]:
    """The few-shot pool and the test set in `domain`."""
    return demo_data(DOMAINS[domain])


def learn_prompt(method: str, train: LabeledImages, seed: int, **recipe) -> torch.nn.Module:
    """A prompt of `method` learned on `train` with the demo's recipe, any of whose fields `recipe` replaces."""
    config_fields, args_fields = PROMPT_METHODS[method]
    config_fields = {"ctx_init": "a photo of a", **config_fields}
    config = PromptEmbeddingConfig(class_names=list(train.class_names), init_seed=seed, **config_fields)
    model = get_prompt_model(CLIPModel.from_pretrained(MODEL_DIR).eval(), config)
    if args_fields.get("kl_weight") == "1/classes":  # PromptSRC's KL, averaged over images and classes
        args_fields = {**args_fields, "kl_weight": 1 / len(train.class_names), "hand_template": PRETRAIN_TEMPLATES}
    demo = dict(output_dir=tempfile.mkdtemp(), epochs=50, optimizer="adamw", lr=3e-3, augment=False, seed=seed)
    args = TrainingArguments(**{**demo, **args_fields, **recipe})
    PromptTrainer(model, PROCESSOR, train, args).train()
    return model


@torch.no_grad()
def image_features(data: LabeledImages) -> torch.Tensor:
    return PromptEncoder(BASE, PROCESSOR).image_features(image_inputs(PROCESSOR, data, range(len(data))))


def linear_probe(train: LabeledImages, weight_decay: float = 1e-3) -> torch.nn.Linear:
    """Logistic regression on the frozen image features (full-batch L-BFGS, L2 penalty), CLIP's linear probe."""
    x, y = image_features(train), torch.tensor(train.labels)
    head = torch.nn.Linear(x.shape[1], len(train.class_names))
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(x), y) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


def zero_shot(templates: list[str], test: LabeledImages) -> float:
    return evaluate(PromptClassifier(BASE, PROCESSOR, test.class_names, templates), test)["top1"]


def score(method: str, model: torch.nn.Module, test: LabeledImages) -> float:
    """Top-1 accuracy on `test` of a learned prompt, or of a linear probe's head."""
    if method == LINEAR_PROBE:
        with torch.no_grad():
            predictions = model(image_features(test)).argmax(-1)
        return (predictions == torch.tensor(test.labels)).float().mean().item()
    return evaluate(PromptClassifier(model, PROCESSOR, test.class_names), test)["top1"]


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.pstdev(values), "runs": values}


def few_shot_table(domain: str, shots_list: list[int], seeds: list[int], models: dict, methods: list[str]) -> dict:
    """Accuracy on `domain`'s test set after learning from its few-shot pool; keeps the 16-shot original-domain
    models (prompts and probes) in `models` for the domain-generalisation table."""
    pool, test = load(domain)
    rows = {name: {"any": summary([zero_shot(list(t), test)])} for name, t in ZERO_SHOT.items()}
    for method in methods:
        rows[method] = {}
        for shots in shots_list:
            values = []
            for seed in seeds:
                train = few_shot(pool, shots, seed=seed)
                model = linear_probe(train) if method == LINEAR_PROBE else learn_prompt(method, train, seed)
                values.append(score(method, model, test))
                if domain == "original" and shots == max(shots_list):
                    models.setdefault(method, []).append(model)
            rows[method][str(shots)] = summary(values)
            print(f"{domain:9} {method:30} {shots:2} shots  {rows[method][str(shots)]['mean']:.3f}", flush=True)
    return rows


BASE_TO_NOVEL = ["zero-shot", "CoOp", "CoCoOp", "KgCoOp", "IVLP", "MaPLe", "PromptSRC", "TCP"]


def base_to_novel_table(domain: str, shots: int, seeds: list[int], methods: list[str]) -> dict:
    pool, test = load(domain)
    base_names, novel_names = base_novel(CLASSES)
    tests = {"base": select_classes(test, base_names), "novel": select_classes(test, novel_names)}
    rows = {}
    for method in ["zero-shot", *[m for m in BASE_TO_NOVEL if m in methods]]:
        runs = []
        for seed in [None] if method == "zero-shot" else seeds:  # zero-shot has nothing to draw
            if method == "zero-shot":
                accuracy = {part: zero_shot(list(CLIP_TEMPLATE), data) for part, data in tests.items()}
            else:
                model = learn_prompt(method, select_classes(few_shot(pool, shots, seed=seed), base_names), seed)
                accuracy = {part: score(method, model, data) for part, data in tests.items()}
            runs.append({**accuracy, "hm": harmonic_mean(accuracy["base"], accuracy["novel"])})
        rows[method] = {key: summary([run[key] for run in runs]) for key in ("base", "novel", "hm")}
        print(
            f"{domain:9} base-to-novel {method:10} "
            + " ".join(f"{k} {v['mean']:.3f}" for k, v in rows[method].items())
        )
    return rows


def domain_shift_table(models: dict) -> dict:
    """The models learned on the original domain, tested on every domain."""
    tests = {domain: load(domain)[1] for domain in DOMAINS}
    rows = {
        name: {d: summary([zero_shot(list(t), data)]) for d, data in tests.items()} for name, t in ZERO_SHOT.items()
    }
    for method, runs in models.items():
        rows[method] = {d: summary([score(method, model, data) for model in runs]) for d, data in tests.items()}
    for method, row in rows.items():
        print(f"domain shift {method:30} " + " ".join(f"{d} {v['mean']:.3f}" for d, v in row.items()))
    return rows


def markdown(results: dict) -> str:
    """The results as the tables of benchmarks/README.md."""

    def cell(value: dict) -> str:
        return f"{value['mean']:.3f}" if value["std"] == 0 else f"{value['mean']:.3f} ± {value['std']:.3f}"

    shots = [str(s) for s in results["shots"]]
    lines = []
    for domain, rows in results["few_shot"].items():
        lines += [f"\nFew-shot, learned and tested on {domain} images (top-1, mean ± std over seeds):\n"]
        header = " | ".join(f"{s} shot{'' if s == '1' else 's'}" for s in shots)
        lines += [f"| method | {header} |", "| --- |" + " ---: |" * len(shots)]
        for method, row in rows.items():
            cells = [cell(row["any"] if "any" in row else row[s]) if "any" in row or s in row else "" for s in shots]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for domain, rows in results["base_to_novel"].items():
        base = ", ".join(base_novel(CLASSES)[0])
        lines += [f"\nBase-to-novel on {domain} images, learned from {max(results['shots'])} shots of {base}:\n"]
        lines += ["| method | base | novel | HM |", "| --- | ---: | ---: | ---: |"]
        for method, row in rows.items():
            lines.append(f"| {method} | {cell(row['base'])} | {cell(row['novel'])} | {cell(row['hm'])} |")
    lines += [f"\nDomain generalisation, learned from {max(results['shots'])} shots of original images:\n"]
    lines += ["| method | " + " | ".join(DOMAINS) + " |", "| --- |" + " ---: |" * len(DOMAINS)]
    for method, row in results["domain_shift"].items():
        lines.append(f"| {method} | " + " | ".join(cell(row[d]) for d in DOMAINS) + " |")
    return "\n".join(lines)


def main(shots_list: list[int], seeds: list[int], methods: list[str] | None) -> dict:
    """Run the tables for `methods` (default: every prompt method and the linear probe); with `methods` given, the
    other rows of the saved results (same shots and seeds) are kept."""
    torch.set_num_threads(min(2, torch.get_num_threads()))  # the tiny model gains nothing from more
    out = Path(__file__).parent / "results" / "accuracy.json"
    chosen = methods or [*PROMPT_METHODS, LINEAR_PROBE]
    models: dict = {}
    results = {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "shots": shots_list,
        "seeds": seeds,
        "few_shot": {domain: few_shot_table(domain, shots_list, seeds, models, chosen) for domain in LEARNED_ON},
        "base_to_novel": {
            domain: base_to_novel_table(domain, max(shots_list), seeds, chosen) for domain in LEARNED_ON
        },
    }
    results["domain_shift"] = domain_shift_table(models)
    if methods:  # keep the saved rows of the other methods
        saved = json.loads(out.read_text())
        if saved["seeds"] != seeds or not set(shots_list) <= set(saved["shots"]):
            raise SystemExit(f"--methods adds rows to {out}, which has other shots or seeds; run every method.")
        results["shots"] = saved["shots"]  # the new rows leave the shots they did not run empty
        for table in ("few_shot", "base_to_novel"):
            for domain in LEARNED_ON:
                results[table][domain] = {**saved[table][domain], **results[table][domain]}
        results["domain_shift"] = {**saved["domain_shift"], **results["domain_shift"]}
    table = markdown(results)
    print(table)
    out.write_text(json.dumps({**results, "markdown": table}, indent=2))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", choices=[*PROMPT_METHODS, LINEAR_PROBE], help="only these methods")
    options = parser.parse_args()
    main(options.shots, options.seeds, options.methods)
