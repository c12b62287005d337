"""Benchmark of the vision-language embedder's cached step: beside sentence-transformers, and on 2 ranks ZeRO-3.

1. One process, the same small random Qwen3-VL, the same batch (text queries with an instruction;
   documents that are pictures of varying size and aspect ratio, a third of them with a caption),
   the same loss (symmetric InfoNCE at a fixed scale of 20): mmscale's cached step (`vlm_gradcache_step`
   through a ZeRO-0 engine, chunks by token budget) against sentence-transformers'
   `CachedMultipleNegativesRankingLoss` (directions query->doc and doc->query, per-direction
   softmax: the same loss) on a `SentenceTransformer` loaded from mmscale's export of the same
   weights. Each runs in its own subprocess: samples/s over the timed steps (after one warm-up),
   peak RSS above the process's RSS before the step, and every parameter's gradient against the
   dense reference (plain torch, the whole batch in one forward, the loss from its formula).
2. mmscale alone on 2 ranks (gloo), ZeRO-3, chunks of the same token budget: peak RSS per rank
   at global batch 64 -> 1024 (each size in a fresh pair of processes).

    python tools/bench_vlm.py                      # prints the tables, writes bench_results/vlm.json
    python tools/bench_vlm.py --sizes 64,256 --repeats 2

Goals: samples/s ratio (mmscale / sentence-transformers) >= 1.1, peak memory ratio <= 1.0, both
gradients exact, ZeRO-3 peak memory flat within 1.15 from 64 to 1024.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.bench_gradcache import peak_rss_since_reset_mb, release_free_memory, reset_peak_rss, rss_mb  # noqa: E402

SCALE = 20.0
PROMPT = "Find the picture that matches the description."
GOALS = {"speed_ratio": 1.1, "memory_ratio": 1.0, "zero3_flatness": 1.15}


# --------------------------------------------------------------------------- model and data


def make_model(root: Path, hidden: int, layers: int) -> Path:
    """A small random Qwen3-VL (ForConditionalGeneration checkpoint + processor) under root."""
    import torch
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    from tools import tiny_vlm

    out = root / f"qwen3_vl_h{hidden}_l{layers}"
    if (out / "config.json").is_file():
        return out
    tokenizer = tiny_vlm.make_tokenizer()
    values = tiny_vlm.inline_config("qwen3_vl", tokenizer, hidden=hidden, layers=layers)
    values["text_config"].update(num_attention_heads=max(2, hidden // 64), num_key_value_heads=1,
                                 intermediate_size=4 * hidden)
    values["text_config"]["head_dim"] = hidden // values["text_config"]["num_attention_heads"]
    hd = values["text_config"]["head_dim"]
    values["text_config"]["rope_parameters"]["mrope_section"] = [hd // 4, hd // 8, hd // 8]
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    Qwen3VLForConditionalGeneration(config).float().save_pretrained(str(out))
    tiny_vlm.make_processor("qwen3_vl", tokenizer, max_pixels=64 * 64 * 4).save_pretrained(str(out))
    return out


def batch_samples(n: int, seed: int = 0) -> list[dict]:
    """n (query text, document) samples: documents are pictures (40-200 px sides), every third with a caption."""
    import numpy as np

    from tools.tiny_vlm import VOCAB_WORDS

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = " ".join(VOCAB_WORDS[j] for j in rng.integers(0, len(VOCAB_WORDS), int(rng.integers(3, 16))))
        h, w = int(rng.integers(40, 200)), int(rng.integers(40, 200))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out.append({"query": words, "image": image, "caption": "a picture of the page" if i % 3 == 0 else None})
    return out


def mmscale_config(model: Path, chunk_tokens: int, batch: int, stage: int = 0):
    from mmscale.config import load_config

    return load_config(None, [
        "model.kind=vlm", f"model.vlm.name_or_path={model}", f"model.vlm.query_prompt='{PROMPT}'",
        "model.vlm.learn_temperature=false", f"model.init_logit_scale={__import__('math').log(SCALE)}",
        f"train.global_batch_size={batch}", f"train.chunk_tokens={chunk_tokens}", f"train.zero_stage={stage}",
        "train.grad_clip=0", "train.weight_decay=0", "train.warmup_steps=0", "train.grad_reduction=coalesced",
    ])  # fmt: skip


def rank_batch(renderer, samples: list[dict]) -> dict:
    import torch

    from mmscale.data.vlm import collate_sequences

    seqs = []
    for s in samples:
        image = torch.from_numpy(s["image"]).permute(2, 0, 1).contiguous()
        seqs.append(renderer.encode("query", [], s["query"]))
        seqs.append(renderer.encode("document", [image], s["caption"]))
    return collate_sequences(seqs)


def build_mmscale(model_dir: Path, chunk_tokens: int, batch: int, stage: int = 0):
    import torch

    from mmscale.data.vlm import VlmRenderer, vision_tokens
    from mmscale.models.vlm import build_vlm_embedder, load_vlm_processor

    cfg = mmscale_config(model_dir, chunk_tokens, batch, stage)
    processor = load_vlm_processor(cfg.model.vlm)
    torch.manual_seed(0)
    model = build_vlm_embedder(cfg.model, processor=processor)
    renderer = VlmRenderer(processor.tokenizer, processor.chat_template, model.preprocess, *vision_tokens(processor))
    return cfg, model, processor, renderer


# --------------------------------------------------------------------------- the three steps (child processes)


def grads_of(named) -> dict:
    return {n.removeprefix("vlm."): p.grad.detach().clone() for n, p in named if p.requires_grad and p.grad is not None}


def child_mmscale(model_dir: Path, batch: int, chunk_tokens: int, repeats: int, out: Path, port: int) -> dict:
    import torch

    from mmscale.losses import build_loss
    from mmscale.train.engine import build_engine
    from mmscale.train.vlm_step import vlm_gradcache_step
    from tools.bench_gradcache import single_rank_env

    single_rank_env(port)
    cfg, model, _, renderer = build_mmscale(model_dir, chunk_tokens, batch)
    engine, _, _ = build_engine(cfg, model, 1, optimizer=lambda groups: torch.optim.SGD(groups, lr=0.0))
    data = rank_batch(renderer, batch_samples(batch))
    loss_fn = build_loss(cfg.loss)
    kwargs = dict(group_size=2, chunk_tokens=chunk_tokens, chunk_size=cfg.train.chunk_size,
                  pad_token_id=renderer.pad_token_id, image_token_id=renderer.image_token_id,
                  merge_size=renderer.pre.merge_size)

    def step():
        engine.zero_grad()
        return vlm_gradcache_step(engine, data, loss_fn, **kwargs)

    return _timed(step, repeats, lambda: grads_of(engine.module.named_parameters()), out,
                  extra={"tokens": int(data["seq_lens"].sum()), "sequences": int(len(data["seq_lens"]))})


def child_st(model_dir: Path, batch: int, mini_batch: int, repeats: int, out: Path, st_dir: Path) -> dict:
    from PIL import Image
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    st = SentenceTransformer(str(st_dir), local_files_only=True, device="cpu")
    st.train()
    loss_fn = CachedMultipleNegativesRankingLoss(st, scale=SCALE, mini_batch_size=mini_batch,
                                                 directions=("query_to_doc", "doc_to_query"),
                                                 partition_mode="per_direction")
    samples = batch_samples(batch)
    queries = [s["query"] for s in samples]
    docs = [{"image": Image.fromarray(s["image"]), "text": s["caption"]} if s["caption"] else Image.fromarray(s["image"])
            for s in samples]
    features = [st.preprocess(queries, prompt=st.prompts["query"]), st.preprocess(docs)]

    def step():
        st.zero_grad()
        loss = loss_fn(features, None)
        loss.backward()
        return {"loss": loss.detach()}

    return _timed(step, repeats, lambda: grads_of(st[0].model.named_parameters()), out, prefix_fix=True)


def child_dense(model_dir: Path, batch: int, out: Path) -> dict:
    import torch

    from tests.test_gradcache import dense_loss
    from tools import tiny_vlm

    cfg, model, _, renderer = build_mmscale(model_dir, 0, batch)
    model.train()
    samples = batch_samples(batch)
    seqs = []
    for s in samples:
        image = torch.from_numpy(s["image"]).permute(2, 0, 1).contiguous()
        seqs += [renderer.encode("query", [], s["query"]), renderer.encode("document", [image], s["caption"])]
    ids, mask, positions, images = tiny_vlm.dense_batch(seqs, renderer.pad_token_id)

    def step():
        model.zero_grad()
        emb = model.encode(ids, mask, positions, images["patches"], images["grids"])
        scale, bias = model.scale_and_bias()
        loss = dense_loss(cfg, emb[1::2], emb[0::2], scale, bias)
        loss.backward()
        return {"loss": loss.detach()}

    return _timed(step, 1, lambda: grads_of(model.named_parameters()), out)


def _timed(step, repeats: int, grads, out: Path, extra: dict | None = None, prefix_fix: bool = False) -> dict:
    import torch

    step()  # warm-up: allocator pools, lazy initialisation
    release_free_memory()  # both processes start the timed steps from their live memory
    before = rss_mb()
    reset_peak_rss()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        result = step()
        times.append(time.process_time() - start)
    peak = peak_rss_since_reset_mb()
    torch.save(grads(), out)
    return {"step_cpu_s": times, "median_step_cpu_s": statistics.median(times), "rss_before_mb": before,
            "peak_rss_mb": peak, "peak_above_before_mb": peak - before, "loss": float(result["loss"]), **(extra or {})}


# --------------------------------------------------------------------------- ZeRO-3 on 2 ranks (child processes)


def zero3_rank(rank: int, port: int, model_dir: str, batch: int, chunk_tokens: int, out: str) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    from mmscale import distributed
    from mmscale.losses import build_loss
    from mmscale.train.engine import build_engine
    from mmscale.train.vlm_step import vlm_gradcache_step

    deepspeed.init_distributed(dist_backend="gloo")
    cfg, model, _, renderer = build_mmscale(Path(model_dir), chunk_tokens, batch, stage=3)
    engine, _, _ = build_engine(cfg, model, 2, optimizer=lambda groups: torch.optim.SGD(groups, lr=0.0))
    per_rank = batch // 2
    data = rank_batch(renderer, batch_samples(batch)[rank * per_rank:(rank + 1) * per_rank])
    kwargs = dict(group_size=2, chunk_tokens=chunk_tokens, chunk_size=cfg.train.chunk_size,
                  pad_token_id=renderer.pad_token_id, image_token_id=renderer.image_token_id,
                  merge_size=renderer.pre.merge_size)
    loss_fn = build_loss(cfg.loss)
    warm = rank_batch(renderer, batch_samples(8, seed=1)[rank * 4:(rank + 1) * 4])
    vlm_gradcache_step(engine, warm, loss_fn, **kwargs)  # warm-up on a small batch: engine buffers, allocator
    engine.step()
    release_free_memory()
    before = rss_mb()
    reset_peak_rss()
    start = time.perf_counter()
    result = vlm_gradcache_step(engine, data, loss_fn, **kwargs)
    engine.step()
    record = {"rank": rank, "batch": batch, "rss_before_mb": before, "peak_rss_mb": peak_rss_since_reset_mb(),
              "step_s": time.perf_counter() - start, "chunks": result["chunks"], "loss": float(result["loss"])}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    distributed.destroy(together=True)


def run_zero3(model_dir: Path, sizes: list[int], chunk_tokens: int) -> list[dict]:
    import torch.multiprocessing as mp

    from mmscale.distributed import free_port

    results = []
    for batch in sizes:
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(zero3_rank, args=(free_port(), str(model_dir), batch, chunk_tokens, out), nprocs=2, join=True)
            ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
        row = {"batch": batch, "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
               "peak_above_before_mb": max(r["peak_rss_mb"] - r["rss_before_mb"] for r in ranks),
               "chunks": ranks[0]["chunks"], "step_s": max(r["step_s"] for r in ranks)}
        print(f"  ZeRO-3 2 ranks, batch {batch:5d}: peak {row['peak_rss_mb']:.0f} MB per rank "
              f"(+{row['peak_above_before_mb']:.0f} MB in the step), {row['chunks']} chunks, {row['step_s']:.1f} s",
              flush=True)
        results.append(row)
    return results


# --------------------------------------------------------------------------- driver


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    what, model_dir, out = args._child[0], Path(args._child[1]), Path(args._child[2])
    if what == "mmscale":
        from mmscale.distributed import free_port

        result = child_mmscale(model_dir, args.batch, args.chunk_tokens, args.repeats, out, free_port())
    elif what == "st":
        result = child_st(model_dir, args.batch, args.mini_batch, args.repeats, out, Path(args._child[3]))
    else:
        result = child_dense(model_dir, args.batch, out)
    print("RESULT " + json.dumps(result))


def run_child(what: str, model_dir: Path, grads: Path, args: argparse.Namespace, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--_child", what, str(model_dir), str(grads), *extra, "--batch", str(args.batch),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--chunk_tokens", str(args.chunk_tokens),
           "--mini_batch", str(args.mini_batch)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu",
                                                                     "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{what} child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def grad_errors(got: dict, want: dict) -> dict:
    """Max abs difference over every parameter and the worst tensor's relative difference."""
    assert got.keys() == want.keys(), (sorted(set(got) ^ set(want)))[:5]
    worst_abs = max((got[k] - want[k]).abs().max().item() for k in want)
    worst_rel = max(((got[k] - want[k]).norm() / want[k].norm().clamp(min=1e-12)).item() for k in want)
    return {"max_abs": worst_abs, "max_rel": worst_rel, "params": len(want)}


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="samples of the one-process comparison")
    parser.add_argument("--hidden", type=int, default=256, help="language-model width")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--mini_batch", type=int, default=16, help="sentence-transformers' mini_batch_size")
    parser.add_argument("--chunk_tokens", type=int, default=0, help="mmscale's budget (0: mini_batch x mean length)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", default="64,256,1024", help="global batches of the ZeRO-3 section")
    parser.add_argument("--skip_zero3", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "vlm.json"))
    parser.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args._child:
        child(args)
        return

    import torch

    from mmscale.export.st_vlm import write_vlm_sentence_transformers

    work = Path(tempfile.mkdtemp(prefix="bench_vlm_"))
    model_dir = make_model(work, args.hidden, args.layers)
    _, model, processor, renderer = build_mmscale(model_dir, 0, args.batch)
    lengths = rank_batch(renderer, batch_samples(args.batch))["seq_lens"].float()
    if not args.chunk_tokens:
        args.chunk_tokens = int(args.mini_batch * lengths.mean().item())
    st_dir = work / "st"
    st_dir.mkdir()
    write_vlm_sentence_transformers(model, None, processor, st_dir, torch.float32)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: Qwen3-VL, {params / 1e6:.2f} M parameters (language model {args.hidden} wide, {args.layers} layers); "
          f"batch {args.batch}: {len(lengths)} sequences of {lengths.min():.0f}-{lengths.max():.0f} tokens "
          f"(mean {lengths.mean():.0f}); mmscale chunk_tokens {args.chunk_tokens}, "
          f"sentence-transformers mini_batch_size {args.mini_batch}", flush=True)

    report: dict = {"machine": f"{os.cpu_count()} CPU cores (shared), torch {torch.__version__}, {args.threads} "
                               "thread(s) per process", "model_parameters": params, "batch": args.batch,
                    "chunk_tokens": args.chunk_tokens, "mini_batch_size": args.mini_batch, "goals": GOALS,
                    "sequence_tokens": {"min": lengths.min().item(), "mean": lengths.mean().item(),
                                        "max": lengths.max().item()}}  # fmt: skip
    runs = {}
    for what in ("dense", "mmscale", "st"):
        extra = (str(st_dir),) if what == "st" else ()
        runs[what] = run_child(what, model_dir, work / f"{what}.pt", args, *extra)
        print(f"  {what}: {runs[what]['median_step_cpu_s']:.2f} CPU s per step, peak +"
              f"{runs[what]['peak_above_before_mb']:.0f} MB", flush=True)
    dense = torch.load(work / "dense.pt")
    errors = {what: grad_errors(torch.load(work / f"{what}.pt"), dense) for what in ("mmscale", "st")}
    speed = runs["st"]["median_step_cpu_s"] / runs["mmscale"]["median_step_cpu_s"]
    memory = runs["mmscale"]["peak_above_before_mb"] / runs["st"]["peak_above_before_mb"]
    rows = [[name, args.batch / runs[key]["median_step_cpu_s"], runs[key]["peak_above_before_mb"],
             runs[key]["peak_rss_mb"], errors[key]["max_abs"], errors[key]["max_rel"]]
            for name, key in (("mmscale cached step", "mmscale"), ("sentence-transformers CMNRL", "st"))]
    table(f"one process, batch {args.batch} (gradients vs the dense step over {errors['mmscale']['params']} tensors)",
          ["step", "samples per CPU-s", "step peak MB", "process peak MB", "grad max abs diff", "grad max rel diff"],
          rows)
    print(f"samples/s ratio mmscale / sentence-transformers: {speed:.2f} (goal >= {GOALS['speed_ratio']}); "
          f"peak memory ratio: {memory:.2f} (goal <= {GOALS['memory_ratio']})")
    report.update(runs=runs, gradient_errors=errors, speed_ratio=speed, memory_ratio=memory)

    if not args.skip_zero3:
        sizes = [int(s) for s in args.sizes.split(",")]
        print(f"\nmmscale, 2 ranks, ZeRO-3, chunk_tokens {args.chunk_tokens}:", flush=True)
        zero3 = run_zero3(model_dir, sizes, args.chunk_tokens)
        flat = max(r["peak_rss_mb"] for r in zero3) / zero3[0]["peak_rss_mb"]
        table("peak RSS per rank vs global batch (ZeRO-3, 2 ranks)",
              ["global batch", "peak MB per rank", "in the step MB", "chunks per rank", "step s"],
              [[r["batch"], r["peak_rss_mb"], r["peak_above_before_mb"], r["chunks"], r["step_s"]] for r in zero3])
        print(f"largest / smallest batch peak: {flat:.3f} (goal <= {GOALS['zero3_flatness']})")
        report.update(zero3=zero3, zero3_flatness=flat)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
