"""Benchmark: this machine's dense fp32 (and bf16) matrix-multiply throughput with torch.

Why: the full-size INT8 / INT4 builds are compute-bound (every calibration pair runs ~2.3 TFLOP
through the VLM: SigLIP 2·0.4 B·729 tokens + decoder 2·1.1 B·~800 tokens), so this figure bounds
how many calibration pairs a build can take in a given time on this CPU.

    nice .venv/bin/python benchmarks/cpu_gemm.py

Writes ``benchmarks/results/cpu_gemm.json``: best-of-``--repeats`` GFLOP/s for a decoder-shaped
GEMM ([tokens, 2048] @ [2048, 5632], the MLP's up projection), per dtype and thread count, with the
load average before and after (the machine is shared: the best run is the least disturbed).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

RESULT = Path(__file__).resolve().parent / "results" / "cpu_gemm.json"
PAIR_TFLOP = 2 * 0.4e9 * 729 / 1e12 + 2 * 1.1e9 * 800 / 1e12   # one calibration pair through the VLM


def gflops(dtype, threads: int, m: int = 1024, k: int = 2048, n: int = 5632, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of ``[m,k] @ [k,n]``."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    out = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
           "loadavg_before": os.getloadavg(), "gflops": {}}
    flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n")[0] if Path("/proc/cpuinfo").is_file() else ""
    out["simd"] = sorted({f for f in flags.split() if f.startswith(("avx", "amx", "fma"))})
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for th in (1, os.cpu_count() or 1):
            # bf16 without AVX-512 BF16 / AMX is emulated and ~200x slower: one repeat at a smaller size
            kw = {"repeats": a.repeats} if name == "fp32" else {"repeats": 1, "m": 128}
            out["gflops"][f"{name}_threads{th}"] = round(gflops(dt, th, **kw), 1)
    out["loadavg_after"] = os.getloadavg()
    best = out["gflops"][f"fp32_threads{os.cpu_count() or 1}"]
    out["calibration_pair_tflop"] = round(PAIR_TFLOP, 2)
    out["seconds_per_pair_at_best_fp32"] = round(PAIR_TFLOP * 1e12 / (best * 1e9), 1)
    out["minutes_for_128_pairs_one_pass"] = round(128 * out["seconds_per_pair_at_best_fp32"] / 60, 1)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
