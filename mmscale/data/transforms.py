"""Image transforms on uint8 tensors: random resized crop (train), resize then centre crop (eval), normalise.

The settings come from `config.ImagePreprocess`, the model's own preprocessing (a pretrained CLIP
resizes bicubically, SigLIP squashes to the square, timm models keep `crop_pct` of the image).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from mmscale.config import ImagePreprocess

CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratios a training crop may take (as torchvision/open_clip)
_MODES = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
          "nearest": InterpolationMode.NEAREST}


def random_crop_box(
    height: int, width: int, scale: Sequence[float], rng: random.Random, ratio: Sequence[float] = CROP_RATIO
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering `scale` of the area with an aspect ratio in `ratio`."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # Rare (extreme aspect ratios): fall back to the largest centred crop within the allowed ratios.
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def centre_crop_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the centred `size` x `size` square (the image is at least that large)."""
    return (height - size) // 2, (width - size) // 2, size, size


def _interpolation(name: str) -> InterpolationMode:
    try:
        return _MODES[name]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r} ({' | '.join(_MODES)})") from None


def _resize(image: torch.Tensor, size: list[int], interpolation: str) -> torch.Tensor:
    mode = _interpolation(interpolation)
    return F.resize(image, size, interpolation=mode, antialias=mode != InterpolationMode.NEAREST)


def crop_resize(
    image: torch.Tensor, box: tuple[int, int, int, int], size: int, interpolation: str = "bilinear"
) -> torch.Tensor:
    """Crop `box` out of a uint8 [3, H, W] image and resize it to [3, size, size] (antialiased)."""
    top, left, h, w = box
    crop = image[:, top : top + h, left : left + w]
    if (h, w) == (size, size):
        return crop.contiguous()
    return _resize(crop, [size, size], interpolation)


def train_transform(
    image: torch.Tensor, preprocess: ImagePreprocess, scale: Sequence[float], rng: random.Random
) -> torch.Tensor:
    """Random resized crop of a uint8 image to `preprocess.size` squared, with its interpolation."""
    box = random_crop_box(image.shape[-2], image.shape[-1], scale, rng)
    return crop_resize(image, box, preprocess.size, preprocess.interpolation)


def eval_transform(image: torch.Tensor, preprocess: ImagePreprocess) -> torch.Tensor:
    """The evaluation view of a uint8 image: resize (shorter side, or squash), then the centre crop.

    `shortest`: the shorter side goes to floor(size / crop_pct), the longer keeps the aspect ratio
    (as CLIP's processor, timm and open_clip do), then the centred size x size crop is taken.
    `squash`: both sides go to size (SigLIP's processor), no crop.
    """
    size = preprocess.size
    height, width = image.shape[-2:]
    if preprocess.resize == "squash":
        return image.contiguous() if (height, width) == (size, size) else _resize(image, [size, size], preprocess.interpolation)
    if preprocess.resize != "shortest":
        raise ValueError(f"unknown resize {preprocess.resize!r} (shortest | squash)")
    short = math.floor(size / preprocess.crop_pct)
    if min(height, width) != short:
        # A single int resizes the shorter side and keeps the aspect ratio (the longer side truncated).
        image = _resize(image, [short], preprocess.interpolation)
        height, width = image.shape[-2:]
    return crop_resize(image, centre_crop_box(height, width, size), size)


def normalize(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], out: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 normalised with the vision tower's mean and std (in [0, 1] units)."""
    if len(mean) != images.shape[-3] or len(std) != images.shape[-3]:
        raise ValueError(f"mean {tuple(mean)} / std {tuple(std)} need one value per channel ({images.shape[-3]})")
    scale = 1.0 / (torch.tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255.0)
    shift = -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    out = torch.empty(images.shape, dtype=torch.float32) if out is None else out
    # In place, as one multiply-add: the batch is large and memory traffic is what costs here.
    return out.copy_(images).mul_(scale).add_(shift)
