"""Distillation on a random tiny checkpoint: loss against torch's own KL, batch alignment, leakage checks,
recipe rules, and an interrupted run resuming to the same weights as an uninterrupted one."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from compress_state import make_state
from medlite.checkpoints import load_model
from medlite.compress.distill import data as D
from medlite.compress.distill.losses import kd_kl
from medlite.compress.distill.options import DistillDataset, DistillOptions, plan, rules
from medlite.errors import DataError


def test_kd_kl_equals_torch_kl_div():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 11, generator=g), torch.randn(3, 4, 11, generator=g)
    targets = torch.tensor([[5, 2, -100, -100], [1, 1, 1, 1], [7, -100, -100, -100]])
    T = 2.5
    got = kd_kl(s, t, targets, T)
    per_pos = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1),
                                         log_target=True, reduction="none").sum(-1)
    ref = torch.stack([per_pos[b, targets[b] != -100].mean() for b in range(3)]).mean() * T * T
    torch.testing.assert_close(got, ref)


def _view(stages, evaluation=None):
    return SimpleNamespace(target=None, by_name={n: (i, None) for i, n in enumerate(stages)},
                           data={"evaluation": evaluation or {"dataset": "builtin:micro-med-vqa", "split": "test"}})


def test_rules_refuse_evaluation_data_and_warn_on_self_distillation():
    opts = DistillOptions(datasets=[DistillDataset(dataset="builtin:micro-med-vqa", split="test"),
                                    DistillDataset(dataset="builtin:micro-med-vqa", split="all"),
                                    DistillDataset(dataset="builtin:micro-med-vqa", split="train")])
    errors, warnings = rules(1, opts, _view(["prune", "distill", "export"]))
    assert [loc for loc, _ in errors] == [("stages", 1, "distill", "datasets", 0),
                                          ("stages", 1, "distill", "datasets", 1, "split")]
    assert "is the evaluation split" in errors[0][1] and "not a training split" in errors[1][1]
    assert warnings == []
    errors, warnings = rules(0, DistillOptions(), _view(["distill", "export"]))
    assert errors == [] and "plain self-distillation" in warnings[0]
    errors, _ = rules(1, DistillOptions(hidden_weight=0.5), _view(["prune", "distill"]))
    assert errors[0][0] == ("stages", 1, "distill", "hidden_weight")
    assert "teacher" in plan(1, DistillOptions(), None)[0]


def test_extra_data_on_evaluation_images_is_refused(calib):
    with pytest.raises(DataError, match="evaluation images"):
        D.check_disjoint(calib.samples[:3], [calib.samples[1]])
    D.check_disjoint(calib.samples, calib.heldout)     # image-disjoint by construction


def test_batch_positions_predict_the_answer(tiny_path, cctx, calib):
    loaded = load_model(tiny_path, ctx=cctx)
    exs = [D.encode(loaded, s, a) for s, a in zip(calib.samples[:3], ["yes", "no no", ""])]
    b = D.Batches(loaded, exs).batch([0, 1, 2], torch.float32)
    for r, e in enumerate(exs):
        k = len(e.answer_ids)
        pos = b["positions"][r, :k]
        # the token after each loss position is the answer token it predicts (teacher forcing) ...
        assert b["input_ids"][r, pos[:-1] + 1].tolist() == e.answer_ids[:-1]
        # ... the last one predicts </s> from the end of the row, and the prompt sits right before
        assert int(pos[-1]) == b["input_ids"].shape[1] - 1 and e.answer_ids[-1] == loaded.eos_token_ids[0]
        assert b["input_ids"][r, int(pos[0]) - len(e.prompt) + 1:int(pos[0]) + 1].tolist() == e.prompt
        assert (b["targets"][r, k:] == -100).all()


def _pruned_state(tiny_path, cctx, calib):
    from medlite.compress.prune.options import PruneOptions
    from medlite.compress.prune.stage import run as prune

    student, teacher = load_model(tiny_path, ctx=cctx), load_model(tiny_path, ctx=cctx)
    from medlite.evaluation.vqa import load_dataset

    evals = load_dataset("builtin:micro-med-vqa", split="test")[:4]
    state = make_state(cctx, student, calib, source=teacher, eval_samples=evals)
    state.results["stages[0].prune"] = prune(state, 0, PruneOptions(mlp=0.25))
    return state


OPTS = DistillOptions(steps=12, batch_size=4, learning_rate=3e-3, eval_every=4, checkpoint_every=4, patience=0,
                      heldout_samples=6, max_new_tokens=4, warmup=2)


def test_interrupted_distillation_resumes_to_the_same_weights(tiny_path, cctx, calib, monkeypatch):
    from medlite.compress.distill import objective
    from medlite.compress.distill.stage import run

    # no held-out slice: no early stop, the run ends with its last weights (a random model's held-out
    # KL need not improve, and restoring the initial weights would make the comparison trivial)
    no_held = dataclasses.replace(calib, heldout=[])
    full = _pruned_state(tiny_path, cctx, calib)
    full.calibration = no_held
    start = {n: p.detach().clone() for n, p in full.model.model.named_parameters()}
    res = run(full, 1, OPTS)
    assert res.manifest["steps_run"] == 12 and not res.manifest["self_distillation"]
    assert any("no early stop" in w for w in cctx.warnings)
    assert not torch.equal(start["model.language_model.layers.0.mlp.down_proj.weight"],
                           full.model.model.model.language_model.layers[0].mlp.down_proj.weight)
    assert res.bytes_before == res.bytes_after and res.report

    broken = _pruned_state(tiny_path, cctx, calib)
    broken.calibration = no_held
    real = objective.Objective.loss

    def loss(self, idx, step):
        if step == 9:
            raise KeyboardInterrupt("injected after step 9")
        return real(self, idx, step)

    monkeypatch.setattr(objective.Objective, "loss", loss)
    with pytest.raises(KeyboardInterrupt):
        run(broken, 1, OPTS)
    monkeypatch.setattr(objective.Objective, "loss", real)
    again = _pruned_state(tiny_path, cctx, calib)
    again.calibration = no_held
    res2 = run(again, 1, OPTS)
    assert res2.manifest["run_key"] == res.manifest["run_key"]
    for (n, a), (_, b) in zip(again.model.model.named_parameters(), full.model.model.named_parameters()):
        assert torch.equal(a, b), n
    assert all(p.requires_grad for p in again.model.model.parameters())   # restored after training


def test_early_stop_on_the_heldout_slice(tiny_path, cctx, calib):
    from medlite.compress.distill.stage import run

    state = _pruned_state(tiny_path, cctx, calib)
    res = run(state, 1, OPTS.model_copy(update={"checkpoint_every": 0}))
    kl = res.manifest["heldout_kl"]
    assert res.manifest["heldout_pairs"] == 6 and len(kl) == 2 and kl[1] <= kl[0]   # best weights kept
    assert set(res.manifest["heldout_before"]) == {"agreement", "closed_accuracy"}


def test_training_data_on_evaluation_images_fails_the_stage(tiny_path, cctx, calib):
    from medlite.compress.distill.stage import run

    state = _pruned_state(tiny_path, cctx, calib)
    state.eval_samples = [calib.samples[0]]
    with pytest.raises(DataError, match="evaluation images"):
        run(state, 1, OPTS)
