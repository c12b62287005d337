"""`mmscale plan` against what real steps hold and send, at 1 and 2 ranks (gloo, CPU).

One spawn per world size runs four gradient-cached steps (ZeRO-2 coalesced and per_chunk, ZeRO-3 coalesced
in fp32, ZeRO-3 per_chunk in bf16) on the tiny dual encoder and measures, per rank, with tools/measure.py: the
bytes of parameters, fp32 masters and AdamW moments the engine holds, the gradient storage after each
pass-2 backward and after the reduction, and the payload handed to every collective (embedding
gathers, gradient reductions, ZeRO's parameter gathers). The planner predicts each from the config
alone (a meta-device model) and must be within 15%. One chunk's activations are measured on a real
forward (real weights, the attention mask, the dual encoder's own forward) against the planner's
meta-device trace of the towers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mmscale.config import load_config
from mmscale.distributed import free_port
from mmscale.plan import Cluster, parse_memory, plan_config
from tests.workers import leave

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "launch" / "configs" / "tiny.yaml"
CASES = [(2, "coalesced", "fp32"), (2, "per_chunk", "fp32"), (3, "coalesced", "fp32"), (3, "per_chunk", "bf16")]
BATCH, CHUNK = 16, 4
# Small buckets (elements) so that ZeRO's buffers are of the gradients' order, not 100x them.
DS_TEMPLATE = {"zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                                     "reduce_bucket_size": 500_000, "allgather_bucket_size": 500_000,
                                     "stage3_prefetch_bucket_size": 500_000,
                                     "stage3_param_persistence_threshold": 10_000},
               "zero_allow_untested_optimizer": True}  # fmt: skip
TOLERANCE = 0.15
# Below this, a difference is a scalar's collective (the logit scale's fp32 master read back after each
# step), not a misprediction.
SLACK = 1024


def overrides(stage: int, mode: str, precision: str, ds: Path) -> list[str]:
    return [f"train.zero_stage={stage}", f"train.grad_reduction={mode}", f"train.precision={precision}",
            f"train.global_batch_size={BATCH}", f"train.chunk_size={CHUNK}", f"train.ds_config={ds}"]


def measure_rank(rank: int, world: int, port: int, ds: str, out: str) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from mmscale import distributed
    from mmscale.losses import build_loss
    from mmscale.models import build_dual_encoder
    from mmscale.train.engine import build_engine
    from tools.measure import measure_cached_step, synthetic_batch

    results = []
    for stage, mode, precision in CASES:
        cfg = load_config(TINY, overrides(stage, mode, precision, Path(ds)))
        torch.manual_seed(0)
        engine, _, _ = build_engine(cfg, build_dual_encoder(cfg.model), world)
        batch = synthetic_batch(BATCH // world, cfg.model.vision.image_size, cfg.model.text.max_length, seed=rank)
        r = measure_cached_step(engine, batch, build_loss(cfg.loss), CHUNK, mode)
        results.append({"case": [stage, mode, precision], **{k: v for k, v in r.items() if k != "collectives"}})
        del engine
    all_results = distributed.all_gather_object(results)
    if rank == 0:
        Path(out).write_text(json.dumps(all_results))
    leave()


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[int, list[list[dict]]]:
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("plan")
    ds = tmp / "ds.json"
    ds.write_text(json.dumps(DS_TEMPLATE))
    out = {}
    for world in (1, 2):
        path = tmp / f"w{world}.json"
        mp.spawn(measure_rank, args=(world, free_port(), str(ds), str(path)), nprocs=world, join=True)
        out[world] = json.loads(path.read_text())
    out["ds"] = ds
    return out


def close(predicted: float, measured: float, what: str) -> None:
    assert abs(predicted - measured) <= max(TOLERANCE * measured, SLACK), (
        f"{what}: predicted {predicted / 2**20:.4f} MiB, measured {measured / 2**20:.4f} MiB "
        f"({predicted / max(measured, 1) - 1:+.1%})")


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_plan_predicts_what_a_step_holds_and_sends(measured, world):
    for i, (stage, mode, precision) in enumerate(CASES):
        cfg = load_config(TINY, overrides(stage, mode, precision, measured["ds"]))
        plan = plan_config(cfg, Cluster(1, world, parse_memory("80GB")))
        case = f"W={world} ZeRO-{stage} {mode} {precision}"
        for rank_results in measured[world]:  # every rank: ZeRO's partitions may differ between ranks
            m = rank_results[i]
            assert m["violations"] == [], m["violations"]
            state = m["state"]
            close(plan.item("parameters"), state["params"], f"{case}: parameters")
            close(plan.item("fp32 master weights"), state["masters"], f"{case}: fp32 masters")
            close(plan.item("AdamW moments"), state["optimizer_states"], f"{case}: AdamW moments")
            close(plan.model["after_reduction"], m["after_reduction"], f"{case}: gradients after the reduction")
            if precision == "fp32" or mode == "per_chunk":  # (bf16 coalesced: mmscale's fp32 sums are not reachable)
                close(plan.model["held_after_backward"], m["peak_gradient"], f"{case}: gradients after a backward")
            close(plan.item("gradient reductions"), m["grad_reduce"], f"{case}: gradient reductions")
            close(plan.item("parameter all-gathers"), m["param_gather"], f"{case}: parameter all-gathers")
            close(plan.item("embedding all-gathers"), m["embedding_gather"], f"{case}: embedding all-gathers")
            close(plan.item("embedding-gradient all-reduces"), m["embedding_reduce"],
                  f"{case}: embedding-gradient all-reduces")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_plan_traces_one_chunks_activations(precision):
    """The meta-device trace of the towers against a real forward of the dual encoder (real weights and mask).

    Without attention dropout: on a CPU it makes torch take the math attention path, which keeps the
    [L x L] probabilities; a GPU's fused kernels, which the planner counts, keep only their RNG state.
    """
    import torch

    from mmscale.models import build_dual_encoder
    from tools.measure import saved_activation_bytes, synthetic_batch

    cfg = load_config(TINY, [f"train.precision={precision}", "model.vision.image_size=64", "train.chunk_size=8",
                             "model.text.config.attention_probs_dropout_prob=0"])
    plan = plan_config(cfg, Cluster(1, 1, parse_memory("80GB")))
    torch.manual_seed(0)
    model = build_dual_encoder(cfg.model)
    if precision == "bf16":
        model.to(torch.bfloat16)
    batch = synthetic_batch(8, 64, cfg.model.text.max_length)
    weights = [*model.parameters(), *model.buffers()]
    image, _ = saved_activation_bytes(lambda: model(pixel_values=batch["pixel_values"]), weights)
    text, _ = saved_activation_bytes(lambda: model(input_ids=batch["input_ids"],
                                                   attention_mask=batch["attention_mask"]), weights)
    activations = plan.model["activations"]
    close(activations["vision"], image, f"{precision}: one chunk's vision activations")
    close(activations["text"], text, f"{precision}: one chunk's text activations")
    close(plan.item("activations of one chunk"), image + text, f"{precision}: one chunk's activations")


def test_plan_advises_a_setting_that_fits_when_the_run_does_not():
    # A ViT-B/16 (fp32) at a 4096 per-rank batch in chunks of 512 does not fit in 16 GB: the plan must name
    # a change that does, and that change re-planned must fit.
    cfg = load_config(TINY, ["model.vision.name=vit_base_patch16_224", "model.vision.image_size=224",
                             "model.vision.timm_kwargs={}", "train.global_batch_size=4096", "train.chunk_size=512"])
    cluster = Cluster(1, 1, parse_memory("16GB"))
    plan = plan_config(cfg, cluster)
    assert not plan.fits()
    changes = [a for a in plan.advice if a.startswith("change ")]
    assert changes and "train.chunk_size=" in changes[0], plan.advice
    chunk = int(changes[0].split("train.chunk_size=")[1].split()[0])
    smaller = plan_config(load_config(TINY, ["model.vision.name=vit_base_patch16_224", "model.vision.image_size=224",
                                             "model.vision.timm_kwargs={}", "train.global_batch_size=4096",
                                             f"train.chunk_size={chunk}"]), cluster)
    assert smaller.fits() and smaller.item("activations of one chunk") < plan.item("activations of one chunk") / 2


@pytest.mark.parametrize("text,expected", [("80GB", 80 * 2**30), ("141GiB", 141 * 2**30), ("24576MB", 24 * 2**30),
                                           ("0.5 TB", 2**39)])
def test_memory_sizes(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("argv,flag", [
    (["--nodes", "1", "--gpus-per-node", "8", "--gpu-memory", "80XB"], "--gpu-memory"),
    (["--nodes", "1", "--gpus-per-node", "8", "--gpu-memory", "lots"], "--gpu-memory"),
    (["--nodes", "0", "--gpus-per-node", "8", "--gpu-memory", "80GB"], "--nodes"),
    (["--nodes", "2", "--gpus-per-node", "0", "--gpu-memory", "80GB"], "--gpus-per-node"),
    (["--nodes", "3", "--gpus-per-node", "1", "--gpu-memory", "80GB"], "train.global_batch_size"),
])
def test_bad_inputs_are_one_line_errors_naming_the_flag(argv, flag, capsys):
    from mmscale.cli import main

    assert main(["plan", str(TINY), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "Traceback" not in err[0], err


def test_cli_prints_the_plan_with_its_assumptions_and_writes_json(tmp_path, capsys):
    from mmscale.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", str(TINY), "--nodes", "1", "--gpus-per-node", "2", "--gpu-memory", "80GB",
                 "--json", str(out), "train.zero_stage=3"]) == 0
    text = capsys.readouterr().out
    for needle in ("GPU memory per rank", "host memory per node", "traffic per rank and step", "assumptions:",
                   "dtype: fp32", "AdamW", "not counted", "estimate_zero3_model_states_mem_needs", "ZeRO-3"):
        assert needle in text, needle
    data = json.loads(out.read_text())
    assert data["world"] == 2 and data["fits"] and data["model"]["params"] == 2_142_401


def test_vlm_plan_from_a_qwen3_vl_config():
    """The published Qwen3-VL-2B dimensions (launch/models/qwen3-vl-2b.json): ~2B parameters counted on meta."""
    from mmscale.plan import load_plan_config

    cfg, vlm = load_plan_config(str(ROOT / "launch" / "configs" / "vlm-2b.yaml"), [])
    plan = plan_config(cfg, Cluster(1, 8, parse_memory("80GB")), vlm)
    params = plan.model["params"]
    assert 1.7e9 < params < 2.3e9, params
    assert plan.item("parameter all-gathers") > 0 and plan.item("activations of one chunk") > 0
    # ZeRO-3 model states are 1/8 of 16 B/param plus bf16 partitions: well under the whole model's.
    states = plan.item("fp32 master weights") + plan.item("AdamW moments")
    assert abs(states - 12 * params / 8) < 0.01 * states
