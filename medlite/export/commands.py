"""``medlite export``: load a checkpoint (or the demo model) and write the ONNX export folder."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from medlite.errors import OutputError
from medlite.fileio import ensure_writable_dir, staged_folder
from medlite.units import common_unit, human_bytes

# What a killed export may leave behind in its own folder (the exporter's staging folders).
_EXPORT_LEFTOVERS = (".medlite-export-tmp", ".medlite-export-park")


def export_target(out: Path) -> list[str]:
    """Check that ``--out`` may receive an export; returns the files of an earlier export it replaces.

    An empty or missing folder is fine; a folder holding only what an earlier ``medlite export``
    wrote (its runtime config among them) is replaced as a whole; anything else — a user's own
    files, a built artifact — is refused with one line, as ``convert`` and ``demo random`` do.
    """
    from medlite.export.api import _OWN_FILES   # the exporter's own list of the files it writes
    from medlite.runtime.config import CONFIG_FILE

    if not out.is_dir():
        return []
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return []
    foreign = [n for n in names if n not in _OWN_FILES and n not in _EXPORT_LEFTOVERS]
    if CONFIG_FILE in names and not foreign:
        return [n for n in names if n in _OWN_FILES]
    shown = ", ".join(foreign[:5]) + (f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else "")
    raise OutputError(f"--out {out}: exists, is not empty and is not an earlier medlite export (it holds "
                      f"{shown}); remove it or choose another --out (nothing was overwritten)")


def cmd_export(args, ctx) -> int:
    """Handler for ``medlite export [--model PATH] --out DIR [--precision fp16|fp32] [--opset N]`` (default fp16, as recipes).

    ``--out`` must be empty, missing or an earlier export (:func:`export_target`); the export is
    staged in a temporary sibling folder and renamed into place.

    ``args.model`` None means the built-in demo model. fp16 exports load the checkpoint in fp16
    directly, so a 1.5 B model never exists in fp32 in memory. Prints a summary to stderr and the
    ExportResult as JSON on stdout with ``--json``.
    """
    from medlite.model_choice import load_from_args
    from medlite.export import export_onnx

    out = ensure_writable_dir(args.out, "--out")      # before the model loads
    replaced = export_target(out)
    precision = getattr(args, "precision", None) or "fp16"
    # --device is checked (a wrong one is one line) but the trace stays on the CPU: the graphs do not
    # depend on where PyTorch ran, and the CPU trace is the tested one (docs/gpu-builds.md).
    loaded = load_from_args(args, ctx, dtype="float16" if precision == "fp16" else "float32", on_device=False)
    # Written into a temporary sibling and renamed into place: a failed export leaves --out as it was.
    with staged_folder(out) as tmp:
        res = export_onnx(loaded, tmp, ctx=ctx, precision=precision, opset=int(getattr(args, "opset", 17) or 17))
    res.out_dir = str(out)
    if replaced:
        ctx.warn(f"--out {out}: replaced the earlier export ({len(replaced)} files: {', '.join(replaced)})")
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
