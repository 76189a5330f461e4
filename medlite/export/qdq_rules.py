"""TensorRT 8.5's rules for explicit quantization, checked on every QuantizeLinear/DequantizeLinear node.

TensorRT 8.5 (the last TensorRT for Xavier) builds INT8 kernels from an ONNX graph's Q/DQ nodes
only when they follow its explicit-quantization rules (TensorRT 8.5 developer guide, "Working with
INT8 → Explicit quantization"; onnx-tensorrt 8.5-GA ``docs/operators.md``):

* INT8 only: the quantized type (the zero point's type, the DequantizeLinear input) is INT8 —
  no UINT8, no INT4 (INT4 weight-only runs through ONNX Runtime's ``MatMulNBits`` only), no FP8;
* symmetric: the zero point is a constant 0 (and present: without one, ONNX means UINT8);
* scales are constant (an initializer or ``Constant``) FP32 values; a scale computed in the graph
  (dynamic per-token quantization) cannot be built;
* per-tensor scales on activations; per-channel scales only on constant weights, along the output
  channel: axis 0 of a ``Conv`` weight ``[O, I, kh, kw]``, axis 1 of a ``ConvTranspose`` weight,
  the last axis of a ``MatMul`` weight ``[K, N]``, and for ``Gemm`` axis 0 with ``transB=1`` else 1;
* no blocked quantization (``block_size``, opset 21) and opset ≤ 17.

:func:`qdq_issues` returns one :class:`QdqIssue` per broken rule, naming the node.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from medlite.opset import DEFAULT_DOMAINS, model_opset_problem

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_TYPE_NAMES = {TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8", TensorProto.FLOAT: "FP32",
               TensorProto.FLOAT16: "FP16", TensorProto.INT32: "INT32", TensorProto.INT16: "INT16",
               TensorProto.UINT16: "UINT16", TensorProto.BFLOAT16: "BF16"}
for _n in ("INT4", "UINT4", "FLOAT8E4M3FN", "FLOAT8E5M2", "FLOAT8E4M3FNUZ", "FLOAT8E5M2FNUZ"):
    if hasattr(TensorProto, _n):
        _TYPE_NAMES[getattr(TensorProto, _n)] = _n


@dataclass
class QdqIssue:
    """One broken rule: ``rule`` is int8 | symmetric | dynamic-scale | per-channel-activation |
    per-channel-axis | scale-type | opset | blocked."""

    rule: str
    op: str
    node: str
    detail: str


def _tname(t: Optional[int]) -> str:
    return _TYPE_NAMES.get(t, str(t)) if t is not None else "unknown"


class _Consts:
    """Constant tensors of a graph (initializers and Constant nodes), their producers and consumers."""

    def __init__(self, graph: onnx.GraphProto):
        self.tensors: dict[str, TensorProto] = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.tensors[node.output[0]] = node.attribute[0].t
            for o in node.output:
                self.producer[o] = node
            for i, name in enumerate(node.input):
                self.consumers.setdefault(name, []).append((node, i))

    def is_const(self, name: str) -> bool:
        return name in self.tensors

    def dtype(self, name: str) -> Optional[int]:
        t = self.tensors.get(name)
        return t.data_type if t is not None else None

    def shape(self, name: str) -> Optional[list]:
        t = self.tensors.get(name)
        return list(t.dims) if t is not None else None

    def value(self, name: str) -> Optional[np.ndarray]:
        t = self.tensors.get(name)
        if t is None or t.data_location == TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(t)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _weight_axis(consumer: onnx.NodeProto, index: int, rank: int) -> Optional[int]:
    """The per-channel axis TensorRT 8.5 expects for a weight read as ``consumer.input[index]``."""
    op = consumer.op_type
    if op == "Conv" and index == 1:
        return 0
    if op == "ConvTranspose" and index == 1:
        return 1
    if op == "MatMul" and index == 1:
        return rank - 1
    if op == "Gemm" and index == 1:
        return 0 if _attr(consumer, "transB", 0) else 1
    return None


def _per_channel(node, c: _Consts, scale_shape: list) -> list[str]:
    """Problems of a per-channel (non-scalar) scale: must sit on a constant weight, along the right axis."""
    x = node.input[0]
    rank_shape = c.shape(x)
    if not c.is_const(x):
        return ["per-channel-activation",
                f"scale {node.input[1]!r} has {int(np.prod(scale_shape))} values on activation {x!r}: "
                "TensorRT 8.5 takes per-tensor (scalar) scales on activations"]
    rank = len(rank_shape)
    axis = int(_attr(node, "axis", 1))
    axis = axis + rank if axis < 0 else axis
    if len(scale_shape) != 1 or axis >= rank or rank_shape[axis] != scale_shape[0]:
        return ["per-channel-axis", f"scale shape {scale_shape} does not match weight {x!r} {rank_shape} along axis {axis}"]
    # The DQ of a weight feeds the op directly; a Q of a float weight feeds its DQ.
    out = node.output[0]
    readers = c.consumers.get(out, [])
    if node.op_type == "QuantizeLinear":
        readers = [r for dq, _ in readers if dq.op_type == "DequantizeLinear" for r in c.consumers.get(dq.output[0], [])]
    for consumer, index in readers:
        want = _weight_axis(consumer, index, rank)
        if want is None:
            return ["per-channel-axis", f"per-channel weight {x!r} feeds {consumer.op_type} {consumer.name!r} "
                                        f"input {index}, which TensorRT 8.5 quantizes per tensor only"]
        if want != axis:
            return ["per-channel-axis", f"weight {x!r} is quantized along axis {axis}; TensorRT 8.5 expects axis "
                                        f"{want} (output channels) for {consumer.op_type} {consumer.name!r}"]
    return []


def _quantized_type(node, c: _Consts) -> Optional[int]:
    if len(node.input) > 2 and node.input[2]:
        return c.dtype(node.input[2])
    if node.op_type == "DequantizeLinear":
        return c.dtype(node.input[0])
    return _attr(node, "output_dtype", TensorProto.UINT8) or TensorProto.UINT8


def _node_issues(node, c: _Consts) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    qtype = _quantized_type(node, c)
    if qtype is not None and qtype != TensorProto.INT8:
        out.append(("int8", f"quantized type {_tname(qtype)}: TensorRT 8.5 takes INT8 Q/DQ only"))
    if _attr(node, "block_size", 0):
        out.append(("blocked", f"block_size {_attr(node, 'block_size')}: blocked quantization is not in TensorRT 8.5"))
    scale = node.input[1] if len(node.input) > 1 else ""
    if not c.is_const(scale):
        out.append(("dynamic-scale", f"scale {scale!r} is computed in the graph; TensorRT 8.5 needs a constant scale"))
    else:
        if c.dtype(scale) != TensorProto.FLOAT:
            out.append(("scale-type", f"scale {scale!r} is {_tname(c.dtype(scale))}; TensorRT 8.5 takes FP32 scales"))
        shape = c.shape(scale) or []
        if int(np.prod(shape)) > 1:
            bad = _per_channel(node, c, shape)
            if bad:
                out.append((bad[0], bad[1]))
    zp = node.input[2] if len(node.input) > 2 else ""
    if not zp:
        out.append(("symmetric", "no zero point: ONNX then means UINT8; give an INT8 zero point of 0"))
    elif not c.is_const(zp):
        out.append(("symmetric", f"zero point {zp!r} is not a constant"))
    else:
        v = c.value(zp)
        if v is not None and np.any(v != 0):
            out.append(("symmetric", f"zero point {zp!r} is {v.ravel()[:4].tolist()}: it must be 0 (TensorRT 8.5 is symmetric only)"))
    return out


def qdq_issues(model: onnx.ModelProto) -> list[QdqIssue]:
    """Every Q/DQ node of ``model`` against TensorRT 8.5's explicit-quantization rules (external data is never read)."""
    c = _Consts(model.graph)
    issues: list[QdqIssue] = []
    nodes = [n for n in model.graph.node if n.op_type in QDQ_OPS and n.domain in DEFAULT_DOMAINS]
    problem = model_opset_problem(model) if nodes else None
    if problem:
        issues.append(QdqIssue("opset", "", "", f"Q/DQ graph: {problem}"))
    for node in nodes:
        for rule, detail in _node_issues(node, c):
            issues.append(QdqIssue(rule, node.op_type, node.name or node.output[0], detail))
    return issues


def qdq_summary(model: onnx.ModelProto) -> dict:
    """Counts for reports: Q/DQ nodes, per-channel weight DQs, INT8 initializers and their bytes."""
    c = _Consts(model.graph)
    q = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    per_channel = sum(int(np.prod(c.shape(n.input[1]) or [1])) > 1 for n in dq)
    int8 = [t for t in model.graph.initializer if t.data_type == TensorProto.INT8 and int(np.prod(t.dims)) > 1]
    return {"quantize_linear": q, "dequantize_linear": len(dq), "per_channel_weights": per_channel,
            "int8_weights": len(int8), "int8_weight_elements": int(sum(int(np.prod(t.dims)) for t in int8))}


__all__ = ["QDQ_OPS", "QdqIssue", "qdq_issues", "qdq_summary"]
