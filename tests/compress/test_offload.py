"""``weights_on_disk``: idle decoder weights leave memory inside the block and come back bit-exactly."""
from __future__ import annotations

import pytest
import torch

from medlite.compress.offload import idle_decoder_modules, weights_on_disk


@pytest.fixture()
def model(tiny_path, cctx):
    from medlite.checkpoints import load_model

    return load_model(tiny_path, ctx=cctx).model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_parked_and_restored_bit_exactly(model, tmp_path):
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    ref = _logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    emb = model.get_input_embeddings()
    with weights_on_disk(idle_decoder_modules(model), keep=[emb], folder=tmp_path):
        layer_bytes = sum(p.numel() for p in model.model.language_model.layers.parameters())
        assert layer_bytes == 0 and model.lm_head.weight.numel() == 0
        assert emb.weight.numel() > 0                                        # feeds still need these
        assert all(p.numel() > 0 for p in model.model.vision_tower.parameters())
        assert list(tmp_path.iterdir())                                      # the parked file
    assert not list(tmp_path.iterdir())                                      # removed afterwards
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[k] for k, p in model.named_parameters())         # same Parameter objects
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_logits(model, ids), ref)


def test_restored_when_the_block_raises(model, tmp_path):
    w = model.model.language_model.layers[0].mlp.down_proj.weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with weights_on_disk(idle_decoder_modules(model), folder=tmp_path):
            raise RuntimeError("boom")
    assert torch.equal(model.model.language_model.layers[0].mlp.down_proj.weight, w)


def test_tied_lm_head_stays(model, tmp_path):
    model.lm_head.weight = model.get_input_embeddings().weight
    mods = idle_decoder_modules(model)
    assert model.lm_head not in mods
    with weights_on_disk(mods, keep=[model.get_input_embeddings()], folder=tmp_path):
        assert model.lm_head.weight.numel() > 0
