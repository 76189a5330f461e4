"""The demo model: tokenizer, training, legacy save → load → answer, cache, held-out accuracy (slow)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import numpy as np
import pytest
import torch

from medlite.demo import model as dm
from medlite.demo.tokenizer import BOS, EOS, PAD, UNK, train_demo_tokenizer
from medlite.demo.train import DemoRecipe, encode_sample, image_spec_for, tokenizer_corpus, train_demo
from medlite.demo.micro_vqa import micro_med_vqa
from medlite.context import RunContext

# A recipe small enough to train in seconds: checks plumbing, not accuracy.
TINY = DemoRecipe(image_size=56, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2,
                  vision_intermediate=64, text_hidden=48, text_layers=1, text_heads=2, text_kv_heads=1,
                  text_intermediate=96, steps=4, batch_size=8, warmup=2, vision_steps=2, vision_batch=8)


@pytest.fixture()
def ctx(tmp_path):
    return RunContext(cache_dir=tmp_path / "cache", quiet=True)


def test_tokenizer_is_llama_like_and_deterministic():
    a = train_demo_tokenizer(tokenizer_corpus())
    b = train_demo_tokenizer(tokenizer_corpus())
    assert a.to_str() == b.to_str()
    assert [a.id_to_token(i) for i in (UNK, BOS, EOS, PAD)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert a.id_to_token(4) == "<0x00>" and a.id_to_token(259) == "<0xFF>"
    yes = a.encode("Yes", add_special_tokens=False)
    assert yes.tokens == ["▁Yes"] and a.decode(yes.ids + [EOS]) == "Yes"
    # characters outside the corpus fall back to bytes (no <unk>) and decode back exactly
    text = "Is there a tumour near the hilum? ü 日本"
    enc = a.encode(text, add_special_tokens=False)
    assert UNK not in enc.ids and a.decode(enc.ids) == text
    assert a.encode("hi").ids[0] == BOS


def test_encode_sample_masks_everything_but_the_answer():
    tok = train_demo_tokenizer(tokenizer_corpus())
    image_id = tok.get_vocab_size()
    ids, labels = encode_sample(tok, "Is this a CT scan?", "No", image_id, 49)
    assert ids[0] == BOS and ids.count(image_id) == 49
    answer = [i for i, l in zip(ids, labels) if l != -100]
    assert tok.decode(answer[:-1]) == "No" and answer[-1] == EOS
    assert labels[: len(ids) - len(answer)] == [-100] * (len(ids) - len(answer))


@pytest.fixture(scope="module")
def tiny_trained():
    ctx = RunContext(quiet=True)
    samples = micro_med_vqa("train", size=TINY.image_size)[::20]
    model, tok, hist = train_demo(samples, TINY, ctx=ctx)
    return model, tok, hist, samples


def test_training_is_deterministic(tiny_trained):
    model, tok, hist, samples = tiny_trained
    again, _, hist2 = train_demo(samples, TINY, ctx=RunContext(quiet=True))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert hist["loss"] == hist2["loss"]
    assert model.config.image_token_id == tok.token_to_id("<image>") == model.config.text_config.vocab_size - 1
    assert torch.count_nonzero(model.lm_head.weight[model.config.image_token_id]) == 0


def test_legacy_save_load_answer_round_trip(tiny_trained, tmp_path):
    """Written in the legacy TinyLLaVA format, loaded by medlite's loader, the model gives the
    same first-token logits as the in-memory model and answers through generate.answer."""
    from medlite.checkpoints import load_model, write_checkpoint
    from medlite.checkpoints.generate import answer, first_token_logits, prompt_ids

    model, tok, _, samples = tiny_trained
    out = tmp_path / "demo"
    spec = image_spec_for(TINY)
    write_checkpoint(model, tok, out, fmt="legacy", image_spec=spec, template_name="vicuna_v1",
                     text_backbone="llama", dtype=torch.float32, vision_tower_repo=dm.TOWER_REPO)
    dm.write_tower_config(model, out, spec)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mm_vision_tower"] == dm.TOWER_REPO and cfg["mm_projector_type"] == "mlp2x_gelu"
    assert cfg["vocab_size"] == model.config.text_config.vocab_size - 1  # <image> row dropped
    tower_cfg = json.loads((out / "vision_tower" / "config.json").read_text())
    assert tower_cfg["num_hidden_layers"] == TINY.vision_layers + 1  # TinyLLaVA deletes the last one

    ctx = RunContext(quiet=True)
    loaded = load_model(out, ctx=ctx)
    assert loaded.source.format == "legacy"
    assert loaded.num_image_tokens == TINY.num_image_tokens and loaded.image_spec.size == TINY.image_size
    s = samples[0]
    img = s.load_image()
    got = first_token_logits(loaded, img, s.question)
    # independent reference: the in-memory training model on the same prompt and pixels
    from medlite.preprocess import preprocess

    ids = torch.tensor([prompt_ids(loaded, s.question)])
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=torch.from_numpy(preprocess([img], spec))).logits[0, -1]
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5)
    text = answer(loaded, img, s.question, max_new_tokens=4)
    assert isinstance(text, str)


def test_ensure_demo_model_builds_once_and_atomically(ctx, monkeypatch):
    path = dm.ensure_demo_model(ctx, recipe=TINY)
    assert path.parent == ctx.cache_dir / "demo-model" and path.name == dm.demo_model_key(TINY)
    card = json.loads((path / dm.MARKER).read_text())
    assert card["recipe"] == TINY.to_dict() and card["heldout"]["metrics"]["n"] > 0
    assert not list(path.parent.glob(".tmp-*"))
    # the build records which weights it made and on which CPU kernels (builds of one key differ by ISA)
    assert card["built_on"]["weights_sha256"] == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert card["built_on"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()

    def boom(*a, **k):
        raise AssertionError("must not retrain a cached model")

    monkeypatch.setattr(dm, "build_demo_model", boom)
    assert dm.ensure_demo_model(ctx, recipe=TINY) == path


def test_killed_build_leaves_no_model(ctx, monkeypatch):
    key = dm.demo_model_key(TINY)
    stale = ctx.cache_dir / "demo-model" / f".tmp-{key}-99999999"
    stale.mkdir(parents=True)

    def dies(out, **k):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(dm, "build_demo_model", dies)
    with pytest.raises(KeyboardInterrupt):
        dm.ensure_demo_model(ctx, recipe=TINY)
    root = ctx.cache_dir / "demo-model"
    assert not (root / key).exists()
    assert not list(root.glob(".tmp-*"))  # its own tmp and the stale one are gone


def test_key_changes_with_the_recipe():
    assert dm.demo_model_key(TINY) != dm.demo_model_key(dataclasses.replace(TINY, steps=5))
    assert dm.demo_model_key(TINY) == dm.demo_model_key(TINY)


@pytest.mark.slow
def test_demo_model_answers_heldout_questions():
    """The real recipe (the model every command uses, trained once per machine in the shared cache,
    as `medlite build` does): >= 0.85 held-out closed accuracy, measured through the legacy loader
    and the same evaluation `medlite eval` runs. The training time is a benchmark
    (benchmarks/demo_model_training.py), not asserted here."""
    from medlite.evaluation.evaluate import evaluate
    from medlite.evaluation.scoring import score
    from medlite.checkpoints import load_model

    ctx = RunContext(quiet=True)
    path = dm.ensure_demo_model(ctx)
    loaded = load_model(path, ctx=ctx)
    assert loaded.source.format == "legacy" and loaded.name == dm.NAME
    test = micro_med_vqa("test")
    result = evaluate(loaded, test, ctx=ctx)
    preds = [p["prediction"] for p in result["predictions"]]
    assert score(preds, test)["closed_accuracy"] == result["metrics"]["closed_accuracy"]
    assert result["metrics"]["closed_accuracy"] >= dm.MIN_ACCURACY, result["metrics"]
    # every question type is above chance, not only the easy ones carrying the mean
    per_type = result["metrics"]["by_question_type"]
    assert all(v["closed_accuracy"] >= 0.6 for v in per_type.values()), per_type
    card = json.loads((path / dm.MARKER).read_text())
    assert card["heldout"]["metrics"]["closed_accuracy"] == result["metrics"]["closed_accuracy"]
