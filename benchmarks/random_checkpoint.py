"""Scale benchmark: write the full-size random TinyLLaVA-1.5B checkpoint, inspect it, load it.

    .venv/bin/python benchmarks/random_checkpoint.py [--format legacy] [--workdir DIR] [--no-load]

Each step runs as its own ``medlite`` process (so peak RSS is per step: ``ru_maxrss`` of that
process) and the results go to ``benchmarks/results/random_checkpoint.json``. ``inspect`` must
report ≈1.1 B language-model (incl. embeddings) and ≈0.4 B vision parameters.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "random_checkpoint.json"

# run inside the child: execute one medlite command, then report wall time and own peak RSS
_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from medlite.cli import main
rc = main(sys.argv[1:])
wall = time.perf_counter() - t0
print("@@BENCH@@" + json.dumps({"rc": rc, "wall_s": round(wall, 2),
      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}), file=sys.stderr)
sys.exit(rc)
"""

_LOAD = """
import json, resource, sys, time
t0 = time.perf_counter()
from medlite.checkpoints import load_model
from medlite.context import RunContext
m = load_model(sys.argv[1], ctx=RunContext(quiet=True))
b = m.param_breakdown()
print("@@BENCH@@" + json.dumps({"rc": 0, "wall_s": round(time.perf_counter() - t0, 2),
      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      "params": b["total"]["params"], "dtype": str(next(m.model.parameters()).dtype)}), file=sys.stderr)
"""


def _run(code: str, argv: list[str]) -> tuple[dict, str]:
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT)
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("@@BENCH@@")]
    if p.returncode != 0 or not line:
        raise SystemExit(f"step {argv} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(line[-1][len("@@BENCH@@"):]), p.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="legacy", choices=["legacy", "factory", "hf"])
    ap.add_argument("--workdir", default=None, help="where the ~3 GB checkpoint goes (default: a temp dir, removed)")
    ap.add_argument("--no-load", action="store_true", help="skip the full fp32 load step")
    ap.add_argument("--out", default=str(RESULT))
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="medlite-bench-"))
    ckpt = work / "tinyllava-1.5b"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    try:
        steps = {}
        steps["demo_random"], _ = _run(_CHILD, ["--quiet", "demo", "random", "--preset", "tinyllava-1.5b",
                                                "--format", a.format, "--out", str(ckpt)])
        files = {f.name: f.stat().st_size for f in sorted(ckpt.iterdir()) if f.is_file()}
        steps["inspect"], out = _run(_CHILD, ["--quiet", "inspect", str(ckpt), "--json"])
        rep = json.loads(out)
        if not a.no_load:
            steps["load_fp32"], _ = _run(_LOAD, [str(ckpt)])
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    p = rep["params"]
    llm_total = p["llm"]["params"] + p["embeddings"]["params"]
    vision = p["vision_tower"]["params"]
    checks = {"llm_incl_embeddings_about_1.1B": 1.05e9 <= llm_total <= 1.15e9,
              "vision_about_0.4B": 0.38e9 <= vision <= 0.44e9,
              "image_tokens_729": rep["num_image_tokens"] == 729}
    import torch
    import transformers

    result = {
        "benchmark": "random_checkpoint", "preset": "tinyllava-1.5b", "format": a.format,
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "steps": steps, "checkpoint_files": files, "checkpoint_bytes": sum(files.values()),
        "inspect": {"format": rep["format"], "text_backbone": rep["text_backbone"], "source_dtype": rep["source_dtype"],
                    "num_image_tokens": rep["num_image_tokens"], "params": p,
                    "llm_incl_embeddings_params": llm_total, "architecture": rep["architecture"]},
        "checks": checks,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"steps": steps, "checks": checks, "llm": llm_total, "vision": vision}, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
