"""Models: the dual encoder (timm image tower + transformers text tower) and its helpers."""

from mmscale.models.dual_encoder import DualEncoder, build_dual_encoder
from mmscale.models.towers import load_tokenizer, pool_tokens, resolve_model_path

__all__ = ["DualEncoder", "build_dual_encoder", "load_tokenizer", "pool_tokens", "resolve_model_path"]
