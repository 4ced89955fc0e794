"""The command line, as a user runs it: train, eval, predict on a generated image folder; one-line errors."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import threading

import pytest
from conftest import write_image_folder


def run(*args, check=True, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "peft_prompt_clip", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), per_class=10)


@pytest.fixture(scope="module")
def trained(clip_dir, image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    result = run(
        "train", "--model", clip_dir, "--data", image_folder, "--output", out, "--shots", "4", "--epochs", "2",
        "--optimizer", "adamw", "--n-ctx", "4", "--batch-size", "4",
    )  # fmt: skip
    assert "trained 2 epochs on 12 images of 3 classes" in result.stdout
    return out


def test_train_saves_an_adapter_with_its_classes(trained, clip_dir):
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["class_names"] == ["cat", "dog", "red car"]
    assert config["base_model_name_or_path"] == str(clip_dir)
    assert (trained / "adapter_model.safetensors").is_file() and (trained / "checkpoint.safetensors").is_file()


def test_train_opens_only_the_shots_it_uses(clip_dir, tmp_path):
    from peft_prompt_clip.data import few_shot, hold_out, load_data

    folder = write_image_folder(tmp_path / "images", per_class=10)
    every = load_data(folder)
    shots, rest = hold_out(every, 2)
    used = {*shots.images, *few_shot(rest, 2).images}  # the shots, and as many held out to choose the epoch kept
    for path in set(every.images) - used:  # every other image is unreadable: never opened, never warned of
        path.write_bytes(b"not an image")
    result = run(
        "train", "--model", clip_dir, "--data", folder, "--output", tmp_path / "a", "--shots", "2", "--epochs", "1",
        "--n-ctx", "2",
    )  # fmt: skip
    assert "trained 1 epochs on 6 images of 3 classes" in result.stdout
    assert "unreadable" not in result.stderr


def test_eval_prints_zero_shot_and_learned_and_writes_json(trained, image_folder):
    result = run("eval", "--adapter", trained, "--data", image_folder)
    assert "zero-shot" in result.stdout and "learned prompt" in result.stdout
    results = json.loads((trained / "eval_results.json").read_text())
    assert results["learned prompt"]["n"] == 30 - 12 - 12  # all the folder's images less those it trained on
    assert set(results["learned prompt"]["per_class"]) == {"cat", "dog", "red car"}
    assert 0 <= results["zero-shot"]["top1"] <= results["zero-shot"]["top5"] <= 1
    for method in ("zero-shot", "learned prompt"):  # confusion counts: every image once, the diagonal is top-1
        confusion = results[method]["confusion"]
        assert sum(c for _, _, c in confusion) == 6
        assert sum(c for t, p, c in confusion if t == p) / 6 == pytest.approx(results[method]["top1"])
    report = (trained / "eval_results.html").read_text()  # its charts: tests/test_report.py
    assert "<svg" in report and "Training" in report and "<h2>Confusion matrices" in report
    assert "results written to" in result.stdout and "eval_results.html (a report with charts)" in result.stdout


def test_eval_base_to_novel(trained, image_folder):
    result = run("eval", "--adapter", trained, "--data", image_folder, "--base-to-novel")
    rows = json.loads((trained / "eval_results.json").read_text())["base_to_novel"]
    assert set(rows) == {"zero-shot", "learned prompt"} and set(rows["learned prompt"]) == {"base", "novel", "HM"}
    assert "HM" in result.stdout


def test_predict_top_k(trained, image_folder):
    result = run(
        "predict", "--adapter", trained, "--top-k", "2", image_folder / "cat" / "0.png", image_folder / "dog" / "1.png"
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(image_folder / "cat" / "0.png"))
    assert len(lines[0].split(": ")[1].split(", ")) == 2


def test_predict_prints_the_first_result_before_reading_the_next_image(trained, image_folder, tmp_path):
    """The second image is a FIFO that only gets its bytes once the first image's line is out: a predict that printed
    at the end would wait for it forever (here: until the test gives up)."""
    fifo = tmp_path / "second.png"
    os.mkfifo(fifo)
    command = [
        sys.executable,
        "-m",
        "peft_prompt_clip",
        "predict",
        "--adapter",
        str(trained),
        image_folder / "cat" / "0.png",
        fifo,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
        ready, _, _ = select.select([process.stdout], [], [], 120)
        first = process.stdout.readline() if ready else ""
        image = (image_folder / "dog" / "1.png").read_bytes()  # fed once predict opens the FIFO (if it ever does)
        threading.Thread(target=fifo.write_bytes, args=(image,), daemon=True).start()
        rest, errors = process.communicate(timeout=240)
    assert first.startswith(f"{image_folder / 'cat' / '0.png'}: "), errors
    assert process.returncode == 0 and rest.startswith(f"{fifo}: "), errors


def test_help_on_every_command():
    for command in ("train", "eval", "predict", "demo"):
        assert "usage: peft-prompt-clip " + command in run(command, "--help").stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("train", "--model", "{clip}", "--data", "/no/such/folder", "--output", "{tmp}"),
            "No data folder at /no/such/folder",
        ),
        (("train", "--model", "/no/such/model", "--data", "{images}", "--output", "{tmp}"), "error:"),
        (("eval", "--adapter", "/no/such/adapter", "--data", "{images}"), "No adapter folder"),
        (("predict", "--adapter", "{adapter}", "/no/such/image.png"), "Cannot read image /no/such/image.png"),
    ],
)
def test_user_mistakes_are_one_line(args, message, clip_dir, image_folder, trained, tmp_path):
    values = {"clip": clip_dir, "images": image_folder, "adapter": trained, "tmp": tmp_path}
    result = run(*[a.format(**values) for a in args], check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if "error:" in line]) == 1


def test_mismatched_adapter_is_one_line(clip_dir, image_folder, tmp_path):
    from peft import get_peft_model
    from transformers import CLIPModel

    from peft_prompt_clip import PromptEmbeddingConfig

    config = PromptEmbeddingConfig(n_ctx=2, class_specific=True, class_names=["cat", "dog", "bird"])
    get_peft_model(CLIPModel.from_pretrained(clip_dir), config).save_pretrained(tmp_path / "csc")
    result = run("eval", "--adapter", tmp_path / "csc", "--data", image_folder, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "one context per class for ['cat', 'dog', 'bird']; it has none for ['red car']" in result.stderr
    # any subset of its classes is scored, each with its own context (CoCoOp's base-to-novel protocol, say)
    run("eval", "--adapter", tmp_path / "csc", "--data", image_folder, "--classes", "dog,cat")


@pytest.mark.parametrize("kind", ["siglip", "cocoop"])
def test_train_eval_predict_another_family_and_cocoop(kind, clip_dir, image_folder, tmp_path):
    from peft_prompt_clip.tiny import save_tiny_siglip

    model = save_tiny_siglip(tmp_path / "siglip") if kind == "siglip" else clip_dir
    flags = ("--conditional", "--meta-net-reduction", "4") if kind == "cocoop" else ()
    out = tmp_path / "adapter"
    result = run(
        "train", "--model", model, "--data", image_folder, "--output", out, "--shots", "4", "--epochs", "2",
        "--n-ctx", "4", "--batch-size", "4", "--lr", "0.01", *flags,
    )  # fmt: skip
    assert "trained 2 epochs on 12 images of 3 classes" in result.stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["conditional"] is (kind == "cocoop") and config["meta_net_reduction"] == (4 if flags else 16)
    assert config["auto_mapping"]["base_model_class"] == ("SiglipModel" if kind == "siglip" else "CLIPModel")
    result = run("eval", "--adapter", out, "--data", image_folder)
    assert "learned prompt" in result.stdout
    assert json.loads((out / "eval_results.json").read_text())["learned prompt"]["n"] == 6
    result = run("predict", "--adapter", out, "--top-k", "3", image_folder / "cat" / "0.png")
    assert sorted(part.rsplit(" ", 1)[0] for part in result.stdout.split(": ")[1].split(", ")) == [
        "cat",
        "dog",
        "red car",
    ]


HEAVY = ("torch", "transformers", "peft", "accelerate", "datasets", "numpy", "PIL", "huggingface_hub")


@pytest.mark.parametrize(
    "args, code",
    [
        (["--version"], 0),
        (["--help"], 0),
        (["train", "--help"], 0),
        (["distill", "--help"], 0),
        (["train", "--model", "m", "--data", "d", "--output", "o", "--bogus"], 2),
        (["train", "--epochs", "x"], 2),
        (["nonsense"], 2),
    ],
)
def test_help_version_and_argument_errors_import_nothing_heavy(args, code):
    """The parser is built from declarations without torch or PEFT: these answer at once (about 0.15 s against 3.8 s
    when the package imported torch, transformers and PEFT; measured in benchmarks/README.md, never timed here)."""
    script = (
        "import sys\nfrom peft_prompt_clip.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
        f"    code = e.code\nprint('exit', code, sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
    assert result.stderr.strip().splitlines()[-1] == f"exit {code} []", result.stderr
    if code == 2:
        assert "error:" in result.stderr


def test_every_part_of_an_adapter_has_its_flags():
    """The parser's adapter flags are declared without the parts' module (torch): they must be every part's fields."""
    from peft_prompt_clip.cli import ADAPTER_OPTIONS
    from peft_prompt_clip.variants import VARIANTS

    assert ADAPTER_OPTIONS == tuple(dict.fromkeys(field for variant in VARIANTS for field in variant.fields))


def test_a_bug_is_not_reported_as_a_user_mistake(monkeypatch):
    from peft_prompt_clip import cli, commands

    def broken(args):
        raise KeyError("an internal bug")

    monkeypatch.setattr(commands, "demo", broken)  # main() looks the command up when it runs it
    with pytest.raises(KeyError, match="an internal bug"):
        cli.main(["demo"])


def test_training_defaults_come_from_training_arguments():
    from peft_prompt_clip.cli import TRAINING_OPTIONS, build_parser
    from peft_prompt_clip.training import TrainingArguments

    args = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--output", "o", "--optimizer", "adamw"])
    given = {field for field in TRAINING_OPTIONS if getattr(args, field) is not None}
    assert given == {"optimizer"}  # everything else is left to TrainingArguments, whose lr is 0.002 for both
    assert TrainingArguments(output_dir="o", optimizer="adamw").lr == 0.002
    fields = set(TrainingArguments.__dataclass_fields__) - {"output_dir", "seed", "resume"}
    assert fields == set(TRAINING_OPTIONS)  # every option is exposed


def test_option_help_shows_each_fields_default():
    from peft_prompt_clip.cli import build_parser

    train = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    helps = {action.dest: action.help for action in train._actions}
    assert helps["prompt_depth"].endswith("(default: 1)")  # a number, never "on" (1 == True)
    assert helps["kg_weight"].endswith("(default: 0.0)") and helps["gradient_accumulation_steps"].endswith(
        "(default: 1)"
    )
    assert helps["class_specific"].endswith("(default: off)") and helps["share_prefix"].endswith("(default: on)")
    assert helps["class_token_position"].endswith("(default: end)")
    assert "default" not in helps["class_chunk_size"]  # unset: nothing to show


def test_train_then_eval_on_a_plain_folder_without_shots(clip_dir, tmp_path):
    """The README's two commands on a folder of class folders, no --shots: training leaves images it never sees (16
    a class at most, half the smallest class), some choose the epoch, eval measures the rest; a run whose loss does
    not move says so."""
    folder = write_image_folder(tmp_path / "images", per_class=12)
    result = run("train", "--model", clip_dir, "--data", folder, "--output", tmp_path / "a", "--epochs", "5",
                 "--n-ctx", "2", "--lr", "0")  # fmt: skip
    assert "train: 18 images of 3 classes (6 shots per class at most)" in result.stdout
    assert (
        "6 a class by default on data without splits (16 at most, half the smallest class's images)" in result.stdout
    )
    assert "validation: 12 images (4 per class at most) held out from the images not among the shots" in result.stdout
    assert re.search(
        r"validation accuracy \(12 held-out images\): zero-shot \('a photo of a \{\}.'\) [\d.]+", result.stdout
    )
    assert "warning: the training loss did not fall" in result.stdout and "try --optimizer adamw" in result.stdout
    result = run("eval", "--adapter", tmp_path / "a", "--data", folder)
    assert "evaluating 6 images of 3 classes" in result.stdout and "less the 30 images" in result.stdout
    assert "zero-shot prompt: 'a photo of a {}.' (--templates imagenet: the other)" in result.stdout
    from peft_prompt_clip.data import LabeledImages
    from peft_prompt_clip.training.record import describe_run

    data = LabeledImages(["a", "b"], ["x", "y"], [0, 1])
    for first, last, epochs, flat in [(1.6094, 1.6066, 200, True), (1.0, 1.1, 5, True), (1.6, 0.8, 200, False),
                                      (1.6, 1.6, 4, False)]:  # fmt: skip
        summary = {"epochs": epochs, "loss": last, "accuracy": 0.5, "first_loss": first}
        assert ("warning: the training loss did not fall" in describe_run(summary, data, 1, "out")) == flat


def test_a_folder_is_used_as_given_and_held_out_images_choose_the_epoch(clip_dir, tmp_path):
    """A folder of class folders is neither split behind the user's back for training (16 shots are 16 shots) nor for
    eval (all of it, less the images the adapter learned from); spare images choose the epoch kept."""
    folder = write_image_folder(tmp_path / "images", per_class=12)
    common = ("--model", clip_dir, "--data", folder, "--epochs", "2", "--n-ctx", "2", "--batch-size", "6")
    result = run("train", *common, "--shots", "12", "--output", tmp_path / "all")
    assert f"train: 36 images of 3 classes (12 shots per class at most) from {folder} (all of it" in result.stdout
    assert "validation: none (every image is a training shot, and there is no validation split)" in result.stdout
    assert not (tmp_path / "all" / "last").exists()
    result = run("eval", "--adapter", tmp_path / "all", "--data", folder, check=False)
    assert result.returncode == 2 and "Every image of the classes ['cat', 'dog', 'red car'] in" in result.stderr

    result = run("train", *common, "--shots", "6", "--output", tmp_path / "a")
    assert "validation: 12 images (4 per class at most) held out from the images not among the shots" in result.stdout
    numbers = r"zero-shot \('a photo of a \{\}.'\) [\d.]+, initial prompt [\d.]+, end of training [\d.]+, best [\d.]+"
    kept = re.search(
        rf"validation accuracy \(12 held-out images\): {numbers}: kept (the initial prompt \(epoch 0\)|epoch [12]) in",
        result.stdout,
    )
    assert kept and (tmp_path / "a" / "last" / "adapter_model.safetensors").is_file()
    used = json.loads((tmp_path / "a" / "training_log.json").read_text())["data"]
    assert len(used["images"]) == len(set(used["images"])) == 18 + 12  # the shots and the held-out images
    for adapter in (tmp_path / "a", tmp_path / "a" / "last"):  # the best epoch's and the end of training's
        result = run("eval", "--adapter", adapter, "--data", folder)
        assert "evaluating 6 images of 3 classes" in result.stdout
        assert "less the 30 images the adapter was trained and validated on" in result.stdout
        assert json.loads((adapter / "eval_results.json").read_text())["split"] == "all"
    result = run("eval", "--adapter", tmp_path / "a", "--data", folder, "--split", "test", check=False)
    assert result.returncode == 2 and "has no splits, so eval uses all of its images" in result.stderr

    result = run("train", *common, "--shots", "6", "--val-shots", "0", "--output", tmp_path / "a", "--overwrite")
    assert "validation: none (--val-shots 0)" in result.stdout and not (tmp_path / "a" / "last").exists()  # replaced
    (folder / "cat" / "11.png").unlink()  # cat: 11 images, all of them shots: the other classes validate
    result = run("train", *common, "--shots", "11", "--output", tmp_path / "b")
    held_out = "validation: 2 images (4 per class at most) held out from the images not among the shots"
    assert f"{held_out}; none of ['cat'], all of whose images are training shots" in result.stdout
    result = run("train", *common, "--shots", "12", "--val-shots", "2", "--output", tmp_path / "c", check=False)
    assert (
        result.returncode == 2
        and "no images left beside the training shots; add a validation split (a val/ folder), or train on fewer"
        in result.stderr
    )

    split = tmp_path / "split"
    write_image_folder(split / "train", per_class=5)
    write_image_folder(split / "val", per_class=3)
    common = ("--model", clip_dir, "--data", split, "--epochs", "1", "--n-ctx", "2")
    shutil.move(split / "val" / "dog", tmp_path / "dog")
    result = run("train", *common, "--output", tmp_path / "d", check=False)
    assert result.returncode == 2 and f"The validation split {split / 'val'} has no images of the classes ['dog']" in (
        result.stderr
    )
    shutil.move(tmp_path / "dog", split / "val" / "dog")
    result = run("train", *common, "--output", tmp_path / "d")
    assert f"train: 15 images of 3 classes from {split / 'train'}" in result.stdout
    assert f"validation: 9 images (4 per class at most) from {split / 'val'}" in result.stdout
    result = run("eval", "--adapter", tmp_path / "d", "--data", split, "--split", "val", check=False)
    assert result.returncode == 2 and "Every image of the classes ['cat', 'dog', 'red car']" in result.stderr  # chose


def test_json_quiet_and_plain_warnings(trained, image_folder, clip_dir, tmp_path):
    """--json prints the results alone on stdout (notes on stderr); -q drops notes and progress bars, not results;
    a warning is one plain line, not Python's `file:line: UserWarning:` form."""
    result = run("eval", "--adapter", trained, "--data", image_folder, "--json", "--output", tmp_path / "r.json")
    results = json.loads(result.stdout)
    assert results["learned prompt"]["n"] == 6 and 0 <= results["zero-shot"]["top1"] <= 1
    assert "evaluating 6 images" in result.stderr and "results written to" in result.stderr
    result = run("predict", "--adapter", trained, "--json", "--top-k", "2", image_folder / "cat" / "0.png")
    (row,) = json.loads(result.stdout)
    assert row["image"] == str(image_folder / "cat" / "0.png") and len(row["predictions"]) == 2
    assert {p["label"] for p in row["predictions"]} <= {"cat", "dog", "red car"}
    assert row["predictions"][0]["score"] >= row["predictions"][1]["score"]

    bars = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    folder = write_image_folder(tmp_path / "images", per_class=3)
    (folder / "cat" / "bad.png").write_bytes(b"not an image")
    command = [sys.executable, "-m", "peft_prompt_clip", "train", "--model", str(clip_dir), "--data", str(folder)]
    command += ["--epochs", "1", "--n-ctx", "2", "--shots", "2", "--output", str(tmp_path / "out")]
    loud = subprocess.run(command, capture_output=True, text=True, env=bars, timeout=300)
    quiet = subprocess.run([*command, "-q", "--overwrite"], capture_output=True, text=True, env=bars, timeout=300)
    assert loud.returncode == quiet.returncode == 0, quiet.stderr
    assert "training: 100%" in loud.stderr and "train: " in loud.stdout
    assert "training" not in quiet.stderr and "train: " not in quiet.stdout and "trained 1 epochs" in quiet.stdout
    for result in (loud, quiet):  # a skipped image is still said, in one plain line
        assert "warning: Skipped 1 unreadable image(s)" in result.stderr and "UserWarning" not in result.stderr


def test_a_hugging_face_dataset_as_data(clip_dir, tmp_path, monkeypatch):
    """--data takes a dataset folder written by `save_to_disk`, or one of data files that `datasets.load_dataset`
    reads (the call a Hub id goes through); its splits serve as train/val/test, its columns are found by type."""
    import datasets
    import numpy as np
    from PIL import Image

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    names = ["cat", "dog", "red car"]
    features = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(names=names)})
    rng = np.random.default_rng(0)

    def part(n):
        images = [Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)) for _ in range(n)]
        return datasets.Dataset.from_dict({"img": images, "kind": [i % 3 for i in range(n)]}, features=features)

    splits = datasets.DatasetDict({"train": part(12), "validation": part(6), "test": part(9)})
    splits.save_to_disk(str(tmp_path / "saved"))
    for name, dataset in splits.items():
        dataset.to_parquet(str(tmp_path / "files" / "data" / f"{name}-00000-of-00001.parquet"))
    for source, columns in ((tmp_path / "saved", ()), (tmp_path / "files", ("--image-column", "img"))):
        out = tmp_path / f"adapter-{source.name}"
        result = run(
            "train", "--model", clip_dir, "--data", source, "--shots", "2", "--epochs", "1", "--n-ctx", "2",
            "--output", out, *columns,
        )  # fmt: skip
        assert f"train: 6 images of 3 classes (2 shots per class at most) from {source}, its 'train' split" in (
            result.stdout
        )
        assert f"validation: 6 images (2 per class at most) from {source}, its 'validation' split" in result.stdout
        assert json.loads((out / "adapter_config.json").read_text())["class_names"] == names
        result = run("eval", "--adapter", out, "--data", source, *columns)
        assert f"evaluating 9 images of 3 classes from {source}, its 'test' split" in result.stdout
    result = run("eval", "--adapter", out, "--data", tmp_path / "files", "--label-column", "label", check=False)
    assert result.returncode == 2 and "no label column 'label'; its columns are ['img', 'kind']" in result.stderr
    result = run("eval", "--adapter", out, "--data", "nobody/no-such-dataset", check=False)
    assert result.returncode == 2 and "--data nobody/no-such-dataset: no such folder or CSV here" in result.stderr


def test_model_folders_and_outputs_are_checked(clip_dir, image_folder, tmp_path):
    """A relative --model folder is recorded by its absolute path (so eval works from any folder); a path-like --model
    that is not there, an empty --output and an --output that is a file are one-line errors."""
    common = ("--data", image_folder, "--epochs", "1", "--n-ctx", "2", "--shots", "2")
    shutil.copytree(clip_dir, tmp_path / "clip")
    run("train", "--model", "clip", *common, "--output", "out", cwd=tmp_path)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "clip").resolve())
    run("eval", "--adapter", tmp_path / "out", "--data", image_folder, "--output", tmp_path / "r.json")  # from here
    for model in ("./nope", "models/clip/nope"):
        result = run("train", "--model", model, *common, "--output", tmp_path / "x", check=False)
        assert result.returncode == 2 and f"No model folder at {model}" in result.stderr
    (tmp_path / "file").write_text("")
    for output, message in [(tmp_path / "file", "is a file, not a folder"), ("", "--output '' is empty")]:
        result = run("train", "--model", clip_dir, *common, "--output", output, check=False)
        assert result.returncode == 2 and message in result.stderr


def test_what_counts_as_a_hugging_face_dataset(tmp_path, monkeypatch):
    from peft_prompt_clip.sources import is_hf_dataset, load_hf_dataset

    folder = write_image_folder(tmp_path / "images", per_class=1)
    (folder / "extra.parquet").write_bytes(b"")  # a stray data file beside class folders: still an image folder
    assert not is_hf_dataset(str(folder))
    (tmp_path / "files" / "data").mkdir(parents=True)
    (tmp_path / "files" / "data" / "train-0.parquet").write_bytes(b"")
    assert is_hf_dataset(str(tmp_path / "files")) and is_hf_dataset("owner/name")
    assert not is_hf_dataset("my_images") and not is_hf_dataset("./missing/folder")  # mistyped paths
    import datasets

    class HubError(OSError):  # like huggingface_hub's HTTP errors: no constructor of one message
        def __init__(self, message, *, response):
            super().__init__(message)

    def unavailable(*args, **kwargs):
        raise HubError("503 Service Unavailable", response=None)

    monkeypatch.setattr(datasets, "load_dataset", unavailable)
    with pytest.raises(OSError, match="--data owner/name: no such folder or CSV here, and not loadable .* 503"):
        load_hf_dataset("owner/name", None)


def test_the_embedded_model_by_name(image_folder, tmp_path):
    """`--model fashion-clip` is the model shipped in the package (no download; the adapter records its folder),
    unless a folder of that name is where the command runs."""
    from peft_prompt_clip.demo import MODEL_DIR

    out = tmp_path / "adapter"
    common = ("--data", image_folder, "--epochs", "1", "--n-ctx", "2", "--shots", "2")
    run("train", "--model", "fashion-clip", *common, "--output", out, cwd=tmp_path)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(MODEL_DIR.resolve())
    (tmp_path / "fashion-clip").mkdir()  # a folder of that name, not a model: it is what the user means
    result = run("train", "--model", "fashion-clip", *common, "--output", tmp_path / "b", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
