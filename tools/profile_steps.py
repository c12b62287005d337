"""Profile mmscale's and open_clip's plain training step side by side, op by op (torch profiler).

    DS_ACCELERATOR=cpu .venv/bin/python tools/profile_steps.py [--batch 256] [--rounds 2]

The architecture and batch are bench_gradcache's (vit_tiny at 64 px + MiniLM-L6, every caption
32 tokens, so neither library can skip padding). Each round profiles one step of each, the order
swapped every round, and prints each op's self CPU seconds and call count for both, then the
matmul and optimizer totals. Same ops with the same counts and shapes mean the two libraries run
the same computation, and a time difference comes from elsewhere (the optimizer, the load).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gradcache as bench  # noqa: E402

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")
# The optimizer's own kernels: one fused op in mmscale, torch's for-each AdamW ops in open_clip.
# (open_clip's AdamW also calls add_, shared with autograd's gradient accumulation, so it is left out.)
OPTIMIZER_OPS = ("aten::_fused_adamw_", "aten::sqrt", "aten::lerp_", "aten::addcdiv_", "aten::addcmul_", "aten::mul_",
                 "aten::div")


def op_seconds(step) -> dict[str, tuple[float, int]]:
    """Run `step` once under the profiler: op name -> (self CPU seconds, calls)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return {e.key: (e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="profiled steps of each library, order swapped each round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=25, help="ops shown, by the larger of the two times")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import torch

    from mmscale.losses import build_loss

    torch.set_num_threads(args.threads)
    cfg, engine = bench.mmscale_engine(29580, zero_stage=0)
    loss_fn = build_loss(cfg.loss)
    model, optimizer = bench.open_clip_model()
    batch = bench.make_batch(args.batch, seed=2, full_length=True)
    steps = {
        "mmscale": lambda: bench.mmscale_step(engine, loss_fn, batch, 32, cached=False),
        "open_clip": lambda: bench.open_clip_step(model, optimizer, batch),
    }
    for step in steps.values():  # first-step allocations and lazy inits
        step()

    for round_ in range(args.rounds):
        names = list(steps) if round_ % 2 == 0 else list(steps)[::-1]
        ops = {name: op_seconds(steps[name]) for name in names}
        a, b = ops["mmscale"], ops["open_clip"]
        keys = sorted(set(a) | set(b), key=lambda k: -max(a.get(k, (0, 0))[0], b.get(k, (0, 0))[0]))
        bench.table(f"round {round_ + 1} (ran first: {names[0]}): self CPU seconds and calls per op",
                    ["op", "mmscale s", "calls", "open_clip s", "calls"],
                    [[k[:50], *a.get(k, (0.0, 0)), *b.get(k, (0.0, 0))] for k in keys[:args.top]])
        total = {name: sum(s for s, _ in o.values()) for name, o in ops.items()}
        matmul = {name: sum(o.get(k, (0, 0))[0] for k in MATMUL_OPS) for name, o in ops.items()}
        optim = {name: sum(o.get(k, (0, 0))[0] for k in OPTIMIZER_OPS) for name, o in ops.items()}
        for name in ("mmscale", "open_clip"):
            print(f"  {name:9s} all ops {total[name]:.3f} s, matmuls {matmul[name]:.3f} s, "
                  f"optimizer kernels {optim[name] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
