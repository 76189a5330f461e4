"""The framework's forward loop against an independent reference: transformers' own Llava forward."""
from __future__ import annotations

import pytest
import torch

from medlite.context import RunContext
from medlite.evaluation.vqa import load_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from medlite.checkpoints import load_model
    from medlite.checkpoints.random_ckpt import write_random_checkpoint

    ctx = RunContext(cache_dir=tmp_path_factory.mktemp("cache"), quiet=True)
    path = write_random_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", fmt="legacy", ctx=ctx)
    return load_model(path, ctx=ctx)


@pytest.fixture(scope="module")
def samples():
    return load_dataset("builtin:micro-med-vqa", split="train")[:5]


def _llava_inputs_embeds(model, inp, row: int) -> torch.Tensor:
    """What LlavaForConditionalGeneration hands its language model for one unpadded row."""
    seen = {}
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    keep = inp.attention_mask[row].bool()
    try:
        with torch.no_grad():
            model(input_ids=inp.input_ids[row][keep][None], pixel_values=inp.pixel_values[row:row + 1])
    finally:
        handle.remove()
    return seen["inputs_embeds"][0]


def test_inputs_embeds_equal_llava_forward(tiny, samples):
    from medlite.calibration.forward import ForwardLoop

    loop = ForwardLoop(tiny, samples, batch_size=3)
    batches = list(loop.batches())
    assert [len(b) for b in batches] == [3, 2]
    for inp in batches:
        assert int(inp.image_positions.sum()) == len(inp) * tiny.num_image_tokens
        for row in range(len(inp)):
            keep = inp.attention_mask[row].bool()
            ours = inp.inputs_embeds[row][keep]
            ref = _llava_inputs_embeds(tiny.model, inp, row)
            assert ours.shape == ref.shape
            torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_run_sees_image_tokens_and_is_batch_independent(tiny, samples):
    """Hooks see every sample's image tokens; a row's last logits do not depend on its batch mates."""
    from medlite.calibration.forward import ForwardLoop

    lengths, last = [], {}
    h = tiny.model.model.language_model.layers[0].register_forward_hook(
        lambda _m, _i, out: lengths.append((out[0] if isinstance(out, tuple) else out).shape[1]))
    try:
        for bs in (1, 4):
            def keep(inp, logits, bs=bs):
                for r, s in enumerate(inp.samples):
                    last[(bs, s.qid)] = logits[r, -1]
            assert ForwardLoop(tiny, samples, batch_size=bs).run(on_batch=keep) == len(samples)
    finally:
        h.remove()
    assert min(lengths) > tiny.num_image_tokens
    for s in samples:
        torch.testing.assert_close(last[(1, s.qid)], last[(4, s.qid)], rtol=1e-4, atol=1e-5)
