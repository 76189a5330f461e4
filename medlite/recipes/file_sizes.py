"""Expected bytes of each exported graph file, for ``medlite plan`` (torch-free, from the model's dimensions).

A graph file is its weights at their stored width plus its structure (node and tensor names, shapes of
every intermediate tensor, attributes). The weights:

* float graphs: every parameter at the export precision;
* INT8 Q/DQ graphs (``vision: int8``, ``llm: w8a8``; traced in fp32): each quantized matrix as int8 plus
  an fp32 scale and an int8 zero point per output channel, each quantized input's scale and zero
  point, other float tensors of at least :data:`FP16_MIN_ELEMENTS` elements as fp16 (the rest fp32),
  as :func:`medlite.compress.int8.qdq_onnx.float_weights_to_fp16` stores them. Layers the sensitivity
  pass keeps in fp16 are chosen during the build, so the plan counts every matrix as int8 and says
  how much the pass can add at most (:func:`fp16_fallback_bytes`);
* W4A16 decoders: each projection as MatMulNBits (:func:`medlite.compress.int4.rules.packed_bytes`).

The structure's bytes were measured on medlite's TorchScript exports (opset 17) of SigLIP + Llama
models with 1-3 layers and two widths: they grow with the number of layers, not with the width (the
random exports of tests/recipes/test_file_sizes.py and the demo artifact check them).
"""
from __future__ import annotations

FP16_MIN_ELEMENTS = 4096           # as medlite.compress.int8.qdq_onnx.FP16_MIN_ELEMENTS
EXTERNAL_THRESHOLD = 1536 * 1024 * 1024   # as medlite.export.files.EXTERNAL_THRESHOLD: weights -> <graph>.onnx.data
EMBED_GRAPH_BYTES = 365            # embed.onnx: one Gather reading embed_tokens.bin (measured 362-369 B)
# Structure per graph and per layer (measured: vision 3.3 kB + 19.2 kB/layer, decoder 9.4 kB + 34.4 kB/layer).
STRUCTURE = {"vision": (3_300, 19_200), "decoder": (9_400, 34_400)}
# Per quantized matrix of a Q/DQ graph: its QuantizeLinear / DequantizeLinear nodes, scale and zero-point
# tensors and their names (measured on the INT8 builds of the tiny random model and the demo model).
QDQ_STRUCTURE = {"vision": 2_000, "decoder": 3_100}
BYTES = {"fp32": 4, "fp16": 2}


def vision_matrices(sizes) -> tuple[list[tuple[int, int]], int]:
    """(in, out) of the vision tower's and projector's quantizable matrices, and their inputs quantized."""
    v, t = sizes.vision or {}, sizes.text or {}
    vh, vi, layers = int(v.get("hidden_size", 0)), int(v.get("intermediate_size", 0)), int(v.get("num_layers", 0))
    h, patch = int(t.get("hidden_size", 0)), int(v.get("patch_size", 0))
    mats = [(vh, vh)] * 4 * layers + [(vh, vi), (vi, vh)] * layers
    mats += [(3 * patch * patch, vh), (vh, h), (h, h)]     # patch-embedding Conv, mlp2x_gelu projector
    return mats, 4 * layers + 3


def decoder_matrices(sizes) -> tuple[list[tuple[int, int]], int]:
    """(in, out) of the language model's projections (attention, MLP) and their inputs quantized."""
    t = sizes.text or {}
    h, inter, layers = int(t.get("hidden_size", 0)), int(t.get("intermediate_size", 0)), int(t.get("num_layers", 0))
    q, kv = int(t.get("num_attention_heads", 0)) * int(t.get("head_dim", 0)), int(t.get("num_kv_heads", 0)) * int(
        t.get("head_dim", 0))
    attn = [(h, q), (h, kv), (h, kv), (q, h)]
    gated = [(h, inter), (h, inter), (inter, h)]
    plain = [(h, inter), (inter, h)]               # Phi: fc1 / fc2, no gate
    per_layer = sizes.params.get("llm", 0) / max(layers, 1)
    mlp = gated if abs(_count(attn + gated) - per_layer) <= abs(_count(attn + plain) - per_layer) else plain
    return (attn + mlp) * layers, 4 * layers


def _count(mats) -> int:
    return sum(k * n for k, n in mats)


def _float_rest(n: int, big: int = 0) -> int:
    """Bytes of ``n`` non-matrix parameters in a Q/DQ graph: the ``big`` ones (one tensor of at least
    FP16_MIN_ELEMENTS, e.g. the position embedding) as fp16, vectors as fp32."""
    big = big if big >= FP16_MIN_ELEMENTS else 0
    return 2 * big + 4 * max(n - big, 0)


def vision_bytes(sizes, precision: str, quant) -> int:
    """``vision.onnx`` (tower + projector) at ``precision``, or as INT8 Q/DQ when ``quant`` is int8."""
    p = sizes.params
    n = p["vision"] + p["projector"]
    layers = int((sizes.vision or {}).get("num_layers", 0))
    base, per_layer = STRUCTURE["vision"]
    structure = base + per_layer * layers
    if quant != "int8":
        return int(n * BYTES[precision] + structure)
    mats, inputs = vision_matrices(sizes)
    v = sizes.vision or {}
    positions = int(v.get("tokens", 0)) * int(v.get("hidden_size", 0))
    weights = _count(mats) + 5 * sum(o for _, o in mats) + 5 * inputs + _float_rest(n - _count(mats), positions)
    return int(weights + structure + QDQ_STRUCTURE["vision"] * len(mats))


def decoder_bytes(sizes, precision: str, llm, lm_head, *, group_size: int = 128) -> int:
    """``decoder.onnx`` (language model + head): float, W8A8 Q/DQ or W4A16 MatMulNBits."""
    p = sizes.params
    layers = int((sizes.text or {}).get("num_layers", 0))
    base, per_layer = STRUCTURE["decoder"]
    structure = base + per_layer * layers
    if llm not in ("w8a8", "w4a16"):
        return int(p["llm"] * BYTES[precision] + p["lm_head"] * BYTES.get(lm_head, BYTES[precision]) + structure)
    mats, inputs = decoder_matrices(sizes)
    rest = p["llm"] - _count(mats)
    h, head_params = int((sizes.text or {}).get("hidden_size", 0)), p["lm_head"]   # 0 when tied to the table
    if llm == "w4a16":
        from medlite.compress.int4.rules import packed_bytes

        fl = BYTES.get(precision, 4)
        head = packed_bytes(h, head_params // max(h, 1), group_size) if lm_head == "int4" and h else head_params * fl
        return int(sum(packed_bytes(k, n, group_size) for k, n in mats) + rest * fl + head + structure)
    head_mats = [(h, head_params // max(h, 1))] if lm_head == "int8" and h and head_params else []
    head = 0 if head_mats else _float_rest(head_params, head_params)
    q = mats + head_mats
    weights = _count(q) + 5 * sum(o for _, o in q) + 5 * (inputs + len(head_mats)) + _float_rest(rest) + head
    return int(weights + structure + QDQ_STRUCTURE["decoder"] * len(q))


def fp16_fallback_bytes(sizes, graph: str, layers: int) -> int:
    """Bytes the INT8 sensitivity pass can add to a Q/DQ graph: its ``layers`` largest matrices kept fp16
    (2 bytes per weight instead of 1, without their scales and Q/DQ nodes) — the plan's upper bound."""
    mats, _ = vision_matrices(sizes) if graph == "vision" else decoder_matrices(sizes)
    largest = sorted(mats, key=lambda m: m[0] * m[1], reverse=True)[:max(int(layers), 0)]
    return int(sum(max(k * n - 5 * n - QDQ_STRUCTURE[graph], 0) for k, n in largest))


def graph_files(name: str, total: int) -> dict[str, int]:
    """``{<name>.onnx: bytes}``, or the graph and its ``.onnx.data`` when the weights go to external data."""
    if total <= EXTERNAL_THRESHOLD:
        return {f"{name}.onnx": int(total)}
    base, per_layer = STRUCTURE["decoder" if name == "decoder" else "vision"]
    graph = base + per_layer                         # structure stays in the .onnx file (order of magnitude)
    return {f"{name}.onnx": graph, f"{name}.onnx.data": int(total - graph)}


__all__ = ["EMBED_GRAPH_BYTES", "EXTERNAL_THRESHOLD", "FP16_MIN_ELEMENTS", "QDQ_STRUCTURE", "STRUCTURE",
           "decoder_bytes", "decoder_matrices", "fp16_fallback_bytes", "graph_files", "vision_bytes",
           "vision_matrices"]
