"""The embedded default: the demo learns prompts that beat zero-shot under the domain shift; pretraining runs."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
from transformers import CLIPModel

from peft_prompt_clip.demo import CLASSES, pretrain, read_idx


def test_demo_learns_under_the_domain_shift(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "peft_prompt_clip", "demo", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "eval_results.json").read_text())["rows"]
    zero_shot, shared, csc = (rows[k]["faded"] for k in rows)
    assert shared > zero_shot + 0.1 and csc > zero_shot + 0.3, rows
    assert re.search(r"zero-shot 'a photo of a \{\}.'\s+0\.\d+\s+0\.\d+", result.stdout)
    # each progress bar says which part of the demo it is (unless bars are off)
    if "TQDM_DISABLE" not in os.environ:
        assert "CoOp CSC, 16 faded shots: training" in result.stderr
        assert "zero-shot, faded test images: evaluating" in result.stderr
    for name in ("coop", "coop-csc"):
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert config["class_names"] == CLASSES


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_pretraining_runs_on_fashion_mnist_files(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (40, 28, 28)), np.arange(40) % 10
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    summary = pretrain(tmp_path / "model", epochs=1, batch_size=16, data=tmp_path)
    assert summary["steps"] == 3 and np.isfinite(summary["loss"])
    model = CLIPModel.from_pretrained(tmp_path / "model")
    assert model.config.vision_config.image_size == 28
