"""Benchmark: the shipped demo sweep (``recipes/sweeps/demo-precision.yaml``) on the demo model, this machine.

Wall time of ``medlite sweep`` with

* ``--jobs 1`` and the stage-output cache disabled (``MEDLITE_STAGE_CACHE_GB=0``: every variant prunes
  and distils itself) — the baseline for the prefix cache;
* ``--jobs 1`` (the variants that share the 25 % prune + distill prefix reuse it);
* ``--jobs 2`` (two processes, one thread each);
* ``--executor ray --threads 1`` (a local Ray instance started by ``medlite sweep``, start-up included);

each from a cold cache folder of its own (the demo model linked in, so it is not retrained; the
references and stage outputs start empty) and a new ``--out``. Also per variant: build seconds and
the stage it resumed after (from the stage-output cache). Writes ``benchmarks/results/sweep_demo.json``.
Usage::

    nice .venv/bin/python benchmarks/sweep_demo.py [--runs jobs1-nocache,jobs1,jobs2,ray] [--model CKPT]

CPU heavy (four sweeps of four builds); on a shared machine say how busy it was when quoting it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "sweep_demo.json"
SWEEP = ROOT / "recipes" / "sweeps" / "demo-precision.yaml"
RUNS = {"jobs1-nocache": (["--jobs", "1"], {"MEDLITE_STAGE_CACHE_GB": "0"}),
        "jobs1": (["--jobs", "1"], {}),
        "jobs2": (["--jobs", "2"], {}),
        "ray": (["--executor", "ray", "--threads", "1"], {})}


def demo_model_folder() -> Path:
    """The cached demo model (trained once by ``medlite demo model``)."""
    out = subprocess.run([sys.executable, "-m", "medlite.cli", "demo", "model", "--quiet"], capture_output=True,
                         text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def one_run(name: str, demo: Path, work: Path, model: bool = False) -> dict:
    """One sweep from a cold cache; ``model``: pass ``demo`` as ``--model`` (a checkpoint folder) instead of
    linking it into the cache as the built-in demo model."""
    extra, env = RUNS[name]
    cache, out = work / f"cache-{name}", work / f"out-{name}"
    (cache / "demo-model").mkdir(parents=True)
    if model:
        extra = [*extra, "--model", str(demo)]
    else:
        (cache / "demo-model" / demo.name).symlink_to(demo)   # the demo model, not its references or stages
    cmd = [sys.executable, "-m", "medlite.cli", "sweep", str(SWEEP), "--out", str(out), "--cache-dir", str(cache),
           "--quiet", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    res = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    variants = []
    for row in res.get("rows", []):
        resumed = None
        if row.get("artifact"):
            info = json.loads((Path(row["artifact"]) / "build-info.json").read_text())
            resumed = info.get("timings", {}).get("resumed_after_stage")
        variants.append({"variant": row["variant"], "status": row["status"], "build_seconds": row["build_seconds"],
                         "resumed_after_stage": resumed, "closed_acc": row.get("closed_acc")})
    return {"run": name, "command": " ".join(cmd[2:]), "env": env, "exit": proc.returncode,
            "wall_seconds": round(wall, 1), "variants": variants, "stderr_tail": proc.stderr[-2000:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    ap.add_argument("--model", default=None, metavar="PATH",
                    help="a checkpoint folder to sweep instead of the built-in demo model (e.g. a cached demo model "
                         "folder while the current one is being retrained)")
    args = ap.parse_args()
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        sys.exit(f"unknown run(s) {unknown}; choose from {list(RUNS)}")
    demo = Path(args.model).resolve() if args.model else demo_model_folder()
    results = []
    with tempfile.TemporaryDirectory(prefix="medlite-sweep-bench-") as tmp:
        for name in names:
            r = one_run(name, demo, Path(tmp), model=bool(args.model))
            print(f"{name:<14} {r['wall_seconds']:8.1f} s  exit {r['exit']}", flush=True)
            r["load_average_after"] = os.getloadavg()     # a busy machine makes the runs incomparable
            results.append(r)
            summary = _write(results)                     # after every run: an interrupted benchmark keeps its runs
    print(json.dumps(summary, indent=2))


def _write(results: list[dict]) -> dict:
    walls = {r["run"]: r["wall_seconds"] for r in results}
    summary = {"cores": os.cpu_count(), "wall_seconds": walls}
    if "jobs1" in walls and "jobs1-nocache" in walls:
        summary["prefix_cache_saved_seconds"] = round(walls["jobs1-nocache"] - walls["jobs1"], 1)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({"summary": summary, "runs": results}, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
