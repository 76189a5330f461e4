"""Benchmark: train the built-in demo model from scratch, as ``medlite demo model --force`` does.

    .venv/bin/python benchmarks/demo_model_training.py [--cache-dir DIR]

Runs ``medlite --cache-dir DIR demo model --force`` as its own process (peak RSS = that process's
``ru_maxrss``), then reads the model card the build wrote (``medlite_demo.json``: data / training
seconds measured inside the build, the held-out Micro Med-VQA metrics measured through the
written legacy checkpoint) and writes ``benchmarks/results/demo_model_training.json``.
The issue's budget is ≤ 5 minutes of training on 2 CPU cores; run it on an otherwise idle machine
(two torch processes on 2 cores more than double each other's time).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "demo_model_training.json"

_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from medlite.cli import main
rc = main(sys.argv[1:])
print("@@BENCH@@" + json.dumps({"rc": rc, "wall_s": round(time.perf_counter() - t0, 2),
      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}), file=sys.stderr)
sys.exit(rc)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=None, help="medlite cache to build in (default: a temp dir)")
    args = ap.parse_args()
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="medlite-bench-demo-"))
    cmd = [sys.executable, "-c", _CHILD, "--cache-dir", str(cache), "demo", "model", "--force"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    bench = next(json.loads(line[len("@@BENCH@@"):]) for line in proc.stderr.splitlines() if line.startswith("@@BENCH@@"))
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return proc.returncode
    path = Path(proc.stdout.strip().splitlines()[-1])  # the command prints the model folder last
    card = json.loads((path / "medlite_demo.json").read_text())
    metrics = card["heldout"]["metrics"]
    result = {
        "benchmark": "demo_model_training",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "process": {**bench, "total_s": round(time.perf_counter() - t0, 2)},
        "training": card["training"],
        "recipe": card["recipe"],
        "heldout": {"closed_accuracy": metrics["closed_accuracy"], "n": metrics["n"],
                    "by_question_type": {k: v["closed_accuracy"] for k, v in metrics.get("by_question_type", {}).items()},
                    "by_modality": {k: v["closed_accuracy"] for k, v in metrics.get("by_modality", {}).items()}},
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
