"""mmscale: exact very-large-batch multimodal embedding training on DeepSpeed ZeRO."""

__version__ = "0.1.0"


def load(path, device: str = "cpu", dtype=None):
    """Load an export directory or a training checkpoint (dual encoder or reranker) for inference."""
    from mmscale.inference import load as _load

    return _load(path, device=device, dtype=dtype)
