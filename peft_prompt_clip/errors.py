"""The library's own error types."""


class InvalidAdapterError(ValueError):
    """A saved adapter that cannot be used: damaged or inconsistent files, or made for another kind of model."""


class TrainingDivergedError(RuntimeError):
    """Training met a non-finite loss at every step of an epoch, or a non-finite context; the last checkpoint stays."""


class InvalidCheckpointError(ValueError):
    """A training checkpoint that cannot be resumed: damaged, tampered with, or made by a different run."""
