"""Checkpoints that are complete or invisible, and the state an exact resume needs.

Layout under `OUTPUT_DIR/checkpoints/`:

    step_00000100/                 one complete checkpoint
        mp_rank_00_model_states.pt    DeepSpeed: module + client state (step, config, ...)
        *_optim_states.pt             DeepSpeed: ZeRO optimizer shards, one per rank
        mmscale_rank_00000.pt         ours: this rank's loader position and RNG states
        config.yaml                   the resolved config, readable without torch
        complete.json                 written last, before the rename: step, world size, time
    latest                         the tag of the newest complete checkpoint (DeepSpeed reads it too)
    tmp-step_00000200/             a save in progress (or one that died): never resumed from
    universal-step_00000100/       a DeepSpeed universal copy, made when the world size changed

A save writes everything under `tmp-<tag>`, waits for every rank, and then rank 0 renames
the directory to `<tag>`: the rename is the commit, so a crash at any moment leaves either
a whole checkpoint or a `tmp-` directory that `find_latest` ignores. This needs
`output_dir` on a filesystem every node sees (the usual case for multi-node training).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmscale import distributed
from mmscale.errors import BadInputError

# The on-disk layout is shared with the model loader (models/), which reads checkpoints too.
from mmscale.models.checkpoint_layout import (  # noqa: F401  (re-exported: the trainer's names)
    _TAG_RE,
    CHECKPOINT_SUBDIR,
    COMPLETE_MARKER,
    TMP_PREFIX,
    checkpoint_root,
    find_latest,
    find_latest_below,
    is_complete,
    list_complete,
    tag_for,
)

log = logging.getLogger(__name__)

LATEST_FILE = "latest"
UNIVERSAL_PREFIX = "universal-"
# DeepSpeed's per-rank files: ZeRO optimizer shards (stage 1-3) and ZeRO-3 parameter shards.
_ZERO_FILE_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_(optim|model)_states\.pt$")
# What goes wrong when a file is cut short or damaged, from torch.load and DeepSpeed's loaders.
_LOAD_ERRORS = (RuntimeError, OSError, EOFError, ValueError, AssertionError, KeyError, pickle.UnpicklingError,
                zipfile.BadZipFile)


class CheckpointError(BadInputError, RuntimeError):
    """A checkpoint asked for does not exist, is incomplete, or cannot be loaded."""


def read_meta(path: Path) -> dict[str, Any]:
    """The `complete.json` of a checkpoint directory."""
    try:
        return json.loads((path / COMPLETE_MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a complete mmscale checkpoint ({exc})") from exc


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """Turn `train.resume` (auto | none | PATH) into a checkpoint directory or a fresh start."""
    if resume in ("", "none"):
        return None
    if resume == "auto":
        return find_latest(checkpoint_root(output_dir))
    path = Path(resume)
    if is_complete(path):
        return path
    latest = find_latest_below(path)
    if latest is not None:
        return latest
    raise CheckpointError(
        f"train.resume={resume!r}: no complete checkpoint there (a step_* directory with {COMPLETE_MARKER}, "
        "or a directory holding them)"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def damaged_fix(path: Path) -> str:
    """What to do about a damaged checkpoint `path`: the older complete ones, and how to use them."""
    older = [p.name for p in list_complete(path.parent) if _step_of(p) < _step_of(path)]
    choice = f"older complete ones here: {', '.join(older)}" if older else "there is none here"
    return (
        f"resume from an older checkpoint with train.resume=PATH ({choice}) or pass its step directory to "
        f"export/eval, or delete the damaged step directory {path}: train.resume=auto then takes the newest "
        "complete one left (or starts afresh)"
    )


def _step_of(path: Path) -> int:
    match = _TAG_RE.match(path.name)
    return int(match.group(1)) if match else 1 << 62


def verify_checkpoint(path: Path, world_size: int | None = None) -> dict[str, Any]:
    """Refuse a complete checkpoint with a missing or truncated file, naming it; returns its complete.json.

    File-level only (cheap, not a collective): every rank's ZeRO shard is there and every `.pt`
    file is a whole torch archive (its zip directory, written last, is intact). With `world_size`
    equal to the one that saved, this rank-count's `mmscale_rank_*.pt` files must be there too.
    """
    meta = read_meta(path)
    saved = int(meta.get("world_size", 1))
    files = sorted(path.glob("*.pt"))
    if not any(f.name.endswith("model_states.pt") for f in files):
        raise CheckpointError(f"{path}: no DeepSpeed model states (*model_states.pt) in it; {damaged_fix(path)}")
    for kind, what in (("optim", "ZeRO optimizer shard"), ("model", "ZeRO-3 parameter shard")):
        ranks = {int(m.group(1)): f.name for f in files if (m := _ZERO_FILE_RE.search(f.name)) and m.group(2) == kind}
        missing = sorted(set(range(saved)) - set(ranks))
        if ranks and missing:
            example = next(iter(ranks.values()))
            names = ", ".join(re.sub(r"zero_pp_rank_\d+_", f"zero_pp_rank_{r}_", example) for r in missing)
            raise CheckpointError(
                f"{path}: missing {names} (the {what} of rank {', '.join(map(str, missing))}; it was written by "
                f"{saved} ranks, {len(ranks)} shards are there); {damaged_fix(path)}"
            )
    if world_size == saved:
        for r in range(saved):
            if not _rank_file(path, r).is_file():
                raise CheckpointError(
                    f"{_rank_file(path, r)}: missing (rank {r}'s data position and RNG state); {damaged_fix(path)}"
                )
    for f in files:
        if not zipfile.is_zipfile(f):
            raise CheckpointError(
                f"{f}: truncated or damaged ({f.stat().st_size} bytes, not a complete torch archive); {damaged_fix(path)}"
            )
    return meta


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """Every RNG this process draws from: python, numpy, torch CPU and CUDA."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what `capture_rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save / load


def _rank_file(path: Path, rank: int) -> Path:
    return path / f"mmscale_rank_{rank:05d}.pt"


class Checkpointer:
    """Saves and loads DeepSpeed checkpoints plus per-rank state; call its methods on every rank."""

    def __init__(self, output_dir: str | os.PathLike, keep: int, rank: int, world_size: int) -> None:
        self.root = checkpoint_root(output_dir)
        self.keep = keep
        self.rank = rank
        self.world_size = world_size

    def save(
        self,
        engine: Any,
        step: int,
        client_state: dict[str, Any],
        rank_state: dict[str, Any],
        config_yaml: str = "",
    ) -> Path:
        """Write a checkpoint of `step`, commit it by renaming, prune old ones; returns its path."""
        tag = tag_for(step)
        final = self.root / tag
        tmp_tag = TMP_PREFIX + tag
        tmp = self.root / tmp_tag
        if distributed.all_ranks(final.is_dir() and is_complete(final)):
            return final  # e.g. the end-of-run save right after a periodic one
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that died
        distributed.barrier()

        engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state=client_state, save_latest=False)
        torch.save(rank_state, _rank_file(tmp, self.rank))
        if self.rank == 0:
            if config_yaml:
                (tmp / "config.yaml").write_text(config_yaml)
        # Every rank's files must be on disk before the directory may look complete.
        distributed.barrier()
        if self.rank == 0:
            meta = {"step": step, "tag": tag, "world_size": self.world_size, "time": time.time()}
            _atomic_write_text(tmp / COMPLETE_MARKER, json.dumps(meta))
            if final.exists():
                shutil.rmtree(final)  # an incomplete leftover of the same name
            os.replace(tmp, final)  # the commit point
            _fsync_dir(self.root)
            _atomic_write_text(self.root / LATEST_FILE, tag)
            self._prune()
        distributed.barrier()
        return final

    def _prune(self) -> None:
        """Keep the newest `keep` complete checkpoints; drop dead temporaries (rank 0 only)."""
        done = list_complete(self.root)
        for old in done[: -self.keep]:
            # Remove the marker first: a deletion cut short must not look complete.
            (old / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(self.root / (UNIVERSAL_PREFIX + old.name), ignore_errors=True)
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)

    def load(self, engine: Any, path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Load model, optimizer and schedule into `engine`; returns (client state, this rank's state).

        The rank state is None when the checkpoint was written by a different number of ranks:
        model and optimizer then go through a DeepSpeed universal checkpoint, but each rank's
        loader position and RNG streams have no counterpart in the new layout.
        """
        # A cut file or a lost shard would otherwise surface as torch's "PytorchStreamReader failed
        # reading zip archive" or DeepSpeed's "Expected 2 ... found 1", naming neither file nor fix.
        meta = verify_checkpoint(path, self.world_size)
        saved_world = int(meta["world_size"])
        if saved_world == self.world_size:
            load_dir, tag = path.parent, path.name
        else:
            universal = self.to_universal(path)
            load_dir, tag = universal.parent, universal.name
            # DeepSpeed reads this flag at load time; it cannot be set per call.
            engine._config.load_universal_checkpoint = True
        try:
            loaded, client_state = engine.load_checkpoint(
                str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        except _LOAD_ERRORS as exc:
            raise CheckpointError(
                f"{load_dir / tag}: DeepSpeed could not load it ({_first_line(exc)}); {damaged_fix(path)}"
            ) from exc
        finally:
            engine._config.load_universal_checkpoint = False
        if loaded is None:
            raise CheckpointError(f"{load_dir / tag}: DeepSpeed could not load it; {damaged_fix(path)}")
        rank_state = None
        if saved_world == self.world_size:
            rank_file = _rank_file(path, self.rank)
            try:
                rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
            except _LOAD_ERRORS as exc:
                raise CheckpointError(f"{rank_file}: cannot be read ({_first_line(exc)}); {damaged_fix(path)}") from exc
        return client_state or {}, rank_state

    def to_universal(self, path: Path) -> Path:
        """A DeepSpeed universal copy of `path` next to it, converted once by rank 0 with parallel workers.

        A large model's conversion can take longer than the collective timeout (`train.timeout_s`), so the
        other ranks do not wait for it in a barrier: they watch the filesystem for the finished copy (or
        rank 0's failure note), logging progress, and give up only when rank 0's heartbeat stops.
        """
        out = path.parent / (UNIVERSAL_PREFIX + path.name)
        heartbeat = path.parent / f".converting-{path.name}"
        failed = path.parent / f".conversion-failed-{path.name}"
        if self.rank == 0 and not (out / COMPLETE_MARKER).is_file():
            failed.unlink(missing_ok=True)
            beat = _Heartbeat(heartbeat)
            try:
                convert_to_universal(path, out, workers=_conversion_workers())
            except (*_LOAD_ERRORS, OSError, RuntimeError, ValueError, KeyError) as exc:
                message = (f"{path}: the conversion to a universal checkpoint (world size changed) failed "
                           f"({_first_line(exc)}); {damaged_fix(path)}")
                failed.write_text(message)
                raise CheckpointError(message) from exc
            finally:
                beat.stop()
        elif self.rank != 0:
            _wait_for_conversion(out, heartbeat, failed)
        distributed.barrier()
        if not (out / COMPLETE_MARKER).is_file():
            raise CheckpointError(f"universal conversion of {path} did not finish ({out})")
        return out


CONVERSION_STALE_S = 600  # rank 0's heartbeat older than this: it died converting
_HEARTBEAT_S = 20


class _Heartbeat:
    """Touches a file every few seconds while rank 0 converts, so waiting ranks can tell it is alive."""

    def __init__(self, path: Path) -> None:
        import threading

        self.path, self._stop = path, threading.Event()
        path.write_text(f"{os.getpid()}\n")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(_HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)


def _conversion_workers() -> int:
    """Processes for DeepSpeed's extract/merge phases: this node's cores shared by its ranks (at most 8)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")) or 1)
    return max(1, min(8, (os.cpu_count() or 1) // max(1, local_world)))


def _wait_for_conversion(out: Path, heartbeat: Path, failed: Path, poll_s: float = 2.0) -> None:
    """Wait (without a collective) until rank 0's universal copy is complete; raise if it failed or died."""
    start = last_note = time.monotonic()
    seen_beat = False
    while not (out / COMPLETE_MARKER).is_file():
        if failed.is_file():
            raise CheckpointError(failed.read_text().strip())
        now = time.monotonic()
        if heartbeat.is_file():
            seen_beat = True
            try:
                stale = time.time() - heartbeat.stat().st_mtime > CONVERSION_STALE_S
            except OSError:
                stale = False
            if stale:
                raise CheckpointError(f"rank 0 stopped converting {out.name} (no heartbeat for "
                                      f"{CONVERSION_STALE_S} s); rerun, or convert it offline with ds_to_universal")
        elif not seen_beat and now - start > CONVERSION_STALE_S:
            raise CheckpointError(f"rank 0 did not start converting {out.name} in {CONVERSION_STALE_S} s")
        if now - last_note > 60:
            log.info("waiting for rank 0's universal conversion of %s (%.0f s)", out.name, now - start)
            last_note = now
        time.sleep(poll_s)


def convert_to_universal(src: Path, out: Path, workers: int = 1) -> None:
    """Run DeepSpeed's `ds_to_universal` on one checkpoint directory (`workers` processes per phase)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    tmp = out.with_name(TMP_PREFIX + out.name)
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s to a universal checkpoint (world size changed)", src)
    args = argparse.Namespace(
        input_folder=str(src),
        output_folder=str(tmp),
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        # mmscale models carry no universal-checkpoint metadata (no tensor/pipeline
        # parallelism), which DeepSpeed otherwise insists on.
        inject_missing_state=True,
    )
    ds_to_universal.main(args)
    shutil.copy2(src / COMPLETE_MARKER, tmp / COMPLETE_MARKER)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
