"""Inspect WebDataset tar shards: counts, extensions, image sizes, captions, corruption.

    python tools/inspect_shards.py data/train                       # every *.tar in the directory
    python tools/inspect_shards.py 'data/{00000..00003}.tar' --strict --json report.json

Reads shards written by ``make_shards.py``, ``make_demo_data.py`` and img2dataset
(9-digit keys, ``.json`` sidecars; ``NNNNN_stats.json`` and ``.parquet`` files beside
the tars are not shards and are skipped, but a ``NNNNN_stats.json``'s ``successes``,
and a ``stats.json`` manifest's per-shard ``samples``, are checked against the tar).
Images are opened header-only (PIL reads the size without decoding pixels) unless
``--decode`` asks for a full decode. ``--strict`` exits 1 when any issue is found.

``--write-manifest`` writes ``stats.json`` beside the shards: per shard, the samples mmscale's
loader reads of it (a damaged shard counts what precedes the damage). A training run in
``data.mode=epoch`` plans its batches from it; remote shards (http, ``pipe:``) need one, as they
are never downloaded just to be counted. An existing ``stats.json`` is only updated with
``--force`` (its other shards and fields are kept, the previous file is saved as
``stats.json.bak``).

    python tools/inspect_shards.py shards/ --write-manifest            # then upload stats.json with the shards
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import multiprocessing
import statistics
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from braceexpand import braceexpand
from PIL import Image

if __package__ in (None, ""):  # run as a script from a checkout: make `mmscale` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmscale.data.manifest import scan_tar  # noqa: E402 - the loader's own notion of a sample

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
TEXT_EXTS = {"txt", "text", "caption"}
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")


class InspectError(Exception):
    """A user-facing error: nothing to inspect, unsupported url."""


def expand_urls(urls: list[str] | str) -> list[Path]:
    """Brace-expand, glob and list directories (their ``*.tar``) into shard paths, in order, without repeats."""
    if isinstance(urls, (str, Path)):
        urls = [str(urls)]
    out: list[Path] = []
    for url in urls:
        url = str(url)
        if url.startswith(REMOTE_PREFIXES):
            raise InspectError(f"{url}: only local shard paths can be inspected")
        for item in braceexpand(url):
            path = Path(item)
            if path.is_dir():
                found = sorted(path.glob("*.tar")) or sorted(path.rglob("*.tar"))
                if not found:
                    raise InspectError(f"no *.tar shards in directory {path}")
                out.extend(found)
            elif glob.has_magic(item):
                out.extend(Path(p) for p in sorted(glob.glob(item)) if p.endswith(".tar"))
            else:
                out.append(path)  # a missing file is reported as an issue of that shard
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's grouping rule: the key is the path up to the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def summarize(values: list[float]) -> dict[str, float] | None:
    """min / median / max (None for no values)."""
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _expected_counts(path: Path) -> list[tuple[str, int]]:
    """Sample counts that files beside the shard promise: img2dataset's NNNNN_stats.json, our stats.json."""
    expected = []
    sidecar = path.with_name(path.name.removesuffix(".tar") + "_stats.json")
    if sidecar.is_file():
        try:
            expected.append((sidecar.name, int(json.loads(sidecar.read_text())["successes"])))
        except (ValueError, KeyError, TypeError):
            pass
    manifest = path.with_name("stats.json")
    if manifest.is_file():
        try:
            for shard in json.loads(manifest.read_text()).get("shards", []):
                if shard.get("name") == path.name:
                    expected.append((manifest.name, int(shard["samples"])))
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    return expected


def _check_sample(key: str, files: dict[str, bytes], decode: bool, acc: dict[str, Any]) -> None:
    def issue(kind: str, member: str | None, detail: str = "") -> None:
        acc["issues"].append({"key": key, "member": member, "kind": kind, "detail": detail})

    images = [ext for ext in files if ext in IMAGE_EXTS]
    texts = [ext for ext in files if ext in TEXT_EXTS]
    size = None
    for ext in images:
        try:
            img = Image.open(io.BytesIO(files[ext]))
            size = img.size
            if decode:
                img.load()
        except Exception as e:  # PIL raises many types for bad data
            issue("bad_image", f"{key}.{ext}", f"{type(e).__name__}: {str(e).split(' <_io.')[0]}")
            continue
        acc["widths"].append(size[0])
        acc["heights"].append(size[1])
    if not images:
        issue("missing_image", None, f"sample has only: {', '.join(sorted(files)) or 'nothing'}")
    if not texts:
        issue("missing_caption", None, f"sample has only: {', '.join(sorted(files)) or 'nothing'}")
    for ext in texts:
        try:
            caption = files[ext].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            issue("bad_caption", f"{key}.{ext}", str(e))
            continue
        if not caption:
            issue("empty_caption", f"{key}.{ext}")
        acc["caption_chars"].append(len(caption))
        acc["caption_words"].append(len(caption.split()))
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except ValueError as e:
            issue("bad_json", f"{key}.json", str(e))
            return
        if size is not None and isinstance(meta, dict) and "width" in meta and "height" in meta:
            if (meta["width"], meta["height"]) != size and meta["width"] is not None:
                issue(
                    "size_mismatch",
                    f"{key}.json",
                    f"json says {meta['width']}x{meta['height']}, image is {size[0]}x{size[1]}",
                )


def inspect_shard(path: str | Path, decode: bool = False) -> dict[str, Any]:
    """Read one tar shard end to end; return its counts, summaries and issues."""
    path = Path(path)
    acc: dict[str, Any] = {"issues": [], "widths": [], "heights": [], "caption_chars": [], "caption_words": []}
    report: dict[str, Any] = {"url": str(path), "bytes": None, "samples": 0, "extensions": {}, "keys": []}
    if not path.is_file():
        acc["issues"].append({"key": None, "member": None, "kind": "missing_shard", "detail": f"no such file: {path}"})
        return _finish(report, acc)
    report["bytes"] = path.stat().st_size
    extensions: Counter[str] = Counter()
    keys: list[str] = []
    seen: set[str] = set()
    current: tuple[str, dict[str, bytes]] | None = None

    def flush() -> None:
        if current is None:
            return
        key, files = current
        if key in seen:
            acc["issues"].append({"key": key, "member": None, "kind": "duplicate_key", "detail": "key seen earlier"})
        seen.add(key)
        keys.append(key)
        extensions.update(files.keys())
        _check_sample(key, files, decode, acc)

    try:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                data = tar.extractfile(member).read()
                key, ext = split_name(member.name)
                if current is None or current[0] != key:
                    flush()
                    current = (key, {})
                current[1][ext] = data
    except (tarfile.TarError, OSError, EOFError) as e:
        kind = "truncated_tar" if "unexpected end" in str(e) else "corrupt_tar"
        where = f"after {len(keys)} complete samples"
        acc["issues"].append(
            {"key": None, "member": None, "kind": kind, "detail": f"{type(e).__name__}: {e} ({where})"}
        )
        current = None  # the sample being read when the tar broke is incomplete: not counted
    else:
        with open(path, "rb") as f:
            f.seek(max(0, report["bytes"] - 1024))
            tail = f.read()
        if report["bytes"] and (len(tail) < 1024 or any(tail)):
            detail = "no end-of-archive marker: the file was probably cut at a member boundary"
            acc["issues"].append({"key": None, "member": None, "kind": "truncated_tar", "detail": detail})
    flush()
    report["samples"] = len(keys)
    report["extensions"] = dict(sorted(extensions.items()))
    report["keys"] = keys
    for source, expected in _expected_counts(path):
        if expected != len(keys):
            detail = f"{source} says {expected} samples, the tar has {len(keys)}"
            acc["issues"].append({"key": None, "member": None, "kind": "stats_mismatch", "detail": detail})
    return _finish(report, acc)


def _finish(report: dict[str, Any], acc: dict[str, Any]) -> dict[str, Any]:
    report["issues"] = acc["issues"]
    report["_values"] = {k: acc[k] for k in ("widths", "heights", "caption_chars", "caption_words")}
    report["width"] = summarize(acc["widths"])
    report["height"] = summarize(acc["heights"])
    report["caption_chars"] = summarize(acc["caption_chars"])
    return report


def _inspect_star(args: tuple[Path, bool]) -> dict[str, Any]:
    return inspect_shard(*args)


def inspect_shards(urls: list[str] | str, decode: bool = False, workers: int = 1) -> dict[str, Any]:
    """Inspect every shard the urls name; return a JSON-ready report with per-shard and total summaries."""
    paths = expand_urls(urls)
    if not paths:
        raise InspectError(f"no shards match {urls}")
    jobs = [(p, decode) for p in paths]
    if workers > 1 and len(paths) > 1:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(paths))) as pool:
            shards = pool.map(_inspect_star, jobs)
    else:
        shards = [_inspect_star(j) for j in jobs]

    values: dict[str, list] = {"widths": [], "heights": [], "caption_chars": [], "caption_words": []}
    extensions: Counter[str] = Counter()
    issues: list[dict[str, Any]] = []
    owner: dict[str, str] = {}
    for shard in shards:
        for k, v in shard.pop("_values").items():
            values[k].extend(v)
        extensions.update(shard["extensions"])
        for key in shard.pop("keys"):
            if key in owner and owner[key] != shard["url"]:
                shard["issues"].append(
                    {"key": key, "member": None, "kind": "duplicate_key", "detail": f"also in {owner[key]}"}
                )
            owner.setdefault(key, shard["url"])
        issues.extend({"shard": shard["url"], **i} for i in shard["issues"])
    counts = Counter(i["kind"] for i in issues)
    return {
        "shards": shards,
        "total": {
            "shards": len(shards),
            "samples": sum(s["samples"] for s in shards),
            "bytes": sum(s["bytes"] or 0 for s in shards),
            "extensions": dict(sorted(extensions.items())),
            "width": summarize(values["widths"]),
            "height": summarize(values["heights"]),
            "caption_chars": summarize(values["caption_chars"]),
            "caption_words": summarize(values["caption_words"]),
        },
        "issue_counts": dict(sorted(counts.items())),
        "issues": issues,
        "ok": not issues,
    }


MANIFEST_NAME = "stats.json"


def write_manifests(report: dict[str, Any], force: bool = False) -> list[Path]:
    """Write (or with `force` update) ``stats.json`` in each directory of the inspected shards; return the paths."""
    by_dir: dict[Path, list[dict[str, Any]]] = {}
    for shard in report["shards"]:
        path = Path(shard["url"])
        if path.is_file():  # a missing shard gets no count: the loader reports it when it cannot open it
            entry = {"name": path.name, "samples": scan_tar(str(path)), "bytes": shard["bytes"]}
            by_dir.setdefault(path.parent, []).append(entry)
    written = []
    for directory, shards in by_dir.items():
        target = directory / MANIFEST_NAME
        stats: dict[str, Any] = {}
        if target.exists():
            if not force:
                raise InspectError(f"{target} exists; pass --force to update it (the old one is kept as "
                                   f"{MANIFEST_NAME}.bak)")
            try:
                stats = json.loads(target.read_text())
            except ValueError:
                stats = {}
            target.with_name(MANIFEST_NAME + ".bak").write_bytes(target.read_bytes())
        new = {s["name"]: s for s in shards}
        kept = [s for s in stats.get("shards", []) if isinstance(s, dict) and s.get("name") not in new]
        merged = sorted(kept + shards, key=lambda s: str(s.get("name")))
        stats.update(shards=merged, num_shards=len(merged),
                     total_samples=sum(int(s.get("samples", 0)) for s in merged))
        tmp = target.with_name(MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
        tmp.replace(target)
        written.append(target)
    return written


def _fmt(summary: dict[str, float] | None) -> str:
    if summary is None:
        return "-"
    return f"{summary['min']:g} / {summary['median']:g} / {summary['max']:g}"


def format_report(report: dict[str, Any], max_issues: int = 20) -> str:
    """Human-readable table of a report."""
    rows = [("shard", "samples", "MB", "extensions", "issues")]
    for s in report["shards"]:
        exts = " ".join(f"{k}:{v}" for k, v in s["extensions"].items()) or "-"
        mb = f"{s['bytes'] / 1e6:.2f}" if s["bytes"] is not None else "-"
        rows.append((s["url"], str(s["samples"]), mb, exts, str(len(s["issues"])) if s["issues"] else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i in (0, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    ]
    t = report["total"]
    lines += [
        "",
        f"total: {t['samples']} samples in {t['shards']} shards, {t['bytes'] / 1e6:.2f} MB",
        "extensions: " + (" ".join(f"{k}:{v}" for k, v in t["extensions"].items()) or "-"),
        f"image width  min/median/max: {_fmt(t['width'])}",
        f"image height min/median/max: {_fmt(t['height'])}",
        f"caption chars min/median/max: {_fmt(t['caption_chars'])}   words: {_fmt(t['caption_words'])}",
    ]
    if report["ok"]:
        lines.append("no issues found")
    else:
        counts = ", ".join(f"{k}={v}" for k, v in report["issue_counts"].items())
        lines.append(f"{len(report['issues'])} issues: {counts}")
        for i in report["issues"][:max_issues]:
            where = " ".join(x for x in (i["shard"], i["member"] or i["key"]) if x)
            lines.append(f"  {where}: {i['kind']}" + (f" ({i['detail']})" if i["detail"] else ""))
        if len(report["issues"]) > max_issues:
            lines.append(f"  ... {len(report['issues']) - max_issues} more (use --json to get them all)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("urls", nargs="+", metavar="URL_OR_DIR", help="shard paths, brace patterns, globs or directories")
    p.add_argument("--strict", action="store_true", help="exit 1 when any issue is found")
    p.add_argument("--json", metavar="OUT", help="write the full report as JSON")
    p.add_argument("--decode", action="store_true", help="fully decode images (slower, catches truncated pixels)")
    p.add_argument("--workers", type=int, default=1, help="shards inspected in parallel")
    p.add_argument("--write-manifest", action="store_true",
                   help="write stats.json (samples per shard, as mmscale's loader reads them) beside the shards")
    p.add_argument("--force", action="store_true", help="with --write-manifest: update an existing stats.json")
    args = p.parse_args(argv)
    try:
        report = inspect_shards(args.urls, decode=args.decode, workers=args.workers)
        written = write_manifests(report, force=args.force) if args.write_manifest else []
    except InspectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    for path in written:
        manifest = json.loads(path.read_text())
        print(f"wrote {path}: {manifest['num_shards']} shards, {manifest['total_samples']} samples")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if args.strict and not report["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
