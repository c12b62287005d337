"""The multimodal cross-encoder reranker: joint attention over text tokens and image patches.

The two backbones start from the bi-encoder's towers (the timm trunk's `forward_features`
gives patch tokens, the transformers tower its `last_hidden_state`). Their token states are
projected to `fusion_dim`, tagged with a type embedding, prefixed with a learned [CLS] and
fused by a small transformer; a linear head on the [CLS] output gives a correction that is
added to the bi-encoder's own logit for the pair (its projections and logit scale come along).
The head starts at zero, so an untrained reranker ranks exactly as the bi-encoder does and
training on hard negatives can only move it from there: the fusion learns what the single
vector per side cannot express (which colour goes with which shape, which group is above).
Because the towers run before fusion, corpus image tokens (the trunk's raw token states) can
be computed once and reused for every query that retrieves them (`encode_image_tokens` / `fuse`).

The reranker also keeps a **memory** of training pairs: the bi-encoder's image and caption
embeddings of up to `rerank.memory_size` of them (`set_memory`). A candidate image is compared
with the captions of its `memory_neighbours` nearest memory images (softmax over their image
cosines at `memory_temperature`): `evidence = sum_t w_t * cos(query, caption_t)`, and the score
gains `logit_scale * memory_weight * evidence`. Image-to-image and caption-to-caption similarity
are easier than crossing modalities, so a training image that looks like the candidate vouches
for its own caption. `memory_weight` is not learned by gradient: `mmscale rerank` picks it by
leave-one-out on the memory itself (`retrieval/memory.py`), and the fusion trains on the prior
alone (in train mode the memory term is off), so the term joins at inference exactly as calibrated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmscale.config import RerankConfig
from mmscale.models.towers import pool_tokens, text_width, vision_width

TEXT_TYPE, IMAGE_TYPE = 0, 1


class MultimodalReranker(nn.Module):
    """Cross-encoder `score(pixels, input_ids, attention_mask) -> [B]` over (image, caption) pairs."""

    def __init__(
        self,
        visual: nn.Module,
        text: nn.Module,
        fusion_dim: int = 256,
        fusion_layers: int = 2,
        fusion_heads: int = 4,
        bi_encoder: nn.Module | None = None,
        freeze_towers: bool = False,
        memory_neighbours: int = 5,
        memory_temperature: float = 0.1,
    ) -> None:
        super().__init__()
        self.visual = visual
        self.text = text
        self.freeze_towers = freeze_towers
        # The bi-encoder's scoring path (projections, pooling, temperature): the score's prior.
        self.pooling = getattr(bi_encoder, "pooling", "mean")
        self.attend_padding = getattr(bi_encoder, "attend_padding", False)
        # The bi-encoder's preprocessing: uint8 pixels are normalised on the device as there.
        self.preprocess = getattr(bi_encoder, "preprocess", None)
        self.pixels = bi_encoder.pixels if bi_encoder is not None else None
        self.bi_visual_proj = bi_encoder.visual_proj if bi_encoder is not None else None
        self.bi_text_proj = bi_encoder.text_proj if bi_encoder is not None else None
        scale = bi_encoder.scale_and_bias()[0].detach().reshape(1) if bi_encoder is not None else torch.zeros(1)
        self.register_buffer("bi_logit_scale", scale.clone())
        # The memory (empty until `set_memory`; a checkpoint's or export's is loaded whatever its size).
        dim = bi_encoder.embed_dim if bi_encoder is not None else 0
        self.memory_neighbours, self.memory_temperature = memory_neighbours, memory_temperature
        self.register_buffer("memory_image", torch.zeros(0, dim))
        self.register_buffer("memory_text", torch.zeros(0, dim))
        self.register_buffer("memory_weight", torch.zeros(()))
        self._memory_weight = 0.0  # the buffer's value on the host: scoring never reads the device for it
        if freeze_towers:  # only the fusion learns; the towers run without building a graph
            for module in (visual, text, self.bi_visual_proj, self.bi_text_proj):
                if module is not None:
                    module.requires_grad_(False)
        self.visual_proj = nn.Sequential(nn.Linear(vision_width(visual), fusion_dim), nn.LayerNorm(fusion_dim))
        self.text_proj = nn.Sequential(nn.Linear(text_width(text), fusion_dim), nn.LayerNorm(fusion_dim))
        self.type_embed = nn.Embedding(2, fusion_dim)
        self.cls = nn.Parameter(torch.randn(1, 1, fusion_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            fusion_dim, fusion_heads, dim_feedforward=4 * fusion_dim, dropout=0.0, batch_first=True, norm_first=True
        )
        # enable_nested_tensor would change numerics between padded and unpadded batches; keep it exact.
        self.fusion = nn.TransformerEncoder(layer, fusion_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(fusion_dim)
        self.head = nn.Linear(fusion_dim, 1)
        nn.init.zeros_(self.head.weight)  # start exactly at the bi-encoder's ranking
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True) -> MultimodalReranker:
        """Switch train/eval mode. A tower that does not train (frozen here, or locked in the bi-encoder)
        stays in eval, as the bi-encoder keeps a locked tower: its dropout never fires, so the prior is
        the bi-encoder's score."""
        super().train(mode)
        for tower in (self.visual, self.text):
            if not any(p.requires_grad for p in tower.parameters()):
                tower.eval()
        return self

    def encode_image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The trunk's raw token states [B, P, width] (a ViT's prefix + patch tokens); `fuse` projects them."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_towers):
            dtype = self.head.weight.dtype
            pixels = self.pixels(pixel_values, dtype) if self.pixels is not None else pixel_values.to(dtype)
            return self.visual.forward_features(pixels)

    def encode_text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text tower's raw token states [B, L, width]; `fuse` projects them."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_towers):
            # As the bi-encoder's tower was trained: a SigLIP text tower attends to its padding.
            mask = None if self.attend_padding else attention_mask
            return self.text(input_ids=input_ids, attention_mask=mask).last_hidden_state

    def set_memory(self, image_emb: torch.Tensor, text_emb: torch.Tensor, weight: float) -> None:
        """Keep these training pairs' bi-encoder embeddings [N, D] (L2-normalised) as the memory, at `weight`."""
        if image_emb.shape != text_emb.shape or image_emb.shape[1:] != self.memory_image.shape[1:]:
            raise ValueError(f"memory of {tuple(image_emb.shape)} images and {tuple(text_emb.shape)} captions; "
                             f"the bi-encoder embeds in {self.memory_image.shape[1]} dimensions")  # fmt: skip
        like = self.memory_image
        self.memory_image = image_emb.detach().to(like.device, like.dtype).contiguous()
        self.memory_text = text_emb.detach().to(like.device, like.dtype).contiguous()
        self.set_memory_weight(weight)

    def set_memory_weight(self, weight: float) -> None:
        """The memory term's weight (0: scores are the fusion's and the bi-encoder's alone)."""
        self.memory_weight = torch.tensor(float(weight), device=self.memory_image.device, dtype=self.memory_weight.dtype)
        self._memory_weight = float(weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("memory_image", "memory_text", "memory_weight"):
            current, saved = getattr(self, name), state_dict.get(prefix + name)
            if saved is None:  # saved before rerankers kept a memory: none (no rows, weight 0)
                state_dict[prefix + name] = current.new_zeros((0, *current.shape[1:]) if current.dim() else ())
            elif saved.shape != current.shape:  # the memory's size is the saved one
                setattr(self, name, torch.zeros_like(saved, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._memory_weight = float(state_dict[prefix + "memory_weight"])  # at load time, not while scoring

    def embeddings(self, text_states: torch.Tensor, attention_mask: torch.Tensor,
                   image_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bi-encoder's L2-normalised (caption, image) embeddings [B, D] of the pairs."""
        image_emb = F.normalize(self.bi_visual_proj(self.visual.forward_head(image_states)), dim=-1)
        text_emb = F.normalize(self.bi_text_proj(pool_tokens(text_states, attention_mask, self.pooling)), dim=-1)
        return text_emb, image_emb

    def memory_evidence(self, text_emb: torch.Tensor, image_emb: torch.Tensor,
                        exclude: torch.Tensor | None = None) -> torch.Tensor:
        """[B]: for pair b, the cosine of caption b with the captions of image b's nearest memory images,
        weighted by a softmax over their image cosines. `exclude` [B, N] bool: memory rows pair b may not
        use (leave-one-out: the query's own pair and its duplicates, the candidate's own row)."""
        memory_image, memory_text = self.memory_image.float(), self.memory_text.float()
        sims = image_emb.float() @ memory_image.T  # [B, N]
        if exclude is not None:
            sims = sims.masked_fill(exclude, float("-inf"))
        m = min(self.memory_neighbours, memory_image.shape[0])
        near, idx = sims.topk(m, dim=1)
        weights = torch.softmax(near / self.memory_temperature, dim=1).nan_to_num(0.0)  # all excluded: no evidence
        caption_sims = torch.einsum("bd,bmd->bm", text_emb.float(), memory_text[idx])
        return (weights * caption_sims).sum(1)

    def uses_memory(self) -> bool:
        """Whether scores include the memory term: eval mode, a memory, a non-zero weight."""
        return not self.training and self.memory_image.shape[0] > 0 and self._memory_weight != 0

    def prior(self, text_states: torch.Tensor, attention_mask: torch.Tensor, image_states: torch.Tensor) -> torch.Tensor:
        """The bi-encoder's logit scale * cosine for each pair [B] (zero without a bi-encoder), plus the
        memory's term (`memory_evidence`) at its weight when `uses_memory()`."""
        if self.bi_visual_proj is None:
            return text_states.new_zeros(text_states.shape[0])
        text_emb, image_emb = self.embeddings(text_states, attention_mask, image_states)
        cosine = (image_emb * text_emb).sum(-1)
        if self.uses_memory():
            evidence = self.memory_evidence(text_emb, image_emb).to(cosine.dtype)
            cosine = cosine + self._memory_weight * evidence
        return self.bi_logit_scale.reshape(()) * cosine

    def fuse(self, text_states: torch.Tensor, attention_mask: torch.Tensor, image_states: torch.Tensor) -> torch.Tensor:
        """Scores [B] of the pairs (text_states[b], image_states[b]): bi-encoder prior + joint-attention correction."""
        image_tokens = image_states
        if image_tokens.ndim == 4:  # [B, C, H, W] from a convolutional trunk -> one token per cell
            image_tokens = image_tokens.flatten(2).transpose(1, 2)
        image_tokens = self.visual_proj(image_tokens) + self.type_embed.weight[IMAGE_TYPE]
        text_tokens = self.text_proj(text_states) + self.type_embed.weight[TEXT_TYPE]
        b = text_tokens.shape[0]
        tokens = torch.cat([self.cls.expand(b, -1, -1), text_tokens, image_tokens], dim=1)
        keep = torch.cat(
            [
                attention_mask.new_ones(b, 1),
                attention_mask,
                attention_mask.new_ones(b, image_tokens.shape[1]),
            ],
            dim=1,
        )
        out = self.fusion(tokens, src_key_padding_mask=keep == 0)  # True marks padding to ignore
        correction = self.head(self.norm(out[:, 0])).squeeze(-1)
        return correction + self.prior(text_states, attention_mask, image_states)

    def score(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Relevance scores [B] of B (image, caption) pairs."""
        text = self.encode_text_tokens(input_ids, attention_mask)
        return self.fuse(text, attention_mask, self.encode_image_tokens(pixel_values))

    def score_groups(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Scores [B, G] of B captions against their G candidate images each ([B, G, C, H, W] pixels)."""
        b, g = pixel_values.shape[:2]
        text = self.encode_text_tokens(input_ids, attention_mask)  # once per caption, not per candidate
        images = self.encode_image_tokens(pixel_values.flatten(0, 1))
        scores = self.fuse(text.repeat_interleave(g, 0), attention_mask.repeat_interleave(g, 0), images)
        return scores.view(b, g)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """`score_groups` for [B, G, ...] pixels, `score` for [B, ...] (one forward: what ZeRO-3 hooks)."""
        if pixel_values.ndim == 5:
            return self.score_groups(pixel_values, input_ids, attention_mask)
        return self.score(pixel_values, input_ids, attention_mask)


def build_reranker(dual_encoder: nn.Module, rerank_cfg: RerankConfig) -> MultimodalReranker:
    """A reranker whose backbones start as the bi-encoder's towers (shared modules: copy first to keep both)."""
    return MultimodalReranker(
        dual_encoder.visual,
        dual_encoder.text,
        fusion_dim=rerank_cfg.fusion_dim,
        fusion_layers=rerank_cfg.fusion_layers,
        fusion_heads=rerank_cfg.fusion_heads,
        bi_encoder=dual_encoder,
        freeze_towers=rerank_cfg.freeze_towers,
        memory_neighbours=rerank_cfg.memory_neighbours,
        memory_temperature=rerank_cfg.memory_temperature,
    )
