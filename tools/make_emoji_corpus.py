"""A second real image-text corpus from Debian: the Noto colour emoji and their Unicode names.

    python tools/make_emoji_corpus.py --output /work/corpus/emoji         # apt-get download, 64 px
    python tools/make_emoji_corpus.py --output OUT --font NotoColorEmoji.ttf --emoji-test emoji-test.txt

``fonts-noto-color-emoji`` ships Google's emoji as colour bitmaps in one font, and
``unicode-data`` ships ``emoji/emoji-test.txt``, the Unicode list of every emoji sequence
with its CLDR name ("grinning face with big eyes", "woman office worker: medium-dark skin
tone", "flag: Samoa", "couple with heart: woman, man, light skin tone"). Each name is the
caption of its picture: a real, licence-clean (OFL / Unicode) corpus of about 3,600 pairs,
easier than the icons (``tools/make_icon_corpus.py``) in one way and harder in another.
Most emoji come in families that differ by one attribute, so a held-out emoji usually has
seen relatives: the test is binding (this hand with *that* skin tone, this person with
*that* job), the fine-grained matching a cross-encoder is meant to add to a bi-encoder.
The packages are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``
(``tools/make_icon_corpus.py``'s helpers); nothing else touches the network.

Decisions (each one changes what the held-out figures mean):

- **Which emoji.** Every line of ``emoji-test.txt`` with status ``fully-qualified`` or
  ``component`` (the skin-tone and hair swatches); the minimally- and unqualified
  spellings are the same pictures. A sequence the font does not draw as one glyph (the
  shaper left several, or the font's missing-glyph box) is left out with its reason, so
  the corpus follows the font and the list of whatever Debian release is installed.
- **Rendering.** Pillow draws the sequence with the font's embedded colour through the
  raqm layout (HarfBuzz: it joins ZWJ sequences, flags and skin tones into one glyph; a
  Pillow built without raqm is refused with a clear message). The bitmap is flattened onto
  ``--background`` (default white), centred in a square and resized to ``--image-size``
  (Lanczos, as the icons are). Pictures with identical pixels are kept once.
- **Captions** are the CLDR names as Unicode writes them, lowercase except proper names.
  The group and subgroup ("People & Body", "person-role") go to the ``.json`` sidecar,
  not into the caption.
- **Held-out split by emoji.** An emoji goes to ``val`` when ``sha256(seed, name)`` falls
  under ``--val-fraction`` (default 0.12; the icons' rule): deterministic, independent of
  what else is in the list. Variants of one base emoji (skin tones, genders) fall on both
  sides on purpose; no held-out picture or caption is in the training split.

Output: ``OUT/train/`` and ``OUT/val/`` (``NNNNN.tar`` shards in the img2dataset layout,
samples in a seeded random order, val keys after the train shards) each with a
``stats.json`` manifest, and ``OUT/corpus.json``: packages and versions, options, counts
per group and split, and every emoji left out with its reason. ``--overwrite`` is needed
for a non-empty ``OUT``; only shards and manifests are replaced there.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, features

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.make_icon_corpus import (  # noqa: E402
    IconCorpusError,
    add_corpus_options,
    check_corpus_options,
    check_output,
    closing_lines,
    download_packages,
    finish_summary,
    flatten_square,
    parse_colour,
    png_bytes,
    split_of,
    unpack_deb,
    write_corpus,
)
from tools.make_shards import ShardError  # noqa: E402

DEFAULT_PACKAGES = ("fonts-noto-color-emoji", "unicode-data")
FONT_PATH = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST_PATH = "usr/share/unicode/emoji/emoji-test.txt"
STATUSES = ("fully-qualified", "component")
FONT_SIZE = 109  # Noto Color Emoji's one bitmap strike (136 x 128 px); FreeType refuses other sizes
LINE = re.compile(r"^(?P<cps>[0-9A-Fa-f ]+?)\s*;\s*(?P<status>[a-z-]+)\s*#\s*\S+\s+E(?P<version>[\d.]+)\s+(?P<name>.+)$")


class EmojiCorpusError(IconCorpusError):
    """A user-facing error: a missing font or list, a Pillow without raqm, a bad option."""


@dataclass
class Emoji:
    """One line of emoji-test.txt."""

    codepoints: tuple[str, ...]
    status: str
    version: str
    name: str
    group: str
    subgroup: str

    @property
    def text(self) -> str:
        return "".join(chr(int(c, 16)) for c in self.codepoints)


@dataclass
class EmojiSample:
    emoji: Emoji
    caption: str
    png: bytes
    split: str = ""


def parse_emoji_test(path: Path, statuses: Sequence[str] = STATUSES) -> list[Emoji]:
    """The sequences of ``emoji-test.txt`` with one of ``statuses``, in file order."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise EmojiCorpusError(f"cannot read the emoji list {path}: {e}") from None
    group = subgroup = ""
    out: list[Emoji] = []
    for number, line in enumerate(lines, 1):
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            m = LINE.match(line)
            if m is None:
                raise EmojiCorpusError(f"{path}:{number}: not an emoji-test line: {line[:80]!r}")
            if m["status"] in statuses:
                cps = tuple(m["cps"].upper().split())
                out.append(Emoji(cps, m["status"], m["version"], m["name"].strip(), group, subgroup))
    if not out:
        raise EmojiCorpusError(f"{path} lists no emoji with status {', '.join(statuses)}; is it emoji-test.txt?")
    return out


class Renderer:
    """Draws one emoji sequence with a colour font through raqm; None when the font has no single glyph for it."""

    def __init__(self, font_path: Path, size: int = FONT_SIZE) -> None:
        if not features.check("raqm"):
            raise EmojiCorpusError(
                "this Pillow has no raqm layout (libraqm), which joins emoji sequences into one glyph; "
                "install a Pillow wheel from PyPI (it bundles raqm) or the system's libraqm"
            )
        try:
            self.font = ImageFont.truetype(str(font_path), size, layout_engine=ImageFont.Layout.RAQM)
        except OSError as e:
            raise EmojiCorpusError(f"cannot open the emoji font {font_path} at size {size}: {e}") from None
        self.missing = self._draw("\U0010fffd")  # a private-use codepoint: the font's missing-glyph picture
        single = self.font.getbbox("\U0001f600")
        self.width = single[2] - single[0]

    def _draw(self, text: str, bbox: tuple[int, int, int, int] | None = None) -> Image.Image:
        left, top, right, bottom = bbox or self.font.getbbox(text)
        img = Image.new("RGBA", (max(1, right - left), max(1, bottom - top)), (0, 0, 0, 0))
        # black where a glyph has no colour of its own (a monochrome font, a text-style symbol)
        ImageDraw.Draw(img).text((-left, -top), text, font=self.font, fill=(0, 0, 0, 255), embedded_color=True)
        return img

    def render(self, text: str) -> tuple[Image.Image | None, str]:
        bbox = self.font.getbbox(text)
        if bbox[2] - bbox[0] > 1.5 * self.width:
            return None, "not_one_glyph"
        img = self._draw(text, bbox)
        if img.size == self.missing.size and img.tobytes() == self.missing.tobytes():
            return None, "missing_glyph"
        if img.getextrema()[3][1] == 0:
            return None, "blank"
        return img, ""


def make_emoji_corpus(
    font: Path,
    emoji_test: Path,
    output: str | Path,
    *,
    image_size: int = 64,
    background: str = "white",
    val_fraction: float = 0.12,
    seed: int = 0,
    samples_per_shard: int = 256,
    overwrite: bool = False,
    progress: bool = True,
    sources: Sequence[dict[str, str]] = (),
) -> dict[str, Any]:
    """Build the corpus from a colour emoji font and emoji-test.txt into ``output``; return its summary."""
    output = Path(output)
    check_corpus_options(val_fraction, image_size, samples_per_shard, error=EmojiCorpusError)
    check_output(output, overwrite)
    rgb = parse_colour(background)
    start = time.perf_counter()
    emoji = parse_emoji_test(emoji_test)
    renderer = Renderer(font)
    samples: list[EmojiSample] = []
    dropped: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for i, e in enumerate(emoji, 1):
        img, reason = renderer.render(e.text)
        if img is None:
            dropped.append({"name": e.name, "codepoints": " ".join(e.codepoints), "reason": reason})
            continue
        png = png_bytes(flatten_square(img, image_size, rgb))
        digest = hashlib.sha256(png).hexdigest()
        if digest in seen:
            dropped.append({"name": e.name, "codepoints": " ".join(e.codepoints), "reason": "duplicate_pixels",
                            "same_as": seen[digest]})  # fmt: skip
            continue
        seen[digest] = e.name
        samples.append(EmojiSample(e, e.name, png, split_of(e.name, seed, val_fraction)))
        if progress and i % 500 == 0:
            print(f"rendered {i}/{len(emoji)} emoji", file=sys.stderr, flush=True)
    splits = collections.Counter(s.split for s in samples)
    if not splits["train"] or not splits["val"]:
        raise EmojiCorpusError(
            f"{len(samples)} emoji leave one split empty at --val-fraction {val_fraction}; change it or --seed"
        )
    config = {
        "image_size": image_size,
        "background": "#{:02x}{:02x}{:02x}".format(*rgb),
        "val_fraction": val_fraction,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "statuses": list(STATUSES),
    }
    output.mkdir(parents=True, exist_ok=True)
    extra = {"created_by": "make_emoji_corpus", "config": config, "sources": list(sources)}

    def meta(s: EmojiSample) -> dict[str, Any]:
        e = s.emoji
        return {"caption": s.caption, "codepoints": " ".join(e.codepoints), "status": e.status,
                "emoji_version": e.version, "group": e.group, "subgroup": e.subgroup, "split": s.split,
                "width": image_size, "height": image_size}  # fmt: skip

    stats = write_corpus(samples, output, samples_per_shard=samples_per_shard, seed=seed, meta=meta,
                         extra=extra, order="emoji")  # fmt: skip
    summary = {
        **extra,
        "counts": {
            "listed": len(emoji),
            "train": splits["train"],
            "val": splits["val"],
            "by_group": {
                g: {split: sum(1 for s in samples if s.emoji.group == g and s.split == split) for split in ("train", "val")}
                for g in dict.fromkeys(e.group for e in emoji)
            },
        },
        "num_dropped": len(dropped),
        "dropped_by_reason": dict(sorted(collections.Counter(d["reason"] for d in dropped).items())),
        "dropped": dropped,
    }
    return finish_summary(summary, output, start, stats)


def _lines(summary: dict[str, Any], output: Path) -> str:
    c = summary["counts"]
    lines = [
        f"train: {c['train']} emoji -> {output / 'train'}",
        f"val:   {c['val']} emoji -> {output / 'val'}",
        "by group: " + ", ".join(f"{g} {v['train']}+{v['val']}" for g, v in c["by_group"].items()),
    ]
    return "\n".join([*lines, *closing_lines(summary, output, c["listed"])])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output", required=True, help="directory; gets train/, val/ and corpus.json")
    p.add_argument("--font", type=Path, help=f"a colour emoji font already on disk (default: /{FONT_PATH} of the package)")
    p.add_argument("--emoji-test", type=Path, help=f"emoji-test.txt already on disk (default: /{EMOJI_TEST_PATH})")
    add_corpus_options(p, "emoji")
    args = p.parse_args(argv)
    output = Path(args.output)
    try:
        check_output(output, args.overwrite)  # before a 20 MB download
        with tempfile.TemporaryDirectory(prefix="emoji-corpus-") as tmp:
            font, emoji_test, sources = args.font, args.emoji_test, []
            wanted = [pkg for pkg, given in zip(DEFAULT_PACKAGES, (font, emoji_test)) if given is None]
            if wanted:
                if not shutil.which("apt-get"):
                    raise EmojiCorpusError("apt-get not found: pass --font and --emoji-test instead")
                for deb in download_packages(wanted, Path(tmp)):
                    package, version, root = unpack_deb(deb, Path(tmp) / "x")
                    sources.append({"package": package, "version": version})
                    if package == DEFAULT_PACKAGES[0]:
                        font = root / FONT_PATH
                    else:
                        emoji_test = root / EMOJI_TEST_PATH
            for what, path in (("--font", font), ("--emoji-test", emoji_test)):
                if not Path(path).is_file():
                    raise EmojiCorpusError(f"{what} {path} is not a file")
            summary = make_emoji_corpus(
                font, emoji_test, output, image_size=args.image_size, background=args.background,
                val_fraction=args.val_fraction, seed=args.seed, samples_per_shard=args.samples_per_shard,
                overwrite=args.overwrite, progress=not args.no_progress, sources=sources,
            )  # fmt: skip
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(_lines(summary, output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
