"""Export that composes: module swaps at trace time, Q/DQ on small weights and a com.microsoft node
survive the standard passes; the ONNX-Runtime-only graph is marked, skipped by the TensorRT check,
and listed as such in the runtime config and the artifact manifest."""
from __future__ import annotations

import contextlib
import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch

from medlite.pipeline.contract import ONNXRUNTIME, ExportPlan, StageResult
from medlite.cli import main

Q_LAYER = "model.language_model.layers.0.mlp.up_proj"          # fake-quant → QuantizeLinear/DequantizeLinear
NBITS_LAYER = "model.language_model.layers.1.mlp.down_proj"     # → com.microsoft MatMulNBits
WHY = "MatMulNBits is a com.microsoft op: TensorRT 8.5 cannot parse it"


class FakeQuantLinear(torch.nn.Module):
    """A Linear whose weight goes through per-channel symmetric INT8 fake quantization (traces to Q/DQ)."""

    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        self.lin = lin
        self.scale = (lin.weight.detach().abs().amax(dim=1) / 127.0).clamp(min=1e-8).float()

    def forward(self, x):
        w = torch.fake_quantize_per_channel_affine(self.lin.weight.float(), self.scale,
                                                   torch.zeros_like(self.scale, dtype=torch.int32), 0, -128, 127)
        return torch.nn.functional.linear(x, w.to(x.dtype), self.lin.bias)


@contextlib.contextmanager
def fake_quant_swap(model):
    parent = model.get_submodule(Q_LAYER.rsplit(".", 1)[0])
    old = getattr(parent, "up_proj")
    parent.up_proj = FakeQuantLinear(old)
    try:
        yield 1
    finally:
        parent.up_proj = old


def nbits_swap(model):
    from medlite.compress.int4.pack import pack_matmul_nbits
    from medlite.compress.int4.swap import matmul_nbits_swap

    w = model.get_submodule(NBITS_LAYER).weight.detach().float().numpy()
    n, k = w.shape
    bs = 16
    nb = -(-k // bs)
    pad = np.zeros((n, nb * bs), np.float32)
    pad[:, :k] = w
    g = pad.reshape(n, nb, bs)
    scales = np.maximum(np.abs(g).max(axis=2) / 7.0, 1e-8)
    q = np.clip(np.round(g / scales[..., None]) + 8, 0, 15).astype(np.int64).reshape(n, -1)[:, :k]
    packed = pack_matmul_nbits(q, scales, np.full((n, nb), 8), bits=4, block_size=bs)
    return matmul_nbits_swap({NBITS_LAYER: (packed, None)})(model)


def plan_both(state, index, opts):
    """A stand-in compress stage: both swaps on the decoder, which becomes ONNX-Runtime only."""
    gp = state.export_plan.graph("decoder")
    gp.swaps += [("fake-quant int8", fake_quant_swap), ("matmul-nbits", nbits_swap)]
    gp.runtime, gp.runtime_reason = ONNXRUNTIME, WHY
    gp.quantization = {"scheme": "test: int8 Q/DQ + int4 MatMulNBits"}
    return StageResult(summary="planned (test)", changed=[Q_LAYER, NBITS_LAYER])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from medlite.checkpoints import load_model
    from medlite.checkpoints.random_ckpt import write_random_checkpoint
    from medlite.context import RunContext

    root = tmp_path_factory.mktemp("ckpt")
    path = write_random_checkpoint("tiny", root / "tiny", fmt="legacy", ctx=RunContext(cache_dir=root / "c", quiet=True))
    return path


def test_swaps_survive_folding_and_the_graph_is_ort_only(tiny, tmp_path):
    from medlite.checkpoints import load_model
    from medlite.context import RunContext
    from medlite.export import export_onnx
    from medlite.runtime import OnnxVlm

    ctx = RunContext(cache_dir=tmp_path / "c", quiet=True)
    loaded = load_model(tiny, ctx=ctx)
    plan = ExportPlan()

    class _S:
        export_plan = plan
    plan_both(_S(), 0, None)
    small = loaded.model.get_submodule(Q_LAYER).weight.numel()
    assert small <= 1 << 16        # small enough that the folding pass would fold it if it were allowed to
    res = export_onnx(loaded, tmp_path / "out", ctx=ctx, precision="fp32", plan=plan)
    dec = onnx.load(str(tmp_path / "out" / "decoder.onnx"))
    ops = [(n.domain, n.op_type) for n in dec.graph.node]
    assert ("", "QuantizeLinear") in ops and ("", "DequantizeLinear") in ops
    assert ops.count(("com.microsoft", "MatMulNBits")) == 1
    assert res.trt_check["decoder"]["skipped"] and res.trt_check["decoder"]["reason"] == WHY
    assert not res.trt_check["vision"].get("skipped")          # the vision graph is still checked
    cfg = json.loads((tmp_path / "out" / "medlite_runtime.json").read_text())
    assert cfg["graphs"]["decoder"]["runtime"] == "onnxruntime" and cfg["graphs"]["decoder"]["runtime_reason"] == WHY
    assert cfg["graphs"]["decoder"]["quantization"]["scheme"].startswith("test:")
    assert cfg["graphs"]["vision"]["runtime"] == "tensorrt"
    # the swaps were undone after the trace
    assert type(loaded.model.get_submodule(Q_LAYER)) is torch.nn.Linear
    # ONNX Runtime runs it: logits match the swapped PyTorch model
    vlm = OnnxVlm.open(tmp_path / "out", providers=["CPUExecutionProvider"])
    from medlite.checkpoints.generate import first_token_logits
    from medlite.imaging.builtin import builtin_images

    image = builtin_images()[0].load()
    with fake_quant_swap(loaded.model), nbits_swap(loaded.model):
        want = first_token_logits(loaded, image, "is there a lesion?")
    got = vlm.first_token_logits(image, "is there a lesion?")
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


RECIPE = """\
name: ort-only
version: 1.0.0
target: jetson-xavier-agx-32gb
calibration: {samples: 4}
stages:
  - quantize: {llm: w4a16}
  - export: {precision: fp32}
"""


def test_manifest_lists_the_ort_only_graph(tiny, tmp_path, monkeypatch, capsys):
    from medlite.recipes import registry

    monkeypatch.setitem(registry.STAGES, "quantize", dataclasses.replace(registry.STAGES["quantize"], runner=plan_both))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    rc = main(["--quiet", "--cache-dir", str(tmp_path / "c"), "build", str(recipe), "--model", str(tiny),
               "--vision-tower", str(tiny / "vision_tower"), "--out", str(tmp_path / "out"), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0, res
    manifest = json.loads(open(res["artifact"] + "/manifest.json").read())
    assert manifest["graphs"]["decoder"]["runtime"] == "onnxruntime"
    assert manifest["graphs"]["decoder"]["runtime_reason"] == WHY
    assert manifest["sections"]["export"]["onnxruntime_only"] == {"decoder": WHY}
    assert manifest["sections"]["export"]["trt_check"]["decoder"]["skipped"] is True
    assert manifest["sections"]["quantize"]["changed"] == [Q_LAYER, NBITS_LAYER]
    assert "onnxruntime" in manifest["numerics_packages"]
