"""Streaming WebDataset shards into contrastive batches: split, shuffle, decode, transform, tokenise, resume."""

from mmscale.data.build import build_eval_loader, build_train_loader
from mmscale.data.decode import BadSample
from mmscale.data.loader import StreamingLoader
from mmscale.data.manifest import shard_sample_counts
from mmscale.data.urls import expand_urls, parse_sources

__all__ = [
    "BadSample",
    "StreamingLoader",
    "build_eval_loader",
    "build_train_loader",
    "expand_urls",
    "parse_sources",
    "shard_sample_counts",
]
