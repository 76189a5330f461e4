"""The static Q/DQ graphs compute what a plain torch fake-quant forward computes with the graph's scales.

Reference (independent of ONNX Runtime and of onnxruntime.quantization): the tiny HF model, with
forward pre-hooks that fake-quantize each quantized layer's input per tensor
(``torch.fake_quantize_per_tensor_affine``) and weights fake-quantized per output channel
(``torch.fake_quantize_per_channel_affine``), both with the scales read out of the graph; float
weights the graph stores in fp16 are rounded to fp16 the same way.

``torch.fake_quantize_*`` multiply by ``1/scale`` while ONNX's QuantizeLinear divides by the
scale; at exact rounding ties the two differ by one step (measured: one k_proj weight of the tiny
model), so the reference rounds ``x / scale`` with plain torch ops and the test checks that
``torch.fake_quantize_per_channel_affine`` agrees with it except at such ties.

Rounding is discontinuous: where torch's and ONNX Runtime's float math differ in the last bit
(tanh-GELU, RMSNorm), a value on a rounding boundary rounds differently, and in a random-weight
network one such flip cascades through every later quantizer (measured: 1.7e-4 after one flip,
1-2 % at the output). So at each quantizer the reference first checks that its own input equals
the graph's pre-quantization tensor (≤ 1e-4 relative), then rounds the graph's value.
"""
from __future__ import annotations

import contextlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from int8_fixtures import feeds, fp32_graphs, tiny8  # noqa: F401 - fixtures
from medlite.compress.int8 import qdq_onnx as Q
from medlite.compress.int8.stage import quantized_proto
from medlite.export.qdq_rules import qdq_issues
from medlite.export.trt_ops import trt_check_from_onnx


def _module(model, node_name: str):
    """``/lm/layers.0/self_attn/q_proj/MatMul`` → the torch module it was traced from."""
    path = Q.layer_of(node_name).split(".")
    root = {"lm": model.model.language_model, "head": model.lm_head, "tower": model.model.vision_tower,
            "projector": model.model.multi_modal_projector}[path[0]]
    for p in path[1:]:
        root = getattr(root, p)
    return root


def fq(x: torch.Tensor, scale: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Symmetric INT8 fake-quant as ONNX defines it: ``clamp(round(x / scale), -128, 127) * scale``."""
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


def _scales(proto: onnx.ModelProto) -> dict:
    """node name -> (activation scale, weight scales [N]) read from the Q/DQ graph."""
    init = {t.name: t for t in proto.graph.initializer}
    prod = {o: n for n in proto.graph.node for o in n.output}
    out = {}
    for n in proto.graph.node:
        if n.op_type not in ("MatMul", "Conv"):
            continue
        a, w = prod.get(n.input[0]), prod.get(n.input[1])
        if a is None or w is None or a.op_type != "DequantizeLinear" or w.op_type != "DequantizeLinear":
            continue
        s_act = float(numpy_helper.to_array(init[a.input[1]]))
        s_w = numpy_helper.to_array(init[w.input[1]]).astype(np.float32)
        out[n.name] = (s_act, s_w)
    return out


@contextlib.contextmanager
def fake_quant(model, scales: dict, graph_inputs: dict | None = None, seen: list | None = None):
    """Fake-quantize the listed layers (input per tensor, weight per output channel); fp16-round other
    float weights of >= FP16_MIN_ELEMENTS elements, as the graph stores them; restore afterwards.

    ``graph_inputs`` (node name -> the graph's pre-quantization input): the hook records the relative
    difference of its own input to it in ``seen`` and rounds the graph's value (see the docstring)."""
    saved, hooks = [], []
    quantized = set()

    def hook(name, s):
        def pre(_m, args):
            x = args[0]
            if graph_inputs is not None:
                g = torch.from_numpy(graph_inputs[name]).to(x.dtype)
                seen.append(_rel(x.numpy(), g.numpy()))
                x = g
            return (fq(x, torch.tensor(s, dtype=x.dtype)),) + args[1:]
        return pre

    for name, (s_act, s_w) in scales.items():
        mod = _module(model, name)
        quantized.add(id(mod.weight))
        saved.append((mod.weight, mod.weight.detach().clone()))
        sw = torch.from_numpy(s_w)
        ours = fq(mod.weight.detach().float(), sw, axis=0)
        torchs = torch.fake_quantize_per_channel_affine(mod.weight.detach().float(), sw,
                                                        torch.zeros(len(s_w), dtype=torch.int32), 0, -128, 127)
        differ = (ours != torchs).sum().item()
        assert differ <= max(1, ours.numel() // 1000), (name, differ)      # ties only
        with torch.no_grad():
            mod.weight.copy_(ours)
        hooks.append(mod.register_forward_pre_hook(hook(name, s_act)))
    for p in model.parameters():
        if id(p) not in quantized and p.numel() >= Q.FP16_MIN_ELEMENTS and p.dtype == torch.float32:
            saved.append((p, p.detach().clone()))
            with torch.no_grad():
                p.copy_(p.half().float())
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)


def _torch_vision(model, pixels):
    from medlite.calibration.forward import image_features

    with torch.no_grad():
        return image_features(model, torch.from_numpy(pixels)).numpy()


def _torch_decoder(model, feed):
    b, t, _ = feed["inputs_embeds"].shape
    with torch.no_grad():
        out = model.model.language_model(inputs_embeds=torch.from_numpy(feed["inputs_embeds"]),
                                         attention_mask=torch.ones(b, t, dtype=torch.long),
                                         position_ids=torch.from_numpy(feed["position_ids"]).long(), use_cache=False)
        return model.lm_head(out.last_hidden_state).numpy()


def _pre_quant_inputs(proto: onnx.ModelProto, scales: dict, tmp) -> tuple:
    """A copy of the graph that also outputs each quantized node's activation before its Q."""
    prod = {o: n for n in proto.graph.node for o in n.output}
    node_by = {n.name: n for n in proto.graph.node}
    extra = {}
    for name in scales:
        dq = prod[node_by[name].input[0]]
        extra[name] = prod[dq.input[0]].input[0]      # DQ <- Q <- float activation
    dbg = onnx.ModelProto()
    dbg.CopyFrom(proto)
    for t in dict.fromkeys(extra.values()):
        dbg.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    return Q.save_for_ort(dbg, tmp / "dbg" / "q.onnx"), extra


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("graph", ["vision", "decoder"])
@pytest.mark.parametrize("lm_head", [False, True])
def test_qdq_graph_equals_torch_fake_quant(graph, lm_head, tiny8, calib, fp32_graphs, tmp_path):
    if graph == "vision" and lm_head:
        pytest.skip("lm_head is a decoder option")
    fp32 = fp32_graphs[graph]
    ranges = tmp_path / "ranges.json"
    Q.calibrate_ranges(fp32, feeds(tiny8, calib.samples, graph), ranges)
    targets = Q.quant_targets(onnx.load(str(fp32), load_external_data=False), graph, lm_head=lm_head)
    proto = quantized_proto(fp32, tmp_path / "q", ranges, [t.node for t in targets], method="minmax")
    assert qdq_issues(proto) == [] and proto.opset_import[0].version == 17
    assert trt_check_from_onnx(proto).ok, trt_check_from_onnx(proto).summary()
    scales = _scales(proto)
    assert set(scales) == {t.node for t in targets}
    if graph == "vision":
        assert any(t.op == "Conv" for t in targets)               # the patch embedding
    else:
        assert any(n.startswith("/head/") for n in scales) == lm_head
        assert not any("rotary" in n or n.endswith("self_attn/MatMul") for n in scales)
    dbg_path, act_of = _pre_quant_inputs(proto, scales, tmp_path)
    path = Q.save_for_ort(proto, tmp_path / "loadable" / "q.onnx")
    # The graph's semantics (what TensorRT builds): ORT's fused int8 CPU kernels would add their own
    # AVX2 int16 saturation error (docs/quantization-int8.md), so Q/DQ fusion is off here.
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    # several shapes: vision batches of 1 and 3; decoder feeds of different lengths and batch sizes
    shapes = (feeds(tiny8, calib.heldout[:1], graph) + feeds(tiny8, calib.heldout[1:7], graph, batch_size=3))
    if graph == "decoder":
        assert len({f["inputs_embeds"].shape for f in shapes}) >= 3
    dbg = ort.InferenceSession(str(dbg_path), so, providers=["CPUExecutionProvider"])
    out_name = sess.get_outputs()[0].name
    acts = list(dict.fromkeys(act_of.values()))
    for f in shapes:
        (got,) = sess.run([out_name], f)
        outs = dbg.run([out_name, *acts], f)
        np.testing.assert_array_equal(outs[0], got)       # the extra outputs change nothing
        graph_inputs = {n: outs[1 + acts.index(a)] for n, a in act_of.items()}
        seen: list = []
        with fake_quant(tiny8.model, scales, graph_inputs, seen):
            ref = _torch_vision(tiny8.model, f["pixel_values"]) if graph == "vision" else _torch_decoder(tiny8.model, f)
        assert len(seen) == len(scales) and max(seen) <= 1e-4, seen     # the forwards agree before rounding
        assert _rel(got, ref) <= 1e-4, (f[next(iter(f))].shape, _rel(got, ref))
    # and the quantization really changed the numbers (the reference is not the fp32 model)
    fp = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run([out_name], shapes[0])[0]
    assert _rel(sess.run([out_name], shapes[0])[0], fp) > 1e-4


def test_int8_weights_are_stored_as_int8(tiny8, calib, fp32_graphs, tmp_path):
    fp32 = fp32_graphs["decoder"]
    ranges = tmp_path / "r.json"
    Q.calibrate_ranges(fp32, feeds(tiny8, calib.samples[:8], "decoder"), ranges)
    targets = Q.quant_targets(onnx.load(str(fp32), load_external_data=False), "decoder")
    proto = quantized_proto(fp32, tmp_path / "q", ranges, [t.node for t in targets], method="minmax")
    int8 = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert sum(int(np.prod(t.dims)) for t in int8) == sum(t.elements for t in targets)
    fp16 = [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert fp16, "lm_head (not quantized by default) is stored in fp16"
    big_fp32 = [t.name for t in proto.graph.initializer
                if t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) >= Q.FP16_MIN_ELEMENTS]
    assert big_fp32 == []
