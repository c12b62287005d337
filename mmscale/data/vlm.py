"""Vision-language model inputs on the host: images resized with their aspect ratio and cut into uint8
patches, each side rendered (prompt, image, text) and tokenised, and a batch of such sequences.

A *sequence* is one side of a sample encoded for the model: token ids (each image placeholder
repeated once per merged patch), its multimodal rotary positions (temporal, height, width; text
tokens advance all three by one, an image's tokens take their grid coordinates), and its images as
uint8 patches [n, 3, p, p] with their grid (t, h, w) in patches. Patches are normalised (and
repeated over the vision encoder's temporal patch) on the model's device, a quarter of float32's
bytes on the way there and no temporal copy at all.

How a WebDataset sample declares its sides (member names after the key):

    query.txt, query.jpg|png|webp      the query: text, image, or both
    doc.txt, doc.jpg|png|webp          the document: text, image, or both
    txt + jpg|png|webp                 no query.* / doc.* members: the classic layout, the caption
                                       (data.text_key) is the query and the image the document
    txt, pos.*, neg0.*, neg1.*, ...    a mined group (mmscale mine's layout, data/decode.py): the
                                       query text, the positive document, its negatives hardest first
                                       (neg{i}.txt and/or neg{i}.<image>), scores in the json sidecar;
                                       read as a (query, positive) pair when no negatives are asked for

A batch (`VlmCodec.collate`) lays the sequences of its B samples out as B x G consecutive sequences
(G = 2 + K: query, document, K negatives; a group short of negatives fills the rest with a 1-token
placeholder that `negative_mask` marks as absent), flattened into a few tensors so a dataloader
worker hands it over through shared memory in one piece:

    input_ids [T] long, positions [3, T] long, seq_lens [B*G] long      the tokens, concatenated
    patches [P, 3, p, p] uint8, grids [I, 3] long, image_seqs [I] long  the images, in sequence order
    negative_mask [B, K] bool, scores [B, 1 + K] float (NaN where absent),
    image_ids [B, 1 + K] int64 (a hash of each document's bytes)        with K > 0 only, as the two-tower
                                                                        loader's fields of the same names

A model forward takes a *chunk* of a batch's sequences, right-padded to its longest (`VlmChunks`);
`plan_batch` decides which sequences share a chunk (by token budget) and, across ranks, how many
forwards there are and which of them run the vision encoder (see mmscale/train/vlm_step.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from mmscale import distributed
from mmscale.config import VlmPreprocess
from mmscale.data import decode as decoding

QUERY, DOCUMENT = "query", "document"
SIDE_MEMBERS = {QUERY: "query", DOCUMENT: "doc"}  # member prefix of each side in a shard
MAX_ASPECT = 200  # the Qwen-VL processors refuse images more elongated than this


# --------------------------------------------------------------------------- images


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The Qwen-VL resize target: sides divisible by `factor`, area within [min, max] pixels, aspect ratio kept."""
    if max(height, width) > MAX_ASPECT * min(height, width):
        raise decoding.BadSample("bad_aspect_ratio", f"{width}x{height} is more elongated than {MAX_ASPECT}:1")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def resize_image(image: torch.Tensor, pre: VlmPreprocess) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, h, w] at the `smart_resize` size (bicubic, antialiased, as the processors)."""
    h, w = smart_resize(image.shape[-2], image.shape[-1], pre.factor, pre.min_pixels, pre.max_pixels)
    return F.resize(image, [h, w], interpolation=InterpolationMode.BICUBIC, antialias=True)


def patchify(image: torch.Tensor, pre: VlmPreprocess) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 [3, h, w] (sides multiples of `factor`) -> patches [h/p * w/p, 3, p, p] in the vision encoder's order, grid.

    The order is the processors': merge-size blocks row by row, and inside a block its patches row
    by row, so that each run of merge**2 consecutive patches is one merged token.
    """
    c, h, w = image.shape
    p, m = pre.patch_size, pre.merge_size
    gh, gw = h // p, w // p
    patches = image.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    return patches.reshape(gh * gw, c, p, p).contiguous(), (1, gh, gw)


def image_tokens(grid: tuple[int, int, int], merge_size: int) -> int:
    """How many placeholder tokens (merged patches) an image of this grid takes in the sequence."""
    t, h, w = grid
    return t * h * w // (merge_size * merge_size)


# --------------------------------------------------------------------------- sequences


@dataclass
class Sequence:
    """One side encoded: token ids [L], rotary positions [3, L], uint8 patches [n, 3, p, p], image grids."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    patches: torch.Tensor
    grids: list[tuple[int, int, int]]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def mrope_positions(input_ids: torch.Tensor, grids: list[tuple[int, int, int]], image_token_id: int,
                    merge_size: int) -> torch.Tensor:
    """Multimodal rotary positions [3, L] of one unpadded sequence (the Qwen-VL rule for images).

    Text tokens advance temporal, height and width together by one. An image's tokens sit at
    (start + t, start + row, start + column) on its merged grid, and the next token continues at
    start + max(t, rows, columns).
    """
    ids = input_ids.tolist()
    out = torch.empty(3, len(ids), dtype=torch.long)
    cur, i, image = 0, 0, 0
    while i < len(ids):
        if ids[i] != image_token_id:
            j = i
            while j < len(ids) and ids[j] != image_token_id:
                j += 1
            out[:, i:j] = torch.arange(cur, cur + j - i)
            cur += j - i
            i = j
            continue
        if image >= len(grids):
            raise ValueError(f"sequence has more image placeholders than the {len(grids)} images given")
        t, h, w = grids[image]
        gh, gw = h // merge_size, w // merge_size
        n = t * gh * gw
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        out[:, i:i + n] = torch.stack([tt, hh, ww]).reshape(3, -1) + cur
        cur += max(t, gh, gw)
        i += n
        image += 1
    return out


class VlmRenderer:
    """Renders a side (prompt, images, text) as the model was trained and tokenises it; picklable for workers.

    `chat`: through the processor's chat template, the prompt as a system message and the content
    (images first, then the text) as one user message, ending with the assistant header when
    `add_generation_prompt`. `plain`: the same through `plain_template`, which writes the prompt,
    then each image's placeholder, then the text, with no roles. Each image placeholder is then
    repeated once per merged patch, as the processors do, and the whole text tokenised.
    """

    def __init__(self, tokenizer: Any, chat_template: str, pre: VlmPreprocess, image_token: str,
                 vision_start: str, vision_end: str) -> None:
        self.tokenizer = tokenizer
        self.pre = pre
        self.image_token = image_token
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(image_token))
        self.template = chat_template if pre.prompt_format == "chat" else plain_template(vision_start, image_token,
                                                                                            vision_end)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad if pad is not None else 0)

    @classmethod
    def from_processor(cls, processor: Any, pre: VlmPreprocess) -> VlmRenderer:
        """The renderer of a Qwen-VL processor (its tokenizer, chat template, vision tokens) with a model's preprocessing."""
        return cls(processor.tokenizer, processor.chat_template, pre, *vision_tokens(processor))

    def prompt(self, side: str) -> str:
        """The instruction in front of a query or a document."""
        return self.pre.query_prompt if side == QUERY else self.pre.document_prompt

    def conversation(self, prompt: str, n_images: int, text: str | None) -> list[dict[str, Any]]:
        """The messages a side is rendered from: [system: prompt] + [user: images, text]."""
        messages: list[dict[str, Any]] = []
        if prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": prompt}]})
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
        if text is not None:
            content.append({"type": "text", "text": text})
        messages.append({"role": "user", "content": content})
        return messages

    def pair_conversation(self, query: tuple[int, str | None], document: tuple[int, str | None]) -> list[dict[str, Any]]:
        """A reranker's messages: [system: the instruction (query_prompt)] + query + document, each (images, text)."""
        messages: list[dict[str, Any]] = []
        if self.pre.query_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.pre.query_prompt}]})
        for role, (n_images, text) in ((QUERY, query), (DOCUMENT, document)):
            content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
            if text is not None:
                content.append({"type": "text", "text": text})
            messages.append({"role": role, "content": content})
        return messages

    def encode_pair(self, query_images: list[torch.Tensor], query_text: str | None, doc_images: list[torch.Tensor],
                    doc_text: str | None) -> Sequence:
        """A (query, candidate) pair rendered together, for the cross-encoder (see `pair_conversation`)."""
        if (not query_images and query_text is None) or (not doc_images and doc_text is None):
            raise decoding.BadSample("empty_side", "a reranker pair needs content on both sides")
        patched = [patchify(resize_image(im, self.pre), self.pre) for im in [*query_images, *doc_images]]
        trunc = [None if t is None else self.truncate(t) for t in (query_text, doc_text)]
        messages = self.pair_conversation((len(query_images), trunc[0]), (len(doc_images), trunc[1]))
        return self.sequence(self.render(messages), [p for p, _ in patched], [g for _, g in patched])

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The template's text of a conversation (one placeholder per image)."""
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=self.pre.add_generation_prompt)

    def truncate(self, text: str) -> str:
        """`text` cut to `max_text_tokens` tokens (unchanged when shorter)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.pre.max_text_tokens:
            return text
        return self.tokenizer.decode(ids[: self.pre.max_text_tokens])

    def tokenize(self, rendered: str, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """Token ids [L] of a rendered text, each image placeholder expanded to its merged patches."""
        parts = rendered.split(self.image_token)
        if len(parts) - 1 != len(grids):
            raise ValueError(f"rendered text has {len(parts) - 1} image placeholders for {len(grids)} images")
        text = parts[0]
        for grid, rest in zip(grids, parts[1:]):
            text += self.image_token * image_tokens(grid, self.pre.merge_size) + rest
        return torch.tensor(self.tokenizer(text)["input_ids"], dtype=torch.long)

    def encode(self, side: str, images: list[torch.Tensor], text: str | None) -> Sequence:
        """A side of a sample (uint8 RGB images [3, H, W] of any size, a text or None) as a `Sequence`."""
        if not images and text is None:
            raise decoding.BadSample("empty_side", f"the {side} has neither text nor image")
        patched = [patchify(resize_image(im, self.pre), self.pre) for im in images]
        grids = [g for _, g in patched]
        messages = self.conversation(self.prompt(side), len(images), None if text is None else self.truncate(text))
        return self.sequence(self.render(messages), [p for p, _ in patched], grids)

    def sequence(self, rendered: str, patches: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> Sequence:
        """A `Sequence` from a rendered text and its images' patches and grids."""
        ids = self.tokenize(rendered, grids)
        positions = mrope_positions(ids, grids, self.image_token_id, self.pre.merge_size)
        p = self.pre.patch_size
        stacked = torch.cat(patches) if patches else torch.empty(0, 3, p, p, dtype=torch.uint8)
        return Sequence(ids, positions, stacked, grids)

    def placeholder(self) -> Sequence:
        """A 1-token sequence (the pad token): the stand-in for a group's missing negative."""
        p = self.pre.patch_size
        return Sequence(torch.tensor([self.pad_token_id]), torch.zeros(3, 1, dtype=torch.long),
                        torch.empty(0, 3, p, p, dtype=torch.uint8), [])


def vision_tokens(processor: Any) -> tuple[str, str, str]:
    """(image placeholder, vision start, vision end) token strings of a Qwen-VL processor."""
    tok = processor.tokenizer
    start = getattr(processor, "vision_start_token", None) or getattr(tok, "vision_start_token", "<|vision_start|>")
    end = getattr(processor, "vision_end_token", None) or getattr(tok, "vision_end_token", "<|vision_end|>")
    return processor.image_token, start, end


def plain_template(vision_start: str, image_token: str, vision_end: str) -> str:
    """A chat template that renders without roles: the system text, each image's placeholder, the user text."""
    return (
        "{% for message in messages %}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for item in message['content'] %}"
        f"{{% if item['type'] == 'image' %}}{vision_start}{image_token}{vision_end}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{% endfor %}"
    )


# --------------------------------------------------------------------------- batches


def collate_sequences(sequences: list[Sequence]) -> dict[str, torch.Tensor]:
    """Flatten sequences into the batch tensors (input_ids, positions, seq_lens, patches, grids, image_seqs)."""
    grids = [g for s in sequences for g in s.grids]
    image_seqs = [i for i, s in enumerate(sequences) for _ in s.grids]
    patch = sequences[0].patches.shape[-1] if sequences else 1
    return {
        "input_ids": torch.cat([s.input_ids for s in sequences]) if sequences else torch.empty(0, dtype=torch.long),
        "positions": torch.cat([s.positions for s in sequences], 1) if sequences else torch.empty(3, 0, dtype=torch.long),
        "seq_lens": torch.tensor([len(s) for s in sequences], dtype=torch.long),
        "patches": torch.cat([s.patches for s in sequences]) if sequences
        else torch.empty(0, 3, patch, patch, dtype=torch.uint8),
        "grids": torch.tensor(grids, dtype=torch.long).reshape(-1, 3),
        "image_seqs": torch.tensor(image_seqs, dtype=torch.long),
    }


def split_sequences(batch: dict[str, torch.Tensor]) -> list[Sequence]:
    """The batch tensors back into their sequences (the inverse of `collate_sequences`)."""
    lens = batch["seq_lens"].tolist()
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    grids = [tuple(g) for g in batch["grids"].tolist()]
    image_seqs = batch["image_seqs"].tolist()
    counts = [t * h * w for t, h, w in grids]
    out, image, patch_at = [], 0, 0
    for i, n in enumerate(lens):
        own = []
        while image < len(grids) and image_seqs[image] == i:
            own.append(grids[image])
            image += 1
        n_patches = sum(counts[image - len(own):image])
        out.append(Sequence(batch["input_ids"][starts[i]:starts[i] + n], batch["positions"][:, starts[i]:starts[i] + n],
                            batch["patches"][patch_at:patch_at + n_patches], own))
        patch_at += n_patches
    return out


class VlmCodec:
    """What the streaming loader needs to read VLM samples: decode one, collate many, split a batch, stack records.

    `negatives` is K (`data.hard_negatives`; for a reranker `rerank.group_size - 1`): a batch then
    holds K negative documents per sample, read from mined groups in the layout every mmscale reader
    shares (`data.decode`: KEY.pos.*, KEY.neg{i}.*, scores in KEY.json); a plain pair, or a group short
    of negatives, fills its slots with placeholders that `negative_mask` marks absent, as the
    two-tower loader does. `pairs`: a cross-encoder's batch, one (query, candidate) sequence per
    document and negative.
    """

    def __init__(self, renderer: VlmRenderer, image_keys: tuple[str, ...], text_key: str = "txt",
                 max_pixels: int = 50_000_000, negatives: int = 0, pairs: bool = False) -> None:
        self.renderer = renderer
        self.image_keys = image_keys
        self.text_key = text_key
        self.max_pixels = max_pixels
        self.negatives = negatives
        self.pairs = pairs

    @property
    def group_size(self) -> int:
        """Sequences per sample: query, document, negatives (pairs: one per document and negative)."""
        return (1 if self.pairs else 2) + self.negatives

    def _image_data(self, sample: dict, prefix: str) -> bytes | None:
        for ext in self.image_keys:
            data = sample.get(f"{prefix}.{ext}" if prefix else ext)
            if data is not None:
                return data
        return None

    def _text(self, sample: dict, prefix: str) -> str | None:
        raw = sample.get(f"{prefix}.txt")
        if raw is None:
            return None
        text = raw.decode("utf-8", errors="replace").strip()
        return text or None

    def _content(self, sample: dict, prefix: str, side: str) -> tuple[list[torch.Tensor], str | None]:
        data, text = self._image_data(sample, prefix), self._text(sample, prefix)
        if data is None and text is None:
            raise decoding.BadSample(f"missing_{side}", f"{sample.get('__key__')} has no {prefix}.txt nor {prefix} image")
        return ([decoding.decode_rgb(data, self.max_pixels)] if data is not None else []), text

    def _id(self, sample: dict, prefix: str) -> int:
        """The document's id (`decoding.image_id` of its image bytes, else of its text): equal content, equal id."""
        data = self._image_data(sample, prefix)
        return decoding.image_id(data if data is not None else sample.get(f"{prefix}.txt", b""))

    def _sides(self, sample: dict) -> tuple[tuple[list[torch.Tensor], str | None], tuple[list[torch.Tensor], str | None]]:
        """(query, document) contents of a sample in any declared layout (a group: its query and positive)."""
        if any(k.startswith(("query.", "doc.")) for k in sample):
            return self._content(sample, "query", QUERY), self._content(sample, "doc", DOCUMENT)
        query = decoding.caption(sample, self.text_key)
        if any(k.startswith("pos.") for k in sample):
            return ([], query), self._content(sample, "pos", DOCUMENT)
        image = decoding.decode_rgb(decoding.image_bytes(sample, self.image_keys), self.max_pixels)
        return ([], query), ([image], None)

    def _document_prefix(self, sample: dict) -> str:
        if any(k.startswith("doc.") for k in sample):
            return "doc"
        return "pos" if any(k.startswith("pos.") for k in sample) else ""

    def decode(self, sample: dict, issues: Any = None) -> dict[str, Any]:
        """Raw sample -> its item: `sequences`, `text` (the query, for logging), and with K > 0 the group fields.

        Raises BadSample; a negative that cannot be used is masked and counted in `issues` as
        `negative_<reason>`, as in the two-tower loader.
        """
        (q_images, q_text), (d_images, d_text) = self._sides(sample)
        if self.pairs:
            def encode(images: list[torch.Tensor], text: str | None) -> Sequence:
                return self.renderer.encode_pair(q_images, q_text, images, text)

            sequences = [encode(d_images, d_text)]
        else:
            def encode(images: list[torch.Tensor], text: str | None) -> Sequence:
                return self.renderer.encode(DOCUMENT, images, text)

            sequences = [self.renderer.encode(QUERY, q_images, q_text), encode(d_images, d_text)]
        item: dict[str, Any] = {"sequences": sequences, "text": q_text or ""}
        if not self.negatives:
            return item
        k = self.negatives
        mask, ids = [False] * k, [self._id(sample, self._document_prefix(sample))] + [0] * k
        for i in range(k):
            prefix = f"neg{i}"
            sequence = None
            if any(key.startswith(prefix + ".") for key in sample):
                try:
                    sequence = encode(*self._content(sample, prefix, DOCUMENT))
                except decoding.BadSample as exc:
                    if issues is not None:
                        issues.samples[f"negative_{exc.reason}"] += 1
            sequences.append(sequence if sequence is not None else self.renderer.placeholder())
            if sequence is not None:
                mask[i], ids[1 + i] = True, self._id(sample, prefix)
        scores = decoding.group_scores(sample, k)
        item.update(negative_mask=mask, image_ids=ids,
                    scores=[v if i == 0 or mask[i - 1] else math.nan for i, v in enumerate(scores)])
        return item

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Decoded samples -> the batch tensors (see the module docstring)."""
        batch = collate_sequences([s for it in items for s in it["sequences"]])
        if self.negatives:
            k = self.negatives
            batch["negative_mask"] = torch.tensor([it["negative_mask"] for it in items], dtype=torch.bool).reshape(-1, k)
            batch["scores"] = torch.tensor([it["scores"] for it in items], dtype=torch.float32).reshape(-1, 1 + k)
            batch["image_ids"] = torch.tensor([it["image_ids"] for it in items], dtype=torch.int64).reshape(-1, 1 + k)
        return batch

    def split(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """A batch back into per-sample items (what `collate` takes)."""
        sequences = split_sequences(batch)
        g = self.group_size
        items = []
        for b in range(len(sequences) // g):
            item: dict[str, Any] = {"sequences": sequences[b * g:(b + 1) * g]}
            if self.negatives:
                for name in ("negative_mask", "scores", "image_ids"):
                    item[name] = batch[name][b].tolist()
            items.append(item)
        return items

    def empty(self) -> dict[str, torch.Tensor]:
        """A batch of no samples."""
        return self.collate([])


# --------------------------------------------------------------------------- chunks (host)


def plan_token_chunks(lengths: list[int], chunk_tokens: int, chunk_size: int) -> list[list[int]]:
    """Sequence indices per chunk: longest first; rows x longest <= chunk_tokens (or chunk_size rows when 0)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    chunks: list[list[int]] = []
    for i in order:
        if chunks:
            current = chunks[-1]
            longest = lengths[current[0]]  # sorted: the chunk's first sequence is its longest
            fits = (len(current) + 1) * longest <= chunk_tokens if chunk_tokens else len(current) < chunk_size
            if fits:
                current.append(i)
                continue
        chunks.append([i])
    return chunks


@dataclass
class ChunkPlan:
    """This rank's chunks (sequence indices) and what every rank agreed: how many forwards, which run vision."""

    chunks: list[list[int]]
    n_chunks: int
    vision: list[bool]

    def rows(self, i: int) -> list[int]:
        """Chunk i's real sequences on this rank (none for a dummy forward)."""
        return self.chunks[i] if i < len(self.chunks) else []


def agree_on_chunks(chunks: list[list[int]], has_image: list[bool], max_chunks: int) -> ChunkPlan:
    """Every rank's chunk count and vision flags, maxed over ranks in one collective (a no-op on one process)."""
    if len(chunks) > max_chunks:
        raise ValueError(f"{len(chunks)} chunks exceed the {max_chunks} the agreement has room for")
    local = [len(chunks)] + [int(any(has_image[s] for s in c)) for c in chunks] + [0] * (max_chunks - len(chunks))
    if distributed.is_initialized() and distributed.get_world_size() > 1:
        flags = torch.tensor(local, dtype=torch.long, device=distributed.comm_device())
        local = distributed.all_reduce_tensor(flags, "max").tolist()
    n = int(local[0])
    return ChunkPlan(chunks, n, [bool(v) for v in local[1:1 + n]])


class VlmChunks:
    """A batch's sequences padded into chunk tensors on the host, moved to the device one chunk at a time.

    Rows are right-padded to the chunk's longest sequence; dummy rows (see the module docstring) come
    after the real ones. `real(i)` is how many rows of chunk i are real.
    """

    def __init__(self, batch: dict[str, Any], plan: ChunkPlan, device: torch.device, pad_token_id: int,
                 image_token_id: int, merge_size: int) -> None:
        self.plan, self.device = plan, device
        self.pad, self.image_token, self.merge = pad_token_id, image_token_id, merge_size
        self.ids, self.positions, self.patches = batch["input_ids"], batch["positions"], batch["patches"]
        lens = batch["seq_lens"].tolist()
        self.lens = lens
        self.starts = [0]
        for n in lens:
            self.starts.append(self.starts[-1] + n)
        grids = [tuple(g) for g in batch["grids"].tolist()]
        self.grids = grids
        self.seq_images: list[list[int]] = [[] for _ in lens]
        for image, seq in enumerate(batch["image_seqs"].tolist()):
            self.seq_images[seq].append(image)
        self.patch_starts = [0]
        for t, h, w in grids:
            self.patch_starts.append(self.patch_starts[-1] + t * h * w)

    def __len__(self) -> int:
        return self.plan.n_chunks

    def has_image(self, seq: int) -> bool:
        """Whether a sequence carries an image."""
        return bool(self.seq_images[seq])

    def real(self, i: int) -> int:
        """Rows of chunk i that are this rank's sequences."""
        return len(self.plan.rows(i))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Chunk i's model inputs on the device: input_ids, attention_mask, position_ids [3, rows, L], patches, grid."""
        rows = self.plan.rows(i)
        needs_image = self.plan.vision[i] and not any(self.has_image(s) for s in rows)
        dummy = needs_image or not rows
        n = len(rows) + int(dummy)
        width = max([self.lens[s] for s in rows] + [1])
        ids = torch.full((n, width), self.pad, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.long)
        positions = torch.zeros(3, n, width, dtype=torch.long)
        patches, grids = [], []
        for r, s in enumerate(rows):
            a, b = self.starts[s], self.starts[s + 1]
            ids[r, : b - a] = self.ids[a:b]
            mask[r, : b - a] = 1
            positions[:, r, : b - a] = self.positions[:, a:b]
            for image in self.seq_images[s]:
                patches.append(self.patches[self.patch_starts[image]:self.patch_starts[image + 1]])
                grids.append(self.grids[image])
        if dummy:
            mask[-1, 0] = 1
            if needs_image:
                # One merged patch of black pixels behind a single image token.
                ids[-1, 0] = self.image_token
                p = self.patches.shape[-1]
                patches.append(torch.zeros(self.merge * self.merge, 3, p, p, dtype=torch.uint8))
                grids.append((1, self.merge, self.merge))
        out = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        if patches:
            out["patches"] = torch.cat(patches)
            out["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        return {k: v.to(self.device, non_blocking=True) for k, v in out.items()}


def plan_batch(batch: dict[str, Any], chunk_tokens: int, chunk_size: int, agree: bool = True,
               max_chunks: int | None = None) -> ChunkPlan:
    """Plan this rank's chunks of a batch and (with `agree`) agree with every rank on the forwards (one collective).

    `max_chunks` sizes the agreement (the same on every rank; default: one chunk per sequence, since
    every rank holds the same number of sequences in training). Without `agree` the plan is local.
    """
    lens = batch["seq_lens"].tolist()
    has_image = [False] * len(lens)
    for seq in batch["image_seqs"].tolist():
        has_image[seq] = True
    chunks = plan_token_chunks(lens, chunk_tokens, chunk_size)
    if not agree:
        return ChunkPlan(chunks, len(chunks), [any(has_image[s] for s in c) for c in chunks])
    return agree_on_chunks(chunks, has_image, max_chunks=max_chunks or max(len(lens), 1))
