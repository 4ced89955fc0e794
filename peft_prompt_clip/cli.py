"""The `peft-prompt-clip` command: train, distill, eval, predict, interpret, push and demo. The parser is built from
declarations that need neither torch nor PEFT ([`options`], [`methods`]), so `--help`, `--version` and argument errors
answer at once; a command imports what it runs ([`commands`]) only when it runs. User mistakes end in one line on
stderr and exit status 2; anything else is a bug and shows its traceback."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import importlib
import os
import sys
import warnings

from safetensors import SafetensorError

from . import __version__
from .errors import TrainingDivergedError
from .methods import METHODS
from .options import AdapterOptions, RecipeOptions
from .progress import disable_progress_bars, enable_progress_bars
from .report import RESULTS_NAME

#: What the CLI reports in one line: the package's own errors and the user mistakes the libraries signal (a bad value,
#: a missing file or model, a damaged safetensors file). Anything else is a bug, and shows its traceback.
USER_ERRORS = (ValueError, OSError, TrainingDivergedError, SafetensorError)

#: The `train` options that set a `PromptEmbeddingConfig` field: the fields of the adapter's parts (each
#: `PromptVariant.fields`, which tests/test_cli.py checks this against; their help text is the field's); unset ones
#: take `--method`'s.
ADAPTER_OPTIONS = (
    "n_ctx",
    "ctx_init",
    "class_token_position",
    "class_specific",
    "conditional",
    "meta_net_reduction",
    "prompt_depth",
    "vision_n_ctx",
    "vision_prompt_depth",
    "coupled",
    "class_prompt_layer",
)
#: The flags whose name is not the field's
ADAPTER_FLAGS = {"class_token_position": "--position", "class_specific": "--csc"}

#: The `train` options that set a `TrainingArguments` field: the fields with a help text (the flag's); their defaults
#: are the fields'.
TRAINING_OPTIONS = tuple(f.name for f in dataclasses.fields(RecipeOptions) if "help" in f.metadata)


#: Each command's description, as its --help shows it
DESCRIPTIONS = {
    "train": "Learn a prompt adapter on `--data` and save it in `--output`.",
    "distill": (
        "Learn a student's prompt adapter from a teacher's class probabilities on unlabeled `--data` (PromptKD), or "
        "from its most confident guesses (`--self-train`), and save it in `--output`. Unless `--epochs` is given, the "
        "recipe's epochs, at least 400 optimizer steps and at most about 10,000."
    ),
    "eval": "Accuracy of the learned prompt against the zero-shot prompt on `--data`.",
    "predict": "Top-k classes of each image, among the classes the adapter was learned for (or `--classes`).",
    "interpret": "The vocabulary tokens nearest to each learned context vector (CoOp's interpretation).",
    "push": "Upload an adapter and its model card to a Hub repo.",
    "demo": "The whole flow offline on the embedded default model and data.",
}


#: Where notes (what a command used, where it wrote) go: "stdout", "stderr" (under --json, whose output is the
#: results alone), or None (under -q). Set by `main`.
_notes: str | None = "stdout"


def say(text: str) -> None:
    """Print a note (what a command used, where it wrote), where `main` says notes go."""
    if _notes and os.environ.get("RANK", "0") == "0":  # once under `accelerate launch`
        print(text, file=getattr(sys, _notes))


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
    fields = {f.name: f for f in dataclasses.fields(AdapterOptions)}
    _field_options(p, [fields[name] for name in ADAPTER_OPTIONS], ADAPTER_FLAGS)
    fields = {f.name: f for f in dataclasses.fields(RecipeOptions)}
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

    p = commands.add_parser(
        "train", parents=[output], help="learn a prompt adapter", description=DESCRIPTIONS["train"]
    )
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
    p.set_defaults(run="train")

    p = commands.add_parser(
        "distill", parents=[output], help="learn a prompt adapter from a teacher, without labels",
        description=DESCRIPTIONS['distill'],
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
    p.set_defaults(run="distill")

    p = commands.add_parser(
        "eval", parents=[output], help="accuracy of an adapter vs zero-shot", description=DESCRIPTIONS["eval"]
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
    p.set_defaults(run="eval_")

    p = commands.add_parser(
        "predict", parents=[output], help="top-k classes of images", description=DESCRIPTIONS["predict"]
    )
    adapter_options(p)
    p.add_argument("--classes", help="comma-separated class names (default: the adapter's)")
    p.add_argument("--top-k", type=int, default=5, help="classes to print per image")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON (notes go to stderr)")
    p.add_argument("images", nargs="+", help="image files")
    p.set_defaults(run="predict")

    p = commands.add_parser(
        "interpret",
        parents=[output],
        help="nearest words of the learned context",
        description=DESCRIPTIONS["interpret"],
    )
    adapter_options(p)
    p.add_argument("--top-k", type=int, default=5, help="nearest vocabulary tokens per context vector")
    p.add_argument(
        "--metric", default="euclidean", choices=["euclidean", "cosine"], help="distance (CoOp's) or cosine similarity"
    )
    p.set_defaults(run="interpret")

    p = commands.add_parser(
        "push",
        parents=[output],
        help="upload an adapter and its model card to the Hub",
        description=DESCRIPTIONS["push"],
    )
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--repo", required=True, help="Hub repo id, user/name")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", help="write token (default: the saved login or HF_TOKEN)")
    p.add_argument("--dataset", action="append", help="dataset id for the model card (repeatable)")
    p.add_argument("--base-model", help="the base model's Hub id for the card (default: the adapter's, if a Hub id)")
    p.set_defaults(run="push")

    p = commands.add_parser(
        "demo",
        parents=[output],
        help="the whole flow offline on the embedded default",
        description=DESCRIPTIONS["demo"],
    )
    p.add_argument("--output", default="demo-adapter", help="folder for the learned adapter")
    p.add_argument("--shots", type=int, default=16, help="faded training images per class")
    p.add_argument("--seed", type=int, default=1, help="seed of the shots, batch order and initialisation")
    p.set_defaults(run="demo")
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
        getattr(importlib.import_module(".commands", __package__), args.run)(args)
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
