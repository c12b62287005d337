"""The one error type of model loading and export (exit 2): `ExportError` is the loader's `ModelLoadError`.

Loading a checkpoint and writing an export fail for the same kinds of reasons (a path that is not a
model, a format that cannot express it, an output that must not be touched); one type, raised by
both, so callers catch one thing.
"""

from mmscale.models.load import ModelLoadError as ExportError

__all__ = ["ExportError"]
