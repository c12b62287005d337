"""The vision-language cross-encoder: scores equal to transformers' own processor and model, and to
sentence-transformers' `CrossEncoder` loading the export offline; the cached pair step's loss is the
two-tower reranker's.

Tiny random Qwen2-VL and Qwen3-VL models (tools/tiny_vlm.py). The transformers reference renders
each pair through the processor's chat template and `processor(...)` and reads the generation model's
last-position logits of "yes" and "no" itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmscale.config import load_config
from tools import tiny_vlm

FAMILIES = tiny_vlm.FAMILIES
INSTRUCTION = "Judge whether the document answers the query."


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_vlm_rerank")
    for family in FAMILIES:
        tiny_vlm.make_tiny_vlm(out, family)
    return out


def build(path: Path, *overrides: str):
    from mmscale.models.vlm import load_vlm_processor
    from mmscale.models.vlm_reranker import build_vlm_reranker

    cfg = load_config(None, ["model.kind=vlm", f"model.vlm.name_or_path={path}", *overrides])
    processor = load_vlm_processor(cfg.model.vlm)
    torch.manual_seed(0)
    return cfg, build_vlm_reranker(cfg.model, processor=processor).eval(), processor


def pil(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


PAIRS = [
    ("a red square", pil(40, 56, 1)),
    ("two blue dogs", {"image": pil(90, 30, 2), "text": "a page about dogs"}),
    ("yellow", "a text document about yellow things"),
    (pil(32, 32, 3), "a caption for an image query"),
]


def content(side) -> list[dict]:
    if isinstance(side, str):
        return [{"type": "text", "text": side}]
    if isinstance(side, Image.Image):
        return [{"type": "image"}]
    return [{"type": "image"}, {"type": "text", "text": side["text"]}]


def images(side) -> list[Image.Image]:
    if isinstance(side, Image.Image):
        return [side]
    return [side["image"]] if isinstance(side, dict) else []


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_equal_the_transformers_processor_and_generation_model(root, family):
    from mmscale.inference_vlm import VlmRerankerModel

    _, model, processor = build(root / family, f"model.vlm.query_prompt={INSTRUCTION}")
    generation = model.generation_model().eval()
    yes, no = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("yes", "no"))
    ours = VlmRerankerModel(model, processor)
    for query, doc in PAIRS:
        messages = [{"role": "system", "content": [{"type": "text", "text": INSTRUCTION}]},
                    {"role": "query", "content": content(query)}, {"role": "document", "content": content(doc)}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        pics = images(query) + images(doc)
        inputs = processor(text=[text], images=pics or None, return_tensors="pt")
        with torch.no_grad():
            logits = generation(**inputs).logits[0, -1]
        expected = (logits[yes] - logits[no]).item()
        got = ours.score(query, [doc])
        assert got.shape == (1,) and got.item() == pytest.approx(expected, abs=1e-4)


def test_crossencoder_export_scores_equal_mmscale_and_load_serves_it(root, tmp_path):
    from sentence_transformers import CrossEncoder

    import mmscale
    from mmscale.export import export_model
    from mmscale.inference_vlm import VlmRerankerModel
    from mmscale.models.load import ModelSpec
    from mmscale.models.vlm import self_contained_vlm

    cfg, model, processor = build(root / "qwen3_vl", f"model.vlm.query_prompt={INSTRUCTION}")
    direct = VlmRerankerModel(model, processor)
    spec = ModelSpec("vlm_reranker", self_contained_vlm(cfg.model, model))
    out = export_model(model, spec, processor, tmp_path / "out", formats=("mmscale", "sentence-transformers"))
    loaded = mmscale.load(out / "mmscale")
    assert isinstance(loaded, VlmRerankerModel)
    theirs = CrossEncoder(str(out / "sentence-transformers"), local_files_only=True, device="cpu")
    for query, doc in PAIRS:
        ours = loaded.score(query, [doc, "an unrelated text"])
        assert torch.equal(ours, direct.score(query, [doc, "an unrelated text"]))  # the export is the model
        st = torch.as_tensor(theirs.predict([(query, doc), (query, "an unrelated text")]))
        assert (ours - st).abs().max().item() <= 1e-4, (query, doc)
    order = loaded.rerank("a red square", [d for _, d in PAIRS])
    assert sorted(i for i, _ in order) == [0, 1, 2, 3] and [s for _, s in order] == sorted((s for _, s in order),
                                                                                           reverse=True)
    with pytest.raises(TypeError, match="score"):
        loaded.encode(["a text"])


def test_answer_tokens_must_be_single_tokens(root):
    with pytest.raises(ValueError, match="model.vlm.yes_token"):
        build(root / "qwen2_vl", "model.vlm.yes_token=absolutely")
