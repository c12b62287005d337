"""The vision-language cross-encoder: a (query, candidate) pair rendered together, scored by logit(yes) - logit(no).

The pair goes through the chat template as sentence-transformers renders a CrossEncoder pair: the
instruction (`model.vlm.query_prompt`) as the system message, then a `query` message and a
`document` message, each holding its images and text, then the assistant header. The score is the
language-model head's logit of `model.vlm.yes_token` minus that of `no_token` at the last real
token: the log-odds of "yes" between the two answers, the way Qwen3-VL-Reranker and the
sentence-transformers VLM rerankers score. The whole head runs (it is one module, which ZeRO-3
gathers as one) and two columns are kept.

Built from a `*ForConditionalGeneration` checkpoint (its LM head is needed); the base model and
the head are kept as `vlm` and `lm_head` (tied to the input embeddings when the checkpoint ties
them), and `generation_model()` puts them back into the checkpoint's class for export.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from mmscale.config import ModelConfig, VlmConfig, VlmPreprocess
from mmscale.models.towers import resolve_model_path
from mmscale.models.vlm import (
    PatchNormalizer,
    _backbone_kwargs,
    enable_checkpointing,
    language_model,
    last_token_index,
    load_vlm_processor,
    vision_encoder,
    vlm_model_config,
    vlm_preprocess,
)


def single_token_id(tokenizer: Any, token: str, key: str) -> int:
    """The id of a word that the tokenizer writes as one token (the answer a reranker reads), else a clear error."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{key}: {token!r} is {len(ids)} tokens for this tokenizer ({ids}); the score reads one "
                         "token's logit, pick a word the vocabulary holds whole")
    return int(ids[0])


class VlmReranker(nn.Module):
    """`forward(input_ids, attention_mask, position_ids, patches, image_grid_thw) -> {"scores": [B]}` of pair sequences."""

    def __init__(self, generation: nn.Module, preprocess: VlmPreprocess, yes_id: int, no_id: int, pair_template: str,
                 vision_locked: bool = False) -> None:
        super().__init__()
        self.vlm = generation.model
        self.lm_head = generation.lm_head
        self.preprocess = preprocess
        self.patch_norm = PatchNormalizer(preprocess.mean, preprocess.std, preprocess.temporal_patch_size)
        self.yes_id, self.no_id = int(yes_id), int(no_id)
        self.pair_template = pair_template
        self.generation_class = type(generation).__name__
        self.vision_locked = vision_locked
        if vision_locked:
            vision_encoder(self.vlm).requires_grad_(False)

    def train(self, mode: bool = True) -> VlmReranker:
        """Switch train/eval mode; a locked vision encoder stays in eval."""
        super().train(mode)
        if self.vision_locked:
            vision_encoder(self.vlm).eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                patches: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Scores [B] (logits, higher is more relevant) of B padded pair sequences."""
        pixel_values = None
        if patches is not None and patches.shape[0]:
            pixel_values = self.patch_norm(patches, vision_encoder(self.vlm).dtype)
        else:
            image_grid_thw = None
        hidden = self.vlm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          pixel_values=pixel_values, image_grid_thw=image_grid_thw, use_cache=False).last_hidden_state
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        logits = self.lm_head(last)
        return {"scores": logits[:, self.yes_id] - logits[:, self.no_id]}

    def generation_model(self) -> nn.Module:
        """The checkpoint's `*ForConditionalGeneration` holding these weights (a copy), for transformers and export."""
        import transformers

        cls = getattr(transformers, self.generation_class)
        config = copy.deepcopy(self.vlm.config)
        config.architectures = [self.generation_class]
        model = cls(config).eval()
        state = {f"model.{k}": v for k, v in self.vlm.state_dict().items()}
        state.update({f"lm_head.{k}": v for k, v in self.lm_head.state_dict().items()})
        model.load_state_dict(state, strict=True)
        return model.float()


def build_generation_model(cfg: VlmConfig, pretrained: bool = True) -> nn.Module:
    """The `*ForConditionalGeneration` (base model + LM head), fp32: name_or_path's weights or random from the config."""
    from transformers import AutoModelForImageTextToText

    if pretrained and cfg.name_or_path:
        vlm_model_config(VlmConfig(name_or_path=cfg.name_or_path))
        return AutoModelForImageTextToText.from_pretrained(resolve_model_path(cfg.name_or_path), dtype=torch.float32,
                                                           **_backbone_kwargs(cfg))
    return AutoModelForImageTextToText.from_config(vlm_model_config(cfg), dtype=torch.float32, **_backbone_kwargs(cfg))


def pair_template(processor: Any, prompt_format: str) -> str:
    """The template a pair is rendered with: the processor's chat template, or the plain one (no roles)."""
    from mmscale.data.vlm import plain_template

    if prompt_format == "plain":
        tok = processor.tokenizer
        start = getattr(processor, "vision_start_token", None) or getattr(tok, "vision_start_token", "<|vision_start|>")
        end = getattr(processor, "vision_end_token", None) or getattr(tok, "vision_end_token", "<|vision_end|>")
        return plain_template(start, processor.image_token, end)
    return processor.chat_template


def build_vlm_reranker(model_cfg: ModelConfig, pretrained: bool = True, processor: Any = None) -> VlmReranker:
    """The cross-encoder of a `model.kind: vlm` config (its LoRA adapters on the language model last)."""
    from mmscale.models.lora import add_adapters

    cfg = model_cfg.vlm
    processor = processor if processor is not None else load_vlm_processor(cfg)
    generation = build_generation_model(cfg, pretrained=pretrained)
    tok = processor.tokenizer
    model = VlmReranker(
        generation, vlm_preprocess(cfg, processor, generation.config),
        single_token_id(tok, cfg.yes_token, "model.vlm.yes_token"), single_token_id(tok, cfg.no_token, "model.vlm.no_token"),
        pair_template(processor, cfg.prompt_format), vision_locked=cfg.vision_locked,
    )  # fmt: skip
    if cfg.lora.rank:
        add_adapters(language_model(model.vlm), cfg.lora, "vlm")
        model.lm_head.requires_grad_(False)  # adapters only: the head stays the checkpoint's (tied or not)
    if cfg.grad_checkpointing:
        enable_checkpointing(model.vlm)
    return model
