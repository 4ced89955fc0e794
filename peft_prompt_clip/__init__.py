"""peft-prompt-clip: learned prompts (CoOp and its family) for CLIP-family models, as PEFT adapters.

Importing the package registers its adapter type with PEFT, so `get_peft_model` and `PeftModel.from_pretrained`
know it. Import it before loading a saved prompt adapter.
"""

from .classifier import CLIP_TEMPLATE, IMAGENET_TEMPLATES, PromptClassifier
from .config import PEFT_TYPE, ClassTokenPosition, PromptEmbeddingConfig
from .data import LabeledImages, few_shot, from_hf_dataset, hold_out, load_data, load_split, split_data
from .distill import Teacher, pseudo_labeled
from .encoder import PromptEncoder
from .errors import InvalidAdapterError, InvalidCheckpointError, TrainingDivergedError
from .evaluation import evaluate, harmonic_mean
from .layer import PromptEmbeddingLayer, prompt_options
from .loading import get_prompt_model, load_prompt_model
from .model import PromptEmbeddingModel, find_text_embeddings, register
from .training import PromptTrainer, TrainingArguments

register()

__version__ = "0.1.0"

__all__ = [
    "CLIP_TEMPLATE",
    "IMAGENET_TEMPLATES",
    "InvalidAdapterError",
    "InvalidCheckpointError",
    "PromptClassifier",
    "PEFT_TYPE",
    "ClassTokenPosition",
    "PromptEmbeddingConfig",
    "PromptEmbeddingLayer",
    "PromptEmbeddingModel",
    "PromptEncoder",
    "LabeledImages",
    "PromptTrainer",
    "TrainingArguments",
    "Teacher",
    "pseudo_labeled",
    "TrainingDivergedError",
    "evaluate",
    "few_shot",
    "hold_out",
    "find_text_embeddings",
    "from_hf_dataset",
    "harmonic_mean",
    "load_data",
    "load_split",
    "split_data",
    "get_prompt_model",
    "load_prompt_model",
    "prompt_options",
    "register",
]
