"""Fitting the ecosystem: Accelerate's launch settings are honoured, trackers are named as transformers' Trainer
names them, every CLI option has help, and a DatasetDict says which splits it has."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from peft_prompt_clip import TrainingArguments
from peft_prompt_clip.cli import build_parser


def test_report_to_none_all_and_a_missing_tracker():
    assert TrainingArguments(output_dir="o", report_to="none").report_to is None
    assert TrainingArguments(output_dir="o", report_to="all").report_to == "all"
    with pytest.raises(ValueError, match="report_to must be 'none', 'all' or one of"):
        TrainingArguments(output_dir="o", report_to="tensorbored")
    with pytest.raises(ValueError, match="'aim' is not installed|aim is not installed"):
        TrainingArguments(output_dir="o", report_to="aim")


def test_mixed_precision_comes_from_the_launch_configuration(clip_dir, tmp_path):
    # in its own process: Accelerate keeps one mixed-precision setting per process
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_trainer import args, student, teacher_data
from peft_prompt_clip.training import PromptTrainer, TrainingArguments
model, processor = student({str(clip_dir)!r})
recipe = TrainingArguments(output_dir={str(tmp_path)!r}, epochs=1, augment=False)
print(recipe.mixed_precision, PromptTrainer(model, processor, teacher_data({str(clip_dir)!r}, n=8), recipe)
      .accelerator.mixed_precision)
"""
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16"}  # what `accelerate launch --mixed_precision bf16` sets
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["None", "bf16"]


def test_every_option_has_help_and_there_is_a_version(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, command in commands.items()
        for action in command._actions
        if not action.help
    ]
    assert missing == []
    with pytest.raises(SystemExit):
        parser.parse_args(["--version"])
    assert capsys.readouterr().out.startswith("peft-prompt-clip 0.")


def test_a_dataset_dict_names_its_splits():
    datasets = pytest.importorskip("datasets")
    from peft_prompt_clip import from_hf_dataset

    data = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": [0], "label": [0]})})
    with pytest.raises(ValueError, match=r"DatasetDict with the splits \['train'\]; pass one of them"):
        from_hf_dataset(data)


def test_the_package_imports_without_fcntl():
    # Windows has no fcntl: the folder lock comes from filelock (msvcrt there), nothing else needs it
    script = "import sys; sys.modules['fcntl'] = None; import peft_prompt_clip.storage, peft_prompt_clip; print('ok')"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
