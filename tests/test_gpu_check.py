"""tools/gpu_check.sh --cpu-smoke: the GPU check's whole path (the deepspeed launcher, ZeRO-2 and ZeRO-3 in bf16
with the gradient cache on both models, the collective device check, the planner beside it, open_clip's step)
on the CPU with gloo at tiny sizes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_case(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(ROOT / "tools" / "gpu_check.sh"), "--cpu-smoke", "--out", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["backend"] == "gloo" and report["cpu_smoke"] and report["failures"] == []
    cases = {(c["model"], c["zero_stage"], c["batch"]) for c in report["cases"]}
    assert cases == {("tiny", 2, 8), ("tiny", 2, 16), ("tiny", 3, 8), ("tiny", 3, 16), ("vit-b16", 2, 4),
                     ("vit-b16", 3, 4)}
    for c in report["cases"]:
        assert c["violations"] == [] and all(math.isfinite(v) for v in c["losses"])
        assert c["samples_per_s"] > 0 and c["useful_tflops"] > 0 and c["planned_gib"] > 0
    assert all("error" not in o and o["samples_per_s"] > 0 for o in report["open_clip"]), report["open_clip"]
    assert "beside open_clip's plain step" in proc.stdout
