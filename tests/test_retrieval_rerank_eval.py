"""evaluate_rerank: bi-encoder alone vs its top-k re-ordered by a reranker, on cases with known answers."""

import pytest
import torch
from torch import nn

from mmscale.distributed import free_port
from mmscale.evaluate import retrieval_both_ways
from mmscale.retrieval.corpus import build_corpus
from mmscale.retrieval.encode import encode_shards
from mmscale.retrieval.rerank_eval import evaluate_rerank, format_rerank_table, rerank_metrics

N = 6


class ShiftedBiEncoder(nn.Module):
    """Ranks the right image second for every caption: caption i is closest to image i + 1 (of n).

    An image's "pixels" are one number, its index; a caption's token is its index.
    """

    def __init__(self, n: int = N) -> None:
        super().__init__()
        self.n = n
        self.embed_dim = n

    def forward(self, pixel_values, input_ids, attention_mask, normalize=True):
        i = input_ids[:, 0]
        text = nn.functional.one_hot((i + 1) % self.n, self.n).float() + 0.5 * nn.functional.one_hot(i, self.n).float()
        return {"image_emb": nn.functional.one_hot(pixel_values[:, 0].long(), self.n).float(), "text_emb": text}


class TwinBiEncoder(ShiftedBiEncoder):
    """Caption i embeds as image `twin(i)`: images 0 and 1 hold the same picture, so captions 0 and 1 tie."""

    @staticmethod
    def picture(i):
        return torch.where(i == 1, torch.zeros_like(i), i)

    def forward(self, pixel_values, input_ids, attention_mask, normalize=True):
        image = nn.functional.one_hot(self.picture(pixel_values[:, 0].long()), self.n).float()
        text = nn.functional.one_hot(self.picture(input_ids[:, 0]), self.n).float()
        return {"image_emb": image, "text_emb": text}


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


def _batches(idx: list[int], size: int):
    for start in range(0, len(idx), size):
        part = idx[start : start + size]
        yield {
            "image": torch.tensor(part, dtype=torch.float).view(-1, 1),
            "input_ids": torch.tensor(part).view(-1, 1),
            "attention_mask": torch.ones(len(part), 1, dtype=torch.long),
            "key": [f"k{i}" for i in part],
            "text": [f"t{i}" for i in part],
        }


def _rank_batches(rank: int, world: int, n: int, size: int = 3):
    """This rank's share of n samples, in batches of `size` (ranks may hold different counts)."""
    return _batches(list(range(rank, n, world)), size)


def test_oracle_reranker_lifts_recall_at_1_to_the_bi_encoder_recall_at_top_k():
    results = evaluate_rerank(
        ShiftedBiEncoder(), OracleReranker(), _rank_batches(0, 1, N, size=4), tokenizer=_tokenizer, max_length=1,
        top_k=3, ks=(1, 2, 5),
    )  # fmt: skip
    assert results["queries"] == N and results["top_k"] == 3
    assert results["bi_encoder"]["recall@1"] == 0.0 and results["bi_encoder"]["recall@2"] == 1.0
    assert results["bi_encoder"]["mrr@10"] == pytest.approx(0.5)
    assert results["reranked"]["recall@1"] == 1.0 and results["reranked"]["mrr@10"] == 1.0
    assert results["reranked"]["recall@5"] == 1.0  # beyond top_k the bi-encoder's order is kept
    table = format_rerank_table(results)
    assert "recall@1" in table and "+ reranker (top 3)" in table


def test_one_recall_for_one_model_across_both_sections_with_exact_ties():
    # Captions 0 and 1 score images 0 and 1 (the same picture) exactly alike: under the tie rule the
    # wrong one ranks first, in the retrieval section and in the rerank section's bi-encoder row alike.
    model = TwinBiEncoder()
    enc = encode_shards(model, _rank_batches(0, 1, N, size=4), keep_pixels=True, progress=False)
    corpus = build_corpus(enc.image_emb, enc.text_emb, enc.keys, enc.texts)
    metrics, (ranking, found) = retrieval_both_ways(enc, corpus, (1, 5), rerank_depth=3)  # as `mmscale eval --reranker`
    section = rerank_metrics(OracleReranker(), enc, corpus, ranking, found, tokenizer=_tokenizer, max_length=1,
                             top_k=3, ks=(1, 5))  # fmt: skip
    standalone = evaluate_rerank(model, OracleReranker(), _rank_batches(0, 1, N, size=4), tokenizer=_tokenizer,
                                 max_length=1, top_k=3, ks=(1, 5))  # fmt: skip
    assert metrics["t2i_recall@1"] == section["bi_encoder"]["recall@1"] == standalone["bi_encoder"]["recall@1"] == 4 / 6
    assert metrics["t2i_mrr@10"] == section["bi_encoder"]["mrr@10"]
    assert metrics["t2i_ndcg@10"] == section["bi_encoder"]["ndcg@10"]
    # The oracle tells the twins apart (by caption id vs image index): both come first after re-ranking.
    assert section["reranked"]["recall@1"] == 1.0


def _uneven_batches(rank: int, size: int = 4):
    """Rank 0 holds samples 0-9, rank 1 only 10 and 11 (one validation shard much larger than the other)."""
    return _batches(list(range(10)) if rank == 0 else [10, 11], size)


def _two_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    # batch_size 4 does not divide the ranks' query counts: every rank must still join every round.
    results = evaluate_rerank(
        ShiftedBiEncoder(12), OracleReranker(), _rank_batches(rank, world, 12 - rank), tokenizer=_tokenizer,
        max_length=1, top_k=3, ks=(1, 2, 5), batch_size=4,
    )  # fmt: skip
    # Rank 1 runs out of queries two rounds before rank 0 and still joins their exchanges.
    uneven = evaluate_rerank(
        ShiftedBiEncoder(12), OracleReranker(), _uneven_batches(rank), tokenizer=_tokenizer, max_length=1,
        top_k=3, ks=(1, 2, 5), batch_size=4,
    )  # fmt: skip
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"results": results, "uneven": uneven}, f)
    # gloo aborts a process whose peer tore the group down first ("terminate called without an
    # active exception"): leave together.
    dist.barrier()
    dist.destroy_process_group()


def _single_with_the_same_samples(n=12):
    """The samples of the two-rank run (rank 1 drops its last one) in one process."""
    return _batches([i for i in range(n) if not (i % 2 == 1 and i >= n - 2)], 4)


def test_two_ranks_give_the_single_process_result(tmp_path):
    import json

    import torch.multiprocessing as mp

    single = evaluate_rerank(
        ShiftedBiEncoder(12), OracleReranker(), _single_with_the_same_samples(), tokenizer=_tokenizer, max_length=1,
        top_k=3, ks=(1, 2, 5), batch_size=4,
    )  # fmt: skip
    assert single["reranked"]["recall@1"] == 1.0 and single["queries"] == 11
    out = tmp_path / "two.json"
    mp.spawn(_two_rank_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    got = json.loads(out.read_text())
    assert got["results"] == json.loads(json.dumps(single))
    whole = evaluate_rerank(
        ShiftedBiEncoder(12), OracleReranker(), _rank_batches(0, 1, 12, size=4), tokenizer=_tokenizer, max_length=1,
        top_k=3, ks=(1, 2, 5), batch_size=4,
    )  # fmt: skip
    assert got["uneven"] == json.loads(json.dumps(whole))
