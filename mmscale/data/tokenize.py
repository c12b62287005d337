"""Caption tokenisation in the workers: a transformers fast tokenizer or any callable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _is_transformers_tokenizer(tokenizer: Any) -> bool:
    # By class name, so that plain callables never pay for importing transformers.
    return any(cls.__name__ == "PreTrainedTokenizerBase" for cls in type(tokenizer).__mro__)


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, both long [B, max_length] (padded to max_length, truncated)."""
    if _is_transformers_tokenizer(tokenizer):
        out = tokenizer(
            texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return out["input_ids"].long(), out["attention_mask"].long()
    return _from_callable(tokenizer, texts, max_length)


def _from_callable(fn: Callable, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    # open_clip-style tokenizers return ids only; their pad id is 0, so the mask is ids != 0.
    out = fn(texts)
    if isinstance(out, dict) or hasattr(out, "keys"):
        ids = torch.as_tensor(out["input_ids"]).long()
        mask = torch.as_tensor(out["attention_mask"]).long() if "attention_mask" in out else (ids != 0).long()
    else:
        ids = torch.as_tensor(out).long()
        mask = (ids != 0).long()
    if ids.ndim != 2 or ids.shape[0] != len(texts):
        raise ValueError(f"tokenizer returned shape {tuple(ids.shape)} for {len(texts)} texts; expected [B, L]")
    ids, mask = ids[:, :max_length], mask[:, :max_length]
    if ids.shape[1] < max_length:
        pad = max_length - ids.shape[1]
        ids = torch.nn.functional.pad(ids, (0, pad))
        mask = torch.nn.functional.pad(mask, (0, pad))
    return ids, mask
