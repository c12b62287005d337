"""Where an export is written: never over a user's files unasked, never inside a run or a checkpoint.

An export is staged in a hidden sibling directory and moved into place when every file is
written, so a failure leaves the output as it was. The output must be new or empty, unless
`overwrite`: then the entries this export writes replace their namesakes, the entries a
previous export recorded in its manifest go, and anything else in the folder (a user's notes)
stays. Files get the usual modes (0644 / 0755 under the umask), not the 0600 that some writers
(safetensors, tempfile) leave behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from mmscale.export.errors import ExportError

MANIFEST_FILE = ".mmscale_export.json"


def is_run_dir(path: Path) -> bool:
    """A training run's output_dir: its checkpoints/, metrics.jsonl or tb/ beside config.yaml."""
    if not path.is_dir():
        return False
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file():
        return True
    return (path / "config.yaml").is_file() and (path / "tb").is_dir()


def is_checkpoint_dir(path: Path) -> bool:
    """A checkpoint step directory (complete or not), or the checkpoints/ directory holding them."""
    if not path.is_dir():
        return False
    if (path / "complete.json").is_file() or any(path.glob("*model_states.pt")) or path.name.startswith("tmp-step_"):
        return True
    return path.name == "checkpoints" and ((path / "latest").is_file() or any(path.glob("step_*")))


def check_output(output: str | os.PathLike, overwrite: bool = False, sources: Iterable[str | os.PathLike] = ()) -> Path:
    """The resolved output path, or ExportError saying why writing there would risk a run or a user's files."""
    out = Path(output).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    for place in (out, *out.parents):
        if is_run_dir(place) or is_checkpoint_dir(place):
            what = "a training run" if is_run_dir(place) else "a checkpoint"
            where = "is" if place == out else f"is inside {place}, which is"
            raise ExportError(
                f"{out} {where} {what}: an export never writes there (pick a folder outside it, e.g. {place.parent / (place.name + '-export')})"
            )
    for source in sources:
        src = Path(source).resolve()
        if src == out or out in src.parents:
            raise ExportError(f"{out} holds the checkpoint being exported ({src}): choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        entries = sorted(p.name for p in out.iterdir())
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ExportError(
            f"output directory {out} is not empty ({len(entries)} entries: {shown}); "
            "pass --overwrite to replace a previous export there (other files are kept)"
        )
    return out


class Staging:
    """A hidden directory beside the output where an export is written, then committed into place."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.path = output.with_name(f".{output.name}.tmp{os.getpid()}")

    def __enter__(self) -> Path:
        shutil.rmtree(self.path, ignore_errors=True)  # our own leftover of a crash with the same pid
        self.path.mkdir(parents=True)
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        self.commit()

    def commit(self) -> None:
        """Give every staged file the usual modes and move the staged entries into the output."""
        fix_modes(self.path)
        entries = sorted(p.name for p in self.path.iterdir() if p.name != MANIFEST_FILE)
        (self.path / MANIFEST_FILE).write_text(json.dumps({"entries": entries}, indent=2) + "\n")
        fix_modes(self.path)
        out = self.output
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if not out.exists():
            os.replace(self.path, out)
            return
        # --overwrite into an existing folder: the previous export's entries go, ours come, the rest stays.
        for name in previous_entries(out):
            _remove(out / name)
        for entry in sorted(self.path.iterdir()):
            _remove(out / entry.name)
            os.replace(entry, out / entry.name)
        self.path.rmdir()


def previous_entries(out: Path) -> list[str]:
    """The top-level entries an earlier export recorded in its manifest (only plain names inside `out`)."""
    manifest = out / MANIFEST_FILE
    if not manifest.is_file():
        return []
    try:
        entries = json.loads(manifest.read_text()).get("entries", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [e for e in entries if isinstance(e, str) and e and "/" not in e and e not in (".", "..")]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def fix_modes(root: Path) -> None:
    """chmod files to 0666 and directories to 0777, less the umask (writers may leave 0600 / 0700)."""
    mask = current_umask()
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
