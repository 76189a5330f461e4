"""Options, validation rules and plan of the ``prune`` stage (torch-free: the registry imports this).

Recipe form::

    - prune:
        mlp: 0.25                 # fraction of MLP intermediate channels removed (0 = none)
        attention_kv_groups: 0.5  # fraction of KV groups removed, each with its query heads (GQA)
        layers: 0                 # whole decoder layers removed (lowest importance first)
        vision_layers: 0          # SigLIP layers removed from the top; the projector reads the new top
        round_to: 8               # kept MLP channel count is a multiple of this (tensor cores)
        samples: null             # cap on calibration samples used for importance (null: all)
        sparsity: null            # "unstructured" | "2:4": refused (see rules)

The result is a dense, smaller model of the same Hugging Face classes (see docs/pruning-distillation.md).
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from medlite.recipes.base import Closed
from medlite.recipes.registry import Capabilities, Order, StageSpec, register_stage

STAGE = "prune"
VOLTA_SPARSITY = ("Volta (sm_72) tensor cores have no sparse (2:4) or unstructured-sparsity kernels, and "
                  "TensorRT 8.5 on Xavier runs a zeroed weight as fast as any other: there is no speed-up; "
                  "use mlp / attention_kv_groups / layers (dense, smaller model) instead")
DENSE_SPARSITY = ("medlite exports dense ONNX graphs, where zeroed weights cost the same time and bytes: "
                  "sparsity is not offered; use mlp / attention_kv_groups / layers (dense, smaller model)")


class PruneOptions(Closed):
    """Structured pruning that makes the model genuinely smaller (same HF classes, updated config)."""

    mlp: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of MLP intermediate channels removed")
    attention_kv_groups: float = Field(0.0, ge=0.0, lt=1.0,
                                       description="fraction of KV groups removed, each with its query heads")
    layers: int = Field(0, ge=0, description="whole decoder layers removed (lowest importance)")
    vision_layers: int = Field(0, ge=0, description="SigLIP layers removed from the top")
    round_to: int = Field(8, ge=1, le=1024, description="kept MLP channels are a multiple of this")
    samples: Optional[int] = Field(None, ge=1, description="cap on calibration samples for importance")
    sparsity: Optional[Literal["unstructured", "2:4"]] = Field(
        None, description="refused: no speed-up on Volta, none in dense ONNX graphs")

    def amounts(self) -> dict:
        """The non-zero pruning amounts (what this stage will remove)."""
        names = ("mlp", "attention_kv_groups", "layers", "vision_layers")
        return {n: getattr(self, n) for n in names if getattr(self, n)}


def _is_volta(target) -> bool:
    return str(getattr(target, "arch", "")).startswith("sm_7")


def rules(index: int, opts: PruneOptions, view) -> tuple[list, list]:
    """Cross-field checks: ``(errors, warnings)``; errors are ``(loc, message)``.

    * ``sparsity`` is an error: on a Volta target (Xavier, sm_72) with the reason "no speed-up";
      elsewhere because the dense exported graphs would not be faster either.
    * A prune stage that removes nothing is an error (it would only cost calibration time).
    * Pruning without a later ``distill`` stage is a warning (accuracy is not recovered).
    """
    errors: list = []
    warnings: list = []
    loc = ("stages", index, STAGE)
    if opts.sparsity is not None:
        target = getattr(view, "target", None)
        if target is not None and _is_volta(target):
            why = f"{opts.sparsity} sparsity on {target.name}: {VOLTA_SPARSITY}"
        else:
            why = f"{opts.sparsity} sparsity: {DENSE_SPARSITY}"
        errors.append((loc + ("sparsity",), why))
    if not opts.amounts():
        errors.append((loc, "prunes nothing: set at least one of mlp, attention_kv_groups, layers, vision_layers"))
    by_name = getattr(view, "by_name", {}) or {}
    if "distill" not in by_name and opts.amounts():
        warnings.append(f"stages[{index}].prune without a distill stage: the pruned model's accuracy is not "
                        "recovered (add '- distill' after it)")
    return errors, warnings


def _text_dims(sizes) -> dict:
    # ComponentSizes.kv has num_layers / num_kv_heads / head_dim; hidden / intermediate / heads come
    # from an optional ``text`` dict when the planner provides it.
    dims = dict(getattr(sizes, "kv", {}) or {})
    dims.update(getattr(sizes, "text", None) or {})
    return dims


def kept_mlp_channels(intermediate: int, fraction: float, round_to: int) -> int:
    """Channels kept when ``fraction`` of ``intermediate`` is removed, rounded to a multiple of ``round_to``
    (never 0, never more than ``intermediate``)."""
    keep = intermediate - int(round(fraction * intermediate))
    if round_to > 1:
        keep = int(round(keep / round_to)) * round_to
    return max(min(keep, intermediate), min(round_to, intermediate), 1)


def kept_kv_groups(kv_heads: int, fraction: float) -> int:
    """KV groups kept when ``fraction`` of ``kv_heads`` groups is removed (at least one)."""
    return max(kv_heads - int(round(fraction * kv_heads)), 1)


def _llm_params_after(opts: PruneOptions, d: dict, llm: int) -> Optional[int]:
    need = ("hidden_size", "intermediate_size", "num_attention_heads", "num_kv_heads", "head_dim", "num_layers")
    if not all(d.get(k) for k in need):
        return None
    h, inter, nh, nkv, hd, n = (int(d[k]) for k in need)
    per_layer = h * (nh + nkv) * hd * 2 + 3 * h * inter + 2 * h
    rest = llm - n * per_layer                          # final norm etc.
    inter2 = kept_mlp_channels(inter, opts.mlp, opts.round_to) if opts.mlp else inter
    g2 = kept_kv_groups(nkv, opts.attention_kv_groups) if opts.attention_kv_groups else nkv
    nh2 = nh // nkv * g2
    per_layer2 = h * (nh2 + g2) * hd * 2 + 3 * h * inter2 + 2 * h
    return rest + max(n - opts.layers, 1) * per_layer2


def plan(index: int, opts: PruneOptions, sizes) -> list[str]:
    """What the stage will do and the LLM parameters it expects to keep (torch-free).

    Exact figures need the decoder's hidden / intermediate sizes (``sizes.text``); without them the
    plan names what is removed and says the bytes are measured at build time.
    """
    d = _text_dims(sizes)
    what = []
    if opts.mlp:
        inter = d.get("intermediate_size")
        what.append(f"{opts.mlp:.0%} of MLP channels" + (
            f" ({inter} → {kept_mlp_channels(int(inter), opts.mlp, opts.round_to)})" if inter else ""))
    if opts.attention_kv_groups:
        kv = d.get("num_kv_heads")
        what.append(f"{opts.attention_kv_groups:.0%} of KV groups with their query heads" + (
            f" ({kv} → {kept_kv_groups(int(kv), opts.attention_kv_groups)} groups)" if kv else ""))
    if opts.layers:
        what.append(f"{opts.layers} decoder layer(s) of lowest importance")
    if opts.vision_layers:
        what.append(f"top {opts.vision_layers} vision layer(s)")
    lines = [f"prune: remove {', '.join(what) or 'nothing'} (importance from the calibration set, "
             f"{opts.samples or 'all'} samples)"]
    llm = int((getattr(sizes, "params", {}) or {}).get("llm", 0))
    after = _llm_params_after(opts, d, llm) if llm else None
    if after is not None and not opts.vision_layers:
        lines.append(f"  LLM parameters {llm:,} → ~{after:,} ({after / llm:.0%}); exact counts after pruning")
    else:
        lines.append("  parameters and bytes before/after are measured at build time")
    return lines


def estimate(index: int, opts: PruneOptions, sizes):
    """The sizes after pruning (plans chain): the language model's parameters and dimensions, and the
    KV cache's layers and groups. Vision-layer pruning is measured at build time (its share is small)."""
    import dataclasses

    d = _text_dims(sizes)
    llm = int((getattr(sizes, "params", {}) or {}).get("llm", 0))
    after = _llm_params_after(opts, d, llm) if llm else None
    if after is None:
        return sizes
    text, kv = dict(getattr(sizes, "text", {}) or {}), dict(getattr(sizes, "kv", {}) or {})
    groups = kept_kv_groups(int(d["num_kv_heads"]), opts.attention_kv_groups)
    layers = max(int(d["num_layers"]) - opts.layers, 1)
    text.update(num_layers=layers, num_kv_heads=groups,
                num_attention_heads=int(d["num_attention_heads"]) // int(d["num_kv_heads"]) * groups)
    if opts.mlp:
        text["intermediate_size"] = kept_mlp_channels(int(d["intermediate_size"]), opts.mlp, opts.round_to)
    kv.update(num_layers=layers, num_kv_heads=groups)
    return dataclasses.replace(sizes, params={**sizes.params, "llm": after}, text=text, kv=kv)


SPEC = register_stage(StageSpec(
    STAGE, PruneOptions, "structured pruning of MLP channels / KV groups / layers (dense, smaller)",
    "medlite.compress.prune.stage:run", plan, rules, estimate=estimate,
    caps=Capabilities(changes_weights=True, needs_calibration=True, caches_output=True),
    order=Order(phase=10), numerics=("torch", "transformers")))

__all__ = ["PruneOptions", "rules", "plan", "estimate", "kept_mlp_channels", "kept_kv_groups", "STAGE", "SPEC"]
