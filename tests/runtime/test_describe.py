"""Precision shown to users is the quantization that runs (issue 26 #4): records as the stages write them."""
from __future__ import annotations

from medlite.runtime.describe import graph_precision, graph_precisions, precision_summary


def _records():
    """Quantization records made by the quantize stages' own record functions (not hand-written)."""
    from medlite.recipes.options import QuantizeOptions  # first: the stages import the recipe registry
    from medlite.compress.int4.stage import quantization_record  # noqa: I001
    from medlite.compress.int8.stage import GraphChoice, _record

    o8 = QuantizeOptions(vision="int8", llm="w8a8")
    vision = _record(GraphChoice(graph="vision", targets=[]), o8, None)
    w8a8 = _record(GraphChoice(graph="decoder", targets=[], kept_fp16=["model.layers.0.mlp.down_proj"]), o8, None)
    w4a16 = quantization_record(QuantizeOptions(llm="w4a16"), {}, 4)
    return vision, w8a8, w4a16


def test_int8_artifact_is_not_labelled_by_its_trace_precision():
    vision, w8a8, w4a16 = _records()
    cfg = {"precision": "fp32", "graphs": {"decoder": {"precision": "fp32", "quantization": w8a8},
                                           "embed": {"precision": "fp16"},
                                           "vision": {"precision": "fp32", "quantization": vision}}}
    assert graph_precisions(cfg) == {"vision": "int8 Q/DQ", "embed": "fp16",
                                     "decoder": "w8a8 int8 Q/DQ (1 layer kept fp16)"}
    assert precision_summary(cfg) == "vision int8 Q/DQ, embed fp16, decoder w8a8 int8 Q/DQ (1 layer kept fp16)"
    assert graph_precision({"precision": "fp32", "quantization": w4a16}, "decoder") == \
        "w4a16 (int4 weights g128, gptq)"


def test_unquantized_export_is_one_word():
    cfg = {"precision": "fp32", "graphs": {n: {"precision": "fp32"} for n in ("decoder", "embed", "vision")}}
    assert precision_summary(cfg) == "fp32"
    assert precision_summary({"precision": "fp16", "graphs": {"vision": {}, "decoder": {}}}) == "fp16"
