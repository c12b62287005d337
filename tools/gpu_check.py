"""The GPU check's rank (launched by tools/gpu_check.sh through `deepspeed`): ZeRO-2 and ZeRO-3, bf16, gradient cache.

For each model (the tiny config and a ViT-B/16 + 12-layer text tower, launch/configs/vit-b16.yaml)
and each ZeRO stage (2, 3), at each per-rank batch: warm-up steps, then timed gradient-cached steps
through the real engine (`train.gradcache.train_step` + `engine.step()`), with
  * `torch.cuda.max_memory_allocated` after a reset before the timed steps (memory vs batch),
  * samples/s and the share of the GPU's bf16 peak (3 x forward FLOPs per sample, the MFU convention;
    the peak is the best bf16 matmul measured here, and the datasheet's where the GPU is known),
  * every collective's tensors checked against the communication device (tools/measure.py) — under
    NCCL a host tensor would fail anyway; the check names it,
  * the planner's prediction of the same run (`mmscale plan`) beside the measured peak,
and open_clip's plain step (bf16 autocast, the same architecture) at the same batch beside it.
Exit code 1 on any failure: a step that raises, a non-finite loss, a collective off the device.

    tools/gpu_check.sh                 # the real thing: 1 GPU, NCCL, bf16 (<= 8 minutes)
    tools/gpu_check.sh --cpu-smoke     # the same code path on CPU: gloo, tiny sizes, a few steps

Prints a table, writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools import measure  # noqa: E402

# Datasheet dense bf16 peaks (TFLOP/s) by device name fragment, for the share beside the measured one.
DATASHEET_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                         "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "B200": 2250.0}  # fmt: skip

MODELS = {
    "tiny": (ROOT / "launch/configs/tiny.yaml", []),
    "vit-b16": (ROOT / "launch/configs/vit-b16.yaml", []),
}
GPU_BATCHES = {"tiny": [256, 1024, 4096], "vit-b16": [256, 1024]}
GPU_CHUNK = {"tiny": 256, "vit-b16": 128}
SMOKE_BATCHES = {"tiny": [8, 16], "vit-b16": [4]}
SMOKE_CHUNK = {"tiny": 4, "vit-b16": 2}
# CPU smoke: the ViT-B/16 config at a size a CPU runs in seconds (same code, smaller tensors).
SMOKE_VIT = ["model.vision.image_size=32", "model.vision.timm_kwargs={patch_size: 16, depth: 1}",
             "model.text.config.num_hidden_layers=1", "model.text.max_length=8", "model.embed_dim=64"]


def datasheet_peak(name: str) -> float | None:
    """The datasheet's dense bf16 peak of a GPU (FLOP/s), or None when its name is not in the table."""
    for fragment, tflops in DATASHEET_BF16_TFLOPS.items():
        if fragment in name:
            return tflops * 1e12
    return None


def text_dir_for(cfg, where: Path) -> str:
    """A folder with the config's text tower config.json (open_clip builds its HF tower from it)."""
    from transformers import AutoConfig

    inline = dict(cfg.model.text.config)
    config = AutoConfig.for_model(inline.pop("model_type"), **inline)
    where.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(where)
    return str(where)


def run_case(name: str, stage: int, batch: int, chunk: int, args, device, overrides: list[str]) -> dict:
    """Warm-up and timed cached steps of one (model, ZeRO stage, batch) in a fresh engine; memory and speed."""
    import torch

    from mmscale.config import load_config
    from mmscale.losses import build_loss
    from mmscale.models import build_dual_encoder
    from mmscale.plan import Cluster, plan_config
    from mmscale.train.engine import build_engine, resolve_grad_reduction
    from mmscale.train.gradcache import train_step

    path, extra = MODELS[name]
    cfg = load_config(path, [*extra, *overrides, f"train.zero_stage={stage}", "train.precision=bf16",
                             f"train.global_batch_size={batch}", f"train.chunk_size={chunk}", "train.grad_clip=1.0",
                             "data.workers=1"])
    torch.manual_seed(0)
    engine, _, _ = build_engine(cfg, build_dual_encoder(cfg.model, pretrained=False), 1)
    loss_fn = build_loss(cfg.loss)
    size, length = cfg.model.vision.image_size, cfg.model.text.max_length
    vocab = int(cfg.model.text.config.get("vocab_size", 30522))
    inputs = measure.synthetic_batch(batch, size, length, vocab=vocab, seed=1)
    if device.type == "cuda":
        inputs = {k: v.pin_memory() for k, v in inputs.items()}  # as the loader hands them over on GPUs

    mode = resolve_grad_reduction(cfg.train)
    violations: list[str] = []

    def step() -> float:
        with measure.CollectiveCounter(device) as counter:
            out = train_step(engine, inputs, loss_fn, chunk, grad_reduction=mode)
            engine.step()
        violations.extend(counter.violations)
        loss = float(out["loss"])  # one read per step, after it
        if not out["finite"] or loss != loss:
            raise RuntimeError(f"{name} ZeRO-{stage} batch {batch}: non-finite loss {loss}")
        return loss

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    sync()
    seconds = (time.perf_counter() - t) / args.steps
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
    fwd = measure.forward_flops(engine.module, **{k: v[:2].to(device) for k, v in inputs.items()}) / 2
    plan = plan_config(cfg, Cluster(1, 1, 80 * 2**30))
    result = {"model": name, "zero_stage": stage, "batch": batch, "chunk": chunk, "grad_reduction": mode,
              "step_s": seconds, "samples_per_s": batch / seconds, "forward_gflop_per_sample": fwd / 1e9,
              "useful_tflops": 3 * fwd * batch / seconds / 1e12, "max_memory_allocated_gib": peak / 2**30,
              "planned_gib": plan.gpu_total() / 2**30, "losses": losses, "violations": violations}
    engine.destroy()  # its hooks and buffers go before the next case's engine is built
    return result


def run_open_clip(name: str, batch: int, args, device, overrides: list[str], tmp: Path) -> dict:
    """open_clip's plain step (bf16 autocast on the GPU, fp32 on the CPU) on the same architecture and batch."""
    import torch

    from mmscale.config import load_config

    path, extra = MODELS[name]
    cfg = load_config(path, [*extra, *overrides])
    torch.manual_seed(0)
    model = measure.open_clip_twin(cfg.model, text_dir_for(cfg, tmp / f"{name}-text")).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vocab = int(cfg.model.text.config.get("vocab_size", 30522))
    inputs = measure.synthetic_batch(batch, cfg.model.vision.image_size, cfg.model.text.max_length, vocab=vocab,
                                     uint8=False, device=device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    for _ in range(args.warmup):
        measure.open_clip_step(model, optimizer, inputs, autocast_dtype=amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = [measure.open_clip_step(model, optimizer, inputs, autocast_dtype=amp)["seconds"] for _ in range(args.steps)]
    seconds = sum(runs) / len(runs)
    fwd = measure.forward_flops(model, inputs["pixel_values"][:2], inputs["input_ids"][:2]) / 2
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"model": name, "batch": batch, "step_s": seconds, "samples_per_s": batch / seconds,
            "useful_tflops": 3 * fwd * batch / seconds / 1e12, "max_memory_allocated_gib": peak / 2**30}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="gloo on the CPU, tiny sizes, a few steps")
    parser.add_argument("--models", default="tiny,vit-b16")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 5; smoke 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per case (default 2; smoke 1)")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "gpu_check.json"))
    args = parser.parse_args()
    smoke = args.cpu_smoke
    args.steps = args.steps or (1 if smoke else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)

    import tempfile

    import torch

    from mmscale import distributed

    info = distributed.init_distributed(600)
    device = distributed.comm_device()
    backend = torch.distributed.get_backend()
    if not smoke and (device.type != "cuda" or backend != "nccl"):
        print(f"gpu_check: expected a CUDA device under NCCL, got {device} under {backend} "
              "(use --cpu-smoke on a machine without a GPU)", file=sys.stderr)
        return 1
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    sizes = (4096, 8192) if device.type == "cuda" else (256, 512)
    peak = measure.matmul_peak_gflops(sizes=sizes, repeats=5, dtype=torch.bfloat16, device=device) * 1e9
    sheet = datasheet_peak(gpu)
    report: dict = {"device": gpu, "backend": backend, "world": info.world_size, "cpu_smoke": smoke,
                    "torch": torch.__version__, "bf16_matmul_peak_tflops": peak / 1e12,
                    "datasheet_bf16_tflops": sheet / 1e12 if sheet else None, "cases": [], "open_clip": [],
                    "failures": []}
    print(f"gpu_check on {gpu} ({backend}): measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s"
          + (f", datasheet {sheet / 1e12:.0f}" if sheet else ""), flush=True)
    batches, chunks = (SMOKE_BATCHES, SMOKE_CHUNK) if smoke else (GPU_BATCHES, GPU_CHUNK)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            overrides = SMOKE_VIT if smoke and name == "vit-b16" else []
            for stage in (2, 3):
                for batch in batches[name]:
                    what = f"{name} ZeRO-{stage} batch {batch}"
                    try:
                        r = run_case(name, stage, batch, min(chunks[name], batch), args, device, overrides)
                    except Exception as exc:  # noqa: BLE001 - every failure is reported, then the exit code says so
                        if "out of memory" in str(exc).lower():
                            torch.cuda.empty_cache()
                        report["failures"].append(f"{what}: {type(exc).__name__}: {exc}")
                        traceback.print_exc()
                        continue
                    if r["violations"]:
                        report["failures"].append(f"{what}: tensors off {device} in collectives: {r['violations'][:3]}")
                    report["cases"].append(r)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    print(f"  {what}: {r['samples_per_s']:.0f} samples/s, max allocated "
                          f"{r['max_memory_allocated_gib']:.2f} GiB (planned {r['planned_gib']:.2f})", flush=True)
            for batch in batches[name]:
                try:
                    report["open_clip"].append(run_open_clip(name, batch, args, device, overrides, Path(tmp)))
                except Exception as exc:  # noqa: BLE001
                    report["open_clip"].append({"model": name, "batch": batch, "error": f"{type(exc).__name__}: {exc}"})
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    oc = {(r["model"], r["batch"]): r for r in report["open_clip"]}
    rows = []
    for r in report["cases"]:
        o = oc.get((r["model"], r["batch"]), {})
        rows.append([r["model"], f"ZeRO-{r['zero_stage']}", r["batch"], r["chunk"], r["max_memory_allocated_gib"],
                     r["planned_gib"], r["samples_per_s"], r["useful_tflops"] * 1e12 / peak,
                     (r["useful_tflops"] * 1e12 / sheet) if sheet else "", o.get("samples_per_s", o.get("error", "")),
                     o.get("max_memory_allocated_gib", "")])
    measure.table(f"gradient-cached bf16 steps on {gpu} ({backend}, 1 rank) beside open_clip's plain step",
                  ["model", "stage", "batch", "chunk", "max alloc GiB", "planned GiB", "samples/s", "of measured peak",
                   "of datasheet", "open_clip samples/s", "open_clip GiB"], rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    for failure in report["failures"]:
        print(f"gpu_check: FAILED {failure}", file=sys.stderr)
    distributed.destroy()
    return 1 if report["failures"] or not report["cases"] else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
