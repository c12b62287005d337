"""A real image-text corpus from Debian icon themes, with a held-out split by concept.

    python tools/make_icon_corpus.py --output /work/corpus/icons            # oxygen + mate + adwaita, 64 px
    python tools/make_icon_corpus.py --output OUT --packages oxygen-icon-theme --image-size 96
    python tools/make_icon_corpus.py --output OUT --theme-dir /usr/share/icons/Tango   # already extracted

Icon themes are hand-drawn pictures named by what they show (``document-open``,
``battery-caution``, ``face-smile``), in context folders (``actions/``, ``apps/``,
``devices/``, ``mimetypes/``, ``places/``, ``status/``, ...). The names make captions a
sentence encoder can read, so a theme is a small, real, licence-clean retrieval corpus.
The packages are fetched with ``apt-get download`` into a temporary folder (``apt-get
update`` first when apt does not know them) and unpacked with ``dpkg-deb -x``; nothing
else touches the network.

Decisions (each one changes what the held-out figures mean):

- **Themes.** Default ``oxygen-icon-theme`` (KDE's Oxygen: 2,044 names, 1,423 distinct
  drawings), ``mate-icon-theme`` (the GNOME 2 / Tango style: 526 drawings) and
  ``adwaita-icon-theme`` (GNOME's own, full-colour "legacy" icons and grey symbolic
  glyphs rendered as PNG): three clearly different drawing styles of mostly freedesktop
  names ("document-open", "battery-caution"), so most concepts have two or three pictures
  and the names mean something to a sentence encoder. Measured on bookworm (2,536 samples,
  1,500 concept groups with all three): gnome, tango and lxde add under 40 concept groups
  on top (the same names and often the same pixels as mate); moka, paper and faenza add
  300-600 groups, but nearly all of them application logos named after the program
  ("xnoise", "turpial"), which no caption can describe; breeze and papirus ship SVG only,
  which needs a rasteriser this tool does not assume (a theme without PNGs is refused with
  a clear message). Of a package with several themes (mate ships ``menta``, a recolour),
  the theme with the most PNGs is used.
- **One sample per concept per theme.** A concept is (theme, context, name). Of its PNGs
  the tool takes the smallest one at least ``--image-size`` px (downscaling keeps the
  drawing), else the largest one of at least ``--min-size`` px (default 32; 16-22 px
  icons are redrawn pixel art, not the same picture), and renders it at ``--image-size``.
  Animation sheets (``animations/``: a grid of frames) are skipped.
- **Transparency.** Every icon is flattened onto one fixed colour (``--background``,
  default white) and padded to a square before resizing (Lanczos); the shard stores an RGB
  PNG, so training and evaluation see exactly the same pixels.
- **Duplicates.** Names that are symlinks to another icon (``edit-copy`` ->
  ``copy``) are one concept: the icon file's own name is kept, the others go to
  ``aliases`` in the sidecar. Icons whose rendered pixels are identical (within a theme or
  across themes) are kept once, the first in (theme order, context, name) order.
- **Captions** come from the name and the context folder: the name is split into words
  (``-``, ``_``, ``.``, ``+``, camelCase), packaging noise is dropped (``x``, ``vnd``,
  ``org``, ``kde``, ``plasma``, ``gtk``, ``gnome``, ...), a few abbreviations are spelled
  out (``ms`` -> microsoft, ``prefs`` -> preferences, ``rtl`` -> right to left), a file-type
  name reads as a file (``text-x-python`` -> "python text file", ``application-pdf`` ->
  "pdf file"), an action named noun-verb reads verb-first (``document-open`` -> "open
  document", ``address-book-new`` -> "new address book"), and the context goes last in
  brackets: "open document (action icon)", "tools media optical copy (action icon)",
  "battery caution (status icon)", "python text file (file type icon)". A folder that names
  no context (Adwaita's ``legacy/``) takes the context the same name has in the other
  themes, so one concept gets one caption in every theme ("(icon)" when no theme knows it).
  The raw name, the folder and caption contexts, theme, package and version, source size and
  path are in the ``.json`` sidecar.
- **Held-out split by concept.** Concepts are grouped so that near-duplicates fall on the
  same side: the same words in any theme or context (``go-next`` in mate and in oxygen,
  ``edit-copy`` in actions and in apps), names one edit apart once normalised (case,
  separators, ``-rtl``/``-ltr``/``-symbolic``/numeric suffixes; ``adress-book-new`` and
  ``address-book-new``, ``battery-040`` and ``battery-060``), and icons whose 16x16 colour
  thumbnails are identical (the same drawing under two names). A group goes to ``val``
  when ``sha256(seed, group)`` falls under ``--val-fraction`` (default 0.12): deterministic,
  and a concept keeps its side when themes are added. No held-out caption has the same
  words as a training caption, and no held-out image is a copy of a training image.

Output: ``OUT/train/`` and ``OUT/val/`` (``NNNNN.tar`` shards in the img2dataset layout,
written by ``tools/make_shards.py``'s ``ShardWriter``, samples in a seeded random order so
each shard mixes themes and contexts; val keys continue after the train shards) each with
a ``stats.json`` manifest, and ``OUT/corpus.json``: packages and versions, options, counts
per theme / context / split, and every icon left out with its reason. ``--overwrite`` is
needed for a non-empty ``OUT``; only shards and manifests are replaced there.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.make_shards import ShardError, ShardWriter, prepare_output, write_stats  # noqa: E402

DEFAULT_PACKAGES = ("oxygen-icon-theme", "mate-icon-theme", "adwaita-icon-theme")
CORPUS_NAME = "corpus.json"

# Context folder -> the words that end a caption. Folders not listed are still used ("(icon)").
CONTEXT_PHRASES = {
    "actions": "action icon",
    "apps": "application icon",
    "applications": "application icon",
    "applets": "applet icon",
    "categories": "category icon",
    "devices": "device icon",
    "emblems": "emblem",
    "emotes": "emoticon",
    "emotions": "emoticon",
    "filesystems": "file system icon",
    "intl": "international icon",
    "international": "international icon",
    "mimes": "file type icon",
    "mimetypes": "file type icon",
    "places": "place icon",
    "status": "status icon",
    "ui": "interface icon",
}
SKIPPED_CONTEXTS = {"animations": "animation_sheet"}  # sprite sheets of many frames, not one picture

# Words that name packaging, not pictures ("org.kde.plasma.battery" shows a battery).
NOISE_WORDS = frozenset({"x", "vnd", "org", "kde", "plasma", "gtk", "gnome", "mate", "stock", "com", "freedesktop"})
ABBREVIATIONS = {
    "ms": "microsoft",
    "msword": "microsoft word",
    "msexcel": "microsoft excel",
    "mspowerpoint": "microsoft powerpoint",
    "prefs": "preferences",
    "pref": "preferences",
    "config": "configuration",
    "dir": "directory",
    "fs": "file system",
    "doc": "document",
    "docs": "documents",
    "img": "image",
    "pic": "picture",
    "btn": "button",
    "app": "application",
    "apps": "applications",
    "info": "information",
    "rtl": "right to left",
    "ltr": "left to right",
    "harddisk": "hard disk",
    "addressbook": "address book",
    "hdd": "hard disk",
    "cdrom": "cd rom",
    "nm": "network manager",
    "im": "instant messaging",
}
MEDIA_TYPES = frozenset({"application", "text", "image", "audio", "video", "font", "model", "inode", "message"})
# Last words of an action's name that read better first ("document-open" -> "open document").
VERBS = frozenset(
    "new open save close copy cut paste delete remove add find print send edit import export insert "
    "download upload refresh reload rename sort undo redo revert clear encrypt decrypt sign verify "
    "lock unlock share play pause stop record eject burn".split()
)
# freedesktop action prefixes that are groups, not objects: "edit-copy" stays "edit copy".
ACTION_GROUPS = frozenset("edit go view format tools media process system window object insert help list zoom".split())
VARIANT_SUFFIXES = ("rtl", "ltr", "symbolic")


class IconCorpusError(ShardError):
    """A user-facing error: apt failed, a theme has no PNGs, a bad option."""


# --------------------------------------------------------------------------- captions


def name_words(name: str) -> list[str]:
    """The words of an icon name, lowercase: split at - _ . + spaces and camelCase."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
    return [w for w in re.split(r"[-_.+\s]+", spaced.lower()) if w]


def _readable(words: Sequence[str]) -> list[str]:
    kept = [w for w in words if w not in NOISE_WORDS] or list(words)
    out: list[str] = []
    for word in kept:
        for w in ABBREVIATIONS.get(word, word).split():
            if not out or out[-1] != w:  # "folder-folder" -> "folder"
                out.append(w)
    return out


def _file_type_phrase(words: list[str]) -> list[str]:
    media, rest = words[0], _readable(words[1:])
    if media == "inode":
        return rest or ["inode"]
    if media == "application":
        return [*rest, "file"] if rest else ["application", "file"]
    return [*rest, media, "file"] if rest else [media, "file"]


def caption_for(name: str, context: str) -> str:
    """The caption of icon ``name`` in context folder ``context`` (see the module docstring)."""
    words = name_words(name)
    phrase: list[str]
    if context in ("mimetypes", "mimes") and words and words[0] in MEDIA_TYPES:
        phrase = _file_type_phrase(words)
    else:
        phrase = _readable(words)
        if (
            context == "actions"
            and 2 <= len(phrase) <= 3
            and phrase[-1] in VERBS
            and phrase[0] not in ACTION_GROUPS
            and phrase[0] not in VERBS
        ):
            phrase = [phrase[-1], *phrase[:-1]]
    label = CONTEXT_PHRASES.get(context, "icon")
    return f"{' '.join(phrase) or name} ({label})"


def normalized_name(name: str) -> str:
    """The name with case, separators, variant suffixes (-rtl, -symbolic) and trailing numbers removed."""
    words = name_words(name)
    while len(words) > 1 and (words[-1] in VARIANT_SUFFIXES or words[-1].isdigit()):
        words.pop()
    joined = "".join(words)
    return re.sub(r"(?<=[a-z])\d+$", "", joined) or joined


def caption_words(caption: str) -> str:
    """Identity of a caption's content: its words, sorted (the context bracket excluded)."""
    return " ".join(sorted(caption.split(" (", 1)[0].split()))


# --------------------------------------------------------------------------- scanning a theme


@dataclass
class IconFile:
    """One PNG of a theme at one size."""

    path: Path  # as found (may be a symlink)
    rel: str  # path relative to the theme root
    context: str
    name: str
    width: int
    height: int
    target: str | None = None  # rel of the real file when this one is a symlink inside the theme


@dataclass
class Concept:
    """One icon of one theme: (theme, context, name), with its aliases and the file to render."""

    theme: str
    package: str
    version: str
    context: str
    name: str
    aliases: list[str] = field(default_factory=list)
    file: IconFile | None = None
    caption_context: str = ""  # the context the caption names (see caption_contexts)


@dataclass
class Theme:
    """An extracted icon theme folder and the package it came from."""

    name: str
    root: Path
    package: str = ""
    version: str = ""


def _context_of(parts: Sequence[str]) -> str:
    """The context folder of a path inside a theme: a known one anywhere, else the file's folder."""
    for part in reversed(parts[:-1]):
        if part.lower() in CONTEXT_PHRASES or part.lower() in SKIPPED_CONTEXTS:
            return part.lower()
    return parts[-2].lower() if len(parts) > 1 else ""


def scan_theme(root: Path) -> tuple[list[IconFile], list[dict[str, Any]]]:
    """Every PNG under a theme folder (sorted by path), and the files that could not be read."""
    files: list[IconFile] = []
    bad: list[dict[str, Any]] = []
    real_root = Path(os.path.realpath(root))
    for path in sorted(root.rglob("*.png")):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        target = None
        if path.is_symlink():
            real = Path(os.path.realpath(path))
            if not real.is_file():
                bad.append({"source": rel, "reason": "broken_symlink", "detail": os.readlink(path)})
                continue
            try:
                target = real.relative_to(real_root).as_posix()
            except ValueError:  # points outside the theme (e.g. into hicolor): treat as its own file
                target = None
        try:
            with Image.open(path) as img:
                width, height = img.size
        except Exception as e:  # PIL raises many types for a corrupt file
            bad.append({"source": rel, "reason": "decode_error", "detail": f"{type(e).__name__}: {e}"})
            continue
        files.append(IconFile(path, rel, _context_of(parts), path.stem, width, height, target))
    return files, bad


def choose_file(files: Sequence[IconFile], image_size: int, min_size: int) -> IconFile | None:
    """The smallest file of at least ``image_size`` px, else the largest of at least ``min_size``; None if none."""
    usable = [f for f in files if min(f.width, f.height) >= min_size]
    if not usable:
        return None
    big = [f for f in usable if min(f.width, f.height) >= image_size]
    if big:
        return min(big, key=lambda f: (min(f.width, f.height), f.rel))
    return min(usable, key=lambda f: (-min(f.width, f.height), f.rel))


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def find(self, x: Any) -> Any:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: Any, b: Any) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smallest member names the group: deterministic

    def groups(self) -> dict[Any, list[Any]]:
        out: dict[Any, list[Any]] = collections.defaultdict(list)
        for x in sorted(self.parent):
            out[self.find(x)].append(x)
        return out


def theme_concepts(
    theme: Theme, image_size: int, min_size: int
) -> tuple[list[Concept], list[dict[str, Any]], int]:
    """One concept per (context, name) of a theme after merging symlink aliases; the rest with reasons."""
    files, dropped = scan_theme(theme.root)
    for d in dropped:
        d["theme"] = theme.name
    by_rel = {f.rel: f for f in files}
    # Symlink aliases: a link and its target (at any size) are one concept, named by the real file.
    uf = _UnionFind()
    for f in files:
        uf.find((f.context, f.name))
        if f.target is not None and f.target in by_rel:
            real = by_rel[f.target]
            uf.union((real.context, real.name), (f.context, f.name))
    real_names = {(f.context, f.name) for f in files if f.target is None}
    by_concept: dict[tuple[str, str], list[IconFile]] = collections.defaultdict(list)
    for f in files:
        by_concept[(f.context, f.name)].append(f)
    concepts: list[Concept] = []
    for _, members in sorted(uf.groups().items()):
        # The name of a real file (not a link) is the concept's name; among several, the first.
        head = next((m for m in members if m in real_names), members[0])
        context, name = head
        if context in SKIPPED_CONTEXTS:
            dropped.append({"theme": theme.name, "source": f"{context}/{name}", "reason": SKIPPED_CONTEXTS[context]})
            continue
        # Real files first: an alias at a size where the real name is missing still counts.
        candidates = [f for m in members for f in by_concept[m] if f.target is None] or [
            f for m in members for f in by_concept[m]
        ]
        chosen = choose_file(candidates, image_size, min_size)
        if chosen is None:
            biggest = max(min(f.width, f.height) for f in candidates)
            dropped.append(
                {"theme": theme.name, "source": f"{context}/{name}", "reason": "too_small",
                 "detail": f"largest PNG is {biggest} px, --min-size is {min_size}"}
            )  # fmt: skip
            continue
        aliases = sorted({f"{c}/{n}" for c, n in members if (c, n) != head})
        concepts.append(Concept(theme.name, theme.package, theme.version, context, name, aliases, chosen))
    return concepts, dropped, len(files)


# --------------------------------------------------------------------------- rendering


def parse_colour(text: str) -> tuple[int, int, int]:
    """'#ffffff', 'ffffff' or 'white'-style names PIL knows, as an RGB triple."""
    from PIL import ImageColor

    value = text if text.startswith("#") or not re.fullmatch(r"[0-9a-fA-F]{6}", text) else "#" + text
    try:
        rgb = ImageColor.getrgb(value)
    except ValueError:
        raise IconCorpusError(f"--background {text!r} is not a colour (examples: white, #ffffff, 808080)") from None
    return rgb[:3]


def render_icon(path: Path, image_size: int, background: tuple[int, int, int]) -> Image.Image:
    """The icon on an opaque ``background``, padded to a square and resized to ``image_size`` (RGB)."""
    with Image.open(path) as src:
        return flatten_square(src.convert("RGBA"), image_size, background)


def flatten_square(rgba: Image.Image, image_size: int, background: tuple[int, int, int]) -> Image.Image:
    """An RGBA picture on an opaque ``background``, centred in a square, resized to ``image_size`` (Lanczos)."""
    side = max(rgba.size)
    canvas = Image.new("RGBA", (side, side), (*background, 255))
    canvas.alpha_composite(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
    flat = canvas.convert("RGB")
    if flat.size != (image_size, image_size):
        flat = flat.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return flat


def png_bytes(img: Image.Image) -> bytes:
    """Deterministic PNG encoding (no metadata)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def thumbnail_key(img: Image.Image) -> bytes:
    """16x16 colour thumbnail at 8 levels per channel: equal for the same drawing after small changes."""
    # Coarser keys (8x8, 4 levels) make every pale or thin glyph on white one "image" and chain
    # hundreds of unrelated icons into one group; at 16x16 x 8 levels a bucket holds at most a few.
    small = img.resize((16, 16), Image.Resampling.BOX)
    return bytes(v >> 5 for v in small.tobytes())


# --------------------------------------------------------------------------- the corpus


@dataclass
class Sample:
    """A rendered concept, ready to be written."""

    concept: Concept
    caption: str
    png: bytes
    pixel_hash: str
    thumb: bytes
    group: str = ""
    split: str = ""


def split_of(group: str, seed: int, val_fraction: float) -> str:
    """'val' or 'train' for a concept group: a seeded hash, so it never depends on what else is in the corpus."""
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def _deletion_keys(text: str) -> set[str]:
    # Two strings one edit apart (insert, delete or substitute) share one of these keys.
    return {text} | {text[:i] + text[i + 1 :] for i in range(len(text))}


def assign_groups(samples: Sequence[Sample]) -> None:
    """Group near-duplicate concepts (same words, names one edit apart, same thumbnail); name each group."""
    uf = _UnionFind()
    for i, s in enumerate(samples):
        uf.find(("sample", i))
        uf.union(("sample", i), ("words", caption_words(s.caption)))
        norm = normalized_name(s.concept.name)
        # Short names ("go-up", "cut") are too close to everything at one edit: only exact equality.
        for key in _deletion_keys(norm) if len(norm) >= 6 else {norm}:
            uf.union(("sample", i), ("name", key))
        uf.union(("sample", i), ("thumb", s.thumb.hex()))
    names: dict[Any, str] = {}
    for root, members in uf.groups().items():
        words = sorted(m[1] for m in members if m[0] == "words")
        names[root] = words[0] if words else str(root)
    for i, s in enumerate(samples):
        s.group = names[uf.find(("sample", i))]


def build_samples(
    themes: Sequence[Theme],
    image_size: int = 64,
    min_size: int = 32,
    background: tuple[int, int, int] = (255, 255, 255),
    progress: bool = True,
) -> tuple[list[Sample], list[dict[str, Any]], dict[str, int]]:
    """Rendered, de-duplicated samples of all themes (in theme order), what was left out, PNGs per theme."""
    samples: list[Sample] = []
    dropped: list[dict[str, Any]] = []
    files_per_theme: dict[str, int] = {}
    seen: dict[str, Sample] = {}
    for theme in themes:
        concepts, theme_dropped, n_files = theme_concepts(theme, image_size, min_size)
        dropped.extend(theme_dropped)
        files_per_theme[theme.name] = n_files
        if not concepts:
            raise IconCorpusError(
                f"theme {theme.name} ({theme.root}) has no PNG icons of at least {min_size} px "
                f"({n_files} PNG files); SVG-only themes are not supported"
            )
        if progress:
            print(f"{theme.name}: {n_files} PNG files -> {len(concepts)} concepts", file=sys.stderr, flush=True)
        for c in concepts:
            try:
                img = render_icon(c.file.path, image_size, background)
            except Exception as e:  # one odd file must not end the build
                dropped.append({"theme": c.theme, "source": c.file.rel, "reason": "decode_error",
                                "detail": f"{type(e).__name__}: {e}"})  # fmt: skip
                continue
            data = png_bytes(img)
            pixel_hash = hashlib.sha256(img.tobytes()).hexdigest()
            if pixel_hash in seen:
                first = seen[pixel_hash].concept
                dropped.append(
                    {"theme": c.theme, "source": f"{c.context}/{c.name}", "reason": "duplicate_image",
                     "detail": f"same pixels as {first.theme}:{first.context}/{first.name}"}
                )  # fmt: skip
                first.aliases.append(f"{c.theme}:{c.context}/{c.name}")
                continue
            sample = Sample(c, "", data, pixel_hash, thumbnail_key(img))
            seen[pixel_hash] = sample
            samples.append(sample)
    for s, context in zip(samples, caption_contexts([s.concept for s in samples])):
        s.concept.caption_context = context
        s.caption = caption_for(s.concept.name, context)
    assign_groups(samples)
    return samples, dropped, files_per_theme


def caption_contexts(concepts: Sequence[Concept]) -> list[str]:
    """The context each caption names: the concept's folder, or for a folder that names none
    (Adwaita's ``legacy/``) the folder the same name is in most often in the other themes.

    Without this, Adwaita's "edit delete (icon)" would be a different caption from mate's and
    oxygen's "edit delete (action icon)": a false negative in training, a miss in evaluation.
    """
    known: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for c in concepts:
        if c.context in CONTEXT_PHRASES:
            known[c.name][c.context] += 1
    out = []
    for c in concepts:
        if c.context in CONTEXT_PHRASES or not known[c.name]:
            out.append(c.context)
        else:  # most common; ties go to the context seen first (theme order)
            out.append(known[c.name].most_common(1)[0][0])
    return out


def _meta(s: Sample, image_size: int) -> dict[str, Any]:
    c = s.concept
    return {
        "caption": s.caption,
        "name": c.name,
        "context": c.context,
        "caption_context": c.caption_context,
        "theme": c.theme,
        "package": c.package,
        "package_version": c.version,
        "aliases": sorted(c.aliases),
        "size": [c.file.width, c.file.height],
        "source": c.file.rel,
        "group": s.group,
        "split": s.split,
        "width": image_size,
        "height": image_size,
    }


def write_corpus(
    samples: Sequence[Any],
    output: Path,
    *,
    samples_per_shard: int,
    seed: int,
    meta: Callable[[Any], dict[str, Any]],
    extra: dict[str, Any],
    order: str = "icons",
) -> dict[str, dict[str, Any]]:
    """Write ``output/train`` and ``output/val`` in a seeded random order; return their stats.

    A sample has ``png`` (bytes), ``caption`` and ``split``; ``meta(sample)`` is its ``.json``
    sidecar; ``order`` names the corpus in the shuffle's seed."""
    stats: dict[str, dict[str, Any]] = {}
    offset = 0
    for split in ("train", "val"):
        part = [s for s in samples if s.split == split]
        random.Random(f"{order}:{seed}:{split}").shuffle(part)
        out = output / split
        prepare_output(out, overwrite=True)  # the caller has checked OUT is empty or --overwrite was given
        with ShardWriter(out, samples_per_shard, key_shard_offset=offset) as writer:
            for s in part:
                writer.write({"png": s.png, "txt": s.caption.encode("utf-8")}, meta(s))
        stats[split] = write_stats(out, writer.shards, [], {**extra, "split": split})
        offset += len(writer.shards)
    return stats


def check_corpus_options(
    val_fraction: float,
    image_size: int,
    samples_per_shard: int,
    *,
    min_size: int | None = None,
    error: type[IconCorpusError] = IconCorpusError,
) -> None:
    """Refuse the options every corpus tool shares when out of range (``min_size``: the icons' too)."""
    if not 0 < val_fraction < 1:
        raise error(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if min_size is None and image_size < 8:
        raise error(f"--image-size must be >= 8, got {image_size}")
    if min_size is not None and (image_size < 8 or min_size < 1):
        raise error(f"--image-size must be >= 8 and --min-size >= 1, got {image_size} and {min_size}")
    if samples_per_shard < 1:
        raise error(f"--samples-per-shard must be >= 1, got {samples_per_shard}")


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless ``overwrite`` (before any download)."""
    if output.exists() and not output.is_dir():
        raise IconCorpusError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        names = ", ".join(sorted(e.name for e in output.iterdir())[:5])
        raise IconCorpusError(f"output directory {output} is not empty ({names}); pass --overwrite to replace its shards")


def make_icon_corpus(
    themes: Sequence[Theme],
    output: str | Path,
    *,
    image_size: int = 64,
    min_size: int = 32,
    background: str = "white",
    val_fraction: float = 0.12,
    seed: int = 0,
    samples_per_shard: int = 256,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the corpus from extracted theme folders into ``output``; return the ``corpus.json`` summary."""
    output = Path(output)
    check_corpus_options(val_fraction, image_size, samples_per_shard, min_size=min_size)
    if not themes:
        raise IconCorpusError("no themes given")
    names = [t.name for t in themes]
    if len(set(names)) != len(names):
        raise IconCorpusError(f"theme names must be distinct, got {names}")
    check_output(output, overwrite)
    rgb = parse_colour(background)
    start = time.perf_counter()
    samples, dropped, files_per_theme = build_samples(themes, image_size, min_size, rgb, progress)
    for s in samples:
        s.split = split_of(s.group, seed, val_fraction)
    if not any(s.split == "val" for s in samples) or all(s.split == "val" for s in samples):
        groups = len({s.group for s in samples})
        raise IconCorpusError(
            f"{len(samples)} samples in {groups} concept groups leave one split empty at --val-fraction "
            f"{val_fraction}; add themes or change --val-fraction / --seed"
        )
    config = {
        "image_size": image_size,
        "min_size": min_size,
        "background": "#{:02x}{:02x}{:02x}".format(*rgb),
        "val_fraction": val_fraction,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
    }
    sources = [{"theme": t.name, "package": t.package, "version": t.version} for t in themes]
    output.mkdir(parents=True, exist_ok=True)
    extra = {"created_by": "make_icon_corpus", "config": config, "themes": sources}
    stats = write_corpus(samples, output, samples_per_shard=samples_per_shard, seed=seed,
                         meta=lambda s: _meta(s, image_size), extra=extra)  # fmt: skip
    summary = {
        **extra,
        "counts": _counts(samples, files_per_theme),
        "num_dropped": len(dropped),
        "dropped_by_reason": dict(sorted(collections.Counter(d["reason"] for d in dropped).items())),
        "dropped": dropped,
    }
    return finish_summary(summary, output, start, stats)


def finish_summary(summary: dict[str, Any], output: Path, start: float, stats: dict[str, Any]) -> dict[str, Any]:
    """Write ``output/corpus.json`` (sorted keys: a rerun is byte-identical), then add the time and the split stats."""
    (output / CORPUS_NAME).write_bytes(json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    summary["seconds"] = time.perf_counter() - start  # not in corpus.json: reruns stay byte-identical
    summary["stats"] = stats
    return summary


def _counts(samples: Sequence[Sample], files_per_theme: dict[str, int]) -> dict[str, Any]:
    split_counts = collections.Counter(s.split for s in samples)
    return {
        "train": split_counts["train"],
        "val": split_counts["val"],
        "groups": {
            split: len({s.group for s in samples if s.split == split}) for split in ("train", "val")
        },
        "distinct_captions": len({s.caption for s in samples}),
        "png_files": files_per_theme,
        "by_theme": {
            t: {split: sum(1 for s in samples if s.concept.theme == t and s.split == split) for split in ("train", "val")}
            for t in files_per_theme
        },
        "by_context": dict(sorted(collections.Counter(s.concept.context for s in samples).items())),
        "source_sizes": dict(sorted(collections.Counter(str(s.concept.file.width) for s in samples).items(),
                                    key=lambda kv: int(kv[0]))),  # fmt: skip
    }


# --------------------------------------------------------------------------- apt


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError:
        raise IconCorpusError(f"{cmd[0]} not found: this tool needs Debian's apt-get and dpkg-deb") from None
    except subprocess.TimeoutExpired:
        raise IconCorpusError(f"{' '.join(cmd)} did not finish in 15 minutes") from None


def _tail(proc: subprocess.CompletedProcess) -> str:
    text = (proc.stderr or proc.stdout or "").strip().splitlines()
    return " | ".join(text[-3:])


def download_packages(packages: Sequence[str], dest: Path) -> list[Path]:
    """``apt-get download`` each package into ``dest`` (``apt-get update`` first if apt does not know one)."""
    unknown = [p for p in packages if _run(["apt-cache", "show", p]).returncode != 0]
    if unknown:
        print(f"apt does not know {', '.join(unknown)}: running apt-get update", file=sys.stderr, flush=True)
        proc = _run(["apt-get", "update"])
        if proc.returncode != 0:
            raise IconCorpusError(
                f"apt-get update failed (exit {proc.returncode}; it needs root: run `sudo apt-get update` once, "
                f"or pass extracted themes with --theme-dir): {_tail(proc)}"
            )
        still = [p for p in unknown if _run(["apt-cache", "show", p]).returncode != 0]
        if still:
            raise IconCorpusError(f"apt knows no package {', '.join(still)} (see `apt-cache search icon-theme`)")
    debs = []
    for package in packages:
        before = set(dest.glob("*.deb"))
        proc = _run(["apt-get", "download", package], cwd=dest)
        new = sorted(set(dest.glob("*.deb")) - before)
        if proc.returncode != 0 or not new:
            raise IconCorpusError(f"apt-get download {package} failed (exit {proc.returncode}): {_tail(proc)}")
        debs.append(new[0])
    return debs


def unpack_deb(deb: Path, dest: Path) -> tuple[str, str, Path]:
    """``dpkg-deb -x`` a package into ``dest/PACKAGE``; return (package, version, that folder)."""
    fields = _run(["dpkg-deb", "-f", str(deb), "Package", "Version"])
    if fields.returncode != 0:
        raise IconCorpusError(f"{deb} is not a readable .deb: {_tail(fields)}")
    info = dict(line.split(": ", 1) for line in fields.stdout.strip().splitlines() if ": " in line)
    package, version = info.get("Package", deb.stem), info.get("Version", "")
    target = dest / package
    target.mkdir(parents=True, exist_ok=True)
    proc = _run(["dpkg-deb", "-x", str(deb), str(target)])
    if proc.returncode != 0:
        raise IconCorpusError(f"dpkg-deb -x {deb} failed: {_tail(proc)}")
    return package, version, target


def extract_theme(deb: Path, dest: Path) -> Theme:
    """Unpack a .deb and return its icon theme: the folder under usr/share/icons with the most PNGs."""
    package, version, target = unpack_deb(deb, dest)
    icons = target / "usr" / "share" / "icons"
    roots = sorted(p for p in icons.iterdir() if p.is_dir()) if icons.is_dir() else []
    counted = [(sum(1 for _ in r.rglob("*.png")), r) for r in roots]
    if not counted or max(counted)[0] == 0:
        raise IconCorpusError(
            f"package {package} has no PNG icons under usr/share/icons "
            f"({', '.join(r.name for r in roots) or 'no themes'}); SVG-only themes are not supported"
        )
    n, root = max(counted, key=lambda nr: (nr[0], -roots.index(nr[1])))
    others = [r.name for _, r in counted if r != root]
    print(f"{package} {version}: theme {root.name} ({n} PNG files)" + (f"; skipping {', '.join(others)}" if others else ""),
          file=sys.stderr, flush=True)  # fmt: skip
    return Theme(root.name, root, package, version)


def _sample_lines(summary: dict[str, Any], output: Path) -> str:
    c = summary["counts"]
    lines = [
        f"train: {c['train']} samples ({c['groups']['train']} concept groups) -> {output / 'train'}",
        f"val:   {c['val']} samples ({c['groups']['val']} concept groups) -> {output / 'val'}",
        "by theme: " + ", ".join(f"{t} {v['train']}+{v['val']}" for t, v in c["by_theme"].items()),
        "by context: " + ", ".join(f"{k} {v}" for k, v in c["by_context"].items()),
        "source sizes (px): " + ", ".join(f"{k}: {v}" for k, v in c["source_sizes"].items()),
    ]
    return "\n".join([*lines, *closing_lines(summary, output)])


def closing_lines(summary: dict[str, Any], output: Path, listed: int | None = None) -> list[str]:
    """What was left out and why (of ``listed`` when given), and the time taken: a corpus tool's last lines."""
    of = f" of {listed}" if listed is not None else ""
    reasons = ", ".join(f"{k} {v}" for k, v in summary["dropped_by_reason"].items())
    lines = [f"left out: {summary['num_dropped']}{of} ({reasons}), listed in {output / CORPUS_NAME}"]
    if "seconds" in summary:
        lines.append(f"done in {summary['seconds']:.1f}s")
    return lines


def add_corpus_options(p: argparse.ArgumentParser, unit: str) -> None:
    """The options every corpus tool shares: image size, background, split, order, shards, overwrite, progress."""
    p.add_argument("--image-size", type=int, default=64, help="side of the stored square images (default %(default)s)")
    p.add_argument("--background", default="white", help="colour behind transparent pixels (default %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.12, help=f"share of {unit} held out (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="decides the split and the sample order (default %(default)s)")
    p.add_argument("--samples-per-shard", type=int, default=256, help="default %(default)s")
    p.add_argument("--overwrite", action="store_true", help="replace shards and manifests already in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output", required=True, help="directory; gets train/, val/ and corpus.json")
    p.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES),
                   help="Debian icon-theme packages, fetched with apt-get download (default: %(default)s)")  # fmt: skip
    p.add_argument("--theme-dir", action="append", default=[], type=Path,
                   help="an already extracted theme folder (repeatable); replaces --packages")  # fmt: skip
    p.add_argument("--min-size", type=int, default=32, help="smallest source icon used, px (default %(default)s)")
    add_corpus_options(p, "concept groups")
    args = p.parse_args(argv)
    output = Path(args.output)
    try:
        check_output(output, args.overwrite)  # before a 50 MB download
        with tempfile.TemporaryDirectory(prefix="icon-corpus-") as tmp:
            if args.theme_dir:
                missing = [d for d in args.theme_dir if not d.is_dir()]
                if missing:
                    raise IconCorpusError(f"--theme-dir {missing[0]} is not a directory")
                themes = [Theme(d.resolve().name, d) for d in args.theme_dir]
            else:
                if not shutil.which("apt-get"):
                    raise IconCorpusError("apt-get not found: pass extracted themes with --theme-dir instead")
                debs = download_packages(args.packages, Path(tmp))
                themes = [extract_theme(deb, Path(tmp) / "x") for deb in debs]
            summary = make_icon_corpus(
                themes, output, image_size=args.image_size, min_size=args.min_size, background=args.background,
                val_fraction=args.val_fraction, seed=args.seed, samples_per_shard=args.samples_per_shard,
                overwrite=args.overwrite, progress=not args.no_progress,
            )  # fmt: skip
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(_sample_lines(summary, output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
