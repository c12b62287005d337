"""Tiny random vision-language models (Qwen2-VL, Qwen3-VL) with their processors, built offline.

No hub is needed: the tokenizer is a byte-level BPE trained here (the `tokenizers` library) on a
small generated vocabulary with the special tokens the Qwen-VL processors and chat templates use;
the chat template is a ChatML one written here; the image processor is transformers' own
`Qwen2VLImageProcessor` at a small patch size. A model folder looks like a hub checkpoint:
`config.json` + `model.safetensors` of a `*ForConditionalGeneration` (language-model head
included, as Qwen3-VL-Embedding and the rerankers ship), the processor files beside it.

    python tools/tiny_vlm.py --output DIR [--family qwen3_vl]    # writes DIR/<family>/

In code: `make_tiny_vlm(root, "qwen2_vl")` -> path; `inline_config(family)` is the same shape as a
`model.vlm.config` mapping (random init from the config, the processor from `make_processor`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `mmscale` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FAMILIES = ("qwen2_vl", "qwen3_vl")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
PATCH, MERGE, TEMPORAL = 8, 2, 2
MIN_PIXELS, MAX_PIXELS = 16 * 16 * 2, 16 * 16 * 24  # 2..24 merged patches of 16 x 16 pixels
VOCAB_WORDS = ("a an the of on in with and to for is are photo picture image page document chart table figure "
               "red green blue yellow black white small large two three cat dog bird car house tree circle square "
               "triangle above below left right query represent user input retrieve find match description "
               "judge whether relevant yes no system assistant answer text screenshot report").split()

# A ChatML template in the structured message format (content as a list of typed items), as the
# Qwen-VL templates are: images become the vision placeholder, texts their text; the query/document
# roles of a reranker pair are rendered as labelled user turns.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ('query', 'document') %}"
    "<|im_start|>user\n{{ '<Query>' if message['role'] == 'query' else '<Document>' }}: "
    "{% else %}<|im_start|>{{ message['role'] }}\n{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer() -> Any:
    """A byte-level BPE tokenizer (a few hundred tokens) with the Qwen-VL special tokens, right padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(VOCAB_WORDS[i:] + VOCAB_WORDS[:i]) for i in range(len(VOCAB_WORDS))]
    # The reranker's answers must be whole tokens (as "yes" and "no" are in Qwen's vocabulary).
    tok.train_from_iterator(corpus * 4 + ["yes", "no"] * 2000, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="right", model_max_length=4096)


def make_processor(family: str, tokenizer: Any = None, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS):
    """The family's transformers processor over the tiny tokenizer, with 8-pixel patches merged 2 x 2."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor, Qwen3VLProcessor

    _check_family(family)
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    # Qwen3-VL's processor normalises with mean = std = 0.5 (its checkpoints' preprocessor config).
    stats = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]} if family == "qwen3_vl" else {}
    image = Qwen2VLImageProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
                                  min_pixels=min_pixels, max_pixels=max_pixels, **stats)
    video = Qwen2VLVideoProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL)
    cls = Qwen3VLProcessor if family == "qwen3_vl" else Qwen2VLProcessor
    return cls(image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=CHAT_TEMPLATE)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny VLM family {family!r} (one of {', '.join(FAMILIES)})")


def inline_config(family: str, tokenizer: Any = None, hidden: int = 32, layers: int = 2,
                  dropout: float = 0.0) -> dict[str, Any]:
    """A tiny model of the family as a `model.vlm.config` mapping (model_type included)."""
    _check_family(family)
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    heads = 2
    head_dim = hidden // heads
    section = [head_dim // 4, head_dim // 8, head_dim // 8]  # temporal, height, width: sums to head_dim / 2
    text: dict[str, Any] = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1,
                                max_position_embeddings=1024, attention_dropout=dropout, rms_norm_eps=1e-6,
                                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen2_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
        vision = dict(depth=layers, embed_dim=hidden, hidden_size=hidden, num_heads=heads, mlp_ratio=2,
                      patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
        return dict(model_type="qwen2_vl", text_config=text, vision_config=vision, **common)
    text.update(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": section, "mrope_interleaved": True})
    vision = dict(depth=layers, hidden_size=hidden, intermediate_size=2 * hidden, num_heads=heads,
                  out_hidden_size=hidden, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                  num_position_embeddings=64, deepstack_visual_indexes=[0])
    return dict(model_type="qwen3_vl", text_config=text, vision_config=vision, tie_word_embeddings=False, **common)


def make_tiny_vlm(root: str | Path, family: str = "qwen3_vl", seed: int = 0, name: str | None = None) -> Path:
    """A tiny random `*ForConditionalGeneration` checkpoint of the family with its processor, at root/<name>."""
    import torch
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    out = Path(root) / (name or family)
    if (out / "config.json").is_file():
        return out
    tokenizer = make_tokenizer()
    values = inline_config(family, tokenizer)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    cls = Qwen3VLForConditionalGeneration if family == "qwen3_vl" else Qwen2VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).float().eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    make_processor(family, tokenizer).save_pretrained(str(out))
    return out


def dense_batch(seqs: list, pad_token_id: int) -> tuple[Any, Any, Any, dict]:
    """Rendered sequences as one right-padded batch: ids, attention mask, M-RoPE positions, collated images.

    For the one-process dense references (tests, benchmarks): every sequence in a single forward.
    """
    import torch

    from mmscale.data.vlm import collate_sequences

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    positions = torch.zeros(3, len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)], positions[:, i, :len(s)] = s.input_ids, 1, s.positions
    return ids, mask, positions, collate_sequences(seqs)


def main(argv: list[str] | None = None) -> int:
    """Write tiny models of every (or one) family under --output."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--family", choices=FAMILIES, action="append", default=[])
    args = parser.parse_args(argv)
    for family in args.family or FAMILIES:
        print(make_tiny_vlm(args.output, family))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def write_pair_shards(output: str | Path, n: int = 32, samples_per_shard: int = 8, seed: int = 0,
                      layouts: tuple[str, ...] = ("classic", "image_doc", "image_text_doc", "text_doc")) -> Path:
    """WebDataset shards of n (query, document) samples cycling through the declared layouts (mmscale.data.vlm).

    classic: KEY.txt + KEY.png; image_doc: query.txt + doc.png; image_text_doc: query.txt + doc.png +
    doc.txt; text_doc: query.txt + doc.txt; image_query: query.png + doc.txt. Images are random blocks
    of colour of varying size and aspect ratio; captions name their colours, so they are learnable.
    """
    import io

    import numpy as np
    from PIL import Image

    from mmscale.data.writer import ShardWriter, write_stats

    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20),
               "black": (10, 10, 10), "white": (240, 240, 240)}
    names = list(colours)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with ShardWriter(out, samples_per_shard) as writer:
        for i in range(n):
            a, b = rng.choice(len(names), 2, replace=False)
            h, w = int(rng.integers(24, 96)), int(rng.integers(24, 96))
            pixels = np.zeros((h, w, 3), dtype=np.uint8)
            pixels[:, : w // 2], pixels[:, w // 2:] = colours[names[a]], colours[names[b]]
            pixels = np.clip(pixels.astype(int) + rng.integers(-20, 20, pixels.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            caption = f"a picture of {names[a]} and {names[b]}".encode()
            layout = layouts[i % len(layouts)]
            if layout == "classic":
                files = {"txt": caption, "png": buf.getvalue()}
            elif layout == "image_doc":
                files = {"query.txt": caption, "doc.png": buf.getvalue()}
            elif layout == "image_text_doc":
                files = {"query.txt": caption, "doc.png": buf.getvalue(), "doc.txt": b"a page"}
            elif layout == "text_doc":
                files = {"query.txt": caption, "doc.txt": f"{names[a]} left, {names[b]} right".encode()}
            elif layout == "image_query":
                files = {"query.png": buf.getvalue(), "doc.txt": caption}
            else:
                raise ValueError(f"unknown layout {layout!r}")
            writer.write(files, {"i": i, "layout": layout})
    write_stats(out, writer.shards)
    return out


def write_group_shards(output: str | Path, n: int = 16, negatives: int = 2, samples_per_shard: int = 8,
                       seed: int = 0) -> Path:
    """Mined-group shards in `mmscale mine`'s layout: KEY.txt, KEY.pos.png, KEY.neg{i}.png or .txt, KEY.json scores.

    The last negative of every third group is left out (a group short of negatives).
    """
    import io
    import json

    import numpy as np
    from PIL import Image

    from mmscale.data.writer import ShardWriter, write_stats

    rng = np.random.default_rng(seed)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)

    def png() -> bytes:
        h, w = int(rng.integers(16, 64)), int(rng.integers(16, 64))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    with ShardWriter(out, samples_per_shard) as writer:
        for i in range(n):
            words = rng.choice(len(VOCAB_WORDS), 4, replace=False)
            files: dict[str, bytes] = {"txt": " ".join(VOCAB_WORDS[j] for j in words).encode(), "pos.png": png()}
            have = negatives - 1 if i % 3 == 2 else negatives
            for k in range(have):
                files[f"neg{k}.png" if k % 2 == 0 else f"neg{k}.txt"] = png() if k % 2 == 0 else b"a text negative"
            scores = sorted(rng.random(have + 1).tolist(), reverse=True)
            files["json"] = json.dumps({"positive_score": scores[0], "negative_scores": scores[1:]}).encode()
            writer.write(files)
    write_stats(out, writer.shards, extra={"num_negatives": negatives})
    return out
