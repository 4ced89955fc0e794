"""How long the command line takes before it answers: `--version`, `--help`, an argument error, and `predict` of one
image with an adapter on the embedded model (`fashion-clip`), each a fresh process as a user runs it.

Run: python benchmarks/cli_startup.py [--before DIR]   (a minute; on a quiet machine)

`--before DIR` times the same commands with the package of another checkout (e.g. `git worktree add DIR <commit>`)
in the same run, for a before/after table. Medians and ranges over `--repeats` runs each, after one warm-up run;
writes benchmarks/results/cli_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).parent / "results" / "cli_startup.json"
ROOT = Path(__file__).resolve().parent.parent


def seconds(command: list[str], package_root: Path, repeats: int, cwd: Path) -> dict[str, float]:
    """Median, min and max wall time of `python -m peft_prompt_clip COMMAND` with the package of `package_root`, run
    in `cwd` (a folder without the package: `-m` puts the working folder first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(package_root), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    times = []
    for n in range(repeats + 1):
        start = time.perf_counter()
        command_line = [sys.executable, "-m", "peft_prompt_clip", *command]
        result = subprocess.run(command_line, capture_output=True, env=env, cwd=cwd)
        if n:  # the first run warms the disk cache
            times.append(time.perf_counter() - start)
        if result.returncode not in (0, 2):
            raise RuntimeError(result.stderr.decode()[-2000:])
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="a checkout whose package to time too")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        Image.fromarray(np.full((28, 28, 3), 128, np.uint8)).save(tmp / "image.png")
        model = ROOT / "peft_prompt_clip" / "assets" / "fashion-clip"
        adapter = tmp / "adapter"
        script = (
            "from peft import get_peft_model\nfrom transformers import CLIPModel\n"
            "from peft_prompt_clip import PromptEmbeddingConfig\n"
            f"config = PromptEmbeddingConfig(n_ctx=4, class_names=['shirt', 'bag', 'boot'])\n"
            f"get_peft_model(CLIPModel.from_pretrained({str(model)!r}), config).save_pretrained({str(adapter)!r})"
        )
        maker = args.before or ROOT  # an adapter both packages load: the older one's
        subprocess.run(
            [sys.executable, "-c", script], check=True, env={**os.environ, "PYTHONPATH": str(maker)}, cwd=tmp
        )
        commands = {
            "--version": ["--version"],
            "--help": ["--help"],
            "train --help": ["train", "--help"],
            "an argument error": ["train", "--epochs", "x"],
            "predict of one image": [
                "predict",
                "--adapter",
                str(adapter),
                "--model",
                str(model),
                str(tmp / "image.png"),
            ],
        }
        roots = {"after": ROOT, **({"before": args.before.resolve()} if args.before else {})}
        rows = {}
        for name, command in commands.items():
            rows[name] = {label: seconds(command, root, args.repeats, tmp) for label, root in roots.items()}
            print(
                name,
                {label: f"{r['median']:.2f} s ({r['min']:.2f}-{r['max']:.2f})" for label, r in rows[name].items()},
            )
    RESULTS.parent.mkdir(exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
    RESULTS.write_text(json.dumps({"machine": machine, "repeats": args.repeats, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
