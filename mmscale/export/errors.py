"""The one error type of the export package (its own module, so that every format module can raise it)."""

from mmscale.errors import BadInputError


class ExportError(BadInputError, RuntimeError):
    """A checkpoint cannot be found, consolidated or exported, or a format cannot express the model (exit 2)."""
