"""Image transforms on uint8 tensors: random resized crop (train), short-side resize + centre crop (eval), normalise."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torchvision.transforms.v2.functional as F

CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratios a training crop may take (as torchvision/open_clip)


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


def centre_crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the centred square: resizing it equals short-side resize + centre crop."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def crop_resize(image: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """Crop `box` out of a uint8 [3, H, W] image and resize it to [3, size, size] (bilinear, antialiased)."""
    top, left, h, w = box
    if (h, w) == (size, size):
        return image[:, top : top + h, left : left + w].contiguous()
    return F.resized_crop(image, top, left, h, w, [size, size], antialias=True)


def train_transform(image: torch.Tensor, size: int, scale: Sequence[float], rng: random.Random) -> torch.Tensor:
    """Random resized crop of a uint8 image to `size` x `size`."""
    return crop_resize(image, random_crop_box(image.shape[-2], image.shape[-1], scale, rng), size)


def eval_transform(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` and take the centre `size` x `size` crop of a uint8 image."""
    return crop_resize(image, centre_crop_box(image.shape[-2], image.shape[-1]), size)


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
