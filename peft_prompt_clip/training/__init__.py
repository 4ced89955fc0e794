"""Learning a prompt adapter, in parts: the recipe ([`TrainingArguments`]), the loss terms (`losses.py`, a registry),
what a run keeps beside the adapter (`callbacks.py`: the epoch kept on held-out images, PromptSRC's average), the run's
record (`record.py`: its log and resume fingerprint), checkpoints, and the loop ([`PromptTrainer`])."""

from .arguments import TrainingArguments, bounded_epochs, coop_epochs
from .checkpoints import CHECKPOINT_NAME
from .features import view_seeds
from .record import LOG_NAME
from .trainer import PromptTrainer

__all__ = [
    "CHECKPOINT_NAME",
    "LOG_NAME",
    "PromptTrainer",
    "TrainingArguments",
    "bounded_epochs",
    "coop_epochs",
    "view_seeds",
]
