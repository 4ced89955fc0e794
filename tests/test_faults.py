"""Faults: the trainer killed (SIGKILL) at random moments and during checkpoint writes, resumed each time, ends with
the adapter of an uninterrupted run; failed and concurrent adapter saves never leave mixed or partial files."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_image_folder
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import CLIPModel

from peft_prompt_clip import load_prompt_model
from peft_prompt_clip.loading import check_adapter_weights, read_adapter_config
from peft_prompt_clip.tiny import clip_config

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), per_class=16)


def train_command(clip_dir, images, output, resume=False) -> list[str]:
    command = [sys.executable, "-m", "peft_prompt_clip", "train", "--model", str(clip_dir), "--data", str(images)]
    command += ["--output", str(output), "--epochs", "100", "--optimizer", "adamw", "--lr", "0.05", "--n-ctx", "4"]
    command += ["--batch-size", "4", "--augment", "--warmup-epochs", "0", "--no-early-stop"]  # killed anywhere in 100
    return command + (["--resume"] if resume else [])


def checkpoint_epoch(output: Path) -> int:
    try:
        with safe_open(str(output / "checkpoint.safetensors"), "pt") as f:
            return int(f.metadata()["epoch"])
    except (FileNotFoundError, OSError, SafetensorError):
        return 0


def test_sigkill_at_random_moments_loses_nothing(clip_dir, images, tmp_path):
    subprocess.run(train_command(clip_dir, images, tmp_path / "reference"), env=ENV, check=True, capture_output=True)
    reference = load_file(tmp_path / "reference" / "adapter_model.safetensors")

    rng = random.Random(0)
    output = tmp_path / "killed"
    targets = sorted(rng.sample(range(5, 95), 4))  # kill a little after these epochs' checkpoints
    for target in targets:
        resume = checkpoint_epoch(output) > 0
        process = subprocess.Popen(train_command(clip_dir, images, output, resume), env=ENV, stderr=subprocess.DEVNULL)
        while checkpoint_epoch(output) < target and process.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.1))  # somewhere in the next epoch, or in its checkpoint write
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
        assert not (output / "adapter_model.safetensors").exists()
        assert checkpoint_epoch(output) >= target
    subprocess.run(train_command(clip_dir, images, output, resume=True), env=ENV, check=True, capture_output=True)
    assert not [p for p in output.glob(".*tmp")], "a temporary checkpoint was left behind"
    final = load_file(output / "adapter_model.safetensors")
    assert final.keys() == reference.keys() and all(torch.equal(final[k], v) for k, v in reference.items())


DIE_WHILE_WRITING = """
import os, signal, sys
import safetensors.torch
import peft_prompt_clip.training.checkpoints as checkpoints
real = safetensors.torch.save_file
calls = 0
def die_halfway(tensors, path, metadata=None):
    global calls
    calls += 1
    if calls == {epoch}:  # write half of this checkpoint, then die
        real(tensors, path, metadata=metadata)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real(tensors, path, metadata=metadata)
checkpoints.save_file = die_halfway
from peft_prompt_clip.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_while_writing_a_checkpoint(clip_dir, images, tmp_path):
    subprocess.run(train_command(clip_dir, images, tmp_path / "reference"), env=ENV, check=True, capture_output=True)
    reference = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    output = tmp_path / "killed"
    for epoch in (3, 5):  # dies writing the checkpoint of epoch 3, then (resumed) of epoch 3 + 5
        command = train_command(clip_dir, images, output, resume=epoch != 3)[3:]
        result = subprocess.run([sys.executable, "-c", DIE_WHILE_WRITING.format(epoch=epoch), *command], env=ENV)
        assert result.returncode == -signal.SIGKILL
        load_file(output / "checkpoint.safetensors")  # the previous checkpoint, whole
        assert len(list(output.glob(".checkpoint.safetensors.*.tmp"))) == 1  # the dead writer's half file
    subprocess.run(train_command(clip_dir, images, output, resume=True), env=ENV, check=True, capture_output=True)
    assert not list(output.glob(".*.tmp")), "the next write removes what a killed writer left"
    final = load_file(output / "adapter_model.safetensors")
    assert all(torch.equal(final[k], v) for k, v in reference.items())


FILE_SIZE_LIMIT = """
import resource, signal, sys
from peft import get_peft_model
from transformers import CLIPModel
from peft_prompt_clip import PromptEmbeddingConfig
from peft_prompt_clip.storage import save_adapter
from peft_prompt_clip.tiny import clip_config
save_adapter(get_peft_model(CLIPModel(clip_config()), PromptEmbeddingConfig(n_ctx=4)), sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # from now on no file may grow past 2000 bytes: "disk full"
try:
    save_adapter(get_peft_model(CLIPModel(clip_config()), PromptEmbeddingConfig(n_ctx=20)), sys.argv[1])
except OSError as exc:
    print("failed:", exc)
"""


def test_failed_save_keeps_the_previous_adapter(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT, str(tmp_path)], env=ENV, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "failed: [Errno 27] File too large" in result.stdout
    config = read_adapter_config(tmp_path)
    assert config.n_ctx == 4
    check_adapter_weights(tmp_path, config)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".save-")]


SAVER = """
import sys
from peft import get_peft_model
from transformers import CLIPModel
from peft_prompt_clip import PromptEmbeddingConfig
from peft_prompt_clip.storage import save_adapter
from peft_prompt_clip.tiny import clip_config
model = get_peft_model(CLIPModel(clip_config()), PromptEmbeddingConfig(n_ctx=int(sys.argv[1])))
for _ in range(60):
    save_adapter(model, sys.argv[2])
"""


def test_two_processes_saving_to_one_folder_never_mix(tmp_path):
    savers = [
        subprocess.Popen([sys.executable, "-c", SAVER, str(n), str(tmp_path)], env=ENV, stderr=subprocess.PIPE)
        for n in (3, 5)
    ]
    loads = 0
    while any(p.poll() is None for p in savers):  # load while they write: always a matching, whole pair
        if (tmp_path / "adapter_config.json").exists():
            model = load_prompt_model(CLIPModel(clip_config()), str(tmp_path))
            assert model.peft_config["default"].n_ctx in (3, 5)
            loads += 1
    assert loads >= 3
    assert [p.returncode for p in savers] == [0, 0], [p.stderr.read() for p in savers]
    config = read_adapter_config(tmp_path)
    check_adapter_weights(tmp_path, config)
    assert config.n_ctx in (3, 5)


def test_a_full_disk_for_the_image_cache_is_an_error_before_anything_is_written(tmp_path, monkeypatch):
    """A table too large for memory is a mapped file whose space is reserved first: no room is a clear error then,
    not a crash (SIGBUS) at a later write into the mapping; the file is gone either way."""
    import errno

    import peft_prompt_clip.training.cache as cache

    monkeypatch.setattr(cache, "MEMORY_BYTES", 1024)
    table = cache.RowCache(4, tmp_path)
    table.put([0, 1], torch.ones(2, 3, 100))  # 4,800 bytes: mapped
    assert table.mapped and table.has([0, 1]) and not table.has([2])
    assert torch.equal(table.get([1, 0]), torch.ones(2, 3, 100)) and not list(tmp_path.iterdir())

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache.os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"No room for the run's image cache \(0.0 GiB\) in .*: No space left on device"):
        cache.RowCache(4, tmp_path).put([0], torch.ones(1, 3, 100))
    assert not list(tmp_path.iterdir())
