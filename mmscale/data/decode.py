"""Sample decoding: image bytes -> RGB uint8 tensor [3, H, W], caption bytes -> text; bad samples raise.

Three sample layouts share one tar format (members named KEY.EXT):
    pair        KEY.jpg (or png, webp, ...)  KEY.txt                              an image and its caption
    group       KEY.pos.jpg  KEY.neg0.jpg ...  KEY.txt  KEY.json                  `mmscale mine`'s groups
                (retrieval/groups.py): a caption, its positive, mined negatives hardest first, scores
    text pair   KEY.txt  KEY.pos.txt                                              a query and its document
A group read where pairs are expected is its (caption, positive) pair.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings

import torch
from PIL import Image

try:  # libjpeg-turbo / libpng / libwebp straight to a uint8 tensor; PIL when torchvision drops it
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover - depends on the torchvision build
    decode_image = None


TEXT_PAIR_MEMBER = "pos.txt"  # a text pair's document; its query is the caption member


class BadSample(Exception):
    """A sample that cannot be used; `reason` is the key it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def parse_image_keys(image_keys: str) -> tuple[str, ...]:
    """`"jpg;jpeg;png"` -> ("jpg", "jpeg", "png"); the first one a sample has is its image."""
    return tuple(k.strip().lower().lstrip(".") for k in image_keys.split(";") if k.strip())


def image_bytes(sample: dict, image_keys: tuple[str, ...]) -> bytes:
    """The encoded image member of a raw sample (a group's positive, `pos.EXT`, where it has no plain image)."""
    for prefix in ("", "pos."):
        for key in image_keys:
            data = sample.get(prefix + key)
            if data is not None:
                return data
    if TEXT_PAIR_MEMBER in sample:
        raise BadSample("text_pair_sample", f"{sample.get('__key__')} is a text pair (.{TEXT_PAIR_MEMBER}, no image): "
                                            "give such shards as data.text_pairs")
    raise BadSample("missing_image", f"{sample.get('__key__')} has none of {', '.join(image_keys)}")


def negative_bytes(sample: dict, index: int, image_keys: tuple[str, ...]) -> bytes | None:
    """The encoded image of a group's `index`-th mined negative (`negN.EXT`), or None when the group has fewer."""
    for key in image_keys:
        data = sample.get(f"neg{index}.{key}")
        if data is not None:
            return data
    return None


def image_id(data: bytes) -> int:
    """A 64-bit id of an encoded image (signed, for an int64 tensor): equal bytes, equal id.

    Mining copies an image's bytes exactly, so a group's positive, its negatives and the corpus's own
    samples agree on ids wherever the same image turns up; the loss uses them to keep a query's own
    positive out of its negatives when another query's group holds it.
    """
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


# A group's scores in its json: the mining bi-encoder's cosines, and (after `mmscale mine --rescore-with`)
# the reranker's logits, positive first.
SCORE_FIELDS = {"bi_encoder": ("positive_score", "negative_scores"), "reranker": ("reranker_scores",)}


def group_scores(sample: dict, negatives: int, source: str = "bi_encoder") -> list[float]:
    """[positive, negative 0, ...] scores of a group from its json (NaN where absent): 1 + `negatives` values.

    `source`: bi_encoder (the mining cosines) or reranker (the rescoring reranker's logits).
    """
    out = [math.nan] * (1 + negatives)
    raw = sample.get("json")
    if raw is None:
        return out
    try:
        meta = json.loads(raw)
        fields = SCORE_FIELDS[source]
        if len(fields) == 2:
            values = [meta.get(fields[0]), *list(meta.get(fields[1]) or [])[:negatives]]
        else:
            values = list(meta.get(fields[0]) or [])[: 1 + negatives]
    except (ValueError, AttributeError, TypeError):
        return out  # a sidecar that is no group's: no scores, the sample itself is fine
    for i, v in enumerate(values):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[i] = float(v)
    return out


def document(sample: dict) -> str:
    """The document of a text pair (`KEY.pos.txt`)."""
    raw = sample.get(TEXT_PAIR_MEMBER)
    if raw is None:
        raise BadSample("missing_document", f"{sample.get('__key__')} has no .{TEXT_PAIR_MEMBER}")
    text = raw.decode("utf-8", errors="replace").strip()
    if not text:
        raise BadSample("empty_document", str(sample.get("__key__")))
    return text


def caption(sample: dict, text_key: str) -> str:
    """The caption of a raw sample: a member (`txt`) or a field of the json sidecar (`json:caption`)."""
    text = _caption_value(sample, text_key)
    text = text if isinstance(text, str) else ("" if text is None else str(text))
    text = text.strip()
    if not text:
        raise BadSample("empty_caption", str(sample.get("__key__")))
    return text


def captions(sample: dict, text_key: str) -> list[str]:
    """Every caption of a sample with several (`data.multi_caption`): a json list, or one per line.

    The member (or json field) may hold a JSON list of strings, or text with one caption per line;
    blank lines are skipped. At least one caption, or BadSample.
    """
    value = _caption_value(sample, text_key)
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            pass  # a caption that happens to start with a bracket: read it as lines
    if isinstance(value, list):
        items = [v.strip() for v in value if isinstance(v, str)]
    else:
        items = [line.strip() for line in ("" if value is None else str(value)).splitlines()]
    items = [t for t in items if t]
    if not items:
        raise BadSample("empty_caption", str(sample.get("__key__")))
    return items


def _caption_value(sample: dict, text_key: str):
    """The raw caption value: the member's text, or the json field's value (a string, a list, ...)."""
    if text_key.startswith("json:"):
        raw = sample.get("json")
        if raw is None:
            raise BadSample("missing_caption", f"{sample.get('__key__')} has no .json sidecar")
        try:
            value = json.loads(raw)
            for part in text_key[len("json:") :].split("."):
                value = value[part]
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise BadSample("missing_caption", f"{sample.get('__key__')}: {text_key} not found ({exc})") from exc
        return value
    raw = sample.get(text_key)
    if raw is None:
        raise BadSample("missing_caption", f"{sample.get('__key__')} has no .{text_key}")
    return raw.decode("utf-8", errors="replace")


def _check_pixels(data: bytes, max_pixels: int) -> None:
    # PIL reads only the header here, so a decompression bomb is refused before it is decoded.
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Exception as exc:  # noqa: BLE001 - any parser failure means the bytes are not an image
        raise BadSample("undecodable_image", str(exc)) from exc
    if width * height > max_pixels:
        raise BadSample("too_many_pixels", f"{width}x{height} > data.max_pixels={max_pixels}")


def _decode_with_pil(data: bytes) -> torch.Tensor:
    import numpy as np

    with Image.open(io.BytesIO(data)) as im:
        rgb = np.array(im.convert("RGB"))
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def decode_rgb(data: bytes, max_pixels: int) -> torch.Tensor:
    """Decode jpg/png/webp bytes to an RGB uint8 tensor [3, H, W] (libjpeg-turbo via torchvision, PIL fallback)."""
    _check_pixels(data, max_pixels)
    if decode_image is not None:
        try:
            with warnings.catch_warnings():
                # torchvision >= 0.29 flags its decoders as deprecated (for torchcodec) on every call.
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except Exception:  # noqa: BLE001 - formats torchvision lacks (CMYK jpeg, gif, ...) go to PIL
            pass
    try:
        return _decode_with_pil(data)
    except Exception as exc:  # noqa: BLE001
        raise BadSample("undecodable_image", str(exc)) from exc
