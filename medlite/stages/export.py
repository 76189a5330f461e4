"""The ``export`` stage: vision / embed / decoder ONNX graphs, runtime config and tokenizer.

Every graph is checked against the target's TensorRT operator table by ``export_onnx``; a graph the
target's TensorRT would reject fails the build (the exporter decomposes LayerNormalization for 8.5).
"""
from __future__ import annotations


def run(state, index: int, options) -> str:
    """Export ``state.loaded`` into ``state.work`` with the recipe's precision, opset and components."""
    from medlite.errors import ExportError
    from medlite.export import export_onnx

    target = state.target
    if options.opset > target.max_opset:     # also a validation error; guards programmatic use
        raise ExportError(f"stages[{index}].export.opset {options.opset} > {target.max_opset} ({target.name})")
    res = export_onnx(state.loaded, state.work, ctx=state.ctx, precision=options.precision, opset=options.opset,
                      components=options.components)
    bad_ops = {g: sorted(set(ops) & set(target.unsupported_ops)) for g, ops in res.ops.items()}
    bad_ops = {g: ops for g, ops in bad_ops.items() if ops}
    if bad_ops or not res.trt_ok:
        detail = "; ".join(f"{g}: {', '.join(o)}" for g, o in bad_ops.items()) or "see the export warnings"
        raise ExportError(f"stages[{index}].export: graphs TensorRT {target.tensorrt} on {target.name} cannot "
                          f"parse ({detail})")
    # Only deterministic facts go into the manifest (ExportResult.seconds would differ per build).
    state.sections["export"] = {
        "stage": f"stages[{index}].export", "precision": res.precision, "opset": res.opset,
        "files": sorted(res.files), "ops": res.ops, "tied_embeddings": res.tied_embeddings,
        "trt_check": {g: {"ok": c["ok"], "target": c["target"], "issues": len(c["issues"]),
                          "int64_tensors": c["int64_tensors"]} for g, c in res.trt_check.items()},
        "fp32_ops": res.fp32_ops, "trace_notes": sorted(set(res.trace_notes)),
    }
    graphs = " · ".join(f"{c}.onnx" for c in options.components)
    return f"{graphs} ({res.precision}, opset {res.opset}, TensorRT {target.tensorrt} ops only)"
