"""Registration of the prompt adapter with PEFT.

PEFT's `register_peft_method` only accepts names of its own `PeftType` enum, but its mapping dicts accept any
string key, so the adapter type is added to them directly. Doing it again is harmless.
"""

from __future__ import annotations

from peft import mapping

from .config import PEFT_TYPE, PromptEmbeddingConfig
from .model import PromptEmbeddingModel


def register() -> None:
    """Make `get_peft_model` and `PeftModel.from_pretrained` know the prompt adapter (done on import)."""
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = PromptEmbeddingConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = PromptEmbeddingModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = PromptEmbeddingModel.prefix
