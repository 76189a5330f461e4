"""Benchmark: ``medlite export`` of the full-size random TinyLLaVA-1.5B checkpoint (CPU, this machine).

Steps, each in its own process so peak RSS is measured per step (``ru_maxrss`` of that process):

1. ``medlite demo random --preset tinyllava-1.5b`` (legacy format, fp16) unless ``--ckpt`` exists;
2. ``medlite export --model CKPT --out OUT --precision fp16`` (loads the checkpoint in fp16);
3. optionally (``--smoke``) ONNX Runtime on CPU: open the export and compute first-token logits
   for one image — proof that the full-size graphs load and run.

Writes ``benchmarks/results/export_full_size.json`` (time, peak RSS, file sizes, per-graph seconds,
op counts, TensorRT 8.5 check). Usage::

    .venv/bin/python benchmarks/export_full_size.py --work /tmp/medlite-bench [--precision fp16] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "export_full_size.json"

# Runs in a child: executes `main(argv)` of medlite.cli (or a smoke test) and prints its own peak RSS.
CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
mode, args = sys.argv[1], json.loads(sys.argv[2])
extra = {}
if mode == "cli":
    from medlite.cli import main
    code = main(args)
elif mode == "export":   # exactly `medlite export ARGS`, with the ExportResult as JSON on stdout
    from pathlib import Path
    from medlite.cli import build_parser
    from medlite.context import RunContext
    from medlite.export.commands import cmd_export
    import contextlib
    ns = build_parser().parse_args(args)
    peaks = {}

    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

    class PeakCtx(RunContext):   # current RSS at the start/end of every stage, and the peak so far
        @contextlib.contextmanager
        def stage(self, name):
            start = rss()
            with RunContext.stage(self, name) as info:
                yield info
            peaks[name] = {"rss_start": start, "rss_end": rss(),
                           "peak_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    ctx = PeakCtx(cache_dir=Path(ns.cache_dir), json_mode=True)
    code = cmd_export(ns, ctx)
    extra["peak_rss_after_stage_bytes"] = peaks
else:
    import numpy as np
    from PIL import Image
    from medlite.runtime import OnnxVlm
    t = time.perf_counter()
    vlm = OnnxVlm.open(args[0])
    extra["ort_open_s"] = round(time.perf_counter() - t, 2)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    t = time.perf_counter()
    emb = vlm.image_embeddings(img)
    extra["vision_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    logits = vlm.first_token_logits(img, "Is there a pleural effusion?")
    extra["prefill_s"] = round(time.perf_counter() - t, 2)
    extra["prompt_tokens"] = len(vlm.prompt_ids("Is there a pleural effusion?"))
    extra["image_embeds_shape"] = list(emb.shape)
    extra["logits_finite"] = bool(np.isfinite(logits).all())
    extra["providers"] = vlm.providers
    code = 0
print("@@RESULT@@" + json.dumps({"code": code, "seconds": round(time.perf_counter() - t0, 2),
                                 "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                 **extra}))
"""


def run_child(mode: str, args: list, *, capture_json: bool = False) -> dict:
    """Run one step in a fresh interpreter; return its result line (and its stdout JSON if asked)."""
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, json.dumps(args)], cwd=ROOT, text=True,
                          capture_output=True)
    lines = proc.stdout.splitlines()
    marker = [ln for ln in lines if ln.startswith("@@RESULT@@")]
    if proc.returncode != 0 or not marker:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"step {mode} {args[:3]} failed (exit {proc.returncode})")
    res = json.loads(marker[-1][len("@@RESULT@@"):])
    if capture_json:
        body = "\n".join(ln for ln in lines if not ln.startswith("@@RESULT@@"))
        res["stdout_json"] = json.loads(body)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/medlite-bench", help="folder for the checkpoint and the export")
    ap.add_argument("--ckpt", default=None, help="existing tinyllava-1.5b checkpoint (default: WORK/ckpt)")
    ap.add_argument("--precision", choices=["fp16", "fp32"], default="fp16")
    ap.add_argument("--smoke", action="store_true", help="also load the export in ONNX Runtime and run it once")
    ap.add_argument("--out", default=str(RESULT))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = ["--cache-dir", str(work / "cache")]
    ckpt = Path(a.ckpt) if a.ckpt else work / "ckpt"
    result: dict = {"benchmark": "export_full_size", "precision": a.precision,
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version(),
                                "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                                "loadavg_at_start": list(os.getloadavg())}}
    if not (ckpt / "config.json").is_file():
        result["create_checkpoint"] = run_child("cli", cache + ["demo", "random", "--preset", "tinyllava-1.5b",
                                                                  "--format", "legacy", "--out", str(ckpt)])
    result["checkpoint_bytes"] = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    out = work / f"onnx-{a.precision}"
    t = time.time()
    exp = run_child("export", cache + ["export", "--model", str(ckpt), "--out", str(out),
                                       "--precision", a.precision], capture_json=True)
    er = exp.pop("stdout_json")
    result["export"] = {
        "seconds": exp["seconds"], "peak_rss_bytes": exp["peak_rss_bytes"],
        "rss_by_stage_bytes": exp["peak_rss_after_stage_bytes"],
        "graph_seconds": er["seconds"], "files": {k: v["bytes"] for k, v in er["files"].items()},
        "total_bytes": sum(v["bytes"] for v in er["files"].values()), "opset": er["opset"],
        "trt_ok": er["trt_ok"], "tied_embeddings": er["tied_embeddings"],
        "nodes": {g: sum(ops.values()) for g, ops in er["ops"].items()},
        "int64_tensors": {g: c["int64_tensors"] for g, c in er["trt_check"].items()},
        "fp32_ops": er["fp32_ops"], "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)),
    }
    if a.smoke:
        result["ort_cpu_smoke"] = run_child("smoke", [str(out)])
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
