"""The reusable trainer: determinism, resume after an interruption, early stopping (independent
references: a plain torch AdamW loop written here, and a second uninterrupted run)."""
from __future__ import annotations

import pytest
import torch

from medlite.context import RunContext
from medlite.training.trainer import TrainConfig, Trainer, batch_indices


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 5, generator=g)
    y = x @ torch.randn(5, 1, generator=g) + 0.1 * torch.randn(40, 1, generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Linear(5, 1)
    return x, y, model


def _loss_fn(x, y, model, fail_at=None):
    def loss(idx, step):
        if fail_at is not None and step == fail_at:
            raise KeyboardInterrupt(f"injected at step {step}")
        i = torch.tensor(idx)
        return ((model(x[i]) - y[i]) ** 2).mean()
    return loss


@pytest.fixture()
def ctx(tmp_path):
    return RunContext(cache_dir=tmp_path, quiet=True)


def test_batches_cover_every_example_once_per_epoch():
    seen = [i for s in range(5) for i in batch_indices(s, 20, 4, seed=3)]
    assert sorted(seen) == list(range(20))
    assert batch_indices(7, 20, 4, 3) == batch_indices(7, 20, 4, 3)
    assert batch_indices(0, 20, 4, 3) != batch_indices(0, 20, 4, 4)
    # a batch that crosses an epoch boundary takes the end of one permutation and the start of the next
    assert len(batch_indices(2, 10, 4, 0)) == 4


def test_equals_a_plain_adamw_loop(ctx):
    cfg = TrainConfig(steps=12, batch_size=8, learning_rate=0.05, warmup=3, weight_decay=0.01, grad_clip=0.5)
    x, y, model = _problem()
    res = Trainer(dict(model.named_parameters()), _loss_fn(x, y, model), 40, cfg, ctx=ctx).fit()
    x, y, ref = _problem()
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.01)
    for step in range(12):
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        i = torch.tensor(batch_indices(step, 40, 8, 0))
        loss = ((ref(x[i]) - y[i]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5)
        opt.step()
    assert res.steps_run == 12 and len(res.losses) == 12
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_interrupted_run_resumes_to_the_same_weights(ctx, tmp_path):
    cfg = TrainConfig(steps=20, batch_size=8, learning_rate=0.05, warmup=2, checkpoint_every=5, eval_every=5,
                      patience=10)
    x, y, full = _problem()
    ev = lambda m: (lambda: float(((m(x) - y) ** 2).mean()))  # noqa: E731
    Trainer(dict(full.named_parameters()), _loss_fn(x, y, full), 40, cfg, ctx=ctx, eval_fn=ev(full)).fit()

    x, y, model = _problem()
    ck = tmp_path / "ck"
    t = Trainer(dict(model.named_parameters()), _loss_fn(x, y, model, fail_at=13), 40, cfg, ctx=ctx,
                eval_fn=ev(model), checkpoint_dir=ck, run_key="k1")
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert (ck / "checkpoint.pt").exists()
    x, y, model = _problem()      # a fresh process: initial weights again
    res = Trainer(dict(model.named_parameters()), _loss_fn(x, y, model), 40, cfg, ctx=ctx, eval_fn=ev(model),
                  checkpoint_dir=ck, run_key="k1").fit()
    assert res.resumed_from == 10 and res.steps_run == 20
    for a, b in zip(model.parameters(), full.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not (ck / "checkpoint.pt").exists()


def test_checkpoint_of_another_run_is_ignored(ctx, tmp_path):
    cfg = TrainConfig(steps=10, batch_size=8, learning_rate=0.05, checkpoint_every=5)
    x, y, model = _problem()
    with pytest.raises(KeyboardInterrupt):
        Trainer(dict(model.named_parameters()), _loss_fn(x, y, model, fail_at=7), 40, cfg, ctx=ctx,
                checkpoint_dir=tmp_path, run_key="a").fit()
    x, y, model = _problem()
    res = Trainer(dict(model.named_parameters()), _loss_fn(x, y, model), 40, cfg, ctx=ctx,
                  checkpoint_dir=tmp_path, run_key="b").fit()
    assert res.resumed_from is None


def test_early_stop_restores_the_best_weights(ctx):
    # the held-out value gets worse with every evaluation: training stops after `patience`
    # evaluations and the initial weights (the best) come back
    cfg = TrainConfig(steps=50, batch_size=8, learning_rate=0.05, eval_every=2, patience=3)
    x, y, model = _problem()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    calls = []

    def worse():
        calls.append(1)
        return float(len(calls))

    res = Trainer(dict(model.named_parameters()), _loss_fn(x, y, model), 40, cfg, ctx=ctx, eval_fn=worse).fit()
    assert res.stopped_early and res.steps_run == 6 and res.best_step == 0
    assert [s for s, _ in res.evals] == [0, 2, 4, 6]
    for k, v in model.named_parameters():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
