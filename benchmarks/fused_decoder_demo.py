"""Benchmark: decode speed of the demo model's cpu-int4 artifact, fused ONNX Runtime decoder vs the traced
(plain) one (issue 31). Both come from ``medlite build`` of the shipped recipe; the plain one with the
override ``export.decoder_graph=plain`` (everything else identical: same GPTQ weights, same graphs besides
the decoder). Then ``--rounds`` interleaved rounds of

    medlite bench --model ARTIFACT --ignore-eos --max-new-tokens 64 --runs 5 --warmup 1 --json --no-write

per artifact (``--threads N`` sets ``MEDLITE_ORT_THREADS``), the load average recorded before each run.

    nice .venv/bin/python benchmarks/fused_decoder_demo.py --work /tmp/medlite-fused-demo --rounds 3

Writes ``benchmarks/results/fused_decoder_demo.json`` (merged under ``--key``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "fused_decoder_demo.json"
FIELDS = ("decode_tokens_per_s", "ttft_ms", "prefill_ms", "image_encode_ms", "peak_rss_bytes", "threads")


def _json(argv: list, env=None) -> dict:
    p = subprocess.run([sys.executable, "-m", "medlite.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                       env=env)
    if p.returncode:
        raise SystemExit(f"medlite {' '.join(argv)} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout[p.stdout.index("{"):])     # build --json prints an indented object


def build(work: Path) -> dict:
    """Artifact folders of the shipped cpu-int4 recipe, fused (as shipped) and plain (override)."""
    out = {}
    for form, extra in (("fused", []), ("plain", ["export.decoder_graph=plain"])):
        res = _json(["build", "cpu-int4", *extra, "--out", str(work / form), "--json", "--quiet"])
        out[form] = res["artifact"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/medlite-fused-demo"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="MEDLITE_ORT_THREADS (0: physical cores)")
    ap.add_argument("--key", default=None)
    a = ap.parse_args()
    arts = build(a.work)
    env = dict(os.environ, **({"MEDLITE_ORT_THREADS": str(a.threads)} if a.threads else {}))
    runs: dict = {"plain": [], "fused": []}
    for _ in range(a.rounds):
        for form in ("plain", "fused"):
            load = list(os.getloadavg())
            b = _json(["bench", "--model", arts[form], "--ignore-eos", "--max-new-tokens", "64", "--runs", "5",
                       "--warmup", "1", "--json", "--no-write"], env=env)
            runs[form].append(dict({k: b.get(k) for k in FIELDS}, loadavg_before=load))
    med = {f: statistics.median(r["decode_tokens_per_s"] for r in rs) for f, rs in runs.items()}
    key = a.key or f"threads_{a.threads or 'cores'}"
    res = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    res[key] = {"artifacts": arts, "rounds": runs, "median_decode_tokens_per_s": med,
                "fused_vs_plain": round(med["fused"] / med["plain"], 2),
                "command": "benchmarks/fused_decoder_demo.py " + " ".join(sys.argv[1:]),
                "note": "2 cores shared with other sessions: a busy machine (load averages per run)"}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    print(json.dumps(res[key], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
