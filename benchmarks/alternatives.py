"""One CoOp training step at ViT-B/32 size (random weights) with this library against the ways to learn the same
prompt without it, the floor they all share, and full fine-tuning of the text tower:

- ours: `get_peft_model(clip, PromptEmbeddingConfig(n_ctx=16))` and the trainer's step, image features cached
  (and, at 100 classes, with the image tower run every step, as augmentation needs), the prefix all class prompts
  share encoded once (the default);
- ours, whole prompts: the same with `share_prefix=False`, every prompt whole through the model's forward: the path
  that class-specific context, the front position and SigLIP take;
- seed-style: CoOp's repository approach, hand-rolled on transformers: a copy of the embeddings module that
  splices the context over 16 placeholder tokens, every prompt padded to 77 tokens, the image tower every step;
- stock PEFT: 16 tokens added to the tokenizer, `TrainableTokensConfig` on the text tower's token embedding,
  prompts `"<ctx0> ... <ctx15> {class}."`, image features cached;
- whole-prompt floor: the text tower's forward and backward over exactly our whole prompts, from embeddings that are
  a leaf tensor (no adapter, no hook, no embedding lookup), image features cached: the floor of every approach that
  runs whole prompts (ours with shared prefixes runs below it);
- full fine-tuning: every text-tower weight trained, over the same prompts (memory reference).

Every step is forward, backward and an AdamW update on 32 images, on CUDA when present, else on CPU. Times: for each
class count, the configurations are set up side by side in one process and timed in turn, round after round; medians
of 5 rounds after a warm-up round (20 at 10 classes, whose steps are short). Memory: each configuration runs two steps
in a process of its own, so its peak memory (resident memory on CPU, allocated memory on CUDA) is its own; "step
memory" is that peak less the memory held before the first step (model, data, cached features). `--runs N` repeats
the timing process N times and reports each ratio's median and range over the runs; `--modes` runs only the named
configurations (results then in alternatives-<modes>.json). Writes benchmarks/results/alternatives.json.

Run: python benchmarks/alternatives.py   (about 35 minutes on 2 CPU cores; --classes 10 100 for a shorter run)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import DEVICE, clip_config, device_name, interleaved_medians, memory_gib, peak_memory_gib
from peft import TrainableTokensConfig, get_peft_model
from torch import nn
from transformers import AutoProcessor, CLIPModel

from peft_prompt_clip import PromptEmbeddingConfig, PromptEncoder, find_text_embeddings
from peft_prompt_clip.data import LabeledImages, image_inputs
from peft_prompt_clip.encoder import features_of
from peft_prompt_clip.layer import find_prompt_layer
from peft_prompt_clip.tiny import save_tiny_clip, vocab_and_merges
from peft_prompt_clip.training import PromptTrainer, TrainingArguments

N_CTX, IMAGES = 16, 32
MODES = {
    "ours": "ours (cached image features)",
    "ours-whole": "ours, whole prompts (no shared prefix)",
    "ours-augment": "ours (image tower every step)",
    "seed": "seed-style (copy, pad to 77, image tower)",
    "stock": "stock PEFT (TrainableTokens)",
    "floor": "whole-prompt floor (text tower fwd+bwd only)",
    "full": "full fine-tuning of the text tower",
}


class SeedStylePrompt(nn.Module):
    """CoOp's PromptLearner on transformers: a copy of the embeddings module; the context replaces the embeddings of
    the placeholder tokens 1..n_ctx of prompts padded to the full length."""

    def __init__(self, embeddings: nn.Module, n_ctx: int):
        super().__init__()
        self.copy = copy.deepcopy(embeddings).requires_grad_(False)
        table = embeddings.token_embedding.weight
        self.ctx = nn.Parameter(torch.randn(n_ctx, table.shape[1], device=table.device) * 0.02)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        tokens = self.copy.token_embedding(input_ids)
        ctx = self.ctx.expand(len(tokens), -1, -1)
        tokens = torch.cat([tokens[:, :1], ctx, tokens[:, 1 + len(self.ctx) :]], dim=1)
        return tokens + self.copy.position_embedding.weight[: tokens.shape[1]]


class FixedEmbeddings(nn.Module):
    """The floor's embeddings module: returns the prompts' embeddings, a leaf the backward ends at."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = nn.Parameter(hidden)

    def forward(self, **kwargs) -> torch.Tensor:
        return self.hidden


def text_features(model: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    # the baselines' text towers are not all ours to encode (the seed-style one has no supported embeddings module)
    return F.normalize(features_of(model.get_text_features(**tokens)), dim=-1)


def setup(mode: str, classes: int) -> Callable[[], None]:
    """A fresh model set up for `mode`, and its training step."""
    torch.manual_seed(0)
    folder = save_tiny_clip(Path(tempfile.mkdtemp()) / "tok")  # for its tokenizer
    processor = AutoProcessor.from_pretrained(folder)
    processor.image_processor.size = {"shortest_edge": 224}
    processor.image_processor.crop_size = {"height": 224, "width": 224}
    tokenizer = processor.tokenizer
    vocab, _ = vocab_and_merges()
    config = clip_config("ViT-B/32", bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    clip = CLIPModel(config).eval().requires_grad_(False).to(DEVICE)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8) for _ in range(IMAGES)]
    names = [f"class {i}" for i in range(classes)]
    data = LabeledImages(names, images, [i % classes for i in range(IMAGES)])
    labels = torch.tensor(data.labels, device=DEVICE)
    order = list(range(IMAGES))
    scale = clip.logit_scale.exp()

    def image_features(augment: bool) -> torch.Tensor:
        with torch.no_grad():
            inputs = image_inputs(processor, data, order, augment_seed="bench" if augment else None)
            inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
            return F.normalize(features_of(clip.get_image_features(**inputs)), dim=-1)

    def loss_of(model: nn.Module, tokens: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(scale * images @ text_features(model, tokens).T, labels)

    if mode in ("ours", "ours-augment", "ours-whole"):
        model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=N_CTX))
        args = TrainingArguments(
            output_dir=tempfile.mkdtemp(), epochs=1, augment=mode == "ours-augment", share_prefix=mode != "ours-whole"
        )
        trainer = PromptTrainer(model, processor, data, args)
        cached = None if trainer.augment else trainer.images.cached()
        params = trainer.params

        def compute():
            features = trainer.images.of(order, "bench")[0] if cached is None else cached
            trainer.step(features, labels, IMAGES)

    elif mode == "seed":
        name = find_text_embeddings(clip)
        seed = SeedStylePrompt(clip.get_submodule(name), N_CTX)
        clip.set_submodule(name, seed)
        params = [seed.ctx]
        tokens = dict(
            tokenizer([f"{n}." for n in names], padding="max_length", max_length=77 - N_CTX, return_tensors="pt")
        )
        placeholders = torch.zeros(classes, N_CTX, dtype=torch.long)  # any id but end-of-text
        ids = tokens["input_ids"]
        tokens = {"input_ids": torch.cat([ids[:, :1], placeholders, ids[:, 1:]], dim=1).to(DEVICE)}  # no mask: CoOp's

        def compute():
            loss_of(clip, tokens, image_features(augment=True)).backward()

    elif mode == "stock":
        added = [f"<ctx{i}>" for i in range(N_CTX)]
        tokenizer.add_tokens(added)
        if len(tokenizer) > clip.text_model.get_input_embeddings().num_embeddings:  # a real tokenizer needs this
            clip.text_model.resize_token_embeddings(len(tokenizer))
        ids = tokenizer.convert_tokens_to_ids(added)
        model = get_peft_model(clip, TrainableTokensConfig(target_modules=["token_embedding"], token_indices=ids))
        params = [p for p in model.parameters() if p.requires_grad]
        texts = ["".join(added) + f" {n}." for n in names]
        tokens = {k: v.to(DEVICE) for k, v in tokenizer(texts, padding=True, return_tensors="pt").items()}
        cached = image_features(augment=False)

        def compute():
            loss_of(model, tokens, cached).backward()

    else:  # the floor, and full fine-tuning, over exactly our prompts (with placeholder ids at the context)
        model = get_peft_model(clip, PromptEmbeddingConfig(n_ctx=N_CTX))
        layer = find_prompt_layer(model)
        tokens = PromptEncoder(model, processor).tokenize([f"{n}." for n in names])
        ids, mask = layer.prompt_layouts["default"].expand(tokens["input_ids"], tokens["attention_mask"])
        captured = []  # the prompt's embeddings (context in place) as the text tower receives them
        hook = layer.register_forward_hook(lambda module, args, output: captured.append(output))
        with torch.no_grad():
            model.get_text_features(**tokens)
        hook.remove()
        hidden = captured[0]
        clip = model.unload()
        tokens = {"input_ids": ids, "attention_mask": mask}
        if mode == "floor":
            floor = FixedEmbeddings(hidden)
            clip.set_submodule(find_text_embeddings(clip), floor)
            params = [floor.hidden]
        else:
            params = list(clip.text_model.requires_grad_(True).parameters())
        cached = image_features(augment=False)

        def compute():
            loss_of(clip, tokens, cached).backward()

    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def step():
        compute()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def memory(mode: str, classes: int) -> dict:
    """Peak memory of `mode`'s step (run in a process of its own)."""
    step = setup(mode, classes)
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = memory_gib()
    step()
    step()
    peak = peak_memory_gib()
    return {"peak_memory_gib": peak, "step_memory_gib": peak - before}


def timing(modes: list[str], classes: int) -> dict:
    """Median step time of each of `modes`, interleaved (run in a process of its own)."""
    steps = {mode: setup(mode, classes) for mode in modes}
    return interleaved_medians(steps, 5 if classes >= 100 else 20)  # short steps are noisier


def modes_for(classes: int) -> list[str]:
    modes = ["ours", "ours-whole", "floor", "stock"]
    if classes <= 100:  # at 1000 classes, 77-token prompts need more than this machine's 24 GB
        modes.append("seed")
    if classes == 100:
        modes += ["ours-augment", "full"]
    return modes


def run(*args: str) -> dict:
    command = [sys.executable, __file__, *args]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


def main(class_counts: list[int], runs: int = 1, only: list[str] | None = None) -> dict:
    rows, ratios = [], {}
    for classes in class_counts:
        modes = [mode for mode in modes_for(classes) if not only or mode in only]
        timings = [run("--timing", str(classes), *modes) for _ in range(runs)]
        for mode in modes:
            row = {
                "mode": mode,
                "classes": classes,
                "seconds_per_step": statistics.median(t[mode] for t in timings),
                **run("--memory", mode, str(classes)),
            }
            rows.append(row)
            print(
                f"{classes:5} classes  {MODES[mode]:44} {row['seconds_per_step']:8.2f} s/step"
                f"   step memory {row['step_memory_gib']:6.2f} GiB   peak {row['peak_memory_gib']:6.2f} GiB",
                flush=True,
            )
        pairs = [("ours", "floor"), ("ours-whole", "floor"), ("stock", "ours"), ("stock", "ours-whole")]
        pairs += [("seed", "ours"), ("full", "ours"), ("seed", "ours-augment")]
        for a, b in pairs:
            if a in modes and b in modes:
                values = sorted(t[a] / t[b] for t in timings)
                ratios[f"{a} / {b}, {classes} classes"] = {
                    "median": statistics.median(values),
                    "min": values[0],
                    "max": values[-1],
                    "runs": runs,
                }
    for key, value in ratios.items():
        print(f"{key:55} {value['median']:6.2f}   (range {value['min']:.2f}-{value['max']:.2f} over {runs} runs)")
    meta = {"machine": platform.platform(), "device": device_name(), "torch": torch.__version__}
    result = {**meta, "rows": rows, "ratios": ratios}
    out = Path(__file__).parent / "results" / f"alternatives{'-' + '-'.join(only) if only else ''}.json"
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--timing", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--runs", type=int, default=1, help="timing processes per class count (ratios: median, range)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), help="only these configurations")
    options = parser.parse_args()
    if options.memory:
        print(json.dumps(memory(options.memory[0], int(options.memory[1]))))
    elif options.timing:
        print(json.dumps(timing(options.timing[1:], int(options.timing[0]))))
    else:
        main(options.classes, options.runs, options.modes)
