"""When does learning stop? Every preset trained as `peft-prompt-clip train --method NAME --shots S` does it (the
command's own code, in this process, with its defaults: the preset's epochs, at least 400 optimizer steps, held-out
shots choosing the epoch kept, evaluated every tenth of the run), on the accuracy benchmark's faded Fashion-MNIST
(`fashion-clip`), 1, 4 and 16 shots, seeds 1-3, every epoch run (`--no-early-stop`). At every held-out evaluation
the adapter as it is then is also scored on the 1,000 test images, so that any stopping rule can be replayed
exactly afterwards: a run stopped at an evaluation keeps the best held-out candidate up to there, the same adapter the
full run had at that epoch (the learning rate's schedule is the run's whole ceiling either way).

Recorded per run: the epochs, each evaluation (epoch, held-out accuracy and loss, test accuracy), the epoch kept and
its test accuracy, and the seconds. Then each patience P (stop after P evaluations without a held-out gain) is
replayed: the epochs it would run and the test accuracy of what it keeps, against today's.

Writes benchmarks/results/early_stopping.json.

Run: python benchmarks/early_stopping.py   (about 20 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from cli_presets import write_folders

from peft_prompt_clip import cli
from peft_prompt_clip.data import load_image_folder, open_image
from peft_prompt_clip.demo import MODEL_DIR
from peft_prompt_clip.methods import METHODS
from peft_prompt_clip.training import PromptTrainer
from peft_prompt_clip.training.callbacks import BestEpoch

PATIENCES = (1, 2, 3, 4, 5)


class Recorder:
    """Scores the adapter on the test images at each held-out evaluation of the runs in this process."""

    def __init__(self, test_folder: Path) -> None:
        self.test = load_image_folder(test_folder)
        self.trace: list[dict] = []
        self.inputs = None

    def install(self) -> None:
        consider, recorder = BestEpoch.consider, self

        def spy(best: BestEpoch, log: dict, epoch):
            scores = consider(best, log, epoch)
            recorder.trace.append({"epoch": epoch, **scores, "test": recorder.test_accuracy(best.evaluate.__self__)})
            return scores

        BestEpoch.consider = spy

    @torch.no_grad()
    def test_accuracy(self, trainer: PromptTrainer) -> float:
        if self.inputs is None:
            images = [open_image(path) for path in self.test.images]
            self.inputs = dict(trainer.processor(images=images, return_tensors="pt"))
        assert list(self.test.class_names) == list(trainer.data.class_names)
        prompted = trainer.images.prompted
        options = {"adapter_name": trainer.adapter_name} if prompted else {"enabled": False}
        features = trainer.encoder.image_features(self.inputs, **options)
        logits = trainer._classifier().image_logits(features)
        return float((logits.argmax(-1) == torch.tensor(self.test.labels)).float().mean())


def replay(trace: list[dict], patience: int) -> tuple[int, float] | None:
    """The epoch a run stopped by `patience` ends at, and the test accuracy of the candidate it keeps; None for a run
    whose adapter is PromptSRC's mean over all the recipe's epochs (a candidate only a full run has)."""
    if any(point["epoch"] == "average" for point in trace):
        return None
    best, since = None, 0
    for point in trace:
        if best is None or (point["accuracy"], -point["loss"]) > (best["accuracy"], -best["loss"]):
            best, since = point, 0
        else:
            since += 1
            if since == patience:
                break
    return point["epoch"], best["test"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--shots", nargs="*", type=int, default=[1, 4, 16])
    parser.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3])
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "early_stopping.json"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    faded = write_folders(root, "faded")
    recorder = Recorder(faded / "test")
    recorder.install()
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.exists() else {"runs": {}}
    results.update(device="cpu", torch=torch.__version__, python=platform.python_version())
    for method in args.methods:
        for shots in args.shots:
            for seed in args.seeds:
                key = f"{method}, {shots} shots, seed {seed}"
                out = root / key.replace(", ", "-").replace(" ", "")
                recorder.trace = []
                start = time.perf_counter()
                train = [
                    "train",
                    "-q",
                    "--no-early-stop",
                    "--method",
                    method,
                    "--model",
                    str(MODEL_DIR),
                    "--data",
                    str(faded / "train"),
                ]
                code = cli.main([*train, "--output", str(out), "--shots", str(shots), "--seed", str(seed)])
                assert code == 0, key
                log = json.loads((out / "training_log.json").read_text())
                kept = log["best"]["epoch"]
                kept_test = next(p["test"] for p in recorder.trace[::-1] if p["epoch"] == kept)
                results["runs"][key] = {
                    "method": method, "shots": shots, "seed": seed, "epochs": log["epochs"],
                    "seconds": time.perf_counter() - start, "trace": recorder.trace,
                    "kept": kept, "kept test": kept_test,
                    "replayed": {str(p): replay(recorder.trace, p) for p in PATIENCES},
                }  # fmt: skip
                print(key, "epochs", log["epochs"], "kept", kept, f"test {kept_test:.3f}", flush=True)
                output.write_text(json.dumps(results, indent=1) + "\n")
    results["summary"] = summarize(results["runs"])
    output.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["summary"], indent=1))


def peak(trace: list[dict], score) -> int:
    """The epoch of the trace's best evaluation by `score` (the first, at a tie), PromptSRC's average left out."""
    return max((p for p in trace if p["epoch"] != "average"), key=score)["epoch"]


def summarize(runs: dict) -> dict:
    """Per method and shots, over seeds: the epochs, the held-out peak's epoch, today's test accuracy (mean, std), and
    for each patience the fraction of epochs it runs and its test accuracy."""
    table: dict = {}
    for run in runs.values():
        table.setdefault(f"{run['method']}, {run['shots']} shots", []).append(run)
    summary = {}
    for name, group in table.items():
        today = [r["kept test"] for r in group]
        row = {
            "epochs": group[0]["epochs"],
            "held-out peak epochs": [peak(r["trace"], lambda p: (p["accuracy"], -p["loss"])) for r in group],
            "test peak epochs": [peak(r["trace"], lambda p: p["test"]) for r in group],
            "today": {"mean": statistics.mean(today), "std": statistics.pstdev(today)},
        }
        for patience in PATIENCES:
            stops = [r["replayed"][str(patience)] for r in group]
            if None in stops:
                row[f"patience {patience}"] = "n/a: the adapter is the mean over every epoch (Gaussian average)"
                continue
            accuracy = [test for _, test in stops]
            row[f"patience {patience}"] = {
                "epochs run (fraction)": statistics.mean(
                    e / r["epochs"] for (e, _), r in zip(stops, group, strict=True)
                ),
                "test mean": statistics.mean(accuracy),
                "within one std": statistics.mean(accuracy) >= row["today"]["mean"] - row["today"]["std"],
            }
        summary[name] = row
    return summary


if __name__ == "__main__":
    main()
