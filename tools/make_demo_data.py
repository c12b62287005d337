"""Deterministic synthetic captioned images for the demo and for tests.

Each image shows two groups of shapes and a relation between them, for example
"two small red triangles above a large blue circle": to retrieve the right image a
model must read colour, shape, size, count and position. The first group is drawn
entirely inside one half of the image (top, bottom, left or right) and the second
group inside the opposite half, so the caption's relation is visibly true.

The validation split is held out by *composition*: every scene is reduced to a
canonical form ("B below A" is the same scene as "A above B") and hashed; about one in
five compositions belongs to val, the rest to train. Train and val therefore never
share a caption. Every scene is captioned in its canonical form only ("above", "to the left
of"), so one picture never has two different captions. Keys are disjoint too: val keys continue the shard numbering after
the last train shard (files are still ``val/00000.tar, ...``).

    python tools/make_demo_data.py --output data/demo --train-samples 2000 \\
        --val-samples 500 --samples-per-shard 500 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import io
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.make_shards import ShardError, ShardWriter, prepare_output, write_stats  # noqa: E402

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 0),
    "purple": (140, 40, 180),
    "orange": (245, 125, 0),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES = {"small": 0.065, "large": 0.13}  # radius as a fraction of the image side
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
RELATIONS = ("above", "below", "left of", "right of")
RELATION_PHRASES = {"above": "above", "below": "below", "left of": "to the left of", "right of": "to the right of"}
CONVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
BACKGROUND = (245, 245, 245)
VAL_FRACTION_MOD = 5  # one composition in 5 is held out for val
SUPERSAMPLE = 4  # draw large, then downsample: smooth edges at 64 px


@dataclass(frozen=True)
class Group:
    count: int
    size: str
    colour: str
    shape: str

    def phrase(self) -> str:
        noun = self.shape if self.count == 1 else PLURALS[self.shape]
        return f"{COUNT_WORDS[self.count]} {self.size} {self.colour} {noun}"


@dataclass(frozen=True)
class Scene:
    subject: Group
    relation: str
    anchor: Group

    def caption(self) -> str:
        return f"{self.subject.phrase()} {RELATION_PHRASES[self.relation]} {self.anchor.phrase()}"

    def canonical(self) -> tuple:
        """The same scene whichever way it is told ("B below A" == "A above B")."""
        if self.relation in ("below", "right of"):
            return (asdict(self.anchor), CONVERSE[self.relation], asdict(self.subject))
        return (asdict(self.subject), self.relation, asdict(self.anchor))

    def split(self) -> str:
        digest = hashlib.sha256(repr(self.canonical()).encode()).digest()
        return "val" if int.from_bytes(digest[:8], "big") % VAL_FRACTION_MOD == 0 else "train"


def random_group(rng: random.Random) -> Group:
    return Group(rng.randint(1, 3), rng.choice(list(SIZES)), rng.choice(list(COLOURS)), rng.choice(SHAPES))


def random_scene(rng: random.Random, split: str) -> Scene:
    """Draw scenes until one belongs to ``split`` (val compositions are held out of train)."""
    while True:
        scene = Scene(random_group(rng), rng.choice(RELATIONS), random_group(rng))
        if scene.split() == split:
            # Tell every scene one way only: "B below A" and "A above B" are the same picture, and
            # two different captions for one picture would be false negatives for the contrastive
            # loss, for hard-negative mining and for retrieval metrics alike.
            subject, relation, anchor = scene.canonical()
            return Scene(Group(**subject), relation, Group(**anchor))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.88  # similar visual area to the circle
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        t = r * 0.36
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _place_group(
    rng: random.Random, group: Group, region: tuple[float, float, float, float], side: float
) -> list[tuple[float, float, float]]:
    """Centres and radius of the group's objects, in cells along the region's long side."""
    x0, y0, x1, y1 = region
    r = SIZES[group.size] * side
    horizontal = (x1 - x0) >= (y1 - y0)
    length = (x1 - x0) if horizontal else (y1 - y0)
    cell = length / group.count
    out = []
    for i in range(group.count):
        if horizontal:
            cx = rng.uniform(x0 + i * cell + r, x0 + (i + 1) * cell - r)
            cy = rng.uniform(y0 + r, y1 - r)
        else:
            cx = rng.uniform(x0 + r, x1 - r)
            cy = rng.uniform(y0 + i * cell + r, y0 + (i + 1) * cell - r)
        out.append((cx, cy, r))
    return out


def render(scene: Scene, rng: random.Random, image_size: int = 64) -> Image.Image:
    """Draw the scene; the subject's half of the image is set by the relation."""
    s = image_size * SUPERSAMPLE
    margin, gap = 0.03 * s, 0.04 * s  # gap keeps the two groups visibly apart
    halves = {
        "top": (margin, margin, s - margin, s / 2 - gap),
        "bottom": (margin, s / 2 + gap, s - margin, s - margin),
        "left": (margin, margin, s / 2 - gap, s - margin),
        "right": (s / 2 + gap, margin, s - margin, s - margin),
    }
    subject_half, anchor_half = {
        "above": ("top", "bottom"),
        "below": ("bottom", "top"),
        "left of": ("left", "right"),
        "right of": ("right", "left"),
    }[scene.relation]
    img = Image.new("RGB", (s, s), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for group, half in ((scene.subject, subject_half), (scene.anchor, anchor_half)):
        for cx, cy, r in _place_group(rng, group, halves[half], s):
            _draw_shape(draw, group.shape, cx, cy, r, COLOURS[group.colour])
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _write_split(
    out: Path, split: str, n: int, samples_per_shard: int, seed: int, image_size: int, key_shard_offset: int
) -> dict[str, Any]:
    prepare_output(out, overwrite=True)
    rng = random.Random(f"mmscale-demo-{split}-{seed}")
    with ShardWriter(out, samples_per_shard, key_shard_offset=key_shard_offset) as writer:
        for i in range(n):
            scene = random_scene(rng, split)
            img = render(scene, rng, image_size)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            caption = scene.caption()
            meta = {
                "source": "synthetic",
                "split": split,
                "seed": seed,
                "index": i,
                "caption": caption,
                "scene": {"subject": asdict(scene.subject), "relation": scene.relation, "anchor": asdict(scene.anchor)},
                "width": image_size,
                "height": image_size,
                "original_width": image_size,
                "original_height": image_size,
            }
            writer.write({"jpg": buf.getvalue(), "txt": caption.encode("utf-8")}, meta)
    extra = {"created_by": "make_demo_data", "split": split, "seed": seed, "image_size": image_size}
    return write_stats(out, writer.shards, [], extra)


def make_demo_data(
    output: str | Path,
    train_samples: int = 2000,
    val_samples: int = 500,
    samples_per_shard: int = 500,
    seed: int = 0,
    image_size: int = 64,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``output/train`` and ``output/val`` shards; return ``{"train": stats, "val": stats}``."""
    if image_size < 16:
        raise ShardError(f"image_size must be >= 16 to draw three shapes in a row, got {image_size}")
    if train_samples < 0 or val_samples < 0:
        raise ShardError("sample counts must be >= 0")
    output = Path(output)
    for split in ("train", "val"):
        d = output / split
        if d.is_dir() and any(d.iterdir()) and not overwrite:
            raise ShardError(f"output directory {d} is not empty; pass --overwrite to replace its shards")
    train = _write_split(output / "train", "train", train_samples, samples_per_shard, seed, image_size, 0)
    val = _write_split(
        output / "val", "val", val_samples, samples_per_shard, seed, image_size, key_shard_offset=train["num_shards"]
    )
    return {"train": train, "val": val}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output", required=True, help="directory; gets train/ and val/ subdirectories")
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--val-samples", type=int, default=500)
    p.add_argument("--samples-per-shard", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--overwrite", action="store_true", help="replace shards already in the output")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        stats = make_demo_data(
            args.output,
            args.train_samples,
            args.val_samples,
            args.samples_per_shard,
            args.seed,
            args.image_size,
            overwrite=args.overwrite,
        )
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    took = time.perf_counter() - start
    for split, s in stats.items():
        print(
            f"{split}: {s['total_samples']} samples in {s['num_shards']} shards "
            f"({s['total_bytes'] / 1e6:.2f} MB) -> {Path(args.output) / split}"
        )
    print(f"done in {took:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
