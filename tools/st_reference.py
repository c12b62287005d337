"""sentence-transformers' `mine_hard_negatives` run on precomputed embeddings (the reference for mmscale's mining).

sentence-transformers mines text corpora: it embeds a dataset's anchors and positives with a
`SentenceTransformer`. Here the "model" is a lookup table: a caption embeds to its caption
embedding and an image id (`img:KEY`) to its image embedding, so sentence-transformers mines the
caption -> image score matrix mmscale mines, with its own code. Requires the `datasets` package.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import torch


class EmbeddingTable:
    """Duck-typed `SentenceTransformer`: `encode_query` / `encode_document` look strings up in a table."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table
        self.device = torch.device("cpu")
        self.model_card_data = SimpleNamespace(base_model=None)

    def _encode(self, texts: Sequence[str], **_) -> np.ndarray:
        return np.stack([self.table[t] for t in texts]).astype(np.float32)

    encode_query = _encode
    encode_document = _encode

    def similarity(self, a, b) -> torch.Tensor:
        return torch.as_tensor(a) @ torch.as_tensor(b).T

    def similarity_pairwise(self, a, b) -> torch.Tensor:
        return (torch.as_tensor(a) * torch.as_tensor(b)).sum(-1)

    def get_embedding_dimension(self) -> int:
        return next(iter(self.table.values())).shape[0]


def st_mine(
    text_emb: torch.Tensor,
    image_emb: torch.Tensor,
    captions: Sequence[str],
    keys: Sequence[str],
    **settings,
) -> dict[tuple[str, str], list[str]]:
    """(caption, positive key) -> negative keys, best first, mined by sentence-transformers from these embeddings.

    Row i of `text_emb` / `image_emb` is sample i (caption i, key i, its own positive); samples
    sharing a caption must share its embedding, as a text encoder gives them.
    """
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    table = {f"img:{k}": e for k, e in zip(keys, image_emb.float().numpy())}
    for caption, e in zip(captions, text_emb.float().numpy()):
        table.setdefault(caption, e)
    dataset = Dataset.from_dict({"query": list(captions), "positive": [f"img:{k}" for k in keys]})
    mined = mine_hard_negatives(
        dataset, EmbeddingTable(table), corpus=[f"img:{k}" for k in keys], output_format="labeled-list",
        output_scores=True, verbose=False, **settings,
    )  # fmt: skip
    out: dict[tuple[str, str], list[str]] = {}
    for row in mined:
        docs = row["positive"]  # [positive, negative_1, ...] in labeled-list format
        out[(row["query"], docs[0][len("img:") :])] = [d[len("img:") :] for d in docs[1:]]
    return out
