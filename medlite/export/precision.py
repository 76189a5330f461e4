"""Precision variants: which dtype the traced model has, and what must stay fp32 in fp16 graphs.

fp16 graphs are traced from the model in fp16 (not converted graph-to-graph afterwards): the
full-size decoder traced in fp32 needs about 17 GB of memory, in fp16 about 8.7 GB (measured), and
transformers already keeps the sensitive parts in fp32 when the model runs in fp16. What stays fp32:

* RMSNorm (Llama/Qwen2): transformers upcasts to fp32 for the variance, rsqrt and scale;
* LayerNorm (SigLIP, Phi, StableLM): replaced during export by explicit fp32 math
  (:class:`~medlite.export.modules.DecomposedLayerNorm`), since fp16 variances overflow;
* attention softmax: transformers' eager attention computes it in fp32;
* the attention mask arithmetic and rotary cos/sin (computed in fp32, cast to fp16 at the end);
* ``logits`` (cast to fp32 at the output) and ``pixel_values`` (fp32 input, cast inside).

:func:`fp16_islands_from_onnx` reads this back from a graph, so a test (and ``export_onnx``) can
prove that no ``ReduceMean``/``Sqrt``/``Softmax`` runs in fp16.
"""
from __future__ import annotations

import copy
from typing import Optional

import onnx

import torch
from onnx import TensorProto

from medlite.errors import ExportError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
# Ops that must see fp32 inputs in an fp16 graph (normalisation statistics and softmax).
FP32_OPS = ("ReduceMean", "Sqrt", "Softmax")


def model_for_precision(loaded, precision: str, *, ctx, graph: Optional[str] = None):
    """The model in the export dtype: ``loaded.model`` itself if it already is, else a converted copy.

    The caller's model is never converted in place (fp32 → fp16 → fp32 would lose bits). With
    ``graph`` the copy holds only what that graph's trace runs: the other modules' parameters are
    empty placeholders (``deepcopy`` memo), so exporting the fp16 embed graph from a 1.5 B fp32 model
    copies a 131 MB table, not 3 GB (full-size INT8 build peak, benchmarks/int8_full_size.py).
    """
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    want = PRECISIONS[precision]
    model = loaded.model
    have = next(model.parameters()).dtype
    if have == want:
        return model
    memo: dict = {}
    if graph is not None:
        from medlite.memory import modules_idle_for

        for m in modules_idle_for(model, graph):
            for prm in m.parameters():
                memo[id(prm)] = torch.nn.Parameter(torch.empty(0, dtype=prm.dtype), requires_grad=False)
    n = sum(prm.numel() for prm in model.parameters() if id(prm) not in memo)
    if want == torch.float32:
        ctx.warn(f"exporting fp32 from a model loaded in {str(have).replace('torch.', '')}: the fp32 graphs "
                 "hold those rounded weights, not the checkpoint's original precision")
    else:
        ctx.info(f"converting a {str(have).replace('torch.', '')} copy of {n / 1e6:,.1f} M parameters to fp16 for "
                 "export (`medlite export --precision fp16` loads the checkpoint in fp16 directly and needs no copy)")
    return copy.deepcopy(model, memo).to(want).eval()


def fp16_islands_from_onnx(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """For each of :data:`FP32_OPS`: how many nodes take fp32 and how many fp16 inputs."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.value_info) + list(g.output)}
    out = {op: {"fp32": 0, "fp16": 0} for op in FP32_OPS}
    for node in g.node:
        if node.op_type in out:
            t = types.get(node.input[0])
            if t == TensorProto.FLOAT:
                out[node.op_type]["fp32"] += 1
            elif t == TensorProto.FLOAT16:
                out[node.op_type]["fp16"] += 1
    return out


def check_fp32_islands(model: onnx.ModelProto, graph_name: str) -> dict[str, dict[str, int]]:
    """Raise :class:`ExportError` if a normalisation or softmax node of an fp16 graph runs in fp16."""
    islands = fp16_islands_from_onnx(model)
    bad = {op: c["fp16"] for op, c in islands.items() if c["fp16"]}
    if bad:
        raise ExportError(f"{graph_name}.onnx (fp16): {bad} node(s) compute normalisation/softmax in fp16, "
                          "which overflows; they must stay fp32")
    return islands
