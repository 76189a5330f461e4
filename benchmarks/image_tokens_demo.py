"""Benchmark: image-token counts and pooling methods on the demo model, judged on the calibration set's held-out
slice (train-split images never trained on; never the evaluation split).

Reads the artifacts of the shipped sweep ``recipes/sweeps/demo-tokens.yaml`` (count 16 / 9 / 4 × method avg /
salient, each distilled from the source with all 49 tokens) and writes, per variant, the tokens stage's held-out
agreement *before* distillation (32 pairs), the distill stage's held-out KL / agreement / closed accuracy before
and after (64 pairs), and — for reference only, never for choosing — the check stage's test-split figures::

    medlite sweep recipes/sweeps/demo-tokens.yaml --out /tmp/sweep-tokens
    .venv/bin/python benchmarks/image_tokens_demo.py --sweep /tmp/sweep-tokens

Writes ``benchmarks/results/image_tokens_demo.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "image_tokens_demo.json"


def rows(sweep: Path) -> list[dict]:
    out = []
    for m in sorted(sweep.glob("artifacts/*/*/*/manifest.json")):
        d = json.loads(m.read_text())
        s = d["sections"]
        t, di = s["tokens"], s["distill"]
        out.append({"count": t["options"]["count"], "method": t["options"]["method"],
                    "kernel": t["kernel"], "pad": t["pad"],
                    "heldout_before_distill": t["heldout"],
                    "distill_heldout_kl": di["heldout_kl"], "distill_heldout_before": di["heldout_before"],
                    "distill_heldout_after": di["heldout_after"], "distill_steps_run": di["steps_run"],
                    "test_split_reference_only": {k: d["metrics"].get(k) for k in
                                                  ("agreement", "closed_acc_drop", "mean_kl")},
                    "status": d["status"], "artifact": str(m.parent.relative_to(sweep))})
    return sorted(out, key=lambda r: (-r["count"], r["method"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", type=Path, required=True, help="the --out folder of the demo-tokens sweep")
    a = ap.parse_args()
    res = {"benchmark": "image_tokens_demo", "sweep": "recipes/sweeps/demo-tokens.yaml",
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "loadavg": list(os.getloadavg()),
           "variants": rows(a.sweep)}
    RESULT.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    print(RESULT.read_text(), end="")


if __name__ == "__main__":
    main()
