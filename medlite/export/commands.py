"""``medlite export``: load a checkpoint (or the demo model) and write the ONNX export folder."""
from __future__ import annotations

import json
import sys

from medlite.fileio import ensure_writable_dir
from medlite.units import common_unit, human_bytes


def cmd_export(args, ctx) -> int:
    """Handler for ``medlite export [--model PATH] --out DIR [--precision fp16|fp32] [--opset N]`` (default fp16, as recipes).

    ``args.model`` None means the built-in demo model. fp16 exports load the checkpoint in fp16
    directly, so a 1.5 B model never exists in fp32 in memory. Prints a summary to stderr and the
    ExportResult as JSON on stdout with ``--json``.
    """
    from medlite.model_choice import load_from_args
    from medlite.export import export_onnx

    ensure_writable_dir(args.out, "--out")      # before the model loads
    precision = getattr(args, "precision", None) or "fp16"
    loaded = load_from_args(args, ctx, dtype="float16" if precision == "fp16" else "float32")
    res = export_onnx(loaded, args.out, ctx=ctx, precision=precision, opset=int(getattr(args, "opset", 17) or 17))
    if ctx.json_mode:
        json.dump(res.to_dict(), sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    total = sum(f["bytes"] for f in res.files.values())
    ctx.info(f"[bold]{res.out_dir}[/]: {len(res.files)} files, {human_bytes(total)}, {res.precision}, opset "
             f"{res.opset}, TensorRT 8.5 op check {'passed' if res.trt_ok else 'FAILED'}")
    unit = common_unit(f["bytes"] for f in res.files.values())   # one unit: the column compares
    for name, f in sorted(res.files.items()):
        ctx.info(f"  {name:<22}{human_bytes(f['bytes'], unit):>12}")
    ctx.info(f"ask it: medlite ask {res.out_dir} \"QUESTION\" --image IMAGE")
    return 0
