"""What a person watching a run sees: TensorBoard, metrics.jsonl, a progress bar, throughput.

Only rank 0 writes (`Monitor(enabled=False)` on the others turns every call into a no-op),
so the numbers passed in must already be agreed across ranks (summed, averaged) by the caller.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA max_memory_allocated on a GPU, else peak RSS."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.max_memory_allocated() / 2**20
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class ThroughputMeter:
    """Splits each step's wall time into waiting for data and computing."""

    def __init__(self) -> None:
        self._mark = time.perf_counter()
        self.data_wait_s = 0.0
        self.step_s = 0.0

    def start_step(self) -> None:
        """Call right before asking the loader for the next batch."""
        self._mark = time.perf_counter()
        self.data_wait_s = 0.0

    def got_batch(self) -> None:
        """Call when the batch arrived."""
        self.data_wait_s = time.perf_counter() - self._mark

    def end_step(self) -> None:
        """Call after the optimizer step."""
        self.step_s = time.perf_counter() - self._mark

    def stats(self, global_samples: int) -> dict[str, float]:
        """Step time, data-wait share and global samples per second of the last step."""
        step_s = max(self.step_s, 1e-9)
        return {
            "step_time": self.step_s,
            "data_wait_share": min(self.data_wait_s / step_s, 1.0),
            "samples_per_sec": global_samples / step_s,
        }


class MetricsLog:
    """Appends one JSON object per logged step to `metrics.jsonl`; resume-safe (append mode)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = open(self.path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, default=float) + "\n")

    def close(self) -> None:
        self._file.close()


def truncate_jsonl(path: str | os.PathLike, max_step: int) -> None:
    """Drop records with `step` > max_step: what an attempt logged after the checkpoint a resume starts from."""
    p = Path(path)
    if not p.is_file():
        return
    kept = [line for line in p.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line).get("step", 0) <= max_step]
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, p)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class ProgressBar:
    """tqdm with rate and ETA on a terminal; a plain log line per update otherwise."""

    def __init__(self, total: int, initial: int = 0, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.total = total
        self._bar = None
        self._start = time.perf_counter()
        self._start_step = initial
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=self.stream)
        self._step = initial

    def update(self, step: int, metrics: dict[str, float], log_line: bool) -> None:
        """Advance to `step`; `log_line` says whether a non-terminal gets a line now."""
        done = step - self._step
        self._step = step
        if self._bar is not None:
            self._bar.update(done)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        elif log_line:
            print(self.format_line(step, metrics), file=self.stream, flush=True)

    def format_line(self, step: int, metrics: dict[str, float]) -> str:
        """`step 10/100 (10%) | loss 1.23 | ... | eta 0:01:30`."""
        elapsed = time.perf_counter() - self._start
        rate = (step - self._start_step) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        parts = [f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)"]
        parts += [f"{k} {v:.4g}" for k, v in metrics.items()]
        parts.append(f"eta {_hms(eta)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _hms(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Monitor:
    """TensorBoard under `OUTPUT_DIR/tb`, `OUTPUT_DIR/metrics.jsonl` and the progress bar."""

    # Shown in the progress bar / log line, in this order, when present.
    HEADLINE = ("loss", "lr", "logit_scale", "samples_per_sec")

    def __init__(
        self,
        output_dir: str | os.PathLike,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.enabled = enabled
        self._tb = None
        self._jsonl: MetricsLog | None = None
        self._bar: ProgressBar | None = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        out = Path(output_dir)
        # purge_step drops events a previous attempt wrote after the step we resume from,
        # so TensorBoard curves do not fold back on themselves.
        self._tb = SummaryWriter(str(out / "tb"), purge_step=start_step + 1 if start_step else None)
        self._jsonl = MetricsLog(out / "metrics.jsonl")
        self._bar = ProgressBar(total_steps, initial=start_step, stream=stream)

    def log_config(self, config_yaml: str) -> None:
        """The resolved config as TensorBoard text."""
        if self._tb is not None:
            # Markdown: indent by 4 so the YAML shows as a code block.
            self._tb.add_text("config", "    " + config_yaml.replace("\n", "\n    "), 0)

    def log_step(self, step: int, metrics: dict[str, float], group: str = "train") -> None:
        """Scalars as `group/name` in TensorBoard and one line in metrics.jsonl."""
        if not self.enabled:
            return
        for name, value in metrics.items():
            self._tb.add_scalar(f"{group}/{name}", value, step)  # type: ignore[union-attr]
        record = {"step": step, **({} if group == "train" else {"group": group}), **metrics}
        self._jsonl.write(record)  # type: ignore[union-attr]

    def progress(self, step: int, metrics: dict[str, float], log_line: bool) -> None:
        """Move the progress bar (or print a line) with the headline metrics."""
        if self._bar is not None:
            shown = {k: metrics[k] for k in self.HEADLINE if k in metrics}
            self._bar.update(step, shown, log_line)

    def message(self, text: str) -> None:
        """A line for the person watching (rank 0)."""
        if not self.enabled:
            return
        if self._bar is not None and self._bar._bar is not None:
            self._bar._bar.write(text)
        else:
            print(text, flush=True)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()  # type: ignore[union-attr]
        self._tb.close()  # type: ignore[union-attr]
        self._jsonl.close()  # type: ignore[union-attr]
