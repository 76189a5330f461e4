"""Small, predictable ONNX graph passes applied to every exported graph.

* :func:`folded_onnx_from_onnx` folds shape arithmetic that is constant once shape inference knows
  the static dimensions. The TorchScript exporter emits ``Expand`` with dynamic sizes as
  ``Where(Equal(sizes, -1), ConstantOfShape(Shape(sizes)), sizes)``; the ``ConstantOfShape`` there
  produces INT64, which TensorRT 8.5's ConstantOfShape does not take (FP32 only). Its input is the
  shape of a 1-D tensor of static length, so it folds to a constant. Folding also shrinks the
  number of INT64 tensors TensorRT has to cast down.
* :func:`pruned_onnx_from_onnx` removes nodes and initializers nothing uses.
* :func:`stable_onnx_from_onnx` makes the bytes depend only on the graph: no doc strings (the
  exporter puts Python source locations there), fixed producer fields, sorted metadata.

A general optimiser (onnxscript's, polygraphy's) was not used: measured on the decoder, onnxscript's
optimizer left the INT64 ``ConstantOfShape`` nodes in place, and a pass we own cannot change
behaviour under us between versions.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

# Ops never folded: random ops differ per run, control flow carries subgraphs, and quantization
# nodes ARE the quantization: Q/DQ on a constant weight is how TensorRT 8.5 learns a weight's INT8
# scale (explicit quantization), so folding DequantizeLinear(int8 weight) to a float constant would
# silently turn an INT8 graph back into a float one. Custom-domain nodes (com.microsoft MatMulNBits)
# are never folded either (the loop below skips every non-default domain).
_NO_FOLD = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
            "Bernoulli", "If", "Loop", "Scan", "Constant", "Dropout",
            "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def _static_shapes(model: onnx.ModelProto) -> dict[str, list]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    out: dict[str, list] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    return out


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def folded_onnx_from_onnx(model: onnx.ModelProto, *, max_elements: int = 1 << 16) -> onnx.ModelProto:
    """Fold ``Shape`` of statically shaped tensors and every small all-constant node (in place, returned).

    Only results with at most ``max_elements`` elements are folded, so weights are never duplicated
    (the exporter already folded weight transposes). Folded values become initializers named after
    the tensors they replace, so the rest of the graph is untouched.
    """
    from onnx.reference import ReferenceEvaluator

    from medlite.export.files import is_staged, tensor_array

    shapes = _static_shapes(model)
    opset = _opset(model)
    g = model.graph
    const: dict[str, np.ndarray] = {}
    for init in g.initializer:
        if int(np.prod(init.dims)) > max_elements:
            continue
        if init.data_location != TensorProto.EXTERNAL:
            const[init.name] = numpy_helper.to_array(init)
        elif is_staged(init):   # small weight the export staged to disk: fold exactly as if inline
            const[init.name] = tensor_array(init)
    for node in g.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            t = node.attribute[0].t
            if int(np.prod(t.dims)) <= max_elements:
                const[node.output[0]] = numpy_helper.to_array(t)

    folded_nodes: set[int] = set()
    new_values: dict[str, np.ndarray] = {}
    for idx, node in enumerate(g.node):
        if node.domain not in ("", "ai.onnx") or node.op_type in _NO_FOLD:
            continue
        values: Optional[list] = None
        if node.op_type == "Shape":
            shape = shapes.get(node.input[0])
            if shape is not None and all(d is not None for d in shape):
                attrs = {a.name: a.i for a in node.attribute}
                start, end = attrs.get("start", 0), attrs.get("end", len(shape))
                values = [np.asarray(shape[start:end], dtype=np.int64)]
        elif node.input and all((not n) or n in const for n in node.input):
            try:
                ev = ReferenceEvaluator(node, opsets={"": opset})
                values = ev.run(None, {n: const[n] for n in node.input if n})
            except Exception:  # noqa: BLE001 - a node the reference cannot run simply stays
                values = None
        if values is None or any(np.asarray(v).size > max_elements for v in values):
            continue
        folded_nodes.add(idx)
        for name, v in zip(node.output, values):
            const[name] = new_values[name] = np.asarray(v)

    if not folded_nodes:
        return model
    kept = [n for i, n in enumerate(g.node) if i not in folded_nodes]
    del g.node[:]
    g.node.extend(kept)
    for name, v in new_values.items():
        g.initializer.append(numpy_helper.from_array(v, name=name))
    return pruned_onnx_from_onnx(model)


def pruned_onnx_from_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove nodes whose outputs nothing reads, then initializers nothing reads (in place, returned)."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(n for n in node.input if n)
            for a in node.attribute:  # names read inside subgraphs
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    for sn in sub.node:
                        needed.update(n for n in sn.input if n)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    vis = [v for v in g.value_info if v.name in needed]
    del g.value_info[:]
    g.value_info.extend(vis)
    return model


def stable_onnx_from_onnx(model: onnx.ModelProto, *, graph_name: str, metadata: dict[str, str]) -> onnx.ModelProto:
    """Strip run-dependent fields so two exports of the same model give identical bytes (in place)."""
    from medlite import __version__

    model.producer_name = "medlite"
    model.producer_version = __version__
    model.domain = ""
    model.model_version = 0
    model.doc_string = ""
    model.graph.name = graph_name
    model.graph.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""
    del model.metadata_props[:]
    for k in sorted(metadata):
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=str(metadata[k])))
    return model


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How often each op type occurs (sorted by name)."""
    out: dict[str, int] = {}
    for n in model.graph.node:
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))
