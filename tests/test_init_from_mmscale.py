"""`model.init_from` an mmscale model: a next round (hard negatives) starts from an earlier one's weights and shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmscale.config import ConfigError, load_config
from mmscale.export import save_export
from mmscale.models import build_dual_encoder, load_tokenizer
from mmscale.models.load import ModelSpec, self_contained
from mmscale.models.pretrained import locate_source

TINY = Path(__file__).resolve().parents[1] / "launch" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def first_round(tmp_path_factory):
    """An export of a 'trained' tiny dual encoder (weights apart from any seed's initialisation)."""
    cfg = load_config(TINY, ["model.init_logit_scale=3.0"])
    torch.manual_seed(7)
    model = build_dual_encoder(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    spec = ModelSpec("dual_encoder", self_contained(cfg.model, model), cfg.rerank)
    return model, save_export(model, spec, load_tokenizer(cfg.model.text), tmp_path_factory.mktemp("r1") / "export")


def test_a_run_starts_from_an_mmscale_export_with_its_weights(first_round):
    model, export = first_round
    assert locate_source(str(export)).format == "mmscale"
    cfg = load_config(TINY, [f"model.init_from={export}", "model.text.locked=true", "model.text.max_length=12"])
    torch.manual_seed(0)
    second = build_dual_encoder(cfg.model)
    want = model.state_dict()
    got = second.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)  # every tensor, the trained logit scale included
    # How the new round trains is its own: a locked text tower, shorter captions.
    assert second.lock_text and not any(p.requires_grad for p in second.text.parameters())
    assert cfg.model.text.max_length == 12


def test_shapes_that_contradict_the_earlier_round_are_refused(first_round):
    _, export = first_round
    cfg = load_config(TINY, [f"model.init_from={export}", "model.embed_dim=64"])
    with pytest.raises(ConfigError, match=r"model.embed_dim: 64 contradicts the pretrained model .* \(32\)"):
        build_dual_encoder(cfg.model)
