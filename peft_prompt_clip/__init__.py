"""peft-prompt-clip: learned prompts (CoOp and its family) for CLIP-family models, as PEFT adapters.

Importing the package registers its adapter type with PEFT, so `get_peft_model` and `PeftModel.from_pretrained`
know it: import it before loading a saved prompt adapter. The import itself is light (no torch, no PEFT): each name
below loads its module on first use, and the registration happens as soon as PEFT is imported (see
[`registration`]).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from . import registration

__version__ = "0.1.0"

#: Each public name, by the module that defines it
_EXPORTS = {
    "CLIP_TEMPLATE": "options",
    "IMAGENET_TEMPLATES": "options",
    "ClassTokenPosition": "options",
    "PromptClassifier": "classifier",
    "PEFT_TYPE": "config",
    "PromptEmbeddingConfig": "config",
    "LabeledImages": "data",
    "few_shot": "data",
    "from_hf_dataset": "data",
    "hold_out": "data",
    "load_data": "data",
    "load_split": "data",
    "split_data": "data",
    "Teacher": "distill",
    "pseudo_labeled": "distill",
    "PromptEncoder": "encoder",
    "InvalidAdapterError": "errors",
    "InvalidCheckpointError": "errors",
    "TrainingDivergedError": "errors",
    "evaluate": "evaluation",
    "harmonic_mean": "evaluation",
    "PromptEmbeddingLayer": "layer",
    "prompt_options": "layer",
    "get_prompt_model": "loading",
    "load_prompt_model": "loading",
    "PromptEmbeddingModel": "model",
    "find_text_embeddings": "model",
    "register": "model",
    "PromptTrainer": "training",
    "TrainingArguments": "training",
}

__all__ = [
    "CLIP_TEMPLATE",
    "ClassTokenPosition",
    "IMAGENET_TEMPLATES",
    "InvalidAdapterError",
    "InvalidCheckpointError",
    "LabeledImages",
    "PEFT_TYPE",
    "PromptClassifier",
    "PromptEmbeddingConfig",
    "PromptEmbeddingLayer",
    "PromptEmbeddingModel",
    "PromptEncoder",
    "PromptTrainer",
    "Teacher",
    "TrainingArguments",
    "TrainingDivergedError",
    "evaluate",
    "few_shot",
    "find_text_embeddings",
    "from_hf_dataset",
    "get_prompt_model",
    "harmonic_mean",
    "hold_out",
    "load_data",
    "load_prompt_model",
    "load_split",
    "prompt_options",
    "pseudo_labeled",
    "register",
    "split_data",
]

if TYPE_CHECKING:  # what type checkers and editors see; at run time, `__getattr__` loads each on first use
    from .classifier import PromptClassifier
    from .config import PEFT_TYPE, PromptEmbeddingConfig
    from .data import LabeledImages, few_shot, from_hf_dataset, hold_out, load_data, load_split, split_data
    from .distill import Teacher, pseudo_labeled
    from .encoder import PromptEncoder
    from .errors import InvalidAdapterError, InvalidCheckpointError, TrainingDivergedError
    from .evaluation import evaluate, harmonic_mean
    from .layer import PromptEmbeddingLayer, prompt_options
    from .loading import get_prompt_model, load_prompt_model
    from .model import PromptEmbeddingModel, find_text_embeddings, register
    from .options import CLIP_TEMPLATE, IMAGENET_TEMPLATES, ClassTokenPosition
    from .training import PromptTrainer, TrainingArguments


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a module of the package
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    registration.register_when_ready()  # if PEFT came in through an import that could not register yet
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


registration.install()
