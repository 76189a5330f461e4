"""Every exported graph passes onnx.checker and the TensorRT 8.5 op table; the checker catches real problems."""
from __future__ import annotations

import json
from importlib import resources

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from medlite.export.trt_ops import load_trt_op_table, trt_check_from_onnx

GRAPHS = ("vision", "embed", "decoder")


def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, t, shape):
    return helper.make_tensor_value_info(name, t, shape)


def test_table_is_the_shipped_85_table():
    table = load_trt_op_table()
    assert "onnx-tensorrt" in table["_source"] and "8.5-GA" in table["_source"] and "operators.md" in table["_source"]
    assert table["max_opset"] == 17
    assert table["operators"]["LayerNormalization"]["supported"] is False
    assert "INT64" not in table["operators"]["Gather"]["types"]
    raw = json.loads(resources.files("medlite").joinpath("data", "tensorrt-8.5-ops.json").read_text())
    assert len(raw["operators"]) > 150


@pytest.mark.parametrize("fixture", ["exported", "exported_fp16"])
def test_every_exported_graph_passes(request, fixture):
    folder, res = request.getfixturevalue(fixture)
    for name in GRAPHS:
        path = folder / f"{name}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        check = trt_check_from_onnx(path)
        assert check.ok, check.summary()
        assert check.opset == 17
        assert check.untyped_tensors == 0
        assert "LayerNormalization" not in check.ops and "ConstantOfShape" not in check.ops
        assert res.trt_check[name]["ok"] and res.trt_check[name]["ops"] == check.ops
        model = onnx.load(str(path), load_external_data=False)
        # graph interfaces carry no INT64 (TensorRT 8.5 would silently bind INT32)
        for vi in list(model.graph.input) + list(model.graph.output):
            assert vi.type.tensor_type.elem_type != TensorProto.INT64, (name, vi.name)


def test_opset_16_export_also_passes(tiny, ctx, tmp_path):
    from medlite.export import export_onnx

    res = export_onnx(tiny, tmp_path, ctx=ctx, opset=16)
    for name in GRAPHS:
        check = trt_check_from_onnx(tmp_path / f"{name}.onnx")
        assert check.ok and check.opset == 16, check.summary()


def test_layer_norm_at_opset_17_is_rejected(tmp_path):
    """What the decomposition avoids: the exporter's own LayerNormalization at opset 17."""
    path = tmp_path / "ln.onnx"
    torch.onnx.export(torch.nn.LayerNorm(8).eval(), (torch.randn(2, 8),), str(path), opset_version=17, dynamo=False)
    check = trt_check_from_onnx(path)
    assert not check.ok
    assert [(i.kind, i.op) for i in check.issues] == [("unsupported", "LayerNormalization")]


def test_int64_constant_of_shape_is_a_dtype_issue():
    shape = helper.make_tensor("s", TensorProto.INT64, [1], [3])
    node = helper.make_node("ConstantOfShape", ["s"], ["y"], value=helper.make_tensor("v", TensorProto.INT64, [1], [1]))
    check = trt_check_from_onnx(_model([node], [], [_vi("y", TensorProto.INT64, [3])], [shape]))
    kinds = {(i.kind, i.op) for i in check.issues}
    assert ("dtype", "ConstantOfShape") in kinds
    assert ("io", "") in kinds  # the INT64 graph output


def test_int64_inside_a_graph_counts_as_int32():
    idx = helper.make_tensor("idx", TensorProto.INT64, [2], [0, 1])
    nodes = [helper.make_node("Gather", ["x", "idx"], ["y"], axis=0)]
    check = trt_check_from_onnx(_model(nodes, [_vi("x", TensorProto.FLOAT, [4, 3])],
                                       [_vi("y", TensorProto.FLOAT, [2, 3])], [idx]))
    assert check.ok and check.int64_tensors == 1


def test_dynamic_slice_axes_and_unsupported_types_are_caught():
    nodes = [helper.make_node("Slice", ["x", "st", "en", "ax"], ["y"]),
             helper.make_node("Cast", ["y"], ["z"], to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["z"], ["w"], to=TensorProto.FLOAT)]
    inits = [helper.make_tensor("st", TensorProto.INT64, [1], [0]), helper.make_tensor("en", TensorProto.INT64, [1], [2])]
    m = _model(nodes, [_vi("x", TensorProto.FLOAT, [4, 3]), _vi("ax", TensorProto.INT64, [1])],
               [_vi("w", TensorProto.FLOAT, [None, None])], inits)
    check = trt_check_from_onnx(m)
    kinds = [(i.kind, i.op) for i in check.issues]
    assert ("restriction", "Slice") in kinds        # axes must be an initializer
    assert ("dtype", "Cast") in kinds               # FP64 is no TensorRT type
    assert ("io", "") in kinds                      # INT64 graph input "ax"


def test_opset_and_custom_domain_are_caught():
    node = helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")
    g = helper.make_graph([node], "g", [_vi("x", TensorProto.FLOAT, [2])], [_vi("y", TensorProto.FLOAT, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    kinds = {i.kind for i in trt_check_from_onnx(m).issues}
    assert kinds == {"opset", "domain"}


def test_nonzero_quantize_zero_point_is_caught():
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.INT8, [], [3])]
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    m = _model([node], [_vi("x", TensorProto.FLOAT, [4])], [_vi("y", TensorProto.INT8, [4])], inits, opset=13)
    issues = trt_check_from_onnx(m).issues
    assert [(i.kind, i.op) for i in issues] == [("restriction", "QuantizeLinear")]
    assert "must be 0" in issues[0].detail


def test_trt_issue_fails_the_export(tiny, ctx, tmp_path, monkeypatch):
    """A graph TensorRT 8.5 would reject stops the export (unless explicitly allowed)."""
    import medlite.export.api as api
    from medlite.errors import ExportError

    table = load_trt_op_table()
    table["operators"]["Gather"] = {"supported": False, "types": "", "restrictions": ""}
    real = api.trt_check_from_onnx
    monkeypatch.setattr(api, "trt_check_from_onnx", lambda m: real(m, table=table))
    with pytest.raises(ExportError, match="embed.onnx would not parse on TensorRT 8.5"):
        api.export_onnx(tiny, tmp_path, ctx=ctx, components=("embed",))
    res = api.export_onnx(tiny, tmp_path, ctx=ctx, components=("embed",), allow_trt_issues=True)
    assert not res.trt_ok and any("TensorRT 8.5" in w for w in ctx.warnings)
    assert np.isfinite(res.files["embed.onnx"]["bytes"])
