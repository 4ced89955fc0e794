"""The library's own error types."""


class InvalidAdapterError(ValueError):
    """A saved adapter that cannot be used: damaged or inconsistent files, or made for another kind of model."""
