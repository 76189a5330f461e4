"""The ``distill`` stage runner: the untouched source teaches the working (pruned) model.

1. Data: the calibration pairs (+ the recipe's extra training sets), answered greedily by the
   teacher; the calibration set's image-disjoint held-out slice, answered the same way, drives
   early stopping. No training image may be an evaluation image (checked).
2. Teacher logits at the answer positions are computed once (without ``hidden_mse`` the teacher
   is not needed afterwards); with ``hidden_mse`` the teacher runs alongside every step.
3. :class:`medlite.training.trainer.Trainer` trains the student's language model (``trainable:
   auto``; projector and vision tower too when pruning changed the tower) except the embedding
   table: seeded, resumable from checkpoints in ``ctx.cache_dir/distill/<run key>``, early stop on
   the held-out KL, best weights restored.
4. The report gives the held-out KL, teacher agreement and closed accuracy before and after.
"""
from __future__ import annotations

import time
from typing import Optional

from medlite.pipeline.contract import StageResult
from medlite.compress.distill import data as D
from medlite.compress.distill.objective import Objective
from medlite.compress.distill.options import DistillOptions
from medlite.errors import MedliteError
from medlite.training.trainer import TrainConfig, Trainer


def prune_facts(state) -> Optional[dict]:
    """The manifest of an earlier prune stage of this build, if any."""
    for key, res in (getattr(state, "results", None) or {}).items():
        if str(key).endswith("prune") and isinstance(getattr(res, "manifest", None), dict):
            return res.manifest
    return None


def tokens_facts(state) -> Optional[dict]:
    """The manifest of an earlier tokens stage of this build (image tokens reduced), if any."""
    for key, res in (getattr(state, "results", None) or {}).items():
        if str(key).endswith("tokens") and isinstance(getattr(res, "manifest", None), dict):
            return res.manifest
    return None


def select_trainable(model, opts: DistillOptions, pruned: Optional[dict], pooled: bool = False,
                     lora: bool = False) -> list[str]:
    """Set ``requires_grad`` for the parts that train; returns their names (``lora``: the language model
    trains through its LoRA adapters only)."""
    parts = {"llm": ["language_model"], "projector": ["multi_modal_projector"],
             "llm+projector": ["language_model", "multi_modal_projector"],
             "all": ["language_model", "multi_modal_projector", "vision_tower"]}
    mode = opts.trainable
    if mode == "auto":
        # the image embeddings stay the source's unless pruning changed the tower (the vision gate holds);
        # pooled image tokens: the projector learns to read them, with the language model
        mode = "all" if (pruned or {}).get("vision") else "llm+projector" if pooled else "llm"
    names = parts[mode]
    frozen = ("embed_tokens",)     # the embedding table is shared with the embed graph; lm_head stays too
    for n, p in model.named_parameters():
        on = any(f".{part}." in f".{n}" for part in names) and not any(f in n for f in frozen)
        if lora and ".language_model." in f".{n}":
            on = on and "lora_" in n
        p.requires_grad_(on)
    return names


def heldout_metrics(loaded, samples, teacher_answers: list, *, ctx, max_new_tokens: int,
                    description: str = "distill: held-out answers") -> dict:
    """Agreement with the teacher's answers and closed accuracy on the held-out slice."""
    from medlite.evaluation.scoring import normalize, score

    if not samples:
        return {}
    preds = D.teacher_answers(loaded, samples, ctx=ctx, max_new_tokens=max_new_tokens, description=description)
    agree = sum(normalize(p) == normalize(t) for p, t in zip(preds, teacher_answers)) / len(samples)
    acc = score(preds, samples).get("closed_accuracy")
    return {"agreement": round(agree, 6), "closed_accuracy": None if acc is None else round(acc, 6)}


def _samples(state, opts: DistillOptions) -> tuple[list, list]:
    """Training samples (calibration + extra sets) and the held-out slice, leakage-checked."""
    if state.calibration is None:
        raise MedliteError("distill needs the recipe's calibration section (medical image + question pairs)")
    train = D.unique(list(state.calibration.samples) + D.extra_samples(opts, ctx=state.ctx))
    held = state.calibration.heldout_subset(opts.heldout_samples)
    D.check_disjoint(train, state.eval_samples)
    D.check_disjoint(held, state.eval_samples)
    held_imgs = {s.image_id for s in held}
    train = [s for s in train if s.image_id not in held_imgs]   # an extra set may hold held-out images
    if not held:
        state.ctx.warn("distill: the calibration set has no held-out slice (heldout_fraction 0): no early stop, "
                       "the last weights are kept")
    return train, held


def _train(state, opts: DistillOptions, objective: Objective, examples: list):
    from medlite.training.trainer import trainable

    cfg = TrainConfig(steps=opts.steps, batch_size=opts.batch_size, learning_rate=opts.learning_rate, seed=opts.seed,
                      warmup=opts.warmup, weight_decay=opts.weight_decay, eval_every=opts.eval_every,
                      patience=opts.patience, checkpoint_every=opts.checkpoint_every)
    params = {**trainable(state.model.model.named_parameters()), **objective.extra_params()}
    key = objective.key(examples)
    trainer = Trainer(params, objective.loss, len(examples), cfg, ctx=state.ctx,
                      eval_fn=objective.heldout_kl if len(objective.held) else None,
                      checkpoint_dir=state.ctx.cache_dir / "distill" / key[:20], run_key=key, description="distill",
                      scaler=objective.scaler)
    return trainer.fit(), key


def _report(opts, res, before: dict, after: dict, teacher: dict, n_train: int, n_held: int) -> list[str]:
    lines = [f"Distillation from the source model: {n_train} training pairs (teacher answers), "
             f"{res.steps_run} of {opts.steps} steps × {opts.batch_size}, T = {opts.temperature:g}"
             + (" (stopped early)" if res.stopped_early else "") + f"; best held-out at step {res.best_step}.", ""]
    if before:
        lines += [f"Held-out calibration slice ({n_held} pairs, image-disjoint from training):", "",
                  "| | teacher | student before | student after |", "|---|---:|---:|---:|"]
        lines.append(f"| answer-token KL (nats) | 0 | {res.evals[0][1]:.3g} | {res.best_eval:.3g} |")
        for k in ("agreement", "closed_accuracy"):
            t = teacher.get(k)
            lines.append(f"| {k.replace('_', ' ')} | {'–' if t is None else f'{t:.3f}'} | "
                         f"{_fmt(before.get(k))} | {_fmt(after.get(k))} |")
    return lines


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def run(state, index: int, opts: DistillOptions) -> StageResult:
    """Distill the source model into the working model in place; see the module doc."""
    import torch

    from medlite.devices import PeakMemory, is_cpu, placed, record_peaks

    ctx, student = state.ctx, state.model
    teacher = state.source_model()
    if teacher is None or teacher.model is student.model:
        raise MedliteError("distill needs the untouched source model as teacher, apart from the working model")
    if next(student.model.parameters()).dtype != torch.float32:
        raise MedliteError("distill trains in float32; the working model is "
                           f"{next(student.model.parameters()).dtype} (load the checkpoint in float32)")
    device = getattr(state, "device", None)
    _check_device(index, opts, teacher, student, device)
    pruned, pooled = prune_facts(state), tokens_facts(state)
    if pruned is None and pooled is None:
        ctx.warn("distill: no earlier prune or tokens stage — plain self-distillation of an unchanged model")
    train_s, held_s = _samples(state, opts)
    peaks = PeakMemory(device)
    # teacher and student on the build's device for the whole stage, back on the host after it (CPU: no-op)
    with placed(teacher.model, device), placed(student.model, device), peaks.phase("distill"):
        res, objective, parts, examples, held, before, after, teacher_m, key = _distill(
            state, opts, teacher, student, pruned, train_s, held_s, pooled is not None)
    note = f"{res.samples_per_s:.1f} samples/s"
    if not is_cpu(device):
        note += " · " + record_peaks(state, peaks)
    nbytes = student.param_breakdown()["total"]["bytes"]
    summary = (f"{res.steps_run} steps on {len(examples)} pairs · held-out KL "
               + (f"{res.evals[0][1]:.3g} → {res.best_eval:.3g}" if res.evals else "n/a")
               + (f" · agreement {before['agreement']:.3f} → {after['agreement']:.3f}" if before else "")
               + ("" if opts.mixed_precision == "fp32" else f" · {opts.mixed_precision} autocast"))
    manifest = {"options": opts.model_dump(), "hidden_mse_layers": objective.s_layers,   # "all" resolved
                "trained": parts, "train_pairs": len(examples), "heldout_pairs": len(held),
                "data_sha256": D.data_key(examples), "steps_run": res.steps_run, "best_step": res.best_step,
                "stopped_early": res.stopped_early, "run_key": key,
                "heldout_kl": [round(v, 6) for _, v in res.evals[:1]] + ([round(res.best_eval, 6)] if res.evals else []),
                "heldout_before": before, "heldout_after": after, "heldout_teacher": teacher_m,
                "self_distillation": pruned is None and pooled is None}
    return StageResult(summary=summary, changed=["weights"], bytes_before=nbytes, bytes_after=nbytes,
                       note=note, manifest=manifest,
                       report=_report(opts, res, before, after, teacher_m, len(examples), len(held)))


def _check_device(index: int, opts: DistillOptions, teacher, student, device) -> None:
    """Before any work: mixed precision needs a GPU, and teacher + student + AdamW must fit the card."""
    from medlite.devices import check_fits, is_cpu, module_bytes

    if is_cpu(device):
        if opts.mixed_precision != "fp32":
            raise MedliteError(f"stages[{index}].distill.mixed_precision {opts.mixed_precision}: autocast runs on a "
                               "GPU only (build with --device cuda); on the CPU distillation trains in fp32")
        return
    tc = student.model.config.text_config
    trainable_bytes = module_bytes(student.model.model.language_model)
    tokens = int(student.num_image_tokens) + 128
    # activations kept for the backward: ~16 fp32 tensors of [batch, tokens, hidden] per decoder layer
    acts = opts.batch_size * tokens * int(tc.hidden_size) * int(tc.num_hidden_layers) * 4 * 16
    check_fits(device, module_bytes(teacher.model) + module_bytes(student.model) + 3 * trainable_bytes + acts,
               what=f"distill (teacher + student + AdamW state, batch {opts.batch_size})",
               option=f"set stages[{index}].distill.batch_size lower or mixed_precision: bf16, or build with "
                      "--device cpu")


def _teacher_batches(teacher, student, examples: list, held: list):
    """The teacher's own encodings of the examples when its prompts differ from the student's (a tokens
    stage pooled the student's image tokens: same answers, fewer image tokens); ``None`` when they match."""
    if int(teacher.num_image_tokens) == int(student.num_image_tokens):
        return None
    enc = lambda exs: D.Batches(teacher, [D.encode(teacher, e.sample, e.answer) for e in exs])   # noqa: E731
    return enc(examples), enc(held)


def _adapters(student, opts: DistillOptions):
    """LoRA adapters on the language model while it trains (``lora_rank`` > 0), merged on exit; else nothing."""
    import contextlib

    if not opts.lora_rank:
        return contextlib.nullcontext(0)
    from medlite.compress.distill.lora import lora_adapters

    return lora_adapters(student.model.model.language_model, rank=opts.lora_rank,
                         alpha=opts.lora_alpha or 2.0 * opts.lora_rank, seed=opts.seed)


def _distill(state, opts: DistillOptions, teacher, student, pruned, train_s, held_s, pooled: bool = False):
    """The work of :func:`run` on whatever device the models are on (teacher answers, training, metrics)."""
    ctx = state.ctx
    answers = D.teacher_answers(teacher, train_s + held_s, ctx=ctx, max_new_tokens=opts.max_new_tokens)
    t_train, t_held = answers[:len(train_s)], answers[len(train_s):]
    examples = [D.encode(student, s, a) for s, a in zip(train_s, t_train)]
    held = [D.encode(student, s, a) for s, a in zip(held_s, t_held)]
    metric = lambda m: heldout_metrics(m, held_s, t_held, ctx=ctx, max_new_tokens=opts.max_new_tokens)  # noqa: E731
    teacher_m, before = metric(teacher), metric(student)
    grads = {n: p.requires_grad for n, p in student.model.named_parameters()}
    t0 = time.perf_counter()
    try:
        with _adapters(student, opts) as n_lora:
            parts = select_trainable(student.model, opts, pruned, pooled, lora=bool(n_lora))
            if n_lora:
                parts = [f"{p} (LoRA r={opts.lora_rank}: {n_lora:,} parameters, merged)" if p == "language_model"
                         else p for p in parts]
            student.model.eval()      # no dropout: deterministic, resumable
            objective = Objective(student, teacher, D.Batches(student, examples), D.Batches(student, held), opts,
                                  ctx=ctx, pruned=pruned,
                                  teacher_batches=_teacher_batches(teacher, student, examples, held))
            res, key = _train(state, opts, objective, examples)
    finally:
        for n, p in student.model.named_parameters():
            p.requires_grad_(grads.get(n, True))
    state.timings["distill_train_s"] = round(time.perf_counter() - t0, 2)
    after = metric(student)
    return res, objective, parts, examples, held, before, after, teacher_m, key


__all__ = ["run", "select_trainable", "prune_facts", "heldout_metrics"]
