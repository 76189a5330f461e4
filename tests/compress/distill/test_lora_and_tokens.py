"""Distillation after a tokens stage (the teacher keeps every image token) and through merged LoRA adapters,
on the random tiny checkpoint (4×4 = 16 image tokens)."""
from __future__ import annotations

import pytest
import torch

from compress_state import make_state
from medlite.checkpoints import load_model
from medlite.compress.distill.options import DistillOptions, rules

OPTS = DistillOptions(steps=6, batch_size=4, learning_rate=3e-3, eval_every=3, checkpoint_every=0, patience=0,
                      heldout_samples=6, max_new_tokens=4, warmup=1)


def _pooled_state(tiny_path, cctx, calib, count=4):
    from medlite.compress.tokens.options import TokensOptions
    from medlite.compress.tokens.stage import run as tokens
    from medlite.evaluation.vqa import load_dataset

    student, teacher = load_model(tiny_path, ctx=cctx), load_model(tiny_path, ctx=cctx)
    state = make_state(cctx, student, calib, source=teacher,
                       eval_samples=load_dataset("builtin:micro-med-vqa", split="test")[:4])
    state.results["stages[0].tokens"] = tokens(state, 0, TokensOptions(count=count, heldout_samples=4))
    return state, teacher


def test_teacher_keeps_every_token_and_student_trains_llm_and_projector(tiny_path, cctx, calib):
    from medlite.compress.distill.stage import run

    state, teacher = _pooled_state(tiny_path, cctx, calib)
    assert (state.model.num_image_tokens, teacher.num_image_tokens) == (4, 16)
    proj0 = {n: p.detach().clone() for n, p in state.model.model.model.multi_modal_projector.named_parameters()}
    res = run(state, 1, OPTS)
    assert res.manifest["trained"] == ["language_model", "multi_modal_projector"]      # auto after tokens
    assert not res.manifest["self_distillation"]
    kl = res.manifest["heldout_kl"]
    assert kl[1] < kl[0]                                        # learnt from the full-token teacher
    moved = [n for n, p in state.model.model.model.multi_modal_projector.named_parameters()
             if not torch.equal(p, proj0[n])]
    assert moved
    assert teacher.num_image_tokens == 16 and state.model.num_image_tokens == 4


def test_lora_trains_adapters_only_and_merges_them_back(tiny_path, cctx, calib):
    from medlite.compress.distill.stage import run

    state, _ = _pooled_state(tiny_path, cctx, calib)
    lm = state.model.model.model.language_model
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    res = run(state, 1, OPTS.model_copy(update={"lora_rank": 4}))
    after = dict(lm.named_parameters())
    assert after.keys() == before.keys()                        # merged: plain Linear layers, same names
    assert not any("lora" in type(m).__name__.lower() for m in lm.modules())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed and all(any(t in n for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj")) for n in changed)
    # LoRA's update has rank <= 4 per matrix
    n = changed[0]
    assert torch.linalg.matrix_rank((after[n] - before[n]).double(), atol=1e-6) <= 4
    assert "LoRA r=4" in res.manifest["trained"][0]
    kl = res.manifest["heldout_kl"]
    assert kl[1] <= kl[0]


def test_rules_for_lora_and_hidden_states_after_tokens(tmp_path):
    from types import SimpleNamespace

    view = SimpleNamespace(data={}, by_name={"tokens": (0, None), "distill": (1, None)})
    errs, _ = rules(1, DistillOptions(hidden_mse="all", hidden_weight=1.0), view)
    assert any("image-token count" in m for _, m in errs)
    errs, _ = rules(1, DistillOptions(lora_rank=8, trainable="projector"), view)
    assert any(loc[-1] == "lora_rank" for loc, _ in errs)
    errs, _ = rules(1, DistillOptions(lora_alpha=16.0), view)
    assert any(loc[-1] == "lora_alpha" for loc, _ in errs)
    errs, warns = rules(1, DistillOptions(lora_rank=8), view)
    assert not errs and not any("self-distillation" in w for w in warns)
    # the default dump is unchanged (recipe hashes and cache keys of existing recipes)
    assert "lora_rank" not in DistillOptions().model_dump()


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_tokens_stage_heldout_figures_match_a_direct_count(tiny_path, cctx, calib):
    """The tokens stage's held-out agreement / accuracies equal a count made here from the two models' answers."""
    from medlite.checkpoints.generate import answer_batch
    from medlite.evaluation.scoring import normalize, score

    state, teacher = _pooled_state(tiny_path, cctx, calib)
    held = list(calib.heldout_subset(4))
    imgs, qs = [s.load_image() for s in held], [s.question for s in held]
    before = answer_batch(teacher, imgs, qs, max_new_tokens=16)
    after = answer_batch(state.model, imgs, qs, max_new_tokens=16)
    got = state.results["stages[0].tokens"].manifest["heldout"]
    assert got["pairs"] == 4
    assert got["agreement"] == round(sum(normalize(a) == normalize(b) for a, b in zip(before, after)) / 4, 6)
    for key, answers in (("closed_accuracy_before", before), ("closed_accuracy_after", after)):
        acc = score(answers, held).get("closed_accuracy")
        assert got[key] == (None if acc is None else round(acc, 6))
