"""LoRA adapters on the towers (peft), and merging them back into plain weights.

`apply_lora` injects peft's LoRA layers into a tower's linear layers in place: the tower keeps its
class and forward, its own weights freeze, and each adapted layer computes
`W x + b + (alpha / r) * B A dropout(x)` with `B` starting at zero, so the adapted model starts
exactly where the plain one is. Checkpoints hold the base and adapter tensors (the config records
the adapters, so a model rebuilt from it has the same names). `merge_lora` folds every adapter
into its base weight, `W + (alpha / r) * B A`, and puts the plain layer back: the state dict then
has the names of a model built without adapters, which is what every export writes.
"""

from __future__ import annotations

import logging

from torch import nn

from mmscale.config import LoraConfig, ModelConfig

log = logging.getLogger(__name__)

TOWERS = (("visual", "vision"), ("text", "text"))


def lora_target_names(tower: nn.Module, cfg: LoraConfig, where: str = "") -> list[str]:
    """Names of the tower's nn.Linear modules that `cfg.targets` selects (name or dotted suffix; empty: all)."""
    linear = [name for name, module in tower.named_modules() if isinstance(module, nn.Linear) and name]
    if not cfg.targets:
        return linear
    chosen = [name for name in linear if any(name == t or name.endswith("." + t) for t in cfg.targets)]
    unmatched = [t for t in cfg.targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if unmatched:
        examples = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(f"model.{where}.lora.targets: {unmatched} match no linear layer of the tower "
                         f"(its linear layers end in: {', '.join(examples)})")
    return chosen


def apply_lora(model: nn.Module, model_cfg: ModelConfig) -> None:
    """Inject LoRA adapters into the towers that `model_cfg.{vision,text}.lora.rank` asks for (in place)."""
    for attr, where in TOWERS:
        cfg: LoraConfig = getattr(model_cfg, where).lora
        if cfg.rank:
            add_adapters(getattr(model, attr), cfg, where)


def add_adapters(tower: nn.Module, cfg: LoraConfig, where: str = "") -> None:
    """LoRA on `tower`'s selected linear layers; only the adapters stay trainable."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model
    except ImportError as exc:
        raise ImportError(f"model.{where}.lora needs the package 'peft': pip install peft") from exc

    targets = lora_target_names(tower, cfg, where)
    if not targets:
        raise ValueError(f"model.{where}.lora: the tower has no linear layer to adapt")
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                              bias="none")
    inject_adapter_in_model(peft_cfg, tower)
    # peft freezes everything in the module it is given but the adapters: the tower's own weights.
    log.info("LoRA r=%d on %d linear layers of the %s tower", cfg.rank, len(targets), where)


def has_lora(model: nn.Module) -> bool:
    """Whether any module of `model` is a peft LoRA layer."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return any(isinstance(m, LoraLayer) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the plain layer back (in place; returns `model`).

    The merged weights are `W + (alpha / r) * B @ A`; the result has the parameter names of the
    same model built without adapters. Its tower weights become trainable again unless the tower
    is locked.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return model
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in layers:
        layer.merge(safe_merge=True)  # refuses to write a non-finite merged weight
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    if layers:
        for attr, _ in TOWERS:
            tower = getattr(model, attr, None)
            if tower is not None and not getattr(model, f"lock_{attr}", False):
                tower.requires_grad_(True)
    return model


def without_lora(model_cfg: ModelConfig) -> ModelConfig:
    """A copy of `model_cfg` whose towers have no adapters (the shape of a merged model)."""
    import copy

    cfg = copy.deepcopy(model_cfg)
    cfg.vision.lora = LoraConfig()
    cfg.text.lora = LoraConfig()
    cfg.vlm.lora = LoraConfig()
    return cfg
