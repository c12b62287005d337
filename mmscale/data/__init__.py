"""Streaming WebDataset shards into contrastive batches: split, shuffle, decode, transform, tokenise, resume.

    urls.py       brace patterns, directories (their *.tar, sorted), pipe:/http(s), `::`-joined sources
    manifest.py   samples per shard: stats.json, img2dataset NNNNN_stats.json, else a tar header scan
    split.py      shards per rank (seeded shuffle + greedy balance by count) and per worker; resampled draws
    shards.py     raw samples out of tar streams (webdataset's gopen), retries, truncation detection
    stream.py     the worker pipeline: raw -> shuffle buffer -> skip consumed -> decode -> crop -> batch
    decode.py / transforms.py / tokenize.py   one sample's bytes -> uint8 image, caption -> token ids
    loader.py     the rank-side loader: equal batch counts, drop|pad remainder, state_dict, bad_samples
    build.py      build_train_loader / build_eval_loader

Batches: {"image": float32 [B,3,S,S], "input_ids": long [B,L], "attention_mask": long [B,L],
"key": list[str], "text": list[str]}. Bad samples are skipped and counted by reason in
`loader.bad_samples`: undecodable_image, missing_image, missing_caption, empty_caption,
too_many_pixels, truncated_tar, unreadable_tar, unreachable_shard.
"""

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
