"""The sentence-transformers module of an exported mmscale reranker: `CrossEncoder(OUT, trust_remote_code=True)`.

sentence-transformers has no built-in module for a cross-encoder over text tokens and image
patches, so the export folder names this class (an installed `mmscale` is what the remote code
needs). The folder itself is an mmscale export: the module loads it with `mmscale.load` and
scores exactly as `RerankerModel.score` / `rerank` do: the logits, with no sigmoid (the
folder's config sets the CrossEncoder's activation to Identity).

Imported only by sentence-transformers (it imports sentence_transformers at the top).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from sentence_transformers.base.modules import InputModule


class MmscaleReranker(InputModule):
    """CrossEncoder input module: (text, image) pairs -> `scores` [B, 1], mmscale's reranker logits."""

    save_in_root = True
    config_keys: list[str] = []

    def __init__(self, model_path: str) -> None:
        super().__init__()
        from mmscale.inference import load

        loaded = load(model_path)
        if loaded.kind != "reranker":
            raise ValueError(f"{model_path}: not an mmscale reranker export (kind {loaded.kind})")
        self.path = model_path
        self.loaded = loaded
        self.model = loaded.model  # registered, so CrossEncoder(...).to(device) moves it
        self.tokenizer = loaded.tokenizer

    @property
    def modalities(self) -> list:
        """Text queries paired with images."""
        return ["text", "image", ("image", "text")]

    def preprocess(self, inputs: Sequence[Any], prompt: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """Pairs (text, image) or (image, text) -> uint8 pixels and token ids as mmscale's pipeline makes them."""
        from mmscale.data.tokenize import tokenize
        from mmscale.inference import image_batch

        texts, images = [], []
        for pair in inputs:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"an mmscale reranker scores (text, image) pairs, got {type(pair).__name__}")
            text, image = pair if isinstance(pair[0], str) else (pair[1], pair[0])
            if not isinstance(text, str):
                raise ValueError("each pair needs one text and one image")
            texts.append((prompt or "") + text)
            images.append(image)
        ids, mask = tokenize(self.tokenizer, texts, self.loaded.max_length)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": image_batch(images, self.loaded.preprocess)}

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """The reranker's scores of the pairs, as `scores` [B, 1]."""
        scores = self.model.score(features["pixel_values"], features["input_ids"], features["attention_mask"])
        features["scores"] = scores.float().unsqueeze(-1)
        return features

    def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
        """Re-save: the mmscale export files this module was loaded from."""
        import shutil

        if os.path.abspath(output_path) == os.path.abspath(self.path):
            return
        for name in os.listdir(self.path):
            src, dst = os.path.join(self.path, name), os.path.join(output_path, name)
            if name in ("modules.json", "config_sentence_transformers.json", "README.md") or os.path.exists(dst):
                continue
            (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, dst)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             **kwargs: Any) -> MmscaleReranker:
        """The module from a local export folder or a Hub repository holding one."""
        from sentence_transformers.util import load_dir_path

        path = load_dir_path(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                             revision=revision, local_files_only=local_files_only)
        return cls(path)
