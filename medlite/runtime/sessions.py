"""ONNX Runtime sessions, and a check of the execution providers actually in use.

``onnxruntime-gpu`` on a host without the CUDA libraries logs a load failure and silently runs
everything on the CPU. :func:`open_session` compares ``session.get_providers()`` with what was asked
for and reports every provider that is not in use.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from medlite.errors import DataError

Provider = Union[str, tuple]


def _name(p: Provider) -> str:
    return p[0] if isinstance(p, tuple) else str(p)


def default_providers() -> list[str]:
    """CUDA then CPU when this onnxruntime build offers CUDA, else CPU (TensorRT EP is never implied)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def report(msg: str, ctx=None, sink: Optional[list] = None) -> None:
    """A loud warning through ``ctx.warn`` (or stderr when there is no run context)."""
    if sink is not None:
        sink.append(msg)
    if ctx is not None:
        ctx.warn(msg)
    else:
        print(f"WARNING: {msg}", file=sys.stderr)


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads excluded, CPU affinity respected).

    MLAS's GEMM/GEMV kernels saturate a core's vector units; a second hyper-thread on the same core
    adds contention, not throughput, so ONNX Runtime's intra-op pool is sized to physical cores.
    """
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not Linux
        allowed = os.cpu_count() or 1
    try:
        import psutil

        phys = psutil.cpu_count(logical=False) or allowed
        logical = psutil.cpu_count(logical=True) or allowed
        per_core = max(1, logical // phys)
    except ImportError:  # psutil is optional: assume no SMT
        per_core = 1
    return max(1, allowed // per_core)


# ORT's level-2 (EXTENDED/ALL) CPU transformers rewrite DequantizeLinear → MatMul into its own integer
# kernels that quantize the activations dynamically: measured on a tiny decoder with one fake-quantized
# Linear, the logits moved by 2e-2 (ALL or EXTENDED) vs 1.6e-4 (BASIC) from the PyTorch fake-quant
# forward. TensorRT computes what the Q/DQ nodes say, so graphs carrying a quantization record run
# at BASIC: the gates measure the graph that ships, exactly (tests/pipeline/test_export_plan.py).
OPTIMIZATION_LEVELS = ("basic", "extended", "all")


def session_options(intra_op_threads: Optional[int] = None, optimization: str = "all"):
    """ONNX Runtime session options tuned for CPU inference (docs/cpu.md).

    * intra-op threads = physical cores (``$MEDLITE_ORT_THREADS`` overrides), one inter-op thread and
      sequential execution: the graphs are chains, parallelism lives inside each MatMul;
    * graph optimisation level ``ORT_ENABLE_ALL`` (constant folding, MatMul/Add/GELU/attention fusions,
      and the layout transforms MLAS's NCHWc kernels use), stated explicitly rather than relied upon;
      ``optimization="basic"`` for Q/DQ graphs (see :data:`OPTIMIZATION_LEVELS`' comment);
    * the memory-pattern planner on (buffers reused across runs of the same shape).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # ORT's own fallback messages are replaced by the report in open_session
    env = os.environ.get("MEDLITE_ORT_THREADS")
    threads = intra_op_threads or (int(env) if env and env.isdigit() and int(env) > 0 else physical_cores())
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    level = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}[optimization]
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    opts.enable_mem_pattern = True
    return opts


def _fused_hint(message: str) -> str:
    """What to do when an older onnxruntime rejects the fused decoder's contrib operators (docs/cpu.md)."""
    if not any(op in message for op in ("GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization")):
        return ""
    import onnxruntime as ort

    return (f" — this is the fused ONNX Runtime decoder (export.decoder_graph: fused), whose contrib operators "
            f"this onnxruntime {ort.__version__} does not take: upgrade onnxruntime, or rebuild with "
            "export.decoder_graph=plain")


def open_session(path: Path, providers: Optional[Sequence[Provider]] = None, *, ctx=None,
                 warnings: Optional[list] = None, intra_op_threads: Optional[int] = None,
                 optimization: str = "all"):
    """An ``InferenceSession`` for ``path``; returns ``(session, providers actually in use)``.

    Every requested provider that ONNX Runtime did not take is reported loudly (CPU fallback
    changes speed, and for fp16 graphs also numerics: the CPU runs many fp16 ops in fp32).
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: graph file not found")
    requested = list(providers) if providers else default_providers()
    opts = session_options(intra_op_threads, optimization)
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=requested)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        raise DataError(f"{path}: ONNX Runtime could not load the graph: {e}{_fused_hint(str(e))}") from e
    actual = list(sess.get_providers())
    missing = [_name(p) for p in requested if _name(p) not in actual]
    if missing:
        report(f"{path.name}: requested execution provider(s) {', '.join(missing)} are NOT in use; ONNX Runtime "
               f"runs it on {', '.join(actual)} (e.g. onnxruntime-gpu without CUDA/cuDNN libraries falls back "
               "to CPU silently)", ctx, warnings)
    return sess, actual
