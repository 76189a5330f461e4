"""The framework's trainer: seeded, resumable, early-stopping mini-batch training of named parameters.

Generalised from the demo model's loop (medlite/demo/train.py: AdamW, warm-up + cosine schedule,
gradient clipping, progress through ``ctx``) for every stage that trains (distillation first).

Guarantees:

* **Deterministic.** The examples of step ``s`` are a pure function of ``(seed, s)`` — epoch ``e``
  is a permutation drawn from a generator seeded with ``(seed, e)`` — so no generator state needs
  saving, and two runs with the same inputs and thread count give bit-identical weights.
* **Resumable.** Every ``checkpoint_every`` steps the parameters, the optimizer state, the best
  weights so far and the histories are written atomically to ``checkpoint_dir/checkpoint.pt``
  under a ``run_key`` that names the inputs. A rerun after an interruption (crash, Ctrl-C) with
  the same key continues from the last checkpoint and ends with the same weights as an
  uninterrupted run; a checkpoint of another key is ignored. It is deleted after a finished run.
* **Early stop.** With an ``eval_fn`` (lower is better, e.g. a held-out distillation loss), the
  model is evaluated before training and every ``eval_every`` steps; after ``patience`` evaluations
  without improvement training stops, and the best evaluated weights (possibly the initial ones)
  are restored.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (all of them are part of a resumable run's identity)."""

    steps: int
    batch_size: int
    learning_rate: float
    seed: int = 0
    warmup: int = 0                 # linear warm-up steps, then cosine decay to min_lr_frac × lr
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0          # max global gradient norm (0: off)
    eval_every: int = 0             # 0: evaluate only before and after training
    patience: int = 0               # evaluations without improvement before stopping (0: never stop early)
    checkpoint_every: int = 0       # 0: no checkpoints

    def to_dict(self) -> dict:
        return asdict(self)

    def lr_at(self, step: int) -> float:
        """Learning rate of ``step`` (0-based)."""
        if step < self.warmup:
            return self.learning_rate * (step + 1) / self.warmup
        frac = (step - self.warmup) / max(1, self.steps - self.warmup)
        cos = 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        return self.learning_rate * (self.min_lr_frac + (1 - self.min_lr_frac) * cos)


@dataclass
class TrainResult:
    """What a run did (``losses``/``evals`` are ``(step, value)``; timings are for reports only)."""

    steps_run: int
    best_step: int
    best_eval: Optional[float]
    losses: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    stopped_early: bool = False
    resumed_from: Optional[int] = None
    seconds: float = 0.0
    samples_per_s: float = 0.0


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of ``step``: consecutive slices of a stream of seeded per-epoch permutations."""
    import torch

    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        take = perm[offset:offset + batch_size - len(out)]
        out += take
        pos += len(take)
    return out


class Trainer:
    """Train ``params`` (name → ``torch.nn.Parameter``) to minimise ``loss_fn(indices, step)``.

    ``loss_fn`` returns a scalar tensor for the examples ``indices`` (of ``n_examples``);
    ``eval_fn()`` returns a float (lower is better) for early stopping. Progress goes through
    ``ctx.progress`` (steps) and ``ctx.info`` (loss, held-out value and samples/s at each evaluation).
    """

    def __init__(self, params: dict, loss_fn: Callable, n_examples: int, config: TrainConfig, *, ctx,
                 eval_fn: Optional[Callable[[], float]] = None, checkpoint_dir: Optional[Path] = None,
                 run_key: str = "", description: str = "train", scaler=None):
        if n_examples < 1:
            raise ValueError("nothing to train on: no examples")
        if not params:
            raise ValueError("nothing to train: no parameters")
        self.params, self.loss_fn, self.n = dict(params), loss_fn, int(n_examples)
        self.config, self.ctx, self.eval_fn = config, ctx, eval_fn
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.run_key, self.description = run_key, description
        self.scaler = scaler          # torch.amp.GradScaler for fp16 autocast on a GPU; None: plain steps

    # -- state ----------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        return {k: p.detach().clone() for k, p in self.params.items()}

    def _restore(self, weights: dict) -> None:
        import torch

        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(weights[k])

    def _save(self, opt, state: dict) -> None:
        import torch

        if self.checkpoint_dir is None:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / CHECKPOINT
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"key": self.run_key, "config": self.config.to_dict(), "params": self._snapshot(),
                    "optim": opt.state_dict(), **state}, tmp)
        os.replace(tmp, path)        # atomic: an interruption never leaves a half-written checkpoint

    def _load(self, opt) -> Optional[dict]:
        import torch

        path = self.checkpoint_dir / CHECKPOINT if self.checkpoint_dir else None
        if path is None or not path.exists():
            return None
        try:
            ck = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # a corrupt file: start over, loudly
            self.ctx.warn(f"{path}: unreadable training checkpoint ({e}); starting from step 0")
            return None
        if ck.get("key") != self.run_key or ck.get("config") != self.config.to_dict():
            return None
        self._restore(ck["params"])
        opt.load_state_dict(ck["optim"])
        return ck

    def _evaluate(self, step: int, state: dict) -> None:
        import torch

        with torch.no_grad():
            value = float(self.eval_fn())
        state["evals"].append((step, value))
        if state["best_eval"] is None or value < state["best_eval"]:
            state.update(best_eval=value, best_step=step, best=self._snapshot(), bad=0)
        else:
            state["bad"] += 1

    # -- loop -----------------------------------------------------------------------------
    def _step(self, opt, step: int) -> float:
        import torch

        cfg = self.config
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        loss = self.loss_fn(batch_indices(step, self.n, cfg.batch_size, cfg.seed), step)
        opt.zero_grad(set_to_none=True)
        if self.scaler is not None:   # fp16: scaled backward, unscaled before clipping, skipped on inf
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(opt)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.grad_clip)
            self.scaler.step(opt)
            self.scaler.update()
            return float(loss.detach())
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.grad_clip)
        opt.step()
        return float(loss.detach())

    def fit(self) -> TrainResult:
        """Run (or resume) training; returns the :class:`TrainResult` with the best weights in place."""
        import torch

        cfg = self.config
        opt = torch.optim.AdamW(list(self.params.values()), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        state = {"step": 0, "losses": [], "evals": [], "best_eval": None, "best_step": 0, "best": None, "bad": 0,
                 "stopped": False}
        ck = self._load(opt)
        resumed = None
        if ck is not None:
            resumed = int(ck["step"])
            state.update({k: ck[k] for k in state})
            self.ctx.info(f"  {self.description}: resuming from the checkpoint at step {resumed}")
        elif self.eval_fn is not None:
            self._evaluate(0, state)
        t0, seen = time.perf_counter(), 0
        with self.ctx.progress(self.description, total=cfg.steps) as advance:
            advance(state["step"])
            while state["step"] < cfg.steps and not state["stopped"]:
                step = state["step"]
                state["losses"].append((step + 1, self._step(opt, step)))
                state["step"] = step = step + 1
                seen += cfg.batch_size
                advance()
                if self.eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0:
                    self._evaluate(step, state)
                    self._log(state, seen / max(time.perf_counter() - t0, 1e-9))
                    state["stopped"] = bool(cfg.patience and state["bad"] >= cfg.patience and step < cfg.steps)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    self._save(opt, state)
        if self.eval_fn is not None and (not state["evals"] or state["evals"][-1][0] != state["step"]):
            self._evaluate(state["step"], state)
        if state["best"] is not None:
            self._restore(state["best"])
        if self.checkpoint_dir is not None:
            (self.checkpoint_dir / CHECKPOINT).unlink(missing_ok=True)
        dt = time.perf_counter() - t0
        return TrainResult(steps_run=state["step"], best_step=state["best_step"], best_eval=state["best_eval"],
                           losses=state["losses"], evals=state["evals"], stopped_early=state["stopped"],
                           resumed_from=resumed, seconds=dt, samples_per_s=seen / dt if dt > 0 else 0.0)

    def _log(self, state: dict, sps: float) -> None:
        recent = [v for _, v in state["losses"][-max(self.config.eval_every, 1):]]
        step, value = state["evals"][-1]
        self.ctx.info(f"  {self.description}: step {step}/{self.config.steps} · loss {sum(recent) / len(recent):.4f} · "
                      f"held-out {value:.4f} (best {state['best_eval']:.4f} at {state['best_step']}) · "
                      f"{sps:.1f} samples/s")


def trainable(named: Sequence) -> dict:
    """``{name: parameter}`` of the ``(name, parameter)`` pairs that require gradients (stable order)."""
    return {n: p for n, p in named if p.requires_grad}


__all__ = ["TrainConfig", "TrainResult", "Trainer", "batch_indices", "trainable"]
