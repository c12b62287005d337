"""evaluate_rerank: bi-encoder alone vs its top-k re-ordered by a reranker, on a case with known answers."""

import pytest
import torch
from torch import nn

from mmscale.distributed import free_port
from mmscale.retrieval.rerank_eval import evaluate_rerank, format_rerank_table

N = 6


class ShiftedBiEncoder(nn.Module):
    """Ranks the right image second for every caption: caption i is closest to image i + 1 (of n)."""

    def __init__(self, n: int = N) -> None:
        super().__init__()
        self.n = n

    def encode_image(self, pixels):
        return nn.functional.one_hot(pixels[:, 0].long(), self.n).float()

    def encode_text(self, input_ids, attention_mask):
        i = input_ids[:, 0]
        return nn.functional.normalize(
            nn.functional.one_hot((i + 1) % self.n, self.n).float() + 0.5 * nn.functional.one_hot(i, self.n).float(),
            dim=1,
        )


class OracleReranker(nn.Module):
    """Scores 1 for the matching (caption, image) pair and 0 otherwise."""

    def encode_image_tokens(self, pixels):
        return pixels.float().view(-1, 1, 1)

    def encode_text_tokens(self, input_ids, attention_mask):
        return input_ids.float().view(-1, 1, 1)

    def fuse(self, text_tokens, attention_mask, image_tokens):
        return (text_tokens[:, 0, 0] == image_tokens[:, 0, 0]).float()


def _tokenizer(texts):
    return {"input_ids": [[int(t[1:])] for t in texts]}


def _batches():
    return _rank_batches(0, 1, N, size=4)  # two batches of unequal size (4 and 2)


def test_oracle_reranker_lifts_recall_at_1_to_the_bi_encoder_recall_at_top_k():
    results = evaluate_rerank(
        ShiftedBiEncoder(), OracleReranker(), _batches(), tokenizer=_tokenizer, max_length=1, top_k=3, ks=(1, 2, 5)
    )
    assert results["queries"] == N and results["top_k"] == 3
    assert results["bi_encoder"]["recall@1"] == 0.0 and results["bi_encoder"]["recall@2"] == 1.0
    assert results["bi_encoder"]["mrr@10"] == pytest.approx(0.5)
    assert results["reranked"]["recall@1"] == 1.0 and results["reranked"]["mrr@10"] == 1.0
    assert results["reranked"]["recall@5"] == 1.0  # beyond top_k the bi-encoder's order is kept
    table = format_rerank_table(results)
    assert "recall@1" in table and "+ reranker (top 3)" in table


def _rank_batches(rank: int, world: int, n: int, size: int = 3):
    """This rank's share of n samples, in batches of `size` (ranks may hold different counts)."""
    idx = list(range(rank, n, world))
    for start in range(0, len(idx), size):
        part = idx[start : start + size]
        yield {
            "image": torch.tensor(part, dtype=torch.float).view(-1, 1),
            "input_ids": torch.tensor(part).view(-1, 1),
            "attention_mask": torch.ones(len(part), 1, dtype=torch.long),
            "key": [f"k{i}" for i in part],
            "text": [f"t{i}" for i in part],
        }


def _two_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    # batch_size 4 does not divide the rank slices of the 12-image corpus: the blocks must stop at
    # each rank's boundary or every later image's tokens shift (a bug this test caught).
    results = evaluate_rerank(
        ShiftedBiEncoder(12), OracleReranker(), _rank_batches(rank, world, 12), tokenizer=_tokenizer, max_length=1,
        top_k=3, ks=(1, 2, 5), batch_size=4,
    )  # fmt: skip
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    # gloo aborts a process whose peer tore the group down first ("terminate called without an
    # active exception"): leave together.
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_give_the_single_process_result(tmp_path):
    import json

    import torch.multiprocessing as mp

    single = evaluate_rerank(
        ShiftedBiEncoder(12), OracleReranker(), _rank_batches(0, 1, 12), tokenizer=_tokenizer, max_length=1,
        top_k=3, ks=(1, 2, 5), batch_size=4,
    )  # fmt: skip
    assert single["reranked"]["recall@1"] == 1.0
    out = tmp_path / "two.json"
    mp.spawn(_two_rank_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    assert json.loads(out.read_text()) == json.loads(json.dumps(single))
