"""Convert captioned images into WebDataset tar shards in the img2dataset layout.

    python tools/make_shards.py --input captions.jsonl --format jsonl --image-column image \\
        --caption-column caption --image-root DIR --output OUT --samples-per-shard 1000

Inputs (``--format``, guessed from the extension when left at ``auto``):

- ``jsonl`` / ``json`` (an array of objects) / ``csv`` / ``tsv`` / ``parquet``: a table
  with an image column and a caption column (``--image-column``, ``--caption-column``).
  An image cell is a path relative to ``--image-root`` (default: the table's directory),
  raw bytes (parquet binary column), a ``{"bytes": ..., "path": ...}`` struct (Hugging
  Face datasets) or a ``data:image/...;base64,`` URI. Other columns go to the sidecar.
- ``folder``: every image under ``--input`` (recursively, sorted by path) with its
  caption in the same-named ``.txt``.
- ``coco``: a COCO captions file (``--input captions_train2017.json --image-root
  train2017/``). ``--coco-captions all`` (default) makes one sample per (image, caption)
  pair, as CLIP training on COCO usually does; ``first`` makes one sample per image with
  its first caption and keeps all its captions in the ``.json`` sidecar.

Output: ``OUT/00000.tar, 00001.tar, ...`` whose samples are ``KEY.jpg|png|webp`` (the
source bytes untouched unless resized or in another format, then ``--encode-format``),
``KEY.txt`` (the caption) and ``KEY.json`` (key, row, source, caption, width, height,
original_width, original_height, source_row), with 9-digit keys ``shard * 10**k +
position`` (k = 4 up to 10000 samples per shard, as img2dataset does), plus
``OUT/stats.json``: per-shard counts and bytes, failures by reason, and every skipped
row with its reason (missing_file, decode_error, empty_caption, missing_caption, ...).
The output is byte-identical for the same input and options, whatever ``--workers``.

Exit codes: 0 done; 2 refused before converting (bad option, unreadable input, output not
empty); 1 converted, but wrote nothing or skipped more than ``--max-skip-ratio`` of the rows
(default 0.5): the message names the commonest reasons and the first paths looked for.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import csv
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make `mmscale` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmscale.data.writer import STATS_NAME, ShardWriter, write_stats  # noqa: E402

DEFAULT_MAX_SKIP_RATIO = 0.5


class ShardError(Exception):
    """A user-facing error: bad input, bad option, output not empty (refused before converting: exit 2)."""

    exit_code = 2


class TooManySkipped(ShardError):
    """The conversion ran, but wrote nothing or skipped more of its input than allowed (exit 1)."""

    exit_code = 1


def prepare_output(output: Path, overwrite: bool) -> None:
    """Create ``output``; refuse a non-empty one unless ``overwrite`` (then remove old shards and stats)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ShardError(f"output {output} exists and is not a directory")
    if output.is_dir():
        entries = sorted(output.iterdir())
        if entries and not overwrite:
            names = ", ".join(e.name for e in entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ShardError(
                f"output directory {output} is not empty ({len(entries)} entries: {names}); "
                "pass --overwrite to replace its shards"
            )
        for entry in entries:
            if entry.is_file() and (
                entry.name.endswith((".tar", ".tar.tmp"))
                or entry.name == STATS_NAME
                or entry.name.endswith("_stats.json")
            ):
                entry.unlink()
    output.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------
# Input rows
# ---------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_FORMATS = ("jsonl", "json", "csv", "tsv", "parquet")
FORMATS = (*TABLE_FORMATS, "folder", "coco")


@dataclass
class Row:
    """One candidate sample: where its image is, its caption, and what to keep in the sidecar."""

    index: int  # position in the input, as reported in stats.json's failed_rows
    source: str  # image path as written in the input, or a short description of inline bytes
    image: str | bytes | None  # resolved path, raw bytes, or None when the input has no image
    caption: Any
    meta: dict[str, Any] = field(default_factory=dict)
    error: tuple[str, str] | None = None  # (reason, detail) when the row is bad before any image work


def detect_format(input_path: Path) -> str:
    """Guess the input format from the path (a directory is a folder of images)."""
    if input_path.is_dir():
        return "folder"
    suffix = input_path.suffix.lower()
    by_suffix = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    if suffix == ".json":  # a COCO captions object, or an array of records
        with open(input_path, "rb") as f:
            head = f.read(4096).lstrip()
        return "json" if head.startswith(b"[") else "coco"
    raise ShardError(f"cannot guess the format of {input_path}; pass --format ({'|'.join(FORMATS)})")


def _image_value(value: Any, image_root: Path) -> tuple[str, str | bytes | None]:
    """Interpret an image cell: a path, raw bytes, {"bytes": ...} (HF datasets), or a base64 data URI."""
    if value is None:
        return "", None
    if isinstance(value, dict):  # Hugging Face datasets' Image feature stores {"bytes", "path"}
        if value.get("bytes"):
            return str(value.get("path") or "<bytes>"), bytes(value["bytes"])
        value = value.get("path")
        if not value:
            return "", None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>", bytes(value)
    value = str(value).strip()
    if not value:
        return "", None
    if value.startswith("data:") and ";base64," in value:
        try:
            return value[:40] + "...", base64.b64decode(value.split(",", 1)[1], validate=True)
        except ValueError:
            return value[:40] + "...", b""  # fails later as undecodable
    if value.startswith(("http://", "https://", "s3://", "gs://")):
        return value, value  # refused in the worker: this tool reads local files only
    path = Path(value)
    return value, str(path if path.is_absolute() else image_root / path)


def _meta_value(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {k: _meta_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_meta_value(v) for v in value]
    return value


def _table_row(index: int, record: dict, image_column: str, caption_column: str, image_root: Path) -> Row:
    source, image = _image_value(record.get(image_column), image_root)
    meta = {k: _meta_value(v) for k, v in record.items() if k not in (image_column, caption_column)}
    return Row(index, source, image, record.get(caption_column), meta)


def _check_columns(where: str, columns: list[str], image_column: str, caption_column: str) -> None:
    for role, name in (("image", image_column), ("caption", caption_column)):
        if name not in columns:
            raise ShardError(
                f"{role} column {name!r} not found in {where}; available columns: {', '.join(map(str, columns))} "
                f"(choose with --{role}-column)"
            )


def _read_jsonl(path: Path, image_column: str, caption_column: str, image_root: Path) -> Iterator[Row]:
    checked = False
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            except ValueError as e:
                yield Row(index, f"{path.name}:{index + 1}", None, None, error=("invalid_row", str(e)))
                continue
            if not checked:  # the first good row decides whether the columns exist at all
                _check_columns(f"{path} (first row, line {index + 1})", list(record), image_column, caption_column)
                checked = True
            yield _table_row(index, record, image_column, caption_column, image_root)


def _read_json_array(path: Path, image_column: str, caption_column: str, image_root: Path) -> Iterator[Row]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ShardError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(records, list):
        raise ShardError(f"{path}: --format json needs an array of objects (a COCO file is --format coco)")
    checked = False
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            yield Row(index, f"{path.name}[{index}]", None, None, error=("invalid_row", "not a JSON object"))
            continue
        if not checked:
            _check_columns(f"{path} (first record)", list(record), image_column, caption_column)
            checked = True
        yield _table_row(index, record, image_column, caption_column, image_root)


def _read_csv(path: Path, delimiter: str, image_column: str, caption_column: str, image_root: Path) -> Iterator[Row]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        _check_columns(f"{path} (header)", list(reader.fieldnames or []), image_column, caption_column)
        for index, record in enumerate(reader):
            yield _table_row(index, record, image_column, caption_column, image_root)


def _read_parquet(path: Path, image_column: str, caption_column: str, image_root: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    _check_columns(f"{path} (schema)", pf.schema_arrow.names, image_column, caption_column)
    index = 0
    for batch in pf.iter_batches(batch_size=256):
        for record in batch.to_pylist():
            yield _table_row(index, record, image_column, caption_column, image_root)
            index += 1


def _read_folder(root: Path) -> Iterator[Row]:
    images = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    for index, path in enumerate(images):
        rel = path.relative_to(root).as_posix()
        txt = path.with_suffix(".txt")
        try:
            caption = txt.read_text(encoding="utf-8") if txt.is_file() else None
        except UnicodeDecodeError as e:
            yield Row(index, rel, str(path), None, {"path": rel}, error=("bad_caption", f"{txt.name}: {e}"))
            continue
        yield Row(index, rel, str(path), caption, {"path": rel})


def _read_coco(path: Path, image_root: Path, captions: str) -> Iterator[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ShardError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ShardError(f"{path} is not a COCO captions file (needs top-level 'images' and 'annotations')")
    by_image: dict[Any, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann.get("image_id"), []).append(ann)
    index = 0
    for image in data["images"]:
        file_name = image.get("file_name", "")
        source, resolved = _image_value(file_name, image_root)
        anns = by_image.get(image.get("id"), [])
        base = {"image_id": image.get("id"), "file_name": file_name}
        if captions == "first" or not anns:
            meta = {**base, "annotation_id": anns[0].get("id") if anns else None}
            meta["captions"] = [a.get("caption") for a in anns]  # nothing is lost in "first" mode
            yield Row(index, source, resolved, anns[0].get("caption") if anns else None, meta)
            index += 1
        else:
            for ann in anns:
                yield Row(index, source, resolved, ann.get("caption"), {**base, "annotation_id": ann.get("id")})
                index += 1


def read_rows(
    input_path: Path,
    fmt: str,
    image_column: str = "image",
    caption_column: str = "caption",
    image_root: Path | None = None,
    coco_captions: str = "all",
) -> tuple[Iterator[Row], int | None]:
    """Rows of the input in order, and how many there are when that is cheap to know."""
    if not input_path.exists():
        raise ShardError(f"input {input_path} does not exist")
    if fmt == "folder":
        if not input_path.is_dir():
            raise ShardError(f"--format folder needs a directory, got {input_path}")
        rows = list(_read_folder(input_path))
        return iter(rows), len(rows)
    if input_path.is_dir():
        raise ShardError(f"input {input_path} is a directory; use --format folder")
    root = Path(image_root) if image_root is not None else input_path.parent
    if fmt == "jsonl":
        with open(input_path, "rb") as f:
            total = sum(1 for line in f if line.strip())
        return _read_jsonl(input_path, image_column, caption_column, root), total
    if fmt == "json":
        return _read_json_array(input_path, image_column, caption_column, root), None
    if fmt in ("csv", "tsv"):
        return _read_csv(input_path, "," if fmt == "csv" else "\t", image_column, caption_column, root), None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            total = pq.ParquetFile(input_path).metadata.num_rows
        except Exception as e:  # pyarrow raises several types for a non-parquet file
            raise ShardError(f"{input_path} is not a readable parquet file: {e}") from e
        return _read_parquet(input_path, image_column, caption_column, root), total
    if fmt == "coco":
        if coco_captions not in ("first", "all"):
            raise ShardError(f"--coco-captions must be 'first' or 'all', got {coco_captions!r}")
        rows = list(_read_coco(input_path, root, coco_captions))
        return iter(rows), len(rows)
    raise ShardError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


# ---------------------------------------------------------------------------------------
# Image work (runs in worker processes)
# ---------------------------------------------------------------------------------------

RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border")
ENCODE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # kept as-is when not resized


@dataclass(frozen=True)
class ImageOptions:
    image_size: int | None = None
    resize_mode: str = "keep_ratio"
    encode_format: str = "jpg"
    encode_quality: int = 95

    @property
    def resizing(self) -> bool:
        return self.image_size is not None and self.resize_mode != "no"


def target_size(width: int, height: int, size: int, mode: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(scaled size, final canvas size) for a resize mode.

    keep_ratio: smaller side becomes ``size``; center_crop: smaller side becomes ``size``
    then the centre ``size x size`` is kept; border: larger side becomes ``size`` and the
    image is centred on a black ``size x size`` canvas.
    """
    if mode in ("keep_ratio", "center_crop"):
        scale = size / min(width, height)
    elif mode == "border":
        scale = size / max(width, height)
    else:
        raise ShardError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    scaled = (max(1, round(width * scale)), max(1, round(height * scale)))
    if mode == "keep_ratio":
        return scaled, scaled
    return scaled, (size, size)


def _to_encodable(img: Image.Image, fmt: str) -> Image.Image:
    if fmt == "JPEG":
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            flat = Image.new("RGB", img.size, (255, 255, 255))  # transparent pixels become white
            flat.paste(rgba, mask=rgba.getchannel("A"))
            return flat
        return img if img.mode in ("RGB", "L") else img.convert("RGB")
    return img if img.mode in ("RGB", "RGBA", "L", "LA") else img.convert("RGBA")


def _resize(img: Image.Image, opts: ImageOptions) -> Image.Image:
    img = ImageOps.exif_transpose(img)
    scaled, canvas = target_size(img.width, img.height, opts.image_size, opts.resize_mode)
    if scaled != img.size:
        img = img.resize(scaled, Image.Resampling.LANCZOS)
    if opts.resize_mode == "center_crop":
        left, top = (scaled[0] - canvas[0]) // 2, (scaled[1] - canvas[1]) // 2
        img = img.crop((left, top, left + canvas[0], top + canvas[1]))
    elif opts.resize_mode == "border" and scaled != canvas:
        img = _to_encodable(img, "JPEG" if opts.encode_format == "jpg" else "PNG")
        bordered = Image.new(img.mode, canvas, 0)
        bordered.paste(img, ((canvas[0] - scaled[0]) // 2, (canvas[1] - scaled[1]) // 2))
        img = bordered
    return img


def _already_sized(img: Image.Image, opts: ImageOptions) -> bool:
    scaled, canvas = target_size(img.width, img.height, opts.image_size, opts.resize_mode)
    upright = img.getexif().get(0x0112, 1) == 1  # EXIF orientation: a rotated photo must be re-encoded
    return scaled == canvas == img.size and upright


def process_row(row: Row, opts: ImageOptions) -> dict[str, Any]:
    """Load, check, maybe resize one row; returns the sample's files and sidecar, or a failure."""
    try:
        return _process_row(row, opts)
    except Exception as e:  # one odd image (a resize or encode error) must not end a long conversion
        detail = f"{type(e).__name__}: {e}"
        return {"ok": False, "row": row.index, "source": row.source, "reason": "processing_error", "detail": detail}


def _process_row(row: Row, opts: ImageOptions) -> dict[str, Any]:

    def fail(reason: str, detail: str = "") -> dict[str, Any]:
        return {"ok": False, "row": row.index, "source": row.source, "reason": reason, "detail": detail}

    if row.error is not None:
        return fail(*row.error)
    caption = row.caption
    if caption is None or (isinstance(caption, float) and math.isnan(caption)):  # pandas writes NaN for missing
        return fail("missing_caption")
    if not isinstance(caption, str):
        caption = str(caption)
    caption = caption.strip()
    if not caption:
        return fail("empty_caption")
    if row.image is None:
        return fail("missing_image")
    if isinstance(row.image, bytes):
        data = row.image
    elif "://" in row.image:
        return fail("remote_url", "images must be local files; download them first (e.g. with img2dataset)")
    else:
        try:
            data = Path(row.image).read_bytes()
        except FileNotFoundError:
            return fail("missing_file", f"no such file: {row.image}")
        except OSError as e:
            return fail("unreadable_file", str(e))
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # a full decode catches truncated and corrupt files, not just bad headers
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        # PIL puts the BytesIO's address in some messages; drop it so stats.json is reproducible
        return fail("decode_error", re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", f"{type(e).__name__}: {e}"))
    original = img.size
    ext = _KEEP_FORMATS.get(img.format or "")
    resize = opts.resizing and not _already_sized(img, opts)  # never re-encode an image for nothing
    if resize or ext is None:
        if resize:
            img = _resize(img, opts)
        pil_format = ENCODE_FORMATS[opts.encode_format]
        out = _to_encodable(img, pil_format)
        buf = io.BytesIO()
        out.save(buf, format=pil_format, quality=opts.encode_quality)
        data, ext = buf.getvalue(), opts.encode_format
    meta = {
        "row": row.index,
        "source": row.source,
        "caption": caption,
        "width": img.width,
        "height": img.height,
        "original_width": original[0],
        "original_height": original[1],
        "source_row": row.meta,
    }
    return {"ok": True, "files": {ext: data, "txt": caption.encode("utf-8")}, "meta": meta}


def _process_chunk(rows: list[Row], opts: ImageOptions) -> list[dict[str, Any]]:
    return [process_row(row, opts) for row in rows]


def _chunks(items: Iterator[Row], size: int) -> Iterator[list[Row]]:
    chunk: list[Row] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _ordered_parallel(pool: Any, rows: Iterator[Row], opts: ImageOptions, workers: int) -> Iterator[dict[str, Any]]:
    """Results in input order, with at most a few chunks per worker in flight.

    (Pool.imap would read the whole input ahead of the workers: with image bytes in a
    parquet table that means the whole dataset in memory.)
    """
    pending: collections.deque = collections.deque()
    for chunk in _chunks(rows, 8):
        pending.append(pool.apply_async(_process_chunk, (chunk, opts)))
        if len(pending) >= 4 * workers:
            yield from pending.popleft().get()
    while pending:
        yield from pending.popleft().get()


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------


def parse_bytes(text: str | int | None) -> int | None:
    """'100MB', '1.5GiB', '64k' or a plain number of bytes."""
    if text is None or isinstance(text, int):
        return text
    s = text.strip().lower().removesuffix("b").removesuffix("i")
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(s)
    except ValueError:
        raise ShardError(f"cannot read {text!r} as a byte size (examples: 500000, 64KB, 100MB, 1GB)") from None


def make_shards(
    input: str | Path,
    output: str | Path,
    format: str = "auto",
    image_column: str = "image",
    caption_column: str = "caption",
    image_root: str | Path | None = None,
    samples_per_shard: int = 10000,
    max_shard_bytes: int | str | None = None,
    image_size: int | None = None,
    resize_mode: str = "keep_ratio",
    encode_format: str = "jpg",
    encode_quality: int = 95,
    workers: int = 1,
    overwrite: bool = False,
    coco_captions: str = "all",
    progress: bool = True,
) -> dict[str, Any]:
    """Convert ``input`` into shards under ``output``; return the stats written to ``stats.json``."""
    input_path, output = Path(input), Path(output)
    fmt = detect_format(input_path) if format == "auto" else format
    if fmt not in FORMATS:
        raise ShardError(f"unknown format {fmt!r}; choose one of auto, {', '.join(FORMATS)}")
    if resize_mode not in RESIZE_MODES:
        raise ShardError(f"unknown resize mode {resize_mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    if encode_format not in ENCODE_FORMATS:
        raise ShardError(f"unknown encode format {encode_format!r}; choose one of {', '.join(ENCODE_FORMATS)}")
    if image_size is not None and image_size < 1:
        raise ShardError(f"image_size must be >= 1, got {image_size}")
    if workers < 1:
        raise ShardError(f"workers must be >= 1, got {workers}")
    max_bytes = parse_bytes(max_shard_bytes)
    if samples_per_shard < 1:
        raise ShardError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if max_bytes is not None and max_bytes <= 0:
        raise ShardError(f"max_shard_bytes must be > 0, got {max_bytes}")
    opts = ImageOptions(image_size, resize_mode, encode_format, encode_quality)
    rows, total = read_rows(input_path, fmt, image_column, caption_column, image_root, coco_captions)
    # Check the columns before touching the output: a typo must not cost the user their old shards.
    first = next(rows, None)
    rows = itertools.chain([first], rows) if first is not None else iter(())
    prepare_output(output, overwrite)

    failed: list[dict[str, Any]] = []
    start = time.perf_counter()
    bar = tqdm(total=total, unit="img", desc="make_shards", disable=not progress, file=sys.stderr)
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(ShardWriter(output, samples_per_shard, max_bytes))
        if workers == 1:
            results = (process_row(row, opts) for row in rows)
        else:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
            # results come back in input order, so the output does not depend on the number of workers
            results = _ordered_parallel(pool, rows, opts, workers)
        try:
            for result in results:
                bar.update(1)
                if result.pop("ok"):
                    writer.write(result["files"], result["meta"])
                else:
                    failed.append(result)
        except (UnicodeDecodeError, csv.Error) as e:  # the table itself is unreadable past some point
            raise ShardError(f"cannot read {input_path}: {e}") from e
    bar.close()
    config = {
        "input": str(input_path),
        "format": fmt,
        "image_column": image_column if fmt in TABLE_FORMATS else None,
        "caption_column": caption_column if fmt in TABLE_FORMATS else None,
        "samples_per_shard": samples_per_shard,
        "max_shard_bytes": max_bytes,
        "image_size": image_size,
        "resize_mode": resize_mode if opts.resizing else "no",
        "encode_format": encode_format,
        "coco_captions": coco_captions if fmt == "coco" else None,
    }
    stats = write_stats(output, writer.shards, failed, {"created_by": "make_shards", "config": config})
    stats["seconds"] = time.perf_counter() - start  # not in stats.json: keeps reruns byte-identical
    return stats


def check_skipped(stats: dict[str, Any], max_skip_ratio: float, image_root: str | Path | None = None) -> None:
    """Raise TooManySkipped when nothing was written or more than ``max_skip_ratio`` of the rows were skipped.

    The message names the commonest reasons and the first paths looked for: a wrong
    ``--image-root`` (every file missing) then reads as what it is, not as a finished conversion.
    """
    written, skipped = stats["total_samples"], stats["num_failed"]
    rows = written + skipped
    if written and skipped <= max_skip_ratio * rows:
        return
    source = stats.get("config", {}).get("input", "the input")
    if not rows:
        raise TooManySkipped(f"wrote 0 samples: {source} has no rows")
    top = sorted(stats["failures"].items(), key=lambda kv: (-kv[1], kv[0]))
    reasons = ", ".join(f"{k}={v}" for k, v in top[:3]) + (", ..." if len(top) > 3 else "")
    looked = [os.path.abspath(r["detail"].removeprefix("no such file: ")) if r["reason"] == "missing_file"
              else r["source"] for r in stats["failed_rows"][:3]]
    limit = "nothing was written" if not written else f"more than --max-skip-ratio {max_skip_ratio:g}"
    message = (f"wrote {written} of {rows} rows, skipped {skipped} ({100 * skipped / rows:.0f}%: {limit}); "
               f"top reasons: {reasons}; the first paths looked for: {', '.join(looked)}")
    if top[0][0] == "missing_file":
        root = f" (here {os.path.abspath(image_root)})" if image_root is not None else ""
        message += f"; relative image paths are resolved against --image-root{root}: is it right?"
    raise TooManySkipped(message)


def summary(stats: dict[str, Any], output: Path) -> str:
    """A few human lines about a finished conversion."""
    lines = [
        f"wrote {stats['total_samples']} samples in {stats['num_shards']} shards "
        f"({stats['total_bytes'] / 1e6:.1f} MB) to {output}"
        + (f" in {stats['seconds']:.1f}s" if "seconds" in stats else "")
    ]
    if stats["num_failed"]:
        reasons = ", ".join(f"{k}={v}" for k, v in stats["failures"].items())
        lines.append(f"skipped {stats['num_failed']} rows: {reasons}")
        for row in stats["failed_rows"][:5]:
            lines.append(f"  row {row['row']} ({row['source']}): {row['reason']} {row['detail']}".rstrip())
        if stats["num_failed"] > 5:
            lines.append(f"  ... all of them in {output / STATS_NAME}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", required=True, help="table file, image folder, or COCO captions JSON")
    p.add_argument(
        "--format",
        default="auto",
        choices=("auto", *FORMATS),
        help="auto: from the extension (.jsonl .json .csv .tsv .parquet, a directory is folder)",
    )
    p.add_argument("--output", required=True, help="directory for NNNNN.tar and stats.json")
    p.add_argument(
        "--image-column",
        default="image",
        help="table column with the image path (relative to --image-root) or bytes (default %(default)s)",
    )
    p.add_argument("--caption-column", default="caption", help="table column with the caption (default %(default)s)")
    p.add_argument("--image-root", default=None, help="base of relative image paths (default: the input's directory)")
    p.add_argument(
        "--coco-captions",
        default="all",
        choices=("all", "first"),
        help="all (default): one sample per (image, caption); first: one per image, all captions kept in the .json",
    )
    p.add_argument("--samples-per-shard", type=int, default=10000, help="default %(default)s")
    p.add_argument("--max-shard-bytes", default=None, help="also start a new shard before this size (e.g. 100MB)")
    p.add_argument("--image-size", type=int, default=None, help="resize to this size (see --resize-mode)")
    p.add_argument(
        "--resize-mode",
        default="keep_ratio",
        choices=RESIZE_MODES,
        help="with --image-size (default keep_ratio): keep_ratio = smaller side to size; center_crop = square crop; "
        "border = larger side to size, padded square",
    )
    p.add_argument(
        "--encode-format",
        default="jpg",
        choices=tuple(ENCODE_FORMATS),
        help="format of re-encoded images (default %(default)s)",
    )
    p.add_argument("--encode-quality", type=int, default=95, help="default %(default)s")
    p.add_argument(
        "--workers", type=int, default=1, help="processes decoding and resizing images (default %(default)s)"
    )
    p.add_argument(
        "--max-skip-ratio",
        type=float,
        default=DEFAULT_MAX_SKIP_RATIO,
        help="exit 1 when more than this share of the rows is skipped, or nothing is written (default %(default)s)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = p.parse_args(argv)
    if not 0 <= args.max_skip_ratio <= 1:
        p.error(f"--max-skip-ratio must be in [0, 1], got {args.max_skip_ratio}")
    try:
        stats = make_shards(
            args.input,
            args.output,
            format=args.format,
            image_column=args.image_column,
            caption_column=args.caption_column,
            image_root=args.image_root,
            samples_per_shard=args.samples_per_shard,
            max_shard_bytes=args.max_shard_bytes,
            image_size=args.image_size,
            resize_mode=args.resize_mode,
            encode_format=args.encode_format,
            encode_quality=args.encode_quality,
            workers=args.workers,
            overwrite=args.overwrite,
            coco_captions=args.coco_captions,
            progress=not args.no_progress,
        )
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(summary(stats, Path(args.output)))
    image_root = args.image_root or (Path(args.input).parent if stats["config"]["format"] != "folder" else None)
    try:
        check_skipped(stats, args.max_skip_ratio, image_root)
    except TooManySkipped as e:
        print(f"error: {e}; every skipped row is listed in {Path(args.output) / STATS_NAME}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
