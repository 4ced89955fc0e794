"""What each `peft-prompt-clip` command does (the parser and `main` are in [`cli`], which imports this module only
to run a command: `--help` and argument errors need none of it). Each command calls the same functions as the Python
API."""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .classifier import PromptClassifier
from .cli import ADAPTER_OPTIONS, TRAINING_OPTIONS, say
from .config import PromptEmbeddingConfig, printable
from .data import LabeledImages, drop_unreadable, open_image
from .distill import load_teacher, process_state, pseudo_labeled
from .evaluation import against_zero_shot
from .loading import get_prompt_model, load_base_model, load_prompt_model, read_adapter_config, resolve_adapter
from .methods import METHODS, method_settings
from .options import CLIP_TEMPLATE, IMAGENET_TEMPLATES, MAX_RAISE, MIN_STEPS, STEP_BUDGET, describe_templates
from .progress import progress
from .report import RESULTS_NAME, report_path, save_results
from .sources import DataSource, unlabeled_images
from .storage import check_output, run_lock
from .training import CHECKPOINT_NAME, PromptTrainer, TrainingArguments, bounded_epochs, coop_epochs, view_seeds
from .training.arguments import steps_per_epoch
from .training.record import describe_held_out, describe_run, read_log, valid_log

#: A command: its parsed arguments in, its results out
Command = Callable[[argparse.Namespace], Any]


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
    """Unless `--epochs` is given, set it: the recipe's (the preset's, or CoOp's by shots), raised on few images toward
    [`MIN_STEPS`] optimizer steps and cut on many to about `most` (see [`bounded_epochs`]); said when changed."""
    if args.epochs is not None:
        return
    preset = METHODS[args.method].training
    recipe = preset.get("epochs") or coop_epochs(max(data.counts()))
    batch_size = args.batch_size or preset.get("batch_size", 32)
    accumulation = args.gradient_accumulation_steps or preset.get("gradient_accumulation_steps", 1)
    args.epochs = bounded_epochs(recipe, len(data), batch_size, most, accumulation)
    if args.epochs != recipe:
        per_epoch = steps_per_epoch(len(data), batch_size, accumulation)
        bound = (
            f"at least {MIN_STEPS} steps ({MAX_RAISE}x the recipe's epochs at most)"
            if args.epochs > recipe
            else f"at most about {most:,} steps"
        )
        say(
            f"epochs: {args.epochs}, {args.epochs * per_epoch:,} optimizer steps (the recipe's {recipe} epochs of "
            f"{len(data)} images in batches of {batch_size} take {recipe * per_epoch:,}; a run takes {bound} unless "
            "--epochs is given)"
        )


def _say_early_stopping(trainer: PromptTrainer) -> None:
    """Say whether and when the run stops early (see `TrainingArguments.early_stop`)."""
    if trainer.patience:
        say(
            f"early stopping: after {trainer.patience} held-out evaluations (every {trainer.eval_every} epochs) "
            f"without a gain; --no-early-stop runs all {trainer.epochs} epochs"
        )
    elif trainer.eval_data is not None:
        why = "the adapter is the average over every epoch (--gpa-mean)" if trainer.args.early_stop else "--early-stop"
        say(f"early stopping: off ({why}); all {trainer.epochs} epochs run")


def method_fields(args: argparse.Namespace, num_classes: int, model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The adapter and training fields of `train`: `--method`'s preset, each field given by its own flag instead."""
    given = {name: getattr(args, name) for name in (*ADAPTER_OPTIONS, *TRAINING_OPTIONS)}
    given = {name: value for name, value in given.items() if value is not None}
    return method_settings(args.method, num_classes, model, args.epochs, given)


@_holds_output("--data", "--model")
def train(args: argparse.Namespace) -> dict[str, Any]:
    """`peft-prompt-clip train`, as its `--help` describes it."""
    source = _data_source(args)
    run = source.training(args.shots, args.val_shots, args.seed)
    for note in run.notes:
        say(note)
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
    say(f"method: {METHODS[args.method].name} ({config.method} adapter){'; ' if shown else ''}{settings_text}")
    # which images trained and chose the adapter, so that eval on them can leave them out
    record = {"source": source.key, "images": sorted(run.names)}
    trainer = PromptTrainer(model, processor, data, training, eval_data=val, data_record=record)
    _say_early_stopping(trainer)
    summary = trainer.train()
    if trainer.accelerator.is_main_process:
        print(describe_run(summary, data, trainer.accelerator.num_processes, args.output))
        if "eval" in summary:
            print(describe_held_out(summary["eval"], args.output, training.hand_template, config.ctx_init))
    return summary


@_holds_output("--teacher", "--model", "--data", "--labeled", "--eval-data")
def distill(args: argparse.Namespace) -> dict[str, Any]:
    """`peft-prompt-clip distill`, as its `--help` describes it."""
    if args.self_train is not None and args.self_train < 1:
        raise ValueError(f"--self-train takes the K >= 1 most confident images per class, got {args.self_train}.")
    images, note = unlabeled_images(args.data, args.dataset_config, args.image_column)
    say(note)
    count = len(images) // 10 if args.val_images is None else args.val_images
    if not 0 <= count < len(images):
        raise ValueError(f"--val-images must be from 0 to {len(images) - 1} (of {len(images)} images), got {count}.")
    templates = IMAGENET_TEMPLATES if args.teacher_templates == "imagenet" else CLIP_TEMPLATE
    teacher = load_teacher(args.teacher, _class_names(args.classes), templates, revision=args.revision)
    teacher_name, class_names = teacher.name, teacher.class_names
    say(f"teacher: {teacher_name}, {len(class_names)} classes")
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
    # early stopping was measured for train's presets (benchmarks/early_stopping.py), not yet for distillation
    settings = {"early_stop": False, **settings}
    val = pseudo_labeled(val_images, class_names, logits[held]) if held else None
    say(f"train: {len(data)} images; held out: {len(held)} images, to keep the epoch agreeing best with the teacher")
    unguessed = data.empty_classes() if args.self_train is not None else []
    if unguessed:
        say(f"warning: the teacher guessed no image as {unguessed}: the student learns nothing of those classes")
    config = PromptEmbeddingConfig(**adapter, class_names=data.class_names, init_seed=args.seed)
    training = TrainingArguments(output_dir=args.output, seed=args.seed, resume=args.resume, **settings)
    if teacher_logits is not None and training.augment and training.augment_views and not config.prompts_images:
        with state.main_process_first():  # each cached view taught by the teacher's logits of that crop
            seeds = view_seeds(training.seed, training.augment_views)
            teacher_logits = torch.stack([teacher.logits(data.images, cache, augment_seed=seed) for seed in seeds])
    elif teacher_logits is not None and training.augment:
        say(
            "note: the student's crops learn the teacher's logits of the whole images (with --augment-views V and no "
            "vision prompts, of each crop)"
        )
    teacher = None
    used = [*images, *(shots.images if shots else [])]
    record = {"source": _source_key(args.data), "teacher": teacher_name, "images": sorted(map(str, used))}
    trainer = PromptTrainer(
        get_prompt_model(model, config), processor, data, training, val, record, teacher_logits, labeled
    )
    _say_early_stopping(trainer)
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
    say(f"{flag}: {len(images)} labelled images from {where}")
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
    """`peft-prompt-clip eval`, as its `--help` describes it."""
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
    say(f"evaluating {len(data)} images of {len(data.class_names)} classes from {where}")

    results = {
        "split": split,
        "data": where,
        "zero_shot_templates": list(templates),
        **against_zero_shot(model, processor, data, templates, base_to_novel=args.base_to_novel),
    }
    other = "clip" if args.templates == "imagenet" else "imagenet"
    say(f"zero-shot prompt: {describe_templates(templates)} (--templates {other}: the other)")
    if args.base_to_novel:
        table, columns = results["base_to_novel"], ["base", "novel", "HM"]
    else:
        table, columns = {k: results[k] for k in ("zero-shot", "learned prompt")}, ["top1", "top5"]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _report(table, columns)
    if out is None:
        say("results not saved: the adapter is a Hub repo; pass --output FILE to save them")
    else:
        page = save_results(
            out, results, log if valid_log(log) else None, f"{args.adapter}: learned prompt against zero-shot"
        )
        say(f"results written to {out} and {page} (a report with charts)")
    return results


def predict(args: argparse.Namespace) -> list[list[tuple[str, float]]]:
    """`peft-prompt-clip predict`, as its `--help` describes it."""
    model, processor, _ = _adapter_model(args)
    config = model.peft_config[model.active_adapter]
    names = args.classes.split(",") if args.classes else config.class_names
    if not names:
        raise ValueError("The adapter has no class names; pass --classes 'name one,name two,...'.")
    classifier = PromptClassifier(model, processor, names)
    predictions: list[list[tuple[str, float]]] = []
    first, rest = args.images[:1], args.images[1:]  # the first image alone: its result as soon as the model is loaded
    batches = [first] + [rest[i : i + 64] for i in range(0, len(rest), 64)]
    shown = {"disable": True} if len(args.images) <= 64 else {}
    bar = progress(total=len(args.images), desc="predicting", unit="image", **shown)
    for batch in batches:
        images = []
        for path in batch:
            try:
                images.append(open_image(path))
            except (OSError, ValueError) as exc:
                raise ValueError(f"Cannot read image {path}: {exc}") from None
        results = classifier.predict(images, top_k=args.top_k)
        predictions += results
        bar.update(len(batch))
        if not args.json:  # each batch's lines as soon as they are known
            with bar.external_write_mode():
                for path, top in zip(batch, results, strict=True):
                    print(f"{path}: " + ", ".join(f"{printable(name)} {score:.3f}" for name, score in top), flush=True)
    bar.close()
    if args.json:  # the pipeline's shape: a score and a label per class, by image
        rows = [{"image": path, "predictions": [{"score": s, "label": n} for n, s in top]} for path, top in
                zip(args.images, predictions, strict=True)]  # fmt: skip
        print(json.dumps(rows, indent=2))
    return predictions


def interpret(args: argparse.Namespace) -> dict:
    """`peft-prompt-clip interpret`, as its `--help` describes it."""
    from .interpret import format_nearest_words, nearest_words

    model, processor, _ = _adapter_model(args)
    result = nearest_words(model, processor.tokenizer, k=args.top_k, metric=args.metric)
    print(format_nearest_words(result, args.metric))
    return result


def push(args: argparse.Namespace) -> str:
    """`peft-prompt-clip push`, as its `--help` describes it."""
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
    """`peft-prompt-clip demo`, as its `--help` describes it."""
    from .demo import run_demo

    return run_demo(check_output(args.output, [], folder=True), shots=args.shots, seed=args.seed)
