"""The one error type of the export package (its own module, so that every format module can raise it)."""


class ExportError(RuntimeError):
    """A checkpoint cannot be found, consolidated or exported, or a format cannot express the model."""
