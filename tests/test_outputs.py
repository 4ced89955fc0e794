"""Nothing a user gives the command line destroys data: outputs are checked before any work (never a special file,
never inside an input), and a training run holds its output folder (a second run into it is refused at once, and a
finished run is replaced only when asked). FIFOs are made in temporary folders, never at system paths."""

from __future__ import annotations

import os
import stat

import pytest
from conftest import write_image_folder
from test_cli import run

from peft_prompt_clip.storage import atomic_path, run_lock


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), per_class=6)


@pytest.fixture(scope="module")
def adapter(clip_dir, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    run(
        "train",
        "--model",
        clip_dir,
        "--data",
        images,
        "--output",
        out,
        "--shots",
        "2",
        "--epochs",
        "1",
        "--n-ctx",
        "2",
    )
    return out


def one_line_error(result, message):
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_eval_never_writes_over_a_special_file_a_folder_or_the_adapter(adapter, images, tmp_path):
    fifo = tmp_path / "results.json"
    os.mkfifo(fifo)
    one_line_error(run("eval", "--adapter", adapter, "--data", images, "--output", fifo, check=False), "is a FIFO")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    os.mkfifo(tmp_path / "page.html")  # the report beside the results
    result = run("eval", "--adapter", adapter, "--data", images, "--output", tmp_path / "page.json", check=False)
    one_line_error(result, f"--output {tmp_path / 'page.html'} is a FIFO, not a regular file")
    assert not (tmp_path / "page.json").exists() and stat.S_ISFIFO(os.lstat(tmp_path / "page.html").st_mode)
    one_line_error(
        run("eval", "--adapter", adapter, "--data", images, "--output", adapter, check=False), "is a folder"
    )
    weights = adapter / "adapter_model.safetensors"
    before = weights.read_bytes()
    for output, flag in [(weights, "--adapter"), (images / "cat" / "results.json", "--data")]:
        result = run("eval", "--adapter", adapter, "--data", images, "--output", output, check=False)
        one_line_error(result, f"--output {output} would write into {flag}")
    assert weights.read_bytes() == before and not (images / "cat" / "results.json").exists()
    run("eval", "--adapter", adapter, "--data", images)  # the default, beside the adapter's files, is its own
    assert (adapter / "eval_results.json").is_file() and (adapter / "eval_results.html").is_file()


def test_training_never_writes_into_its_data_or_over_a_run(clip_dir, images, tmp_path):
    common = ("--model", clip_dir, "--data", images, "--shots", "2", "--epochs", "1", "--n-ctx", "2")
    inside = images / "runs"
    one_line_error(run("train", *common, "--output", inside, check=False), f"would write into --data {images}")
    assert not inside.exists()
    out = tmp_path / "run"
    run("train", *common, "--output", out)
    weights = (out / "adapter_model.safetensors").read_bytes()
    again = run("train", *common, "--seed", "2", "--output", out, check=False)
    one_line_error(again, f"--output {out} holds a run (adapter_model.safetensors); pass --resume")
    assert (out / "adapter_model.safetensors").read_bytes() == weights
    run("train", *common, "--seed", "2", "--output", out, "--overwrite")
    assert (out / "adapter_model.safetensors").read_bytes() != weights


def test_a_second_run_into_a_folder_in_use_is_refused_at_once(clip_dir, images, tmp_path):
    out = tmp_path / "busy"
    common = ("--model", clip_dir, "--data", images, "--shots", "2", "--epochs", "1", "--n-ctx", "2")
    with run_lock(out):  # as a run in another process holds it
        result = run("train", *common, "--output", out, check=False)
        one_line_error(result, f"{out} is the output of another training run in progress")
        assert not (out / "checkpoint.safetensors").exists()
        with pytest.raises(BlockingIOError):  # in this process too
            with run_lock(out):
                pass
    run("train", *common, "--output", out)  # released: the next run goes ahead
    assert (out / "adapter_model.safetensors").is_file()


def test_an_atomic_write_refuses_a_special_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="is a FIFO, not a regular file: refusing to replace it"):
        with atomic_path(fifo) as tmp:
            tmp.write_text("x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    link = tmp_path / "link"
    link.symlink_to(fifo)  # a link is replaced, never written through
    with atomic_path(link) as tmp:
        tmp.write_text("x")
    assert link.read_text() == "x" and not link.is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode)
