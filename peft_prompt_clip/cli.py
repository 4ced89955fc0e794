"""The `peft-prompt-clip` command: train, eval, predict, interpret, push and demo. Each command calls the same
functions as the Python API; user mistakes end in one line on stderr and exit status 2, anything else is a bug and
shows its traceback."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import functools
import json
import math
import os
import random
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from . import __version__
from .classifier import CLIP_TEMPLATE, IMAGENET_TEMPLATES, PromptClassifier, describe_templates
from .config import PromptEmbeddingConfig, printable
from .data import LabeledImages, drop_unreadable, open_image
from .distill import load_teacher, process_state, pseudo_labeled
from .errors import TrainingDivergedError
from .evaluation import against_zero_shot
from .hub import RESULTS_NAME
from .loading import get_prompt_model, load_base_model, load_prompt_model, read_adapter_config, resolve_adapter
from .methods import METHODS, method_settings
from .progress import disable_progress_bars, enable_progress_bars, progress
from .report import report_path, save_results
from .sources import DataSource, unlabeled_images
from .storage import check_output, run_lock
from .training import CHECKPOINT_NAME, PromptTrainer, TrainingArguments, bounded_epochs, coop_epochs, view_seeds
from .training.arguments import MIN_STEPS, STEP_BUDGET
from .training.record import describe_held_out, describe_run, read_log, valid_log
from .variants import VARIANTS

#: What the CLI reports in one line: the package's own errors and the user mistakes the libraries signal (a bad value,
#: a missing file or model, a damaged safetensors file). Anything else is a bug, and shows its traceback.
USER_ERRORS = (ValueError, OSError, TrainingDivergedError, SafetensorError)

#: A command: its parsed arguments in, its results out
Command = Callable[[argparse.Namespace], Any]

#: The `train` options that set a `PromptEmbeddingConfig` field: the fields of the adapter's parts (their help text is
#: the field's); unset ones take `--method`'s.
ADAPTER_OPTIONS = tuple(dict.fromkeys(field for variant in VARIANTS for field in variant.fields))
#: The flags whose name is not the field's
ADAPTER_FLAGS = {"class_token_position": "--position", "class_specific": "--csc"}

#: The `train` options that set a `TrainingArguments` field: the fields with a help text (the flag's); their defaults
#: are the fields'.
TRAINING_OPTIONS = tuple(f.name for f in dataclasses.fields(TrainingArguments) if "help" in f.metadata)


#: Where notes (what a command used, where it wrote) go: "stdout", "stderr" (under --json, whose output is the
#: results alone), or None (under -q). Set by `main`.
_notes: str | None = "stdout"


def _say(text: str) -> None:
    if _notes and os.environ.get("RANK", "0") == "0":  # once under `accelerate launch`
        print(text, file=getattr(sys, _notes))


def _data_source(args: argparse.Namespace) -> DataSource:
    """`--data` (with `--dataset-config`, `--image-column`, `--label-column` and `--classes`), resolved."""
    return DataSource(args.data, args.dataset_config, args.image_column, args.label_column, args.classes)


def _holds_output(*reads: str) -> Callable[[Command], Command]:
    """A training command's `--output`, checked and held for the command's whole run (see [`run_lock`]): a folder,
    in none of what the command reads (the flags `reads`), and without a run in it unless `--resume` continues it or
    `--overwrite` replaces it."""

    def holding(command: Command) -> Command:
        @functools.wraps(command)
        def run(args: argparse.Namespace) -> Any:
            output = check_output(
                args.output, [(flag, getattr(args, flag[2:].replace("-", "_"))) for flag in reads], True
            )
            # the main process by the launcher's rank: accelerate is not started yet
            with run_lock(output, main=os.environ.get("RANK", "0") == "0"):
                previous = [
                    name for name in ("adapter_model.safetensors", CHECKPOINT_NAME) if (output / name).exists()
                ]
                if previous and not (args.resume or args.overwrite):
                    raise ValueError(
                        f"--output {args.output} holds a run ({previous[0]}); pass --resume to continue it, "
                        "--overwrite to replace it, or give another folder."
                    )
                return command(args)

        return run

    return holding


def _default_epochs(args: argparse.Namespace, data: LabeledImages, most: int | None) -> None:
    """Unless `--epochs` is given, set it: the recipe's (the preset's, or CoOp's by shots), raised on few images to
    [`MIN_STEPS`] optimizer steps and cut on many to about `most` (see [`bounded_epochs`]); said when changed."""
    if args.epochs is not None:
        return
    preset = METHODS[args.method].training
    recipe = preset.get("epochs") or coop_epochs(max(data.counts()))
    batch_size = args.batch_size or preset.get("batch_size", 32)
    args.epochs = bounded_epochs(recipe, len(data), batch_size, most)
    if args.epochs != recipe:
        per_epoch = math.ceil(len(data) / batch_size)
        bound = f"at least {MIN_STEPS}" if args.epochs > recipe else f"at most about {most:,}"
        _say(
            f"epochs: {args.epochs}, {args.epochs * per_epoch:,} optimizer steps in batches of {batch_size} (the "
            f"recipe's {recipe} epochs on {len(data)} images take {recipe * per_epoch:,}; a run takes {bound} steps "
            "unless --epochs is given)"
        )


def method_fields(args: argparse.Namespace, num_classes: int, model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The adapter and training fields of `train`: `--method`'s preset, each field given by its own flag instead."""
    given = {name: getattr(args, name) for name in (*ADAPTER_OPTIONS, *TRAINING_OPTIONS)}
    given = {name: value for name, value in given.items() if value is not None}
    return method_settings(args.method, num_classes, model, args.epochs, given)


@_holds_output("--data", "--model")
def train(args: argparse.Namespace) -> dict[str, Any]:
    """Learn a prompt adapter on `--data` and save it in `--output`."""
    source = _data_source(args)
    run = source.training(args.shots, args.val_shots, args.seed)
    for note in run.notes:
        _say(note)
    data, val = run.train, run.val
    _default_epochs(args, data, most=None)
    model, processor = load_base_model(args.model)
    adapter, settings = method_fields(args, len(data.class_names), model)
    if settings.get("distill_weight"):
        raise ValueError("--distill-weight learns a teacher's probabilities: use `peft-prompt-clip distill`.")
    config = PromptEmbeddingConfig(**adapter, class_names=data.class_names, init_seed=args.seed)
    model = get_prompt_model(model, config)
    training = TrainingArguments(
        output_dir=args.output,
        seed=args.seed,
        resume=args.resume,
        **settings,
    )
    shown = {k: v for k, v in {**adapter, **settings}.items() if k != "hand_template"}
    settings_text = ", ".join(f"{k}={v}" for k, v in shown.items())
    _say(f"method: {METHODS[args.method].name} ({config.method} adapter){'; ' if shown else ''}{settings_text}")
    # which images trained and chose the adapter, so that eval on them can leave them out
    record = {"source": source.key, "images": sorted(run.names)}
    trainer = PromptTrainer(model, processor, data, training, eval_data=val, data_record=record)
    summary = trainer.train()
    if trainer.accelerator.is_main_process:
        print(describe_run(summary, data, trainer.accelerator.num_processes, args.output))
        if "eval" in summary:
            print(describe_held_out(summary["eval"], args.output, training.hand_template, config.ctx_init))
    return summary


@_holds_output("--teacher", "--model", "--data", "--labeled", "--eval-data")
def distill(args: argparse.Namespace) -> dict[str, Any]:
    """Learn a student's prompt adapter from a teacher's class probabilities on unlabeled `--data` (PromptKD), or
    from its most confident guesses (`--self-train`), and save it in `--output`. Unless `--epochs` is given, the
    recipe's epochs, fewer on many images: about 10,000 steps at most."""
    if args.self_train is not None and args.self_train < 1:
        raise ValueError(f"--self-train takes the K >= 1 most confident images per class, got {args.self_train}.")
    images, note = unlabeled_images(args.data, args.dataset_config, args.image_column)
    _say(note)
    count = len(images) // 10 if args.val_images is None else args.val_images
    if not 0 <= count < len(images):
        raise ValueError(f"--val-images must be from 0 to {len(images) - 1} (of {len(images)} images), got {count}.")
    templates = IMAGENET_TEMPLATES if args.teacher_templates == "imagenet" else CLIP_TEMPLATE
    teacher = load_teacher(args.teacher, _class_names(args.classes), templates, revision=args.revision)
    teacher_name, class_names = teacher.name, teacher.class_names
    _say(f"teacher: {teacher_name}, {len(class_names)} classes")
    shots = _labelled(args.labeled, "train", class_names, "--labeled") if args.labeled else None
    labelled = _labelled(args.eval_data, "test", class_names, "--eval-data") if args.eval_data else None
    known = [data for data in (shots, labelled) if data is not None]
    cache = Path(args.output) / "teacher-cache"
    state = process_state()
    with state.main_process_first():  # one process runs the teacher; the others read its cache
        if args.overwrite and state.is_main_process and not teacher.owns(cache):
            shutil.rmtree(cache, ignore_errors=True)  # another teacher's, of the run being replaced
        logits = teacher.logits([*images, *(image for data in known for image in data.images)], cache=cache)
    if not (args.augment and args.augment_views and args.self_train is None):
        teacher = None  # its model is not needed past its logits (with cached views, of their crops too: below)
    logits, shot_logits, eval_logits = logits.split([len(images), len(shots or []), len(labelled or [])])
    order = list(range(len(images)))
    random.Random(args.seed).shuffle(order)
    held, kept = sorted(order[:count]), sorted(order[count:])
    train_images, val_images = [images[i] for i in kept], [images[i] for i in held]
    labeled = teacher_logits = None
    if args.self_train is not None:  # the teacher's most confident guesses as labels
        data = pseudo_labeled(train_images, class_names, logits[kept], per_class=args.self_train)
    else:
        data = pseudo_labeled(train_images, class_names, logits[kept])
        teacher_logits = torch.cat([logits[kept], shot_logits])
        if shots is not None:  # their labels are true: the cross-entropy's
            labeled = torch.arange(len(data) + len(shots)) >= len(data)
    if shots is not None:
        data = LabeledImages(class_names, [*data.images, *shots.images], [*data.labels, *shots.labels])
    _default_epochs(args, data, most=STEP_BUDGET)
    model, processor = load_base_model(args.model)
    adapter, settings = method_fields(args, len(class_names), model)
    if teacher_logits is not None:
        settings = {"label_weight": 0.0 if shots is None else 1.0, "distill_weight": 1.0, **settings}
    val = pseudo_labeled(val_images, class_names, logits[held]) if held else None
    _say(f"train: {len(data)} images; held out: {len(held)} images, to keep the epoch agreeing best with the teacher")
    unguessed = data.empty_classes() if args.self_train is not None else []
    if unguessed:
        _say(f"warning: the teacher guessed no image as {unguessed}: the student learns nothing of those classes")
    config = PromptEmbeddingConfig(**adapter, class_names=data.class_names, init_seed=args.seed)
    training = TrainingArguments(output_dir=args.output, seed=args.seed, resume=args.resume, **settings)
    if teacher_logits is not None and training.augment and training.augment_views and not config.prompts_images:
        with state.main_process_first():  # each cached view taught by the teacher's logits of that crop
            seeds = view_seeds(training.seed, training.augment_views)
            teacher_logits = torch.stack([teacher.logits(data.images, cache, augment_seed=seed) for seed in seeds])
    elif teacher_logits is not None and training.augment:
        _say(
            "note: the student's crops learn the teacher's logits of the whole images (with --augment-views V and no "
            "vision prompts, of each crop)"
        )
    teacher = None
    used = [*images, *(shots.images if shots else [])]
    record = {"source": _source_key(args.data), "teacher": teacher_name, "images": sorted(map(str, used))}
    trainer = PromptTrainer(
        get_prompt_model(model, config), processor, data, training, val, record, teacher_logits, labeled
    )
    summary = trainer.train()
    if not trainer.accelerator.is_main_process:
        return summary
    print(describe_run(summary, data, trainer.accelerator.num_processes, args.output))
    if "eval" in summary:
        scores = summary["eval"]
        print(
            f"agreement with the teacher on {scores['images']} held-out images: student zero-shot "
            f"{scores['zero_shot']['accuracy']:.3f}, kept prompt {scores['best']['accuracy']:.3f}"
        )
        if scores["best"]["accuracy"] < scores["zero_shot"]["accuracy"]:
            print(
                "warning: the kept prompt agrees with the teacher less than the student's zero-shot prompt does: more "
                "images, more --epochs, or another --lr"
            )
    if labelled is not None:
        results = against_zero_shot(trainer.model, processor, labelled, CLIP_TEMPLATE)
        teacher_top1 = int((eval_logits.argmax(-1) == torch.tensor(labelled.labels)).sum()) / len(labelled)
        summary["eval_data"] = {"teacher": {"top1": teacher_top1}, **results}
        print(f"accuracy on {len(labelled)} labelled images of --eval-data {args.eval_data} (top-1):")
        _report({name: {"top1": row["top1"]} for name, row in summary["eval_data"].items()}, ["top1"])
    return summary


def _source_key(data: str) -> str:
    return str(Path(data).resolve()) if Path(data).exists() else data


def _labelled(data: str, split: str, class_names: list[str], flag: str) -> LabeledImages:
    """Labelled images of `distill` (its `split`, else all of it), by `class_names` (the teacher's, in its order):
    `--labeled` of some of them, `--eval-data` of all."""
    images, where, _ = DataSource(data).split(split)
    unknown = sorted(set(images.class_names) - set(class_names))
    if unknown or (flag == "--eval-data" and sorted(images.class_names) != sorted(class_names)):
        raise ValueError(
            f"{flag} {data} has the classes {images.class_names}, the teacher {class_names}; give labelled images of "
            f"{'some of ' if flag == '--labeled' else ''}the teacher's classes"
            f"{' (or run `peft-prompt-clip eval` on the adapter for others)' if flag == '--eval-data' else ''}."
        )
    images = drop_unreadable(images)
    index = [class_names.index(name) for name in images.class_names]
    _say(f"{flag}: {len(images)} labelled images from {where}")
    return LabeledImages(list(class_names), images.images, [index[y] for y in images.labels])


def _class_names(classes: str | None) -> list[str] | None:
    """`--classes` of `distill`: comma-separated names, or a text file of one name per line."""
    if classes is None:
        return None
    try:
        names_file = Path(classes).is_file()
    except OSError:  # e.g. a hundred names: too long for a file name
        names_file = False
    if names_file:
        return [line.strip() for line in Path(classes).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [name.strip() for name in classes.split(",") if name.strip()]


def _base_model_name(args: argparse.Namespace, folder: str) -> str:
    base_name = args.model or read_adapter_config(folder).base_model_name_or_path  # validated before use
    if not base_name:
        raise ValueError("The adapter does not name its base model; pass --model.")
    return base_name


def _adapter_model(args: argparse.Namespace, folder: str | None = None):
    folder = folder or resolve_adapter(args.adapter, revision=args.revision)
    base, processor = load_base_model(_base_model_name(args, folder))
    return load_prompt_model(base, folder), processor, folder


def _report(rows: dict[str, dict[str, float]], columns: list[str]) -> None:
    print(f"{'':22}" + "".join(f"{c:>10}" for c in columns))
    for name, values in rows.items():
        print(f"{name:22}" + "".join(f"{values[c]:>10.3f}" for c in columns))


def _results_output(args: argparse.Namespace, folder: str) -> Path | None:
    """Where `eval` writes its results: `--output`, else beside a local adapter's files (never into the Hub cache,
    never silently into the current folder); checked with its report beside it, before any work: never over the
    adapter's other files, the data or the model."""
    if not args.output and not Path(args.adapter).is_dir():
        return None
    out = Path(args.output or Path(folder) / RESULTS_NAME)
    own = {RESULTS_NAME, report_path(Path(RESULTS_NAME)).name}
    reads = [("--data", args.data), ("--model", _base_model_name(args, folder))]
    reads += [("--adapter", path) for path in Path(folder).iterdir() if path.name not in own]
    name = "--output" if args.output else "the results file (eval's default; --output FILE puts it elsewhere)"
    for path in (out, report_path(out)):
        check_output(path, reads, name=name)
    return out


def eval_(args: argparse.Namespace) -> dict[str, Any]:
    """Accuracy of the learned prompt against the zero-shot prompt on `--data`."""
    folder = resolve_adapter(args.adapter, revision=args.revision)
    out = _results_output(args, folder)
    model, processor, folder = _adapter_model(args, folder)
    templates = IMAGENET_TEMPLATES if args.templates == "imagenet" else CLIP_TEMPLATE
    # a class-specific adapter scores any of its classes (the classifier checks)
    source = _data_source(args)
    if "all" in source.parts and args.split is not None:
        raise ValueError(f"--split {args.split}: {args.data} has no splits, so eval uses all of its images.")
    data, where, split = source.split(args.split)
    log = read_log(folder)
    data, where = source.unseen(data, where, log, split)
    data = drop_unreadable(data)
    _say(f"evaluating {len(data)} images of {len(data.class_names)} classes from {where}")

    results = {
        "split": split,
        "data": where,
        "zero_shot_templates": list(templates),
        **against_zero_shot(model, processor, data, templates, base_to_novel=args.base_to_novel),
    }
    other = "clip" if args.templates == "imagenet" else "imagenet"
    _say(f"zero-shot prompt: {describe_templates(templates)} (--templates {other}: the other)")
    if args.base_to_novel:
        table, columns = results["base_to_novel"], ["base", "novel", "HM"]
    else:
        table, columns = {k: results[k] for k in ("zero-shot", "learned prompt")}, ["top1", "top5"]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _report(table, columns)
    if out is None:
        _say("results not saved: the adapter is a Hub repo; pass --output FILE to save them")
    else:
        page = save_results(
            out, results, log if valid_log(log) else None, f"{args.adapter}: learned prompt against zero-shot"
        )
        _say(f"results written to {out} and {page} (a report with charts)")
    return results


def predict(args: argparse.Namespace) -> list[list[tuple[str, float]]]:
    """Top-k classes of each image, among the classes the adapter was learned for (or `--classes`)."""
    model, processor, _ = _adapter_model(args)
    config = model.peft_config[model.active_adapter]
    names = args.classes.split(",") if args.classes else config.class_names
    if not names:
        raise ValueError("The adapter has no class names; pass --classes 'name one,name two,...'.")
    classifier = PromptClassifier(model, processor, names)
    predictions: list[list[tuple[str, float]]] = []
    batches = [args.images[i : i + 64] for i in range(0, len(args.images), 64)]
    for batch in progress(batches, desc="predicting", **({"disable": True} if len(batches) == 1 else {})):
        images = []
        for path in batch:
            try:
                images.append(open_image(path))
            except (OSError, ValueError) as exc:
                raise ValueError(f"Cannot read image {path}: {exc}") from None
        predictions += classifier.predict(images, top_k=args.top_k)
    if args.json:  # the pipeline's shape: a score and a label per class, by image
        rows = [{"image": path, "predictions": [{"score": s, "label": n} for n, s in top]} for path, top in
                zip(args.images, predictions, strict=True)]  # fmt: skip
        print(json.dumps(rows, indent=2))
    else:
        for path, top in zip(args.images, predictions, strict=True):
            print(f"{path}: " + ", ".join(f"{printable(name)} {score:.3f}" for name, score in top))
    return predictions


def interpret(args: argparse.Namespace) -> dict:
    """The vocabulary tokens nearest to each learned context vector (CoOp's interpretation)."""
    from .interpret import format_nearest_words, nearest_words

    model, processor, _ = _adapter_model(args)
    result = nearest_words(model, processor.tokenizer, k=args.top_k, metric=args.metric)
    print(format_nearest_words(result, args.metric))
    return result


def push(args: argparse.Namespace) -> str:
    """Upload an adapter and its model card to a Hub repo."""
    from .hub import push_adapter

    url = push_adapter(
        args.adapter,
        args.repo,
        private=args.private,
        token=args.token,
        datasets=args.dataset,
        base_model=args.base_model,
    )
    print(f"pushed {args.adapter} to {args.repo}: {url}")
    return url


def demo(args: argparse.Namespace) -> dict[str, Any]:
    """The whole flow offline on the embedded default model and data."""
    from .demo import run_demo

    return run_demo(check_output(args.output, [], folder=True), shots=args.shots, seed=args.seed)


def _field_options(p: argparse.ArgumentParser, fields: list[dataclasses.Field], flags: dict[str, str]) -> None:
    """A flag per dataclass field (`--field-name`, or as `flags` name it), its help the field's `help` metadata with
    the field's default; the flag's own default is None (not given)."""
    for field in fields:
        text, default = field.metadata["help"], field.default
        if "default" not in text and default is not None:
            shown = ("on" if default else "off") if isinstance(default, bool) else getattr(default, "value", default)
            text = f"{text.rstrip('.')} (default: {shown})"
        flag = flags.get(field.name, "--" + field.name.replace("_", "-"))
        if field.type == "bool":
            p.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, help=text)
        elif isinstance(default, enum.Enum):
            p.add_argument(flag, dest=field.name, choices=[c.value for c in type(default)], help=text)
        else:
            kind = int if field.type.startswith("int") else float if field.type.startswith("float") else str
            p.add_argument(flag, dest=field.name, type=kind, help=text)


def _learning_options(p: argparse.ArgumentParser) -> None:
    """The adapter's and the recipe's flags (the preset's values unless given), and --resume."""
    fields = {f.name: f for f in dataclasses.fields(PromptEmbeddingConfig)}
    _field_options(p, [fields[name] for name in ADAPTER_OPTIONS], ADAPTER_FLAGS)
    fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    _field_options(p, [fields[name] for name in TRAINING_OPTIONS], {})
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    run.add_argument("--overwrite", action="store_true", help="replace the run in --output (its adapter, checkpoint)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-prompt-clip", description="Learned prompts for CLIP, as PEFT adapters."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    output = argparse.ArgumentParser(add_help=False)  # every command's
    output.add_argument("-q", "--quiet", action="store_true", help="results and errors only: no notes, no progress")
    output.add_argument("-v", "--verbose", action="store_true", help="also transformers' informational logs")

    def adapter_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--adapter", required=True, help="adapter folder or Hub repo id")
        p.add_argument("--revision", help="branch, tag or commit of the adapter's Hub repo")
        p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")

    def dataset_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dataset-config", help="the Hugging Face dataset's configuration (its name)")
        p.add_argument("--image-column", help="the dataset's image column (default: its first Image column)")

    def data_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data",
            required=True,
            help="folder of class folders (used as given, or under train/val/test), CSV (path,label), or a Hugging "
            "Face dataset: a Hub id or a local dataset folder",
        )
        dataset_options(p)
        p.add_argument("--label-column", help="the dataset's label column (default: its first ClassLabel column)")
        p.add_argument("--classes", help="'base', 'novel' (CoCoOp's halves), 'all', or comma-separated class names")

    p = commands.add_parser("train", parents=[output], help="learn a prompt adapter", description=train.__doc__)
    p.add_argument("--model", required=True, help="base CLIP model: folder or Hub id")
    data_options(p)
    p.add_argument("--output", required=True, help="folder for the adapter and checkpoint")
    p.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the shots, held-out images, initial context, batch order and augmentation (default: 1)",
    )
    p.add_argument(
        "--shots",
        type=int,
        help="images per class (K-shot); by default all of a train split, and on data without splits 16 (at most "
        "half the smallest class's images: the rest are left for validation and eval)",
    )
    p.add_argument(
        "--val-shots",
        type=int,
        help="held-out images per class to choose the epoch kept, the initial prompt included (default: min(shots, "
        "4), from the data's val/ folder, else from images not among the shots; 0: none, keep the last epoch)",
    )
    p.add_argument(
        "--method",
        default="coop",
        choices=list(METHODS),
        help="a paper's adapter and recipe, each setting overridable by its own flag (default: %(default)s; see "
        "docs/methods)",
    )
    _learning_options(p)
    p.set_defaults(run=train)

    p = commands.add_parser(
        "distill", parents=[output], help="learn a prompt adapter from a teacher, without labels",
        description=distill.__doc__,
    )  # fmt: skip
    p.add_argument("--teacher", required=True, help="a prompt adapter (folder or Hub id) or a model (zero-shot)")
    p.add_argument("--revision", help="branch, tag or commit of the teacher adapter's Hub repo")
    p.add_argument(
        "--teacher-templates", default="imagenet", choices=["clip", "imagenet"], help="a model teacher's prompt(s)"
    )
    p.add_argument("--model", required=True, help="the student: base CLIP model, folder or Hub id")
    p.add_argument(
        "--data",
        required=True,
        help="unlabeled images: a folder (flat or nested), a CSV with a 'path' column, or a Hugging Face dataset (Hub "
        "id or local folder; its train split, its image column)",
    )
    dataset_options(p)
    p.add_argument("--classes", help="comma-separated class names, or a file of one per line (default: the teacher's)")
    p.add_argument("--output", required=True, help="folder for the adapter, its checkpoint and the teacher's cache")
    p.add_argument("--seed", type=int, default=1, help="seed of the held-out images, context and batch order")
    p.add_argument(
        "--val-images", type=int, help="held-out images choosing the epoch kept by agreement (default: a tenth)"
    )
    p.add_argument(
        "--self-train", type=int, metavar="K", help="learn the teacher's K most confident guesses per class instead"
    )
    p.add_argument("--method", default="coop", choices=list(METHODS), help="the student's preset (default: coop)")
    p.add_argument(
        "--labeled",
        help="labelled images of some of the classes (as train's --data; its train split, else all of it), learned "
        "with the cross-entropy as well (--label-weight, default 1) beside the unlabeled ones",
    )
    p.add_argument(
        "--eval-data",
        help="labelled images of the same classes (as eval's --data; its test split, else all of it): the teacher's, "
        "the student's zero-shot and its learned accuracy at the end",
    )
    _learning_options(p)
    p.set_defaults(run=distill)

    p = commands.add_parser(
        "eval", parents=[output], help="accuracy of an adapter vs zero-shot", description=eval_.__doc__
    )
    adapter_options(p)
    data_options(p)
    p.add_argument(
        "--split",
        choices=["train", "val", "test"],
        help="the split to evaluate on, for data with splits (default: test); data without them is evaluated "
        "whole, less the images the adapter learned from",
    )
    p.add_argument("--templates", default="clip", choices=["clip", "imagenet"], help="zero-shot prompt(s)")
    p.add_argument("--base-to-novel", action="store_true", help="report base, novel and harmonic mean (CoCoOp)")
    p.add_argument(
        "--output",
        help=f"JSON file for the results, and the report beside it as .html (default: {RESULTS_NAME} in a local "
        "adapter's folder)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON (notes go to stderr)")
    p.set_defaults(run=eval_)

    p = commands.add_parser("predict", parents=[output], help="top-k classes of images", description=predict.__doc__)
    adapter_options(p)
    p.add_argument("--classes", help="comma-separated class names (default: the adapter's)")
    p.add_argument("--top-k", type=int, default=5, help="classes to print per image")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON (notes go to stderr)")
    p.add_argument("images", nargs="+", help="image files")
    p.set_defaults(run=predict)

    p = commands.add_parser(
        "interpret", parents=[output], help="nearest words of the learned context", description=interpret.__doc__
    )
    adapter_options(p)
    p.add_argument("--top-k", type=int, default=5, help="nearest vocabulary tokens per context vector")
    p.add_argument(
        "--metric", default="euclidean", choices=["euclidean", "cosine"], help="distance (CoOp's) or cosine similarity"
    )
    p.set_defaults(run=interpret)

    p = commands.add_parser(
        "push", parents=[output], help="upload an adapter and its model card to the Hub", description=push.__doc__
    )
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--repo", required=True, help="Hub repo id, user/name")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", help="write token (default: the saved login or HF_TOKEN)")
    p.add_argument("--dataset", action="append", help="dataset id for the model card (repeatable)")
    p.add_argument("--base-model", help="the base model's Hub id for the card (default: the adapter's, if a Hub id)")
    p.set_defaults(run=push)

    p = commands.add_parser(
        "demo", parents=[output], help="the whole flow offline on the embedded default", description=demo.__doc__
    )
    p.add_argument("--output", default="demo-adapter", help="folder for the learned adapter")
    p.add_argument("--shots", type=int, default=16, help="faded training images per class")
    p.add_argument("--seed", type=int, default=1, help="seed of the shots, batch order and initialisation")
    p.set_defaults(run=demo)
    return parser


def _set_output(args: argparse.Namespace) -> None:
    """-q, -v and --json: where notes go, progress bars, the libraries' logs, and warnings as one plain line."""
    import transformers

    global _notes
    _notes = None if args.quiet else "stderr" if getattr(args, "json", False) else "stdout"
    if args.quiet:
        disable_progress_bars()
        transformers.logging.disable_progress_bar()  # its weight loading and huggingface_hub's downloads
        with contextlib.suppress(ImportError):
            import datasets

            datasets.disable_progress_bars()
    else:
        enable_progress_bars()
    if args.verbose:
        transformers.logging.set_verbosity_info()
    warnings.formatwarning = lambda message, category, *_: f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    # transformers' own deprecation notice from inside from_pretrained: nothing a user of this command can act on
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    args = build_parser().parse_args(argv)
    _set_output(args)
    try:
        args.run(args)
    except KeyboardInterrupt:
        kept = (
            " the checkpoint of the last finished epoch is kept; --resume continues."
            if args.command == "train"
            else ""
        )
        print(f"peft-prompt-clip {args.command}: interrupted.{kept}", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if len(message) > 1000:  # a value echoed whole (a 50 MB ctx_init) is no one-line error
            message = f"{message[:600]} ... ({len(message) - 900:,} characters left out) ... {message[-300:]}"
        print(f"peft-prompt-clip {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0
