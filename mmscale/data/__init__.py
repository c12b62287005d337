"""Streaming WebDataset shards into contrastive batches: split, shuffle, decode, transform, tokenise, resume.

    urls.py       brace patterns, directories (their *.tar, sorted), pipe:/http(s), `::`-joined sources
    manifest.py   samples per shard without downloading shards: stats.json / img2dataset NNNNN_stats.json
                  beside them (fetched through the shards' opener when remote), else a local header scan;
                  kept in the run's shard_counts.json
    split.py      shards per rank (seeded shuffle + greedy balance by count) and per worker; resampled draws;
                  eval splits by shard, or by sample when there are fewer shards than ranks
    shards.py     raw samples out of tar streams (webdataset's gopen), retries, positions, losses vs the manifest
    stream.py     the worker pipeline: raw -> shuffle buffer -> skip consumed -> decode -> crop -> batch;
                  resumable from a snapshot (read position + buffer ids) without re-reading drained shards
    decode.py / transforms.py / tokenize.py   one sample's bytes -> uint8 image, caption -> token ids
    loader.py     the rank-side loader: a fixed round robin over workers, equal batch counts, drop|pad
                  remainder, state_dict, issue counts
    build.py      build_train_loader / build_eval_loader

    mix.py        KindMixLoader: image-text and text-pair batches (data.text_pairs) on a seeded schedule

Batches: {"image": uint8 [B,3,S,S] (the model normalises it on its device: `DualEncoder.pixels`),
"input_ids": long [B,L], "attention_mask": long [B,L], "key": list[str], "text": list[str]}.
With data.hard_negatives K > 0 (group shards of `mmscale mine`), also "negatives": uint8 [B,K,3,S,S]
(hardest first), "negative_mask": bool [B,K] (False: padding), "scores": float [B,1+K] (the mining
bi-encoder's, positive first; NaN where absent), "teacher_scores": float [B,1+K] (a rescoring reranker's
logits, `mmscale mine --rescore-with`; NaN where absent) and "image_ids": int64 [B,1+K] (a hash of each image's
bytes). A text-pair batch has no "image": "input_ids"/"attention_mask"/"text" are the queries,
"doc_input_ids"/"doc_attention_mask"/"doc_text" their documents.
`loader.bad_samples` counts samples skipped or lost, by reason (undecodable_image, missing_image,
missing_caption, empty_caption, too_many_pixels, text_pair_sample, negative_<reason> (a masked negative, the
sample kept); truncated_tar, unreadable_tar, unreachable_shard,
manifest_mismatch: what a shard's manifest promised and it did not deliver; lost_on_resume: a
sample a resumed shuffle buffer could not read again); `loader.bad_shards` counts the shards behind
truncated_tar ... manifest_mismatch; `loader.padded_samples` the repeats that kept ranks in step.
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
