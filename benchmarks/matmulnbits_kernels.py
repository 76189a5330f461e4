"""Benchmark: onnxruntime's CPU MatMulNBits kernel, one decode step (M = 1), per bits and accuracy level.

Why: on the full-size INT4 export the decode was slower than fp32 (benchmarks/int4_full_size.py) —
the 8-bit lm_head (32000 x 2048) took a slow path. This isolates one MatMulNBits node of the
full-size shapes (lm_head 2048 -> 32000, MLP up 2048 -> 5632) with random packed weights, block 128,
uint8 zero points, on the CPU execution provider with 2 intra-op threads; median of ``--runs`` calls.

    nice .venv/bin/python benchmarks/matmulnbits_kernels.py

accuracy_level: unset (0, what medlite writes), 1 (fp32 compute), 4 (int8 compute: the activation
is quantized per block, which changes numerics — medlite does not use it).
Writes ``benchmarks/results/matmulnbits_kernels.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

RESULT = Path(__file__).resolve().parent / "results" / "matmulnbits_kernels.json"
SHAPES = {"lm_head": (2048, 32000), "mlp_up": (2048, 5632)}


def _session(k: int, n: int, bits: int, block: int, accuracy_level):
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    blocks = -(-k // block)
    b = rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8)
    s = (rng.random(n * blocks, dtype=np.float32) * 0.01).astype(np.float32)
    z = np.full(n * -(-blocks * bits // 8), 0x88 if bits == 4 else 0x80, dtype=np.uint8)
    kw = dict(K=k, N=n, bits=bits, block_size=block, domain="com.microsoft")
    if accuracy_level is not None:
        kw["accuracy_level"] = accuracy_level
    node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], **kw)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
                          [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "S"),
                           numpy_helper.from_array(z, "Z")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def time_ms(k: int, n: int, bits: int, accuracy_level, runs: int, block: int = 128) -> float:
    """Median milliseconds of one ``[1, k] x [k, n]`` MatMulNBits call."""
    import numpy as np

    sess = _session(k, n, bits, block, accuracy_level)
    a = np.random.default_rng(1).standard_normal((1, k), dtype=np.float32)
    sess.run(None, {"A": a})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {"A": a})
        times.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(times), 2)


def main(argv=None) -> int:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=9)
    a = ap.parse_args(argv)
    out = {"onnxruntime": ort.__version__, "loadavg_before": os.getloadavg(), "block_size": 128, "ms": {}}
    for name, (k, n) in SHAPES.items():
        for bits in (4, 8):
            for acc in (None, 1, 4):
                out["ms"][f"{name} bits{bits} accuracy_level={acc if acc is not None else 'unset'}"] = \
                    time_ms(k, n, bits, acc, a.runs)
    out["loadavg_after"] = os.getloadavg()
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
