"""How the gradient cache forms its chunks (captions grouped by length, rows kept track of) and how the
dual encoder cuts a batch's padding.

The multi-rank exactness of a grouped step is in test_gradcache.py (its captions differ in length);
these are the single-process facts that step relies on.
"""

from __future__ import annotations

import torch

from mmscale.models.towers import pool_tokens, trim_right_padding
from mmscale.train.gradcache import ChunkedBatch, plan_chunks


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


def chunks_of(b: dict[str, torch.Tensor], chunk_size: int, group: bool = True) -> ChunkedBatch:
    return ChunkedBatch(b, plan_chunks(b, chunk_size, group), torch.device("cpu"))


def test_chunks_group_captions_of_similar_length_and_cover_every_row_once():
    lengths = [1, 8, 2, 7, 3, 6, 4, 5]
    b = batch(lengths)
    chunks = chunks_of(b, 2)
    rows = chunks.plan.text_rows
    assert [r.tolist() for r in rows] == [[1, 3], [5, 7], [6, 4], [2, 0]]
    assert sorted(torch.cat(rows).tolist()) == list(range(8))
    assert list(chunks.plan.text_lengths) == [8, 6, 4, 2]  # what the text tower will encode, decided on the host
    for i, idx in enumerate(rows):
        chunk = chunks[i]
        assert torch.equal(chunk["input_ids"], b["input_ids"][idx]) and chunk["text_length"] == chunks.plan.text_lengths[i]
        # Images need no grouping: they go in contiguous slices of the batch, views until sent.
        assert torch.equal(chunk["pixel_values"][:, 0, 0, 0], torch.arange(2 * i, 2 * i + 2).float())
    # Caption embeddings computed chunk by chunk come back in batch order.
    per_chunk = [b["input_ids"][idx, :1].float() for idx in rows]
    assert torch.equal(chunks.text_in_batch_order(per_chunk), b["input_ids"][:, :1].float())


def test_equal_lengths_or_grouping_off_keep_contiguous_chunks():
    b = batch([4, 4, 4, 4])
    assert plan_chunks(b, 2, group_by_length=True).text_rows is None
    varied = batch([1, 8, 2, 7])
    chunks = chunks_of(varied, 2, group=False)
    assert chunks.plan.text_rows is None
    assert list(chunks.plan.text_lengths) == [8, 7]  # each contiguous chunk still cut
    assert torch.equal(chunks[1]["pixel_values"], varied["pixel_values"][2:4])
    assert torch.equal(chunks[1]["input_ids"], varied["input_ids"][2:4])


def test_left_padding_is_never_cut_by_the_plan():
    assert list(plan_chunks(batch([3, 5, 2, 1], left=True), 2, True).text_lengths) == [8, 8]


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
            chunks = chunks_of(inputs, 4)
            outs = [model(**chunks[i]) for i in range(len(chunks))]
        assert torch.allclose(torch.cat([o["image_emb"] for o in outs]), whole["image_emb"], atol=1e-6), pooling
        text = chunks.text_in_batch_order([o["text_emb"] for o in outs])
        assert torch.allclose(text, whole["text_emb"], atol=1e-6), pooling


def test_bf16_chunk_gradients_are_summed_in_fp32_and_rounded_once():
    """64 chunks each adding a gradient far below bf16's resolution of the running sum."""
    from mmscale.train.gradcache import _Fp32GradSum

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(16, dtype=torch.bfloat16))
    parts = [torch.full((16,), 1.0) if i == 0 else torch.rand(16) * 1e-3 for i in range(64)]
    exact = torch.stack(parts).sum(0)  # fp32
    with _Fp32GradSum([w]) as acc:
        for i, g in enumerate(parts):
            acc.last = i == len(parts) - 1
            (w.float() * g).sum().backward()
    assert torch.equal(w.grad, exact.to(torch.bfloat16))  # one rounding of the fp32 total
    naive = torch.nn.Parameter(torch.ones(16, dtype=torch.bfloat16))
    for g in parts:
        (naive.float() * g).sum().backward()  # autograd adds in bf16: the small parts are rounded away
    assert (naive.grad.float() - exact).abs().max() > (w.grad.float() - exact).abs().max()
