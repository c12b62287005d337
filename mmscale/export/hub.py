"""`--push-to-hub REPO`: upload an export folder to the Hugging Face Hub (huggingface_hub)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from mmscale.export.errors import ExportError
from mmscale.export.output import MANIFEST_FILE

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def check_repo_id(repo_id: str) -> None:
    """Refuse what cannot be a Hub model repository id (before any export work is done)."""
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise ExportError(f"--push-to-hub {repo_id!r}: not a Hub repository id (expected NAME or OWNER/NAME)")


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None,
                commit_message: str = "", api: Any = None) -> str:
    """Create `repo_id` if needed and upload the export folder to it (the local manifest stays local); returns the commit URL."""
    check_repo_id(repo_id)
    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise ExportError(f"{folder}: not an export folder (no README.md model card); export first, then push")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=str(folder),
        commit_message=commit_message or f"Upload {folder.name} exported with mmscale",
        ignore_patterns=[MANIFEST_FILE],
    )
    url = str(getattr(info, "commit_url", info))
    log.info("pushed %s -> %s", folder, url)
    return url
