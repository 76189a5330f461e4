"""Per-graph precision labels name the quantization that runs, not the float precision it was traced in."""
from __future__ import annotations

import json

from medlite.runtime.config import RuntimeConfig
from medlite.runtime.describe import graph_labels, precision_summary, read_graph_labels

INT8 = {"scheme": "int8-static-qdq", "precision": "int8", "kept_fp16_layers": []}
INT8_KEPT = {"scheme": "int8-static-qdq", "precision": "int8", "kept_fp16_layers": ["layers.3.mlp"]}
W4 = {"method": "w4a16", "algorithm": "gptq", "group_size": 128, "bits": [4]}


def _cfg(vision=None, decoder=None, precision="fp32"):
    return {"precision": precision, "graphs": {
        "decoder": {"file": "decoder.onnx", "precision": "fp16", "quantization": decoder or {}},
        "vision": {"file": "vision.onnx", "precision": "fp16", "quantization": vision or {}},
        "embed": {"file": "embed.onnx"}}}


def test_int8_artifact_is_not_labelled_fp16():
    assert graph_labels(_cfg(INT8, INT8)) == {"vision": "int8 Q/DQ", "embed": "fp32", "decoder": "w8a8 int8 Q/DQ"}
    assert precision_summary(_cfg(INT8_KEPT)) == "vision int8 Q/DQ (1 layer kept fp16), embed fp32, decoder fp16"


def test_w4a16_decoder():
    assert graph_labels(_cfg(decoder=W4))["decoder"] == "w4a16 int4 g128 gptq"


def test_reads_an_exported_folder(rt_export_fp16, tmp_path):
    labels = read_graph_labels(rt_export_fp16)
    assert labels == {"vision": "fp16", "embed": "fp16", "decoder": "fp16"}
    assert graph_labels(RuntimeConfig.load(rt_export_fp16)) == labels      # parsed config: same labels
    raw = json.loads((rt_export_fp16 / "medlite_runtime.json").read_text())
    raw["graphs"]["decoder"]["quantization"] = W4
    (tmp_path / "medlite_runtime.json").write_text(json.dumps(raw))
    assert read_graph_labels(tmp_path)["decoder"] == "w4a16 int4 g128 gptq"
    assert read_graph_labels(tmp_path / "missing") == {}
