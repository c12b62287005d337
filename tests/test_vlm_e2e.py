"""A vision-language embedder and its cross-encoder trained end to end through the real deepspeed launcher,
then evaluated and exported.

Two CPU ranks, ZeRO-3, LoRA on a tiny random Qwen3-VL, chunks by token budget, mined groups with two
hard negatives (some groups short of one), evaluation on (query, document) pairs at the end; then
`mmscale eval` and `mmscale export --format sentence-transformers` of the run, whose folder
`SentenceTransformer` loads offline and which gives the checkpoint's own embeddings. Then
`mmscale rerank` of the same config on 2 ranks (ZeRO-3, LoRA, groups of 3 from the same group
shards through the streaming loader, the token-budget cached step), `mmscale eval EMBEDDER
--reranker RUN`, and the reranker's CrossEncoder export, which sentence-transformers loads offline
and which scores as the checkpoint does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.test_reranker_e2e import launch
from tools import tiny_vlm


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("vlm_e2e")
    model = tiny_vlm.make_tiny_vlm(tmp / "models", "qwen3_vl")
    tiny_vlm.write_group_shards(tmp / "groups", n=24, negatives=2, samples_per_shard=6)
    tiny_vlm.write_pair_shards(tmp / "val", n=12, samples_per_shard=6, seed=1)
    config = {
        "output_dir": str(tmp / "run"),
        "model": {"kind": "vlm", "vlm": {"name_or_path": str(model), "query_prompt": "Find the document.",
                                         "lora": {"rank": 4, "alpha": 8}}},
        "data": {"train": str(tmp / "groups"), "hard_negatives": 2, "val": str(tmp / "val"), "workers": 1, "shuffle_buffer": 4},
        "train": {"global_batch_size": 8, "chunk_tokens": 96, "steps": 3, "lr": 1e-3, "warmup_steps": 1,
                  "zero_stage": 3, "log_every": 1, "save_every": 0},
        "eval": {"batch_size": 6},
    }  # fmt: skip
    path = tmp / "vlm.yaml"
    path.write_text(yaml.safe_dump(config))
    launch("train", path)
    return tmp


@pytest.fixture(scope="module")
def rerank_run(run) -> Path:
    launch("rerank", run / "vlm.yaml", f"rerank.mined={run / 'groups'}", "rerank.group_size=3",
           "rerank.global_batch_size=4", "rerank.steps=2", "rerank.warmup_steps=0", "rerank.lr=1e-3")
    return run / "run" / "rerank"


def test_two_rank_zero3_run_with_hard_negatives_trains_and_evaluates(run):
    records = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("group") != "eval" and "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)
    evals = [r for r in records if r.get("group") == "eval"]
    assert evals and evals[-1]["samples"] == 12 and 0 <= evals[-1]["q2d_recall@1"] <= 1
    assert (run / "run" / "checkpoints" / "step_00000003" / "complete.json").is_file()


def test_eval_and_sentence_transformers_export_of_the_run(run, capsys):
    from sentence_transformers import SentenceTransformer

    import mmscale
    from mmscale.cli import main

    assert main(["eval", str(run / "run"), "--data", str(run / "val"), "--output", str(run / "eval.json")]) == 0
    metrics = json.loads((run / "eval.json").read_text())["metrics"]
    assert metrics["samples"] == 12 and "q2d_mrr@10" in metrics and "d2q_recall@5" in metrics
    assert main(["export", str(run / "run"), str(run / "st"), "--format", "sentence-transformers"]) == 0
    st = SentenceTransformer(str(run / "st"), local_files_only=True, device="cpu")
    trained = mmscale.load(run / "run")
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (48, 40, 3), dtype=np.uint8))
    for ours, theirs in ((trained.encode_query(["red and blue"]), st.encode_query(["red and blue"])),
                         (trained.encode_document([image, {"image": image, "text": "a page"}]),
                          st.encode_document([image, {"image": image, "text": "a page"}]))):
        assert (ours - torch.as_tensor(theirs)).abs().max().item() <= 1e-4


def test_two_rank_vlm_reranker_trains_on_groups_then_eval_reranks_and_crossencoder_export_scores_alike(
        run, rerank_run, capsys):
    from sentence_transformers import CrossEncoder

    import mmscale
    from mmscale.cli import main

    records = [json.loads(line) for line in (rerank_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "listwise" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(np.isfinite(r["loss"]) and "distill" in r and 0 <= r["accuracy"] <= 1 for r in steps)
    assert (rerank_run / "checkpoints" / "step_00000002" / "complete.json").is_file()
    assert yaml.safe_load((rerank_run / "config.yaml").read_text())["data"]["hard_negatives"] == 2

    out = run / "rerank_eval.json"
    assert main(["eval", str(run / "run"), "--data", str(run / "val"), "--reranker", str(rerank_run), "--top-k", "5",
                 "--output", str(out)]) == 0
    rerank = json.loads(out.read_text())["rerank"]
    assert rerank["queries"] == 12 and rerank["top_k"] == 5
    assert rerank["reranked"].keys() == rerank["bi_encoder"].keys() and "ndcg@10" in rerank["reranked"]
    assert "+ reranker (top 5)" in capsys.readouterr().out

    assert main(["export", str(rerank_run), str(run / "ce"), "--format", "sentence-transformers"]) == 0
    ce = CrossEncoder(str(run / "ce"), local_files_only=True, device="cpu")
    trained = mmscale.load(rerank_run)
    image = Image.fromarray(np.random.RandomState(1).randint(0, 256, (40, 48, 3), dtype=np.uint8))
    docs = [image, "a text document", {"image": image, "text": "a page"}]
    ours = trained.score("red and blue", docs)
    theirs = torch.as_tensor(ce.predict([("red and blue", d) for d in docs]))
    assert (ours - theirs).abs().max().item() <= 1e-4
