"""The on-disk layout of a training checkpoint: which step directories exist and which are complete.

The trainer writes it (train/checkpoint.py) and the model loader reads it (models/load.py); both
use these file-system helpers, which need nothing but paths.

    OUTPUT_DIR/checkpoints/step_00000100/   a step directory: DeepSpeed's files, complete.json written last
    OUTPUT_DIR/checkpoints/tmp-...           a save in progress (never a checkpoint)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CHECKPOINT_SUBDIR = "checkpoints"
COMPLETE_MARKER = "complete.json"
TMP_PREFIX = "tmp-"
_TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    """The directory name of the checkpoint taken after `step` optimizer steps."""
    return f"step_{step:08d}"


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(output_dir) / CHECKPOINT_SUBDIR


def is_complete(path: Path) -> bool:
    """A step directory whose save finished (not a collective)."""
    return _TAG_RE.match(path.name) is not None and (path / COMPLETE_MARKER).is_file()


def list_complete(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(_TAG_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`; torn and temporary ones are skipped."""
    done = list_complete(root)
    return done[-1] if done else None


def find_latest_below(path: Path) -> Path | None:
    """The newest complete checkpoint in a checkpoints directory or in a run's output_dir."""
    for root in (path, path / CHECKPOINT_SUBDIR):
        latest = find_latest(root)
        if latest is not None:
            return latest
    return None
