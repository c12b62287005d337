"""Per-parameter learning-rate multipliers for fine-tuning: per tower, for the heads, and layer-wise decay.

    tower parameter in layer i:  lr * {vision,text}.lr_mult * layer_decay ** (L + 1 - i)
    heads (projections, logit scale / bias):  lr * head_lr_mult

A tower's layers are its repeated blocks (`blocks.3.`, `encoder.layer.3.`, `layers.3.`,
`stages.3.`), numbered 1..L; everything registered before the first block (patch / token
embeddings, class token, position embedding, pre-norm) is layer 0 and everything after the last
(final norm, pooling head) is layer L + 1, which keeps the full tower multiplier. This is BEiT's
layer-wise decay, as timm and open_clip users know it.
"""

from __future__ import annotations

import re

from torch import nn

from mmscale.config import ModelConfig

HEAD_PARAMETERS = ("visual_proj.", "text_proj.", "logit_scale", "logit_bias")
_BLOCK = re.compile(r"(?:^|\.)(?:blocks|layers|layer|stages|h|resblocks)\.(\d+)(?:\.|$)")


def layer_ids(tower: nn.Module) -> tuple[dict[str, int], int]:
    """({parameter name: layer id in 0..L+1}, L) for a tower's parameters (see the module docstring)."""
    names = [name for name, _ in tower.named_parameters()]
    blocks = {name: int(m.group(1)) for name in names if (m := _BLOCK.search(name))}
    if not blocks:
        return {name: 1 for name in names}, 0  # no repeated blocks: one layer, no decay to apply
    order = sorted(set(blocks.values()))
    index = {b: i + 1 for i, b in enumerate(order)}
    first = next(i for i, name in enumerate(names) if name in blocks)
    ids = {}
    for i, name in enumerate(names):
        ids[name] = index[blocks[name]] if name in blocks else (0 if i < first else len(order) + 1)
    return ids, len(order)


def lr_multipliers(model: nn.Module, model_cfg: ModelConfig) -> dict[str, float]:
    """{parameter name: lr multiplier} for a dual encoder under `model_cfg`."""
    out: dict[str, float] = {}
    for attr, cfg in (("visual", model_cfg.vision), ("text", model_cfg.text)):
        tower = getattr(model, attr, None)
        if tower is None:
            continue
        ids, depth = layer_ids(tower)
        for name, layer in ids.items():
            out[f"{attr}.{name}"] = cfg.lr_mult * cfg.layer_decay ** (depth + 1 - layer) if depth else cfg.lr_mult
    for name, _ in model.named_parameters():
        if name not in out:
            out[name] = model_cfg.head_lr_mult if name.startswith(HEAD_PARAMETERS) else 1.0
    return out
