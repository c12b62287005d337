"""Losses: CLIP InfoNCE, SigLIP, Matryoshka (and the reranker's ranking losses)."""

from mmscale.losses.clip import clip_loss
from mmscale.losses.contrastive import ContrastiveLoss, build_loss
from mmscale.losses.matryoshka import matryoshka_prefix
from mmscale.losses.siglip import siglip_loss

__all__ = ["ContrastiveLoss", "build_loss", "clip_loss", "matryoshka_prefix", "siglip_loss"]
