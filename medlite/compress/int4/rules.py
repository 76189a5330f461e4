"""Validation rules and the plan of ``quantize: {llm: w4a16}`` (torch-free: the validator imports this).

Registry wiring (lead): the quantize stage's rules call :func:`rules` for its W4A16 part, its plan
calls :func:`plan`.
"""
from __future__ import annotations

INT4_RUNTIME_REASON = (
    "INT4 weight-only MatMulNBits (com.microsoft) runs only on ONNX Runtime — MLAS kernels on CPU, or the "
    "CUDA EP on a Jetson with onnxruntime >= 1.17 built for sm_72; TensorRT 8.5 (the last TensorRT for "
    "Xavier) has no INT4")


def _int4_asked(opts) -> bool:
    return getattr(opts, "llm", None) == "w4a16" or getattr(opts, "lm_head", None) == "int4"


def _act_order_asked(opts) -> bool:
    """``act_order: true`` written in the recipe (its default is true, and only GPTQ reads it)."""
    explicit = "act_order" in getattr(opts, "model_fields_set", {"act_order"})
    return explicit and bool(getattr(opts, "act_order", False))


def rules(index: int, opts, view):
    """``(errors, warnings)`` for the W4A16 options of the quantize stage at ``stages[index]``.

    * a TensorRT engine asked to hold INT4 (``engines: {precision: int4}``) is an error — TensorRT 8.5
      has no INT4; the INT4 decoder is an ONNX Runtime component of the bundle;
    * ``act_order: true`` written with awq/rtn is an error (a GPTQ option; its default, true, is
      ignored by them); ``algorithm``/``act_order`` without ``llm: w4a16`` do nothing (warning);
    * awq with ``symmetric: true`` is a warning (measured worse than asymmetric, see the docs);
    * awq with a quantized lm_head is a warning (lm_head is round-to-nearest: AWQ cannot reach it);
    * ``lm_head: int8`` with w4a16 is a warning (MatMulNBits bits=8 is slow on ONNX Runtime's CPU kernel);
    * a target whose runtimes cannot run INT4 is an error.
    """
    errors: list = []
    warnings: list = []
    loc = ("stages", index, "quantize")
    if not _int4_asked(opts):
        if _act_order_asked(opts) or getattr(opts, "algorithm", "gptq") != "gptq" or \
                getattr(opts, "int4_compute", "fp32") != "fp32":
            warnings.append(f"stages[{index}].quantize: algorithm/act_order/int4_compute apply to llm: w4a16 only; "
                            "ignored")
        return errors, warnings
    if _act_order_asked(opts) and opts.algorithm != "gptq":
        errors.append((loc + ("act_order",), f"act_order is a GPTQ option; algorithm is {opts.algorithm}"))
    if opts.algorithm == "awq" and opts.symmetric:
        warnings.append(f"stages[{index}].quantize: awq with symmetric: true — compressed-tensors' symmetric int4 "
                        "grid clips each group's largest weight and AWQ only rescales channels (demo model g32: "
                        "agreement 98.1 % symmetric vs 99.4 % asymmetric); AWQ's usual form is symmetric: false "
                        "(docs/quantization-int4.md)")
    if opts.algorithm == "awq" and getattr(opts, "lm_head", None) in ("int4", "int8"):
        warnings.append(f"stages[{index}].quantize.lm_head: {opts.lm_head} with awq is round-to-nearest — AWQ has "
                        "no mapping into lm_head (llm-compressor 0.14 switches lm_head off while it calibrates), "
                        "so only the decoder layers get AWQ's scales; gptq quantizes lm_head with GPTQ "
                        "(docs/quantization-int4.md)")
    if getattr(opts, "llm", None) == "w4a16" and getattr(opts, "lm_head", None) == "int8":
        warnings.append(f"stages[{index}].quantize.lm_head: int8 is MatMulNBits bits=8, which onnxruntime's CPU "
                        "kernel runs on a slow path (measured ~23x slower than bits=4 for the full-size lm_head, "
                        "benchmarks/matmulnbits_kernels.py): it saves bytes, not decode time — for CPU speed use "
                        "lm_head: int4 (docs/quantization-int4.md)")
    eng = view.by_name.get("engines")
    if eng and eng[1] is not None and getattr(eng[1], "precision", None) == "int4":
        errors.append((("stages", eng[0], "engines", "precision"),
                       f"TensorRT cannot build INT4 engines: {INT4_RUNTIME_REASON}. Keep the engines stage at "
                       "fp16/int8 for the vision graph; the INT4 decoder ships as an ONNX Runtime component"))
    t = view.target
    if t is not None and "int4" not in tuple(getattr(t, "ort_precisions", ())):
        errors.append((loc + ("llm",), f"{t.name} lists no ONNX Runtime INT4 support: {INT4_RUNTIME_REASON}"))
    elif t is not None and getattr(t, "trt_precisions", ()):
        warnings.append(f"stages[{index}].quantize.llm: w4a16 on {t.name} — the decoder is an ONNX Runtime "
                        f"component, never a TensorRT engine: {INT4_RUNTIME_REASON}")
    return errors, warnings


def packed_bytes(k: int, n: int, group_size: int, bits: int = 4, scale_bytes: int = 4) -> int:
    """Bytes of one ``[n, k]`` Linear as MatMulNBits: packed integers + scales + packed zero points."""
    blocks = -(-k // group_size)
    return n * blocks * (group_size * bits // 8) + n * blocks * scale_bytes + n * (-(-blocks * bits // 8))


def plan(index: int, opts, sizes) -> list:
    """What the W4A16 part will do and the bytes it expects (from the model's text dimensions)."""
    if not _int4_asked(opts):
        return []
    t = getattr(sizes, "text", {}) or {}
    h, inter = int(t.get("hidden_size", 0)), int(t.get("intermediate_size", 0))
    heads, kvh = int(t.get("num_attention_heads", 1) or 1), int(t.get("num_kv_heads", 0) or 0)
    hd = int(t.get("head_dim", 0) or (h // heads if heads else 0))
    layers = int(t.get("num_layers", 0))
    if not (h and inter and layers):
        return [f"llm w4a16 {opts.algorithm} g{opts.group_size}: MatMulNBits (ONNX Runtime only)"]
    shapes = [(h, heads * hd), (h, kvh * hd), (h, kvh * hd), (heads * hd, h), (h, inter), (h, inter), (inter, h)]
    fp16 = layers * sum(2 * k * n for k, n in shapes)
    int4 = layers * sum(packed_bytes(k, n, opts.group_size) for k, n in shapes)
    return [f"llm w4a16 {opts.algorithm} g{opts.group_size}: {layers * len(shapes)} Linear → MatMulNBits, "
            f"{fp16 / 1e6:.1f} MB fp16 → {int4 / 1e6:.1f} MB (ONNX Runtime only)"]


__all__ = ["INT4_RUNTIME_REASON", "packed_bytes", "plan", "rules"]
