"""Sample decoding: image bytes -> RGB uint8 tensor [3, H, W], caption bytes -> text; bad samples raise."""

from __future__ import annotations

import io
import json
import warnings

import torch
from PIL import Image

try:  # libjpeg-turbo / libpng / libwebp straight to a uint8 tensor; PIL when torchvision drops it
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover - depends on the torchvision build
    decode_image = None


class BadSample(Exception):
    """A sample that cannot be used; `reason` is the key it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def parse_image_keys(image_keys: str) -> tuple[str, ...]:
    """`"jpg;jpeg;png"` -> ("jpg", "jpeg", "png"); the first one a sample has is its image."""
    return tuple(k.strip().lower().lstrip(".") for k in image_keys.split(";") if k.strip())


def image_bytes(sample: dict, image_keys: tuple[str, ...]) -> bytes:
    """The encoded image member of a raw sample."""
    for key in image_keys:
        data = sample.get(key)
        if data is not None:
            return data
    raise BadSample("missing_image", f"{sample.get('__key__')} has none of {', '.join(image_keys)}")


def caption(sample: dict, text_key: str) -> str:
    """The caption of a raw sample: a member (`txt`) or a field of the json sidecar (`json:caption`)."""
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
        text = value if isinstance(value, str) else ("" if value is None else str(value))
    else:
        raw = sample.get(text_key)
        if raw is None:
            raise BadSample("missing_caption", f"{sample.get('__key__')} has no .{text_key}")
        text = raw.decode("utf-8", errors="replace")
    text = text.strip()
    if not text:
        raise BadSample("empty_caption", str(sample.get("__key__")))
    return text


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
