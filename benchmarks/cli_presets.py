"""The methods' presets as a user runs them: `peft-prompt-clip train --method NAME` and `peft-prompt-clip eval`, as
subprocesses, on the accuracy benchmark's model and images (`fashion-clip`; Fashion-MNIST's few-shot pool of 32
training images per class and 100 test images per class, original and faded), written to disk as a folder of class
folders (`train/`, `test/`) as a user's data would be.

Each run is the command line's defaults and the preset alone: `--shots 16` (held-out shots: the default, min(shots, 4)
per class from the pool's images that are not among the shots, choosing the epoch kept), `--seed` 1, 2 and 3. Then
`eval --split test` prints the learned prompt's and the zero-shot prompt's top-1 on the test images. With
`--base-to-novel`, `train --classes base` and `eval --base-to-novel` (CoCoOp's protocol: the first 5 classes learned,
base, novel and harmonic mean).

Run: python benchmarks/cli_presets.py --methods tcp   (about 10 minutes a method on 2 CPU cores); writes
benchmarks/results/cli_presets.json (other methods' rows kept). `--train-args '--epochs 10'` measures the presets with
more train flags, as rows of their own.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from peft_prompt_clip.demo import MODEL_DIR, demo_data, fade

RESULTS = Path(__file__).parent / "results" / "cli_presets.json"
DOMAINS = {"original": None, "faded": fade}


def write_folders(root: Path, domain: str) -> Path:
    """The domain's pool and test images as `root/<domain>/{train,test}/<class>/<n>.png`."""
    folder = root / domain
    for split, data in zip(("train", "test"), demo_data(DOMAINS[domain]), strict=True):
        for n, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
            path = folder / split / data.class_names[label] / f"{n}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    return folder


def cli(*args: str) -> str:
    """Run `peft-prompt-clip ARGS` as a user does, and return its standard output."""
    command = [sys.executable, "-m", "peft_prompt_clip", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def run(method: str, data: Path, seed: int, out: Path, base_to_novel: bool, extra: list[str]) -> dict[str, float]:
    """Train the preset (with the `extra` train flags) on `data` and evaluate it against zero-shot on its test
    images."""
    adapter = str(out / f"{method}-{'-'.join(extra)}-{data.name}-{seed}-{'b2n' if base_to_novel else 'all'}")
    train = ["train", "--method", method, "--model", str(MODEL_DIR), "--data", str(data), "--output", adapter, *extra]
    cli(*train, "--shots", "16", "--seed", str(seed), "-q", *(["--classes", "base"] if base_to_novel else []))
    evaluation = ["eval", "--adapter", adapter, "--data", str(data), "--split", "test", "--json", "-q"]
    scores = json.loads(cli(*evaluation, *(["--base-to-novel"] if base_to_novel else [])))
    if base_to_novel:
        return {f"{prompt} {k}": v for prompt, row in scores["base_to_novel"].items() for k, v in row.items()}
    return {prompt: scores[prompt]["top1"] for prompt in ("zero-shot", "learned prompt")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["tcp"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-args", default="", help="more train flags, e.g. '--epochs 10' (a row of its own)")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = {domain: write_folders(root, domain) for domain in DOMAINS}
        tables = [
            *((domain, folder, False) for domain, folder in folders.items()),
            ("faded b2n", folders["faded"], True),
        ]
        for method in args.methods:
            rows = {}
            for name, data, b2n in tables:
                runs = [
                    run(method, data, seed, root, b2n, args.train_args.split()) for seed in range(1, args.seeds + 1)
                ]
                values = {key: [r[key] for r in runs] for key in runs[0]}
                rows[name] = {k: {"mean": statistics.mean(v), "std": statistics.pstdev(v)} for k, v in values.items()}
                print(method, name, {k: round(v["mean"], 3) for k, v in rows[name].items()}, flush=True)
            results["runs"][f"{method} {args.train_args}".strip()] = rows
    results["machine"] = f"{platform.processor() or platform.machine()}, {platform.system()}"
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
