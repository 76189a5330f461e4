"""The one opset helper (medlite.opset) and the places that use it."""
import json
import subprocess
import sys
from importlib import resources

import onnx
import pytest
from onnx import helper

from medlite.opset import (MIN_EXPORT_OPSET, TRT85_MAX_OPSET, default_opset, export_opset_problem,
                           model_opset_problem, opset_problem)


def _model(*imports):
    graph = helper.make_graph([], "g", [], [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in imports])


def test_max_opset_is_the_shipped_tensorrt_table_and_every_target():
    from medlite.engines.targets import TARGETS

    table = json.loads(resources.files("medlite.data").joinpath("tensorrt-8.5-ops.json").read_text())
    assert TRT85_MAX_OPSET == table["max_opset"] == 17
    assert {t.max_opset for t in TARGETS.values()} == {TRT85_MAX_OPSET}


@pytest.mark.parametrize("imports, want", [
    ((("", 17),), 17), ((("ai.onnx", 18),), 18),
    ((("com.microsoft", 1), ("", 16)), 16),     # a custom domain is not the opset
    ((("com.microsoft", 1),), 0),
])
def test_default_opset_reads_the_default_domain(imports, want):
    assert default_opset(_model(*imports)) == want


def test_problem_only_above_the_limit_with_one_message():
    assert opset_problem(17) is None and opset_problem(16) is None
    msg = opset_problem(18)
    assert msg == "opset 18 is above 17, the highest ONNX opset TensorRT 8.5 accepts"
    assert opset_problem(18, tensorrt="8.5.2", where="on jetson-xavier-nx-8gb") == (
        "opset 18 is above 17, the highest ONNX opset TensorRT 8.5.2 on jetson-xavier-nx-8gb accepts")
    assert model_opset_problem(_model(("ai.onnx", 19))) == opset_problem(19)
    assert model_opset_problem(_model(("", 17), ("com.microsoft", 99))) is None


def test_export_range():
    assert export_opset_problem(MIN_EXPORT_OPSET) is None and export_opset_problem(TRT85_MAX_OPSET) is None
    assert export_opset_problem(13).startswith("opset 13 is not supported: use 14..17")
    assert "opset 18 is above 17" in export_opset_problem(18)


def test_trt_check_and_qdq_rules_report_the_same_problem():
    from medlite.export.qdq_rules import qdq_issues
    from medlite.export.trt_ops import trt_check_from_onnx

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    s = helper.make_tensor("s", onnx.TensorProto.FLOAT, [], [0.1])
    z = helper.make_tensor("z", onnx.TensorProto.INT8, [], [0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [s, z]),
                          opset_imports=[helper.make_opsetid("", 18)])
    trt = [i for i in trt_check_from_onnx(m).issues if i.kind == "opset"]
    qdq = [i for i in qdq_issues(m) if i.rule == "opset"]
    assert [i.detail for i in trt] == [opset_problem(18)]
    assert [i.detail for i in qdq] == [f"Q/DQ graph: {opset_problem(18)}"]


def test_helper_imports_neither_torch_nor_onnx():
    code = "import sys, medlite.opset, medlite.recipes.rules; print('torch' in sys.modules, 'onnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
