"""Does an ONNX graph parse on TensorRT 8.5 (JetPack 5.1.x, Xavier)? Checked against onnx-tensorrt's table.

The table (``medlite/data/tensorrt-8.5-ops.json``) is onnx-tensorrt 8.5-GA ``docs/operators.md``:
per operator whether it is supported, the TensorRT data types it takes and its restrictions.
:func:`trt_check_from_onnx` checks every node of a graph against it:

* the opset is at most the table's ``max_opset`` (17) and every node is in the default domain;
* the operator is supported (``LayerNormalization`` is not, in 8.5);
* the tensors of the operator's main type variable (``T`` of ``MatMul``, the data of ``Gather``,
  the input of ``QuantizeLinear``, the output of ``ConstantOfShape``; both sides of ``Cast``) have
  a type in the operator's ``types``. Index/shape variables (``Tind``, ``Shape``'s output...) are
  fixed by the ONNX spec and not what the column describes. TensorRT 8.5 has no INT64: the
  parser casts INT64 weights and shape tensors down to INT32, so inside a graph INT64 counts as
  INT32 (and is counted, to keep it small); graph inputs and outputs must not be INT64, because
  the binding would silently become INT32;
* the restrictions that can be decided statically (``axes`` must be an initializer, pooling rank,
  Resize modes, ...). Restrictions that cannot are reported as notes;
* every QuantizeLinear/DequantizeLinear against TensorRT 8.5's explicit-quantization rules
  (:mod:`medlite.export.qdq_rules`: INT8 only, zero point 0, constant FP32 scales, per-tensor
  activation scales, per-channel weight scales along the output-channel axis), kind ``restriction``
  with the detail starting ``qdq <rule>:``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from medlite.opset import default_opset, opset_problem

TRT_85_TABLE = "tensorrt-8.5-ops.json"

_DTYPE_NAMES = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.INT32: "INT32",
    TensorProto.INT8: "INT8", TensorProto.BOOL: "BOOL", TensorProto.INT64: "INT64",
    TensorProto.UINT8: "UINT8", TensorProto.DOUBLE: "FP64", TensorProto.BFLOAT16: "BF16",
}
# Types a TensorRT 8.5 engine can bind as inputs/outputs.
_IO_TYPES = {"FP32", "FP16", "INT32", "INT8", "BOOL", "UINT8"}


@dataclass
class TrtIssue:
    """One reason the graph would not parse or build: ``kind`` is opset | domain | unsupported | dtype |
    restriction | io (a Q/DQ restriction's ``detail`` starts with ``qdq <rule>:``, see :mod:`medlite.export.qdq_rules`)."""

    kind: str
    op: str
    node: str
    detail: str


@dataclass
class TrtCheck:
    """The result of checking one graph against a TensorRT operator table."""

    target: str
    opset: int
    ops: dict[str, int] = field(default_factory=dict)
    issues: list[TrtIssue] = field(default_factory=list)
    int64_tensors: int = 0          # INT64 tensors inside the graph (cast to INT32 by the parser)
    untyped_tensors: int = 0        # node inputs whose type shape inference could not determine
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.issues

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def summary(self, limit: int = 8) -> str:
        """A short human-readable list of the issues (for error messages)."""
        if self.ok:
            return f"{self.target}: ok ({sum(self.ops.values())} nodes, {len(self.ops)} op types)"
        lines = [f"{i.kind}: {i.op} {i.node!r}: {i.detail}" for i in self.issues[:limit]]
        more = len(self.issues) - limit
        return "\n".join(lines + ([f"... and {more} more"] if more > 0 else []))


def load_trt_op_table(name: str = TRT_85_TABLE) -> dict:
    """The operator table shipped in ``medlite/data`` (see its ``_source`` key)."""
    with resources.files("medlite").joinpath("data", name).open("r", encoding="utf-8") as f:
        return json.load(f)


class _Graph:
    """Types, shapes and constant values of every tensor of one graph (after shape inference)."""

    def __init__(self, model: onnx.ModelProto):
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        g = inferred.graph
        self.types: dict[str, int] = {}
        self.shapes: dict[str, Optional[list]] = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            if tt.elem_type:
                self.types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        self.const: dict[str, Optional[TensorProto]] = {}
        for init in g.initializer:
            self.types[init.name] = init.data_type
            self.shapes[init.name] = list(init.dims)
            self.const[init.name] = init
        for node in g.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                t = node.attribute[0].t
                self.types[node.output[0]] = t.data_type
                self.shapes[node.output[0]] = list(t.dims)
                self.const[node.output[0]] = t
        self.graph = g

    def value(self, name: str) -> Optional[np.ndarray]:
        t = self.const.get(name)
        if t is None or t.data_location == TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(t)


def _schema(op: str, opset: int, domain: str = ""):
    try:
        return onnx.defs.get_schema(op, opset, domain)
    except Exception:  # noqa: BLE001 - unknown op: reported by the caller
        return None


def _checked_type_vars(schema) -> dict[str, set]:
    """Type variables whose type is a real choice (not only int64 / index types / a single type)."""
    out = {}
    for c in schema.type_constraints:
        allowed = set(c.allowed_type_strs)
        if len(allowed) <= 1 or allowed <= {"tensor(int32)", "tensor(int64)"}:
            continue
        out[c.type_param_str] = allowed
    return out


def _formal(params, i: int):
    if not params:
        return None
    return params[i] if i < len(params) else (params[-1] if params[-1].option.name == "Variadic" else None)


def _primary_tensors(node, schema) -> list[str]:
    """The tensors whose type the table's ``types`` column describes.

    That is the operator's main data type: the first type variable (in input order) that is a real
    choice — ``T`` of ``Gather``/``MatMul``, ``X``'s of ``Where``, ``T1`` of ``QuantizeLinear``,
    ``T2`` (the output) of ``ConstantOfShape``. ``Cast`` is checked on both sides.
    """
    tvars = _checked_type_vars(schema)
    primary = None
    for params in (schema.inputs, schema.outputs):
        for p in params:
            if p.type_str in tvars:
                primary = p.type_str
                break
        if primary:
            break
    names = []
    for actual, params in ((node.input, schema.inputs), (node.output, schema.outputs)):
        for i, name in enumerate(actual):
            formal = _formal(params, i)
            if name and formal is not None and (formal.type_str == primary or
                                                (node.op_type == "Cast" and formal.type_str in tvars)):
                names.append(name)
    return names


# -- restriction checkers: (node, graph) -> problem text or None ---------------------------------

def _input_const(idx: int, what: str) -> Callable:
    def check(node, g: _Graph):
        if len(node.input) > idx and node.input[idx] and node.input[idx] not in g.const:
            return f"{what} ({node.input[idx]!r}) must be an initializer/constant"
        return None
    return check


def _pool_rank(node, g: _Graph):
    shape = g.shapes.get(node.input[0])
    if shape is not None and len(shape) not in (4, 5):
        return f"input rank {len(shape)}: only 2D/3D pooling"
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        return "the Indices output is unsupported"
    return None


def _resize(node, g: _Graph):
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    dec = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
    if dec.get("coordinate_transformation_mode", "half_pixel") not in (
            "half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"):
        return f"coordinate_transformation_mode {dec['coordinate_transformation_mode']!r}"
    if dec.get("mode", "nearest") not in ("nearest", "linear"):
        return f"mode {dec['mode']!r}"
    if dec.get("nearest_mode", "round_prefer_floor") not in ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil"):
        return f"nearest_mode {dec['nearest_mode']!r}"
    return None


def _static_input(node, g: _Graph):
    shape = g.shapes.get(node.input[0])
    if shape is None or any(d is None for d in shape):
        return "dynamic input shapes are unsupported"
    return None


def _instance_norm(node, g: _Graph):
    for i in (1, 2):
        if node.input[i] not in g.const:
            return f"{node.input[i]!r} must be an initializer"
    shape = g.shapes.get(node.input[0])
    if shape is not None and not 3 <= len(shape) <= 5:
        return f"input rank {len(shape)} (must be 3..5)"
    return None


_RESTRICTIONS: dict[str, Callable] = {
    "Slice": _input_const(3, "axes"),
    "Squeeze": _input_const(1, "axes"),
    "Unsqueeze": _input_const(1, "axes"),
    "CumSum": _input_const(1, "axis"),
    "TopK": _input_const(1, "K"),
    # Q/DQ: the zero-point rule and the rest of TensorRT 8.5's explicit-quantization rules are
    # checked by medlite.export.qdq_rules (one issue per node and rule).
    "DequantizeLinear": lambda node, g: None,
    "QuantizeLinear": lambda node, g: None,
    "AveragePool": _pool_rank,
    "MaxPool": _pool_rank,
    "Resize": _resize,
    "ReverseSequence": _static_input,
    "InstanceNormalization": _instance_norm,
}


def trt_check_from_onnx(model: Union[onnx.ModelProto, str, Path], *, table: Optional[dict] = None) -> TrtCheck:
    """Check a graph (a ModelProto or a path; external data is never read) against a TensorRT table."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    table = table or load_trt_op_table()
    ops_table = table["operators"]
    opset = default_opset(model)
    res = TrtCheck(target=f"tensorrt-{table.get('tensorrt', '?')}", opset=opset)
    problem = opset_problem(opset, max_opset=table["max_opset"], tensorrt=str(table.get("tensorrt", "8.5")))
    if problem:
        res.issues.append(TrtIssue("opset", "", "", problem))
    g = _Graph(model)

    for vi in list(g.graph.input) + list(g.graph.output):
        t = _DTYPE_NAMES.get(vi.type.tensor_type.elem_type, str(vi.type.tensor_type.elem_type))
        if t not in _IO_TYPES:
            res.issues.append(TrtIssue("io", "", vi.name, f"graph input/output of type {t}"))

    int64: set[str] = set()
    untyped: set[str] = set()
    unchecked_restrictions: set[str] = set()
    for node in g.graph.node:
        op = node.op_type
        res.ops[op] = res.ops.get(op, 0) + 1
        for name in list(node.input) + list(node.output):
            if name and g.types.get(name) == TensorProto.INT64:
                int64.add(name)
        if node.domain not in ("", "ai.onnx"):
            res.issues.append(TrtIssue("domain", op, node.name, f"custom domain {node.domain!r}"))
            continue
        entry = ops_table.get(op)
        if entry is None or not entry.get("supported"):
            res.issues.append(TrtIssue("unsupported", op, node.name, "not supported by the TensorRT ONNX parser"))
            continue
        allowed = {t.strip() for t in entry.get("types", "").split(",") if t.strip()}
        schema = _schema(op, opset)
        if schema is not None and allowed:
            for name in _primary_tensors(node, schema):
                dt = g.types.get(name)
                if dt is None:
                    untyped.add(name)
                    continue
                tname = _DTYPE_NAMES.get(dt, str(dt))
                if not (tname in allowed or (tname == "INT64" and "INT32" in allowed)):
                    res.issues.append(TrtIssue("dtype", op, node.name,
                                               f"{name!r} is {tname}; TensorRT 8.5 {op} takes {', '.join(sorted(allowed))}"))
        checker = _RESTRICTIONS.get(op)
        if checker is not None:
            problem = checker(node, g)
            if problem:
                res.issues.append(TrtIssue("restriction", op, node.name, problem))
        elif entry.get("restrictions"):
            unchecked_restrictions.add(op)
    from medlite.export.qdq_rules import qdq_issues

    for q in qdq_issues(model):
        res.issues.append(TrtIssue("restriction", q.op, q.node, f"qdq {q.rule}: {q.detail}"))
    res.int64_tensors = len(int64)
    res.untyped_tensors = len(untyped)
    for op in sorted(unchecked_restrictions):
        res.notes.append(f"{op}: restriction not checked statically: {ops_table[op]['restrictions']}")
    if untyped:
        res.notes.append(f"{len(untyped)} tensor(s) without an inferred type were not type-checked")
    res.ops = dict(sorted(res.ops.items()))
    return res
