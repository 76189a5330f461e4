"""The ``export`` stage: vision / embed / decoder ONNX graphs, runtime config and tokenizer.

It exports the working model with the export plan the compress stages filled (module swaps, graph
passes, per-graph precision and runtime). Graphs bound for TensorRT are checked against the target's
TensorRT operator table and fail the build if TensorRT would reject them; graphs marked
ONNX-Runtime-only (e.g. INT4 MatMulNBits) skip that check and say why.
"""
from __future__ import annotations


def run(state, index: int, options):
    """Export ``state.model`` into ``state.work`` with the recipe's precision, opset and components."""
    from medlite.pipeline.contract import TENSORRT, StageResult
    from medlite.errors import ExportError
    from medlite.export import export_onnx

    from medlite.opset import opset_problem

    target = state.target
    # also a validation error (medlite.recipes.rules); this guards programmatic use
    problem = opset_problem(options.opset, max_opset=target.max_opset, tensorrt=target.tensorrt,
                            where=f"on {target.name}")
    if problem:
        raise ExportError(f"stages[{index}].export.opset: {problem}")
    before = state.model.param_breakdown()["total"]["bytes"]
    from medlite.export.plan import decoder_graph_choice

    try:   # the fused ONNX Runtime decoder only where the decoder runs on ONNX Runtime (docs/cpu.md)
        choice = decoder_graph_choice(getattr(options, "decoder_graph", "plain"), tensorrt_target=bool(
            target.trt_precisions), decoder_runtime=state.export_plan.graph("decoder").runtime)
    except ValueError as e:
        raise ExportError(f"stages[{index}].export.decoder_graph: {e}") from None
    res = export_onnx(state.model, state.work, ctx=state.ctx, precision=options.precision, opset=options.opset,
                      components=options.components, plan=state.export_plan, pass_state=state,
                      decoder_graph=choice)
    plans = state.export_plan.graphs
    trt_graphs = [g for g in res.ops if plans.get(g) is None or plans[g].runtime == TENSORRT]
    bad_ops = {g: sorted(set(res.ops[g]) & set(target.unsupported_ops)) for g in trt_graphs}
    bad_ops = {g: ops for g, ops in bad_ops.items() if ops}
    if bad_ops or not res.trt_ok:
        detail = "; ".join(f"{g}: {', '.join(o)}" for g, o in bad_ops.items()) or "see the export warnings"
        raise ExportError(f"stages[{index}].export: graphs TensorRT {target.tensorrt} on {target.name} cannot "
                          f"parse ({detail})")
    ort_only = {g: plans[g].runtime_reason for g in res.ops if g not in trt_graphs}
    after = sum(f["bytes"] for f in res.files.values())
    # Only deterministic facts go into the manifest (ExportResult.seconds would differ per build).
    manifest = {
        "precision": res.precision, "opset": res.opset, "files": sorted(res.files), "ops": res.ops,
        "tied_embeddings": res.tied_embeddings, "passes": res.passes,
        "trt_check": {g: {"ok": c["ok"], "skipped": bool(c.get("skipped")), "target": c["target"],
                          "issues": len(c["issues"]), "int64_tensors": c["int64_tensors"]}
                      for g, c in res.trt_check.items()},
        "onnxruntime_only": ort_only,
        "fp32_ops": res.fp32_ops, "trace_notes": sorted(set(res.trace_notes)),
    }
    if res.decoder_graph:      # only decoders that run on ONNX Runtime: TensorRT manifests are unchanged
        manifest["decoder_graph"] = res.decoder_graph
    graphs = " · ".join(f"{c}.onnx" for c in options.components)
    precs = sorted({(plans[g].precision if g in plans else None) or res.precision for g in res.ops})
    if not target.trt_precisions:      # a CPU target: every graph runs on ONNX Runtime
        tail = "ONNX Runtime" + (f"; {', '.join(ort_only)} ONNX Runtime only" if ort_only else "")
    elif not ort_only:
        tail = f"TensorRT {target.tensorrt} ops only"
    else:
        tail = (f"TensorRT {target.tensorrt} ops in {', '.join(trt_graphs) or 'none'}; "
                f"ONNX Runtime only: {', '.join(ort_only)}")
    report = [f"- `{n}`: {f['bytes']:,} bytes" for n, f in sorted(res.files.items())]
    report += [f"- {g}.onnx runs on ONNX Runtime only: {why}" for g, why in ort_only.items()]
    return StageResult(summary=f"{graphs} ({'/'.join(precs)}, opset {res.opset}, {tail})",
                       changed=[f"{c}.onnx" for c in options.components], bytes_before=before, bytes_after=after,
                       manifest=manifest, report=report)
