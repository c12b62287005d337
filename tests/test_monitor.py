"""Monitor: TensorBoard scalars and config text, metrics.jsonl, truncation on resume, plain progress lines."""

from __future__ import annotations

import io

from tensorboard.backend.event_processing import event_accumulator

from mmscale.monitor import Monitor, ProgressBar, ThroughputMeter, read_metrics, truncate_jsonl


def test_monitor_writes_tensorboard_and_jsonl(tmp_path):
    out = io.StringIO()
    mon = Monitor(tmp_path, total_steps=4, stream=out)
    mon.log_config("train:\n  lr: 0.1\n")
    for step in (1, 2, 3):
        mon.log_step(step, {"loss": 3.0 - step, "lr": 0.1, "logit_scale": 14.3})
        mon.progress(step, {"loss": 3.0 - step, "lr": 0.1, "step_time": 1.0}, log_line=True)
    mon.log_step(3, {"i2t_recall@1": 0.5}, group="eval")
    mon.close()

    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/logit_scale", "eval/i2t_recall@1"} <= scalars
    assert [e.value for e in acc.Scalars("train/loss")] == [2.0, 1.0, 0.0]
    assert any("config" in tag for tag in acc.Tags()["tensors"])

    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 3]
    assert records[-1] == {"step": 3, "group": "eval", "i2t_recall@1": 0.5}
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("step 1/4 (25%) | loss 2 | lr 0.1") and "eta" in lines[0]
    assert "step_time" not in lines[0]  # only the headline metrics

    truncate_jsonl(tmp_path / "metrics.jsonl", 1)  # a resume from step 1
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]


def test_disabled_monitor_writes_nothing(tmp_path):
    mon = Monitor(tmp_path, total_steps=2, enabled=False)
    mon.log_step(1, {"loss": 1.0})
    mon.progress(1, {"loss": 1.0}, log_line=True)
    mon.close()
    assert list(tmp_path.iterdir()) == []


def test_throughput_meter_and_progress_line():
    meter = ThroughputMeter()
    meter.start_step()
    meter._mark -= 0.5  # pretend the batch took 0.5 s to arrive
    meter.got_batch()
    meter._mark -= 1.5  # and the whole step 2 s
    meter.end_step()
    stats = meter.stats(global_samples=64)
    assert 1.9 < stats["step_time"] < 2.5
    assert 0.2 < stats["data_wait_share"] < 0.3
    assert 25 < stats["samples_per_sec"] < 34
    bar = ProgressBar(total=10, stream=io.StringIO())
    assert bar.format_line(5, {"loss": 1.5}).startswith("step 5/10 (50%) | loss 1.5 | eta ")
