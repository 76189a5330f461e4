"""The ``tokens`` stage runner: pool the working model's image tokens before its projector.

1. The geometry (:func:`medlite.image_tokens.geometry`) from the working model's token count — an
   impossible count was refused by the plan already; checked again here for a model given directly.
2. The pooling is installed on the projector (:func:`medlite.checkpoints.token_pool.install`): no
   weight changes, ``num_image_tokens`` and ``config.image_seq_length`` follow.
3. On the calibration set's held-out slice (never the evaluation split): the answers before and
   after pooling — how much a later ``distill`` stage has to recover — go into the report.
"""
from __future__ import annotations

from medlite.compress.tokens.options import TokensOptions
from medlite.errors import MedliteError
from medlite.image_tokens import METHODS, geometry
from medlite.pipeline.contract import StageResult


def _heldout(state, opts: TokensOptions) -> list:
    cal = getattr(state, "calibration", None)
    if cal is None or not opts.heldout_samples:
        return []
    return list(cal.heldout_subset(opts.heldout_samples))


def _answers(loaded, samples: list, ctx, description: str) -> list[str]:
    from medlite.compress.distill.data import teacher_answers

    return teacher_answers(loaded, samples, ctx=ctx, max_new_tokens=16, description=description)


def _compare(loaded, before: list[str], samples: list, ctx) -> dict:
    """The pooled model's held-out answers against ``before`` (the same model with all its tokens)."""
    from medlite.compress.distill.stage import heldout_metrics
    from medlite.evaluation.scoring import score

    after = heldout_metrics(loaded, samples, before, ctx=ctx, max_new_tokens=16,
                            description="tokens: held-out answers (pooled)")
    acc0 = score(before, samples).get("closed_accuracy")
    return {"pairs": len(samples), "agreement": after["agreement"],
            "closed_accuracy_before": None if acc0 is None else round(float(acc0), 6),
            "closed_accuracy_after": after["closed_accuracy"]}


def run(state, index: int, opts: TokensOptions) -> StageResult:
    """Pool the working model's image tokens to ``opts.count`` in place; see the module doc."""
    from medlite.checkpoints.token_pool import current_pool, install

    loaded = state.model
    if current_pool(loaded.model) is not None:
        raise MedliteError(f"stages[{index}].tokens: the model already pools its image tokens "
                           f"({current_pool(loaded.model).spec()}): one tokens stage per model")
    n_in = int(loaded.num_image_tokens)
    try:
        g = geometry(n_in, opts.count)
    except ValueError as e:
        raise MedliteError(f"stages[{index}].tokens.count: {e}") from None
    held = _heldout(state, opts)
    before = _answers(loaded, held, state.ctx, "tokens: held-out answers (all tokens)") if held else []
    install(loaded.model, n_in, opts.count, opts.method)
    loaded.num_image_tokens = g.tokens_out        # the count every prompt expands <image> to
    measured = _compare(loaded, before, held, state.ctx) if held else {}
    nbytes = loaded.param_breakdown()["total"]["bytes"]
    summary = (f"{g.tokens_in} → {g.tokens_out} image tokens ({METHODS[opts.method]}, kernel {g.kernel}"
               + (f", padded by {g.pad}" if g.pad else "") + ")"
               + (f" · held-out agreement before distillation {measured['agreement']:.1%}" if measured else ""))
    manifest = {"options": opts.model_dump(), "tokens_in": g.tokens_in, "tokens_out": g.tokens_out,
                "grid_in": g.side, "grid_out": g.out, "kernel": g.kernel, "pad": g.pad, "heldout": measured}
    report = [f"Image tokens: {METHODS[opts.method]} before the projector, {g.describe()}.", ""]
    if measured:
        report += [f"Held-out calibration slice ({measured['pairs']} pairs), answers before distillation:", "",
                   "| | all tokens | pooled |", "|---|---:|---:|",
                   f"| agreement with all tokens | 1.000 | {measured['agreement']:.3f} |",
                   f"| closed accuracy | {_fmt(measured['closed_accuracy_before'])} | "
                   f"{_fmt(measured['closed_accuracy_after'])} |"]
    return StageResult(summary=summary, changed=["num_image_tokens"], bytes_before=nbytes, bytes_after=nbytes,
                       manifest=manifest, report=report)


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


__all__ = ["run"]
