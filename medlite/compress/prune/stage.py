"""The ``prune`` stage runner: importance on the calibration set → dense, smaller working model.

Order: all scores are measured on the unpruned working model first (activation norms in one pass
of the forward loop, layer skip-KL in a second pass when ``layers`` > 0), then KV groups, MLP
channels, decoder layers and vision layers are removed. Scores, kept counts and parameters/bytes
before and after go into the manifest and the report.
"""
from __future__ import annotations

import hashlib
import json

from medlite.pipeline.contract import StageResult
from medlite.compress.prune import importance as imp
from medlite.compress.prune import structured
from medlite.compress.prune.options import PruneOptions, kept_kv_groups, kept_mlp_channels
from medlite.errors import MedliteError


def _round(x, digits: int = 6) -> list:
    # Scores go into the hashed manifest: a fixed number of significant digits keeps it deterministic.
    return [float(f"{float(v):.{digits}g}") for v in x]


def _digest(idx_lists) -> str:
    return hashlib.sha256(json.dumps([[int(i) for i in x] for x in idx_lists]).encode()).hexdigest()[:16]


def _dims(loaded) -> dict:
    tc, vc = loaded.model.config.text_config, loaded.model.config.vision_config
    nh, nkv, hd = imp.head_layout(tc)
    return {"intermediate_size": int(tc.intermediate_size), "num_attention_heads": nh, "num_key_value_heads": nkv,
            "head_dim": hd, "num_hidden_layers": int(tc.num_hidden_layers),
            "vision_layers": int(vc.num_hidden_layers), "num_image_tokens": int(loaded.num_image_tokens)}


def _check_amounts(opts: PruneOptions, dims: dict) -> None:
    if opts.layers >= dims["num_hidden_layers"]:
        raise MedliteError(f"prune.layers {opts.layers}: the decoder has {dims['num_hidden_layers']} layers, "
                           "at least one must stay")
    if opts.attention_kv_groups and kept_kv_groups(dims["num_key_value_heads"], opts.attention_kv_groups) \
            == dims["num_key_value_heads"]:
        raise MedliteError(f"prune.attention_kv_groups {opts.attention_kv_groups}: removes no group of "
                           f"{dims['num_key_value_heads']} (use at least {0.5 / dims['num_key_value_heads']:.3f})")


def measure(state, opts: PruneOptions) -> tuple[imp.Importance, list]:
    """Importance of the working model on the calibration samples (`samples: N`: the set's one subset rule)."""
    from medlite.devices import PeakMemory, is_cpu, placed, record_peaks, to_host

    samples = state.calibration.subset(opts.samples)      # the rows every stage asking for this many uses
    device = getattr(state, "device", None)
    peaks = PeakMemory(device)
    # on the build's device (the whole model: importance needs every layer's activations); the scores
    # come back to the host with the weights, where pruning itself runs. CPU: nothing moves.
    with placed(state.model.model, device):
        loop = state.forward_loop(samples=samples, description="prune: activation importance")
        with peaks.phase("prune importance"):
            scores = imp.activation_importance(loop, state.model.model)
        if opts.layers:
            loop = state.forward_loop(samples=samples, description="prune: layer importance (skip one layer)")
            with peaks.phase("prune layer importance"):
                scores.layers, _ = imp.layer_importance(loop, state.model.model)
    if not is_cpu(device):
        to_host(scores)
        state.prune_note = record_peaks(state, peaks)
    return scores, samples


def apply(model, scores: imp.Importance, opts: PruneOptions, *, warn=None) -> dict:
    """Remove what ``opts`` asks for, chosen by ``scores``; returns the facts for the manifest."""
    facts: dict = {}
    nh, nkv, _ = imp.head_layout(model.config.text_config)
    if opts.attention_kv_groups:
        g = kept_kv_groups(nkv, opts.attention_kv_groups)
        keep = [imp.keep_top(s, g) for s in scores.groups]
        structured.prune_kv_groups(model, keep)
        facts["attention"] = {"kv_groups": [nkv, g], "heads": [nh, g * (nh // nkv)],
                              "kept_groups": [[int(i) for i in k] for k in keep],
                              "group_scores": [_round(s) for s in scores.groups]}
    if opts.mlp:
        inter = int(scores.mlp[0].numel())
        k = kept_mlp_channels(inter, opts.mlp, opts.round_to)
        keep = [imp.keep_top(s, k) for s in scores.mlp]
        structured.prune_mlp(model, keep)
        facts["mlp"] = {"channels": [inter, k], "kept_sha256": _digest(keep),
                        "score_kept_min": _round([float(s[i].min()) for s, i in zip(scores.mlp, keep)]),
                        "score_max": _round([float(s.max()) for s in scores.mlp]),
                        "score_removed_max": _round([float(s[_removed(s, i)].max()) for s, i in zip(scores.mlp, keep)])}
    if opts.layers:
        n = int(scores.layers.numel())
        kept = imp.keep_top(scores.layers, n - opts.layers).tolist()
        structured.drop_decoder_layers(model, kept)
        facts["layers"] = {"count": [n, len(kept)], "kept": kept, "skip_kl": _round(scores.layers)}
    if opts.vision_layers:
        facts["vision"] = structured.drop_vision_layers(model, opts.vision_layers, warn=warn)
    return facts


def _removed(scores, keep):
    import torch

    mask = torch.ones(scores.numel(), dtype=torch.bool)
    mask[keep] = False
    return mask


def _report(facts: dict, before: dict, after: dict, dims0: dict, dims1: dict) -> list[str]:
    lines = ["| | before | after |", "|---|---:|---:|"]
    for k in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "vision_layers"):
        lines.append(f"| {k} | {dims0[k]} | {dims1[k]} |")
    for comp in ("vision_tower", "projector", "llm", "embeddings", "total"):
        lines.append(f"| {comp} parameters | {before[comp]['params']:,} | {after[comp]['params']:,} |")
    lines.append(f"| bytes (in memory) | {before['total']['bytes']:,} | {after['total']['bytes']:,} |")
    if "attention" in facts:
        lines.append("")
        lines.append("KV-group importance (L2 of the group's attention output; kept groups in bold):")
        for li, (s, k) in enumerate(zip(facts["attention"]["group_scores"], facts["attention"]["kept_groups"])):
            cells = [f"**{v:.4g}**" if gi in k else f"{v:.4g}" for gi, v in enumerate(s)]
            lines.append(f"- layer {li}: " + " · ".join(cells))
    if "mlp" in facts:
        m = facts["mlp"]
        lines.append("")
        lines.append(f"MLP channels {m['channels'][0]} → {m['channels'][1]} per layer; per layer, the highest removed "
                     "channel score vs the lowest kept (activation L2 norm):")
        for li, (r, k) in enumerate(zip(m["score_removed_max"], m["score_kept_min"])):
            lines.append(f"- layer {li}: removed ≤ {r:.4g}, kept ≥ {k:.4g}")
    if "layers" in facts:
        lines.append("")
        lines.append("Decoder-layer importance (mean next-token KL when skipped, nats): " + " · ".join(
            f"{i}: {v:.4g}" for i, v in enumerate(facts["layers"]["skip_kl"])) + f"; kept {facts['layers']['kept']}")
    return lines


def run(state, index: int, opts: PruneOptions) -> StageResult:
    """Prune the working model in place (``state.model.model`` and its config); see the module doc."""
    loaded = state.model
    dims0 = _dims(loaded)
    _check_amounts(opts, dims0)
    before = loaded.param_breakdown()
    scores, samples = measure(state, opts)
    facts = apply(loaded.model, scores, opts, warn=state.ctx.warn)
    after = loaded.param_breakdown()
    dims1 = _dims(loaded)
    changed = [k for k in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                           "vision_layers") if dims0[k] != dims1[k]]
    pb, pa = before["total"]["params"], after["total"]["params"]
    summary = (f"{', '.join(f'{k} {dims0[k]}→{dims1[k]}' for k in changed)} · params {pb:,} → {pa:,} "
               f"({pa / pb:.0%}) · importance on {len(samples)} calibration samples")
    manifest = {"options": opts.model_dump(), "importance_samples": len(samples),
                "importance_tokens": scores.tokens, "dims_before": dims0, "dims_after": dims1,
                "params_before": pb, "params_after": pa, **facts}
    report = [f"Structured pruning (importance: {len(samples)} calibration samples, {scores.tokens:,} tokens).", ""]
    report += _report(facts, before, after, dims0, dims1)
    return StageResult(summary=summary, changed=changed, bytes_before=before["total"]["bytes"],
                       bytes_after=after["total"]["bytes"], manifest=manifest, report=report,
                       note=getattr(state, "prune_note", ""))


__all__ = ["run", "measure", "apply"]
