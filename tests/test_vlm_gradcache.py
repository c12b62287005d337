"""Exactness of the VLM gradient cache: 2 ranks under DeepSpeed ZeRO 2/3 equal one process on the whole batch.

Tiny random Qwen2-VL and Qwen3-VL models (tools/tiny_vlm.py) embed 2 x 4 samples: text queries, and
documents that are an image, an image and a text, or a text alone, of different sizes. The ranks
chunk by token budget, which gives them different numbers of chunks and chunks where one rank has an
image and the other none, so the agreed dummy forwards (extra 1-token chunks, one-patch images) run.
The reference is plain torch in this process: every sequence of the global batch encoded in one
padded forward, the loss written from its formula (tests/test_gradcache.py's `dense_loss`), one
backward. Every parameter's full gradient (LoRA adapters, full fine-tuning, the logit scale) and
every parameter after one SGD step must agree to 1e-5.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from mmscale.config import load_config
from mmscale.distributed import free_port
from tests.test_gradcache import assert_matches_reference, dense_loss
from tests.workers import leave
from tools import tiny_vlm

WORLD, PER_RANK, LR = 2, 4, 0.1
CHUNK_TOKENS = 64
LORA = ["model.vlm.lora.rank=4", "model.vlm.lora.alpha=8"]
# name -> (family, zero stage, overrides)
CASES: dict[str, tuple[str, int, list[str]]] = {
    "qwen2_zero2_full": ("qwen2_vl", 2, []),
    "qwen2_zero3_lora": ("qwen2_vl", 3, LORA),
    "qwen3_zero3_full_per_chunk": ("qwen3_vl", 3, ["train.grad_reduction=per_chunk"]),
    "qwen3_zero2_lora_matryoshka": ("qwen3_vl", 2, [*LORA, "loss.matryoshka_dims=[8,16]"]),
    "qwen3_zero3_lora_plain": ("qwen3_vl", 3, [*LORA, "train.gradcache=false"]),
}


def case_config(root: str, name: str):
    family, stage, extra = CASES[name]
    return load_config(None, [
        "model.kind=vlm", f"model.vlm.name_or_path={Path(root) / family}", f"train.zero_stage={stage}",
        f"train.global_batch_size={WORLD * PER_RANK}", f"train.chunk_tokens={CHUNK_TOKENS}", f"train.lr={LR}",
        "train.grad_clip=0", "train.weight_decay=0", "train.warmup_steps=0", "train.grad_reduction=coalesced",
        "model.init_logit_scale=2.0", *extra,
    ])  # fmt: skip


def new_model(cfg):
    """The embedder as every side builds it; LoRA's B matrices made non-zero so every adapter has a gradient."""
    from mmscale.models.vlm import build_vlm_embedder

    torch.manual_seed(0)
    model = build_vlm_embedder(cfg.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def samples() -> list[dict]:
    """The global batch: (query text, document images, document text), rank 0's samples first."""
    g = torch.Generator().manual_seed(7)
    words = tiny_vlm.VOCAB_WORDS

    def text(n: int) -> str:
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g))

    def image(h: int, w: int) -> torch.Tensor:
        return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)

    return [
        # rank 0: large pages first
        {"query": text(3), "images": [image(90, 60)], "doc": None},
        {"query": text(9), "images": [image(40, 56)], "doc": text(4)},
        {"query": text(5), "images": [], "doc": text(12)},
        {"query": text(2), "images": [image(33, 33)], "doc": None},
        # rank 1: small images and texts
        {"query": text(6), "images": [], "doc": text(3)},
        {"query": text(4), "images": [image(30, 90)], "doc": text(2)},
        {"query": text(11), "images": [], "doc": text(7)},
        {"query": text(3), "images": [image(24, 40)], "doc": None},
    ]


def rank_batch(renderer, rank: int) -> dict:
    from mmscale.data.vlm import collate_sequences

    seqs = []
    for s in samples()[rank * PER_RANK:(rank + 1) * PER_RANK]:
        seqs.append(renderer.encode("query", [], s["query"]))
        seqs.append(renderer.encode("document", s["images"], s["doc"]))
    return collate_sequences(seqs)


def task_parts(cfg):
    from mmscale.data.vlm import VlmRenderer, vision_tokens
    from mmscale.models.vlm import load_vlm_processor, vlm_preprocess

    processor = load_vlm_processor(cfg.model.vlm)
    renderer = VlmRenderer(processor.tokenizer, processor.chat_template, vlm_preprocess(cfg.model.vlm, processor),
                           *vision_tokens(processor))
    return renderer


# --------------------------------------------------------------------------- the reference


def reference_step(root: str, name: str) -> dict:
    """One process, plain torch: all 16 sequences in one padded forward, the dense loss, one backward, one SGD step."""
    cfg = case_config(root, name)
    renderer = task_parts(cfg)
    model = new_model(cfg).train()
    seqs = []
    for rank in range(WORLD):
        for s in samples()[rank * PER_RANK:(rank + 1) * PER_RANK]:
            seqs.append(renderer.encode("query", [], s["query"]))
            seqs.append(renderer.encode("document", s["images"], s["doc"]))
    ids, mask, positions, images = tiny_vlm.dense_batch(seqs, renderer.pad_token_id)
    emb = model.encode(ids, mask, positions, images["patches"], images["grids"])
    scale, bias = model.scale_and_bias()
    loss = dense_loss(cfg, emb[1::2], emb[0::2], scale, bias)  # documents in the image role
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    params = {n: (p - LR * p.grad if p.requires_grad else p).detach() for n, p in model.named_parameters()}
    return {"loss": loss.item(), "grads": grads, "params": params}


# --------------------------------------------------------------------------- the ranks


def _rank_worker(rank: int, port: int, out_dir: str, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from mmscale.data.vlm import plan_batch
    from mmscale.losses import build_loss
    from mmscale.train.engine import build_ds_config, build_engine
    from mmscale.train.vlm_step import vlm_gradcache_step, vlm_plain_step

    deepspeed.init_distributed(dist_backend="gloo")
    for name in CASES:
        cfg = case_config(root, name)
        renderer = task_parts(cfg)
        batch = rank_batch(renderer, rank)
        ds = build_ds_config(cfg, WORLD)
        if cfg.train.zero_stage == 3:
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the logit scale
        engine, _, _ = build_engine(cfg, new_model(cfg), WORLD, optimizer=lambda groups: torch.optim.SGD(groups, lr=LR),
                                    ds_config=ds)
        plan = plan_batch(batch, CHUNK_TOKENS, cfg.train.chunk_size)
        step = vlm_gradcache_step if cfg.train.gradcache else vlm_plain_step
        kwargs = dict(group_size=2, chunk_tokens=CHUNK_TOKENS, chunk_size=cfg.train.chunk_size,
                      pad_token_id=renderer.pad_token_id, image_token_id=renderer.image_token_id,
                      merge_size=renderer.pre.merge_size)
        if cfg.train.gradcache:
            kwargs["grad_reduction"] = cfg.train.grad_reduction
        result = step(engine, batch, build_loss(cfg.loss), **kwargs)
        loss = result["loss"].detach().clone().float()
        dist.all_reduce(loss)
        grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()
                 if p.requires_grad}
        engine.step()
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        plans = [None] * WORLD
        with_image = set(batch["image_seqs"].tolist())
        own = [any(s in with_image for s in c) for c in plan.chunks]
        dist.all_gather_object(plans, {"chunks": plan.chunks, "n": plan.n_chunks, "vision": plan.vision, "own": own})
        if rank == 0:
            torch.save({"loss": loss.item() / WORLD, "grads": grads, "params": params, "result": result,
                        "plans": plans}, Path(out_dir) / f"{name}.pt")
        engine.destroy() if hasattr(engine, "destroy") else None
    _rerank_rank(rank, out_dir, root)
    leave()


# --------------------------------------------------------------------------- the cross-encoder

RERANK_G, RERANK_PER_RANK = 3, 2  # groups of a positive and 2 negatives; 2 groups per rank


def rerank_config(root: str):
    return load_config(None, [
        "model.kind=vlm", f"model.vlm.name_or_path={Path(root) / 'qwen3_vl'}", "train.zero_stage=3",
        f"rerank.group_size={RERANK_G}", f"train.global_batch_size={WORLD * RERANK_PER_RANK}",
        f"train.chunk_tokens={CHUNK_TOKENS}", f"train.lr={LR}", "train.grad_clip=0", "train.weight_decay=0",
        "train.warmup_steps=0", "rerank.distill_weight=0.5", "rerank.distill_temperature=2.0",
        "model.vlm.query_prompt=Judge the pair.",
    ])  # fmt: skip


def rerank_groups(renderer) -> tuple[list, torch.Tensor, torch.Tensor]:
    """Every group's pair sequences (the query with its positive, then each negative; the last group is
    short of one, a placeholder), the negative mask [groups, G - 1] and the miner's scores [groups, G]."""
    docs = samples()
    seqs, mask = [], []
    for q in range(WORLD * RERANK_PER_RANK):
        query = docs[q]["query"]
        for j in range(RERANK_G):
            d = docs[(q + 3 * j) % len(docs)]
            short = q == WORLD * RERANK_PER_RANK - 1 and j == RERANK_G - 1
            seqs.append(renderer.placeholder() if short else renderer.encode_pair([], query, d["images"], d["doc"]))
            if j:
                mask.append(not short)
    scores = torch.linspace(0.9, 0.1, WORLD * RERANK_PER_RANK * RERANK_G).view(-1, RERANK_G)
    return seqs, torch.tensor(mask).view(-1, RERANK_G - 1), scores


def new_reranker(cfg):
    from mmscale.models.vlm_reranker import build_vlm_reranker

    torch.manual_seed(0)
    return build_vlm_reranker(cfg.model)


def _rerank_rank(rank: int, out_dir: str, root: str) -> None:
    """The VLM reranker's cached step (ZeRO-3, full fine-tuning) on this rank's groups."""
    from deepspeed.utils import safe_get_full_grad

    from mmscale.data.vlm import collate_sequences
    from mmscale.train.engine import build_ds_config, build_engine
    from mmscale.train.vlm_rerank import group_loss
    from mmscale.train.vlm_step import cached_sequence_step

    cfg = rerank_config(root)
    renderer = task_parts(cfg)
    seqs, mask, scores = rerank_groups(renderer)
    rows = slice(rank * RERANK_PER_RANK, (rank + 1) * RERANK_PER_RANK)
    batch = collate_sequences(seqs[rows.start * RERANK_G:rows.stop * RERANK_G])
    ds = build_ds_config(cfg, WORLD)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    engine, _, _ = build_engine(cfg, new_reranker(cfg), WORLD, optimizer=lambda groups: torch.optim.SGD(groups, lr=LR),
                                ds_config=ds)

    def rows_loss(pair_scores, scalars):
        return group_loss(pair_scores.view(-1, RERANK_G), scores[rows], mask[rows], 20.0, cfg)

    result = cached_sequence_step(engine, batch, rows_loss, output="scores", chunk_tokens=CHUNK_TOKENS,
                                  chunk_size=cfg.train.chunk_size, pad_token_id=renderer.pad_token_id,
                                  image_token_id=renderer.image_token_id, merge_size=renderer.pre.merge_size)
    grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    if rank == 0:
        torch.save({"result": result, "grads": grads}, Path(out_dir) / "rerank.pt")
    engine.destroy() if hasattr(engine, "destroy") else None  # its ZeRO-3 hooks go before the group does


def rerank_reference(root: str) -> dict:
    """One process: every pair of the global batch in one padded forward, the same group loss, one backward."""
    from mmscale.train.vlm_rerank import group_loss

    cfg = rerank_config(root)
    renderer = task_parts(cfg)
    seqs, mask, scores = rerank_groups(renderer)
    model = new_reranker(cfg).train()
    ids, attention, positions, images = tiny_vlm.dense_batch(seqs, renderer.pad_token_id)
    out = model(ids, attention, positions, images["patches"], images["grids"])["scores"]
    loss, _ = group_loss(out.view(-1, RERANK_G), scores, mask, 20.0, cfg)
    loss.backward()
    return {"loss": loss.item(), "grads": {n: p.grad for n, p in model.named_parameters() if p.requires_grad}}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tiny_vlm")
    for family in tiny_vlm.FAMILIES:
        tiny_vlm.make_tiny_vlm(root, family)
    return str(root)


@pytest.fixture(scope="module")
def rank_results(models):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_worker, args=(free_port(), out_dir, models), nprocs=WORLD, join=True)
        out = {name: torch.load(Path(out_dir) / f"{name}.pt", weights_only=False) for name in [*CASES, "rerank"]}
        yield out


@pytest.mark.parametrize("name", list(CASES))
def test_vlm_step_on_two_ranks_matches_the_dense_step(rank_results, models, name):
    got = rank_results[name]
    assert got["result"]["finite"]
    plans = got["plans"]
    # The plan exercises what makes multi-rank VLM steps hard: unequal chunk counts (rank 1 runs dummy
    # forwards) and chunks whose vision encoder runs on one rank for the other's images only.
    assert len(plans[0]["chunks"]) != len(plans[1]["chunks"])
    assert plans[0]["n"] == plans[1]["n"] == max(len(p["chunks"]) for p in plans)
    own = [p["own"] + [False] * (p["n"] - len(p["own"])) for p in plans]
    assert any(v and own[0][i] != own[1][i] for i, v in enumerate(plans[0]["vision"]))
    ref = reference_step(models, name)
    assert_matches_reference(got, ref)
    if "lora" in name:
        assert all("lora_" in n or not n.startswith("vlm.language_model") for n in got["grads"])
        assert any(n.startswith("vlm.visual") for n in got["grads"])  # the vision encoder trains fully


def test_vlm_reranker_cached_step_on_two_ranks_matches_the_dense_group_loss(rank_results, models):
    got, ref = rank_results["rerank"], rerank_reference(models)
    assert got["result"]["finite"] and "distill" in got["result"]
    assert got["grads"].keys() == ref["grads"].keys() and any(n.startswith("lm_head") for n in ref["grads"])
    for name, expected in ref["grads"].items():
        diff = (got["grads"][name].float() - expected).abs().max().item()
        assert diff <= 1e-5 * max(1.0, expected.abs().max().item()), f"{name}: {diff:.2e}"
