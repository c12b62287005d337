"""How the gradient cache forms its chunks (captions grouped by length, rows kept track of) and how the
dual encoder cuts a batch's padding.

The multi-rank exactness of a grouped step is in test_gradcache.py (its captions differ in length);
these are the single-process facts that step relies on.
"""

from __future__ import annotations

import torch

from mmscale.models.towers import pool_tokens, trim_right_padding
from mmscale.train.gradcache import chunk_rows, make_chunks


def batch(lengths: list[int], width: int = 8, left: bool = False) -> dict[str, torch.Tensor]:
    n = len(lengths)
    positions = torch.arange(width)[None]
    lengths_t = torch.tensor(lengths)[:, None]
    mask = (positions >= width - lengths_t) if left else (positions < lengths_t)
    return {
        "pixel_values": torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, 2, 2).clone(),
        "input_ids": (torch.arange(1, width + 1)[None] + 100 * torch.arange(n)[:, None]) * mask,
        "attention_mask": mask.long(),
    }


def trim(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return trim_right_padding(b["input_ids"], b["attention_mask"])


def test_right_padding_is_cut_after_the_longest_caption():
    b = batch([3, 5, 2])
    ids, mask = trim(b)
    assert ids.shape == (3, 5) and mask.shape == (3, 5)
    assert torch.equal(ids, b["input_ids"][:, :5])


def test_left_padding_and_full_captions_are_left_alone():
    # Cutting leading columns would shift the real tokens' position ids.
    for b in (batch([3, 5, 2], left=True), batch([8, 8])):
        assert trim(b)[0].shape[1] == 8


def test_all_empty_captions_keep_one_column():
    assert trim(batch([0, 0]))[0].shape == (2, 1)


def test_chunks_group_captions_of_similar_length_and_cover_every_row_once():
    lengths = [1, 8, 2, 7, 3, 6, 4, 5]
    b = batch(lengths)
    rows = chunk_rows(b, chunk_size=2, group_by_length=True)
    assert [r.tolist() for r in rows] == [[1, 3], [5, 7], [6, 4], [2, 0]]
    assert sorted(torch.cat(rows).tolist()) == list(range(8))
    chunks = make_chunks(b, 2, rows)
    assert [trim(c)[0].shape[1] for c in chunks] == [8, 6, 4, 2]  # what the text tower will encode
    for idx, chunk in zip(rows, chunks):  # every input follows the same rows
        assert torch.equal(chunk["pixel_values"][:, 0, 0, 0], idx.float())
        assert torch.equal(chunk["input_ids"], b["input_ids"][idx])


def test_equal_lengths_or_grouping_off_keep_contiguous_chunks():
    b = batch([4, 4, 4, 4])
    assert chunk_rows(b, 2, group_by_length=True) is None
    varied = batch([1, 8, 2, 7])
    assert chunk_rows(varied, 2, group_by_length=False) is None
    chunks = make_chunks(varied, 2, None)
    assert [trim(c)[0].shape[1] for c in chunks] == [8, 7]  # each contiguous chunk still cut
    assert torch.equal(chunks[1]["pixel_values"], varied["pixel_values"][2:4])


def test_grouped_chunks_and_cut_padding_give_the_same_embeddings_as_the_whole_padded_batch():
    from mmscale.config import load_config
    from mmscale.models import build_dual_encoder

    cfg = load_config("launch/configs/tiny.yaml", ["model.text.config.hidden_dropout_prob=0.0",
                                                   "model.text.config.attention_probs_dropout_prob=0.0"])
    torch.manual_seed(0)
    model = build_dual_encoder(cfg.model).eval()
    g = torch.Generator().manual_seed(1)
    n, width = 12, 16
    mask = (torch.arange(width)[None] < torch.randint(1, width + 1, (n, 1), generator=g)).long()
    inputs = {"pixel_values": torch.randn(n, 3, 32, 32, generator=g),
              "input_ids": torch.randint(1000, 5000, (n, width), generator=g) * mask, "attention_mask": mask}
    for pooling in ("mean", "cls", "eos"):
        model.pooling = pooling
        with torch.no_grad():
            whole = model(**inputs)
            # The tower on the full padded width, no cut: the reference the cut must equal.
            hidden = model.text(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
            uncut = torch.nn.functional.normalize(model.text_proj(pool_tokens(hidden, mask, pooling)), dim=-1)
            assert torch.allclose(whole["text_emb"], uncut, atol=1e-6), pooling
            rows = chunk_rows(inputs, 4, group_by_length=True)
            outs = [model(**c) for c in make_chunks(inputs, 4, rows)]
        inverse = torch.argsort(torch.cat(rows))
        for key in ("image_emb", "text_emb"):
            assert torch.allclose(torch.cat([o[key] for o in outs])[inverse], whole[key], atol=1e-6), (pooling, key)
