"""The distillation objective: teacher targets, the student's loss and its held-out value.

Teacher logits at the answer positions are computed once (without ``hidden_mse`` the teacher is not
needed afterwards); with ``hidden_mse`` the teacher runs alongside every step for its hidden states.
The hidden states of student layer ``i`` are matched with the teacher layer it came from (the
prune stage's ``layers.kept``).
"""
from __future__ import annotations

import hashlib
import json
from typing import Optional

from medlite.compress.distill import data as D
from medlite.compress.distill.losses import forward_answers, hidden_mse, kd_kl
from medlite.compress.distill.options import DistillOptions, hidden_layers
from medlite.errors import MedliteError


def on_device(b: dict, device) -> dict:
    """A batch's tensors on ``device`` when that is a GPU (``--device``); on the CPU the same dict."""
    from medlite.devices import is_cpu

    if is_cpu(device):
        return b
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()}


def autocast(opts, device):
    """``torch.autocast`` for ``opts.mixed_precision`` bf16/fp16 on a GPU; a null context for fp32."""
    import contextlib

    import torch

    if getattr(opts, "mixed_precision", "fp32") == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[
        opts.mixed_precision])


def _teacher_logits(teacher, batches: D.Batches, *, ctx, batch_size: int, description: str, opts=None) -> list:
    """The teacher's answer-position logits per example (float32 ``[A_i, V]``)."""
    import torch

    from medlite.devices import model_device

    out = []
    dtype = next(teacher.model.parameters()).dtype
    device = model_device(teacher.model)
    with ctx.progress(description, total=len(batches)) as advance, torch.no_grad():
        for i in range(0, len(batches), batch_size):
            idx = list(range(i, min(i + batch_size, len(batches))))
            b = on_device(batches.batch(idx, dtype), device)
            with autocast(opts, device):
                logits, _ = forward_answers(teacher.model, b)
            for r, j in enumerate(idx):
                out.append(logits[r, : len(batches.examples[j].answer_ids)].float().clone())
            advance(len(idx))
    return out


def _stack(cache: list, idx, width: int, like):
    import torch

    out = torch.zeros((len(idx), width, cache[idx[0]].shape[-1]), dtype=torch.float32, device=like.device)
    for r, i in enumerate(idx):
        out[r, : cache[i].shape[0]] = cache[i]
    return out


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def mix_images(pixels, strength: float, *, seed: int, step: int):
    """Each image blended with another image of the batch: ``(1 - w)·x_i + w·x_j``, ``w ~ U(0, strength)``.

    Function matching (Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and
    consistent", arXiv:2106.05237): teacher and student see the same blended image, so the student
    learns the teacher's function off the training images' manifold too — what an unseen source
    asks of it. Random draws are a function of ``(seed, step)`` (resumable, bit-identical).
    """
    import torch

    n = pixels.shape[0]
    if n < 2:
        return pixels
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    other = (torch.arange(n) + torch.randint(1, n, (1,), generator=g)) % n    # never the image itself
    w = (torch.rand(n, generator=g) * strength).to(pixels.dtype).view(n, 1, 1, 1)
    return (1 - w) * pixels + w * pixels[other]


def _layer_map(layers: list[int], pruned) -> list[int]:
    """The teacher layers matching the student's ``layers`` (layer pruning keeps a subset)."""
    kept = ((pruned or {}).get("layers") or {}).get("kept")
    return [kept[i] if kept else i for i in layers]


class Objective:
    """The training loss and the held-out value of one distillation run."""

    def __init__(self, student, teacher, train: D.Batches, held: D.Batches, opts: DistillOptions, *, ctx,
                 pruned: Optional[dict], teacher_batches: Optional[tuple] = None):
        self.student, self.teacher, self.train, self.held, self.opts = student, teacher, train, held, opts
        # The teacher's inputs: the student's, unless the student's prompts carry fewer image tokens (a
        # tokens stage); then the same examples encoded for the teacher, and only the answer positions
        # (same answer tokens, same order) compare.
        self.t_train_b, self.t_held_b = teacher_batches or (train, held)
        from medlite.devices import is_cpu, model_device

        self.dtype = next(student.model.parameters()).dtype
        self.device = model_device(student.model)        # the build's device (the student is placed there)
        # fp16 autocast needs loss scaling (the trainer takes the scaler); bf16 and fp32 do not
        self.scaler = None
        if getattr(opts, "mixed_precision", "fp32") == "fp16" and not is_cpu(self.device):
            import torch

            self.scaler = torch.amp.GradScaler(self.device.type)
        n_layers = len(student.model.model.language_model.layers)
        layers = hidden_layers(opts, n_layers)          # "all": every decoder layer of this student
        bad = [i for i in layers if i >= n_layers]
        if bad:
            raise MedliteError(f"distill.hidden_mse {bad}: the student has {n_layers} decoder layers")
        self.s_layers, self.t_layers = layers, _layer_map(layers, pruned)
        self.hidden = bool(opts.hidden_mse and opts.hidden_weight)
        if self.hidden and teacher_batches is not None:
            raise MedliteError("distill.hidden_mse: the student's prompts carry fewer image tokens than the teacher's "
                               "(a tokens stage), so hidden states do not align position by position; use the "
                               "answer-token KL alone (hidden_weight: 0)")
        # blended images have no cached teacher logits: the teacher then runs alongside every step
        self.online = self.hidden or opts.mixup > 0
        bs = opts.batch_size
        self.t_train = None if self.online else _teacher_logits(teacher, self.t_train_b, ctx=ctx, batch_size=bs,
                                                                 opts=opts, description="distill: teacher logits")
        self.t_held = _teacher_logits(teacher, self.t_held_b, ctx=ctx, batch_size=bs, opts=opts,
                                      description="distill: teacher logits (held-out)") if len(held) else []
        self.projections = self._projections()

    def _projections(self) -> list:
        import torch

        hs = self.student.model.config.text_config.hidden_size
        ht = self.teacher.model.config.text_config.hidden_size
        if not self.hidden or hs == ht:
            return []
        torch.manual_seed(self.opts.seed)
        out = [torch.nn.Linear(hs, ht, bias=False) for _ in self.s_layers]
        if self.device.type != "cpu":       # initialised on the host (same numbers), trained on the device
            out = [m.to(self.device) for m in out]
        return out

    def extra_params(self) -> dict:
        return {f"projection.{k}.{n}": p for k, m in enumerate(self.projections) for n, p in m.named_parameters()}

    def loss(self, idx, _step):
        import torch

        b = self.train.batch(idx, self.dtype)
        if self.opts.mixup > 0:     # blended on the host (the same draws on every device)
            b["pixel_values"] = mix_images(b["pixel_values"], self.opts.mixup, seed=self.opts.seed, step=_step)
        b = on_device(b, self.device)
        with autocast(self.opts, self.device):
            s_logits, s_hidden = forward_answers(self.student.model, b,
                                                 hidden_layers=self.s_layers if self.hidden else ())
            if self.online:
                tb = b if self.t_train_b is self.train else self._teacher_batch(idx, b)
                with torch.no_grad():
                    t_logits, t_hidden = forward_answers(self.teacher.model, tb,
                                                        hidden_layers=self.t_layers if self.hidden else ())
        if not self.online:
            t_logits, t_hidden = _stack(self.t_train, idx, s_logits.shape[1], s_logits), []
        loss = kd_kl(s_logits, t_logits, b["targets"], self.opts.temperature)
        if self.hidden:
            loss = loss + self.opts.hidden_weight * hidden_mse(s_hidden, t_hidden, b["attention_mask"],
                                                                self.projections or None)
        return loss

    def _teacher_batch(self, idx, student_batch: dict) -> dict:
        """The teacher's encoding of the batch ``idx`` with the student's (possibly blended) pixels."""
        tb = self.t_train_b.batch(idx, self.dtype)
        tb["pixel_values"] = student_batch["pixel_values"]
        return on_device(tb, self.device)

    def heldout_kl(self) -> float:
        """Mean answer-token KL (T = 1) of the student on the held-out slice."""
        total, n, bs = 0.0, len(self.held), self.opts.batch_size
        for i in range(0, n, bs):
            idx = list(range(i, min(i + bs, n)))
            b = on_device(self.held.batch(idx, self.dtype), self.device)
            with autocast(self.opts, self.device):
                s_logits, _ = forward_answers(self.student.model, b)
            total += float(kd_kl(s_logits, _stack(self.t_held, idx, s_logits.shape[1], s_logits), b["targets"], 1.0)) \
                * len(idx)
        return total / max(n, 1)

    def key(self, examples) -> str:
        """Identity of the run (options, data, teacher targets, the student's initial weights)."""
        # The resolved layers, not the spelling: "all" and the list it names are the same run.
        opts = dict(self.opts.model_dump(), hidden_mse=list(self.s_layers))
        h = hashlib.sha256(json.dumps(opts, sort_keys=True).encode())
        h.update(D.data_key(examples).encode())
        h.update(_digest(self.t_train or []).encode())
        h.update(_digest(p for p in self.student.model.parameters()).encode())
        return h.hexdigest()


__all__ = ["Objective"]
