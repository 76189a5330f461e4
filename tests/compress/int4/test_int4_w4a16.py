"""W4A16 through llm-compressor → MatMulNBits decoder, against independent references (tiny random model).

* the MatMulNBits initializers unpack to exactly the integers / scales / zero points llm-compressor's
  modules hold (integers recomputed here in numpy from its scale and zero point);
* ONNX Runtime's logits of the MatMulNBits decoder equal the PyTorch forward of the model while
  llm-compressor's own fake-quant forward is installed.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from int4_decoder import export_decoder, max_rel, ort_logits
from onnx import numpy_helper


@pytest.fixture(scope="module")
def quantized(cctx, tiny_path, calib):
    """GPTQ asymmetric g32 with an int4 lm_head, plus llm-compressor's own state and logits."""
    from medlite.calibration.forward import ForwardLoop
    from medlite.checkpoints import load_model
    from medlite.compress.int4.llmc import LlmcOptions, quantize_language_model

    loaded = load_model(tiny_path, ctx=cctx)
    vision_before = {k: v.clone() for k, v in loaded.model.model.vision_tower.state_dict().items()}
    loop = ForwardLoop(loaded, calib.samples[:8], batch_size=4)
    probe = loop.batch(calib.samples[8:10])
    seen = {}

    def capture(model):
        for name, m in model.named_modules():
            if hasattr(m, "weight_scale"):
                zp = getattr(m, "weight_zero_point", None)
                seen[name.removesuffix(".inner")] = (m.weight.detach().clone(), m.weight_scale.detach().clone(),
                                                     None if zp is None else zp.detach().clone())
        with torch.no_grad():
            out = model.model.language_model(inputs_embeds=probe.inputs_embeds, attention_mask=probe.attention_mask,
                                             position_ids=probe.position_ids)
            seen["__logits__"] = model.lm_head(out.last_hidden_state).numpy()

    records = quantize_language_model(loaded.model, loop, LlmcOptions("gptq", 32, symmetric=False, lm_head="int4"),
                                      on_quantized=capture)
    return SimpleNamespace(loaded=loaded, records=records, seen=seen, probe=probe, vision_before=vision_before)


def _decoder(q, tmp_path):
    return export_decoder(q.loaded, q.records, tmp_path)


def test_only_language_model_quantized(quantized):
    names = set(quantized.records)
    assert "lm_head" in names and len(names) == 15
    assert all(n.startswith("model.language_model.") or n == "lm_head" for n in names)
    after = quantized.loaded.model.model.vision_tower.state_dict()
    assert all(torch.equal(after[k], v) for k, v in quantized.vision_before.items())


def test_initializers_unpack_to_the_quantizers_values(quantized, tmp_path):
    from medlite.compress.int4.pack import unpack_matmul_nbits

    proto, _ = _decoder(quantized, tmp_path)
    inits = {t.name: t for t in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 15 and all(n.domain == "com.microsoft" for n in nodes)
    checked = 0
    for node in nodes:
        attrs = {a.name: a.i for a in node.attribute}
        B, sc, zp = (numpy_helper.to_array(inits[i]) for i in node.input[1:4])
        q, sc, zp = unpack_matmul_nbits(B, sc, zp, K=attrs["K"], N=attrs["N"], bits=attrs["bits"],
                                        block_size=attrs["block_size"])
        # Which layer: the one whose llm-compressor scales match exactly.
        name = next(n for n, (w, s, z) in quantized.seen.items()
                    if n != "__logits__" and s.shape == sc.shape and np.array_equal(s.numpy(), sc))
        w, s, z = (t.double().numpy() for t in quantized.seen[name])
        k = attrs["K"]
        g = np.arange(w.shape[1]) // attrs["block_size"]
        ints = np.clip(np.round(w / s[:, g] + z[:, g]), -8, 7)[:, :k]   # compressed-tensors' signed int4
        np.testing.assert_array_equal(q, ints + 8)
        np.testing.assert_array_equal(zp, z + 8)
        assert attrs["bits"] == 4 and attrs["block_size"] == 32
        checked += 1
    assert checked == 15


def test_onnxruntime_logits_equal_llmcompressor_fake_quant(quantized, tmp_path):
    _, path = _decoder(quantized, tmp_path)
    p = quantized.probe
    rel = max_rel(ort_logits(path, quantized.loaded, p), quantized.seen["__logits__"], p.attention_mask.bool().numpy())
    assert rel <= 1e-3, rel


def _probe_logits(model, probe) -> np.ndarray:
    with torch.no_grad():
        out = model.model.language_model(inputs_embeds=probe.inputs_embeds, attention_mask=probe.attention_mask,
                                         position_ids=probe.position_ids)
        return model.lm_head(out.last_hidden_state).numpy()


def test_stage_registers_swap_and_runtime(cctx, tiny_path, calib):
    """apply_w4a16 through the build contract: ORT-only decoder plan with a quantization record; the
    working model holds only the packed layers, and its eager logits equal the fake-quant model's."""
    from medlite.pipeline.contract import ONNXRUNTIME, BuildState
    from medlite.calibration.forward import ForwardLoop
    from medlite.checkpoints import load_model
    from medlite.compress.int4.llmc import LlmcOptions, quantize_language_model
    from medlite.compress.int4.stage import apply_w4a16
    from medlite.compress.int4.swap import MatMulNBitsLinear
    from medlite.export.graphs import decoder_onnx_from_model

    loaded = load_model(tiny_path, ctx=cctx)
    state = BuildState(ctx=cctx, recipe=None, target=None, work=None, source=None, model=loaded, calibration=calib)
    opts = SimpleNamespace(vision="fp16", llm="w4a16", lm_head="int8", algorithm="rtn", group_size=128,
                           symmetric=True, act_order=False, samples=4)
    res = apply_w4a16(state, 0, opts)
    plan = state.export_plan.graph("decoder")
    assert plan.runtime == ONNXRUNTIME and "TensorRT 8.5" in plan.runtime_reason
    rec = plan.quantization
    assert rec["format"] == "com.microsoft.MatMulNBits" and rec["calibration_samples"] == 4
    assert rec["bits"] == [4, 8] and rec["layers"] == 15 and rec["group_size"] == 128
    assert rec["lm_head"] == "int8" and rec["lm_head_algorithm"] == "rtn"
    assert 0 < res.bytes_after < res.bytes_before and res.ok and len(res.changed) == 15
    model = loaded.model
    installed = [n for n, m in model.named_modules() if isinstance(m, MatMulNBitsLinear)]
    assert sorted(installed) == sorted(res.changed)       # every quantized layer is packed for good ...
    assert not [n for n, m in model.model.language_model.named_modules() if isinstance(m, torch.nn.Linear)]
    # ... and computes what the fake-quant (dequantized fp32) model computes: round-to-nearest again on
    # a fresh copy, baked into plain Linear layers by quantize_language_model itself
    ref = load_model(tiny_path, ctx=cctx)
    quantize_language_model(ref.model, ForwardLoop(ref, calib.samples[:4]), LlmcOptions("rtn", 128, lm_head="int8"))
    probe = ForwardLoop(loaded, calib.samples[8:10]).batch(calib.samples[8:10])
    np.testing.assert_allclose(_probe_logits(model, probe), _probe_logits(ref.model, probe), rtol=0, atol=1e-6)
    with state.export_plan.swaps_for("decoder", model):
        proto = decoder_onnx_from_model(model, opset=17, metadata={})
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits") for n in proto.graph.node
                  if n.op_type == "MatMulNBits")
    assert bits == [4] * 14 + [8]
    big = [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2
           and min(t.dims) > 32]
    assert not big, f"fp32 weight matrices left in the MatMulNBits decoder: {big}"


def test_awq_says_its_lm_head_is_round_to_nearest():
    """AWQ cannot reach lm_head: the record, the stage line and the report say how lm_head was quantized."""
    from medlite.compress.int4.stage import _head_algorithm

    opts = lambda alg, head: SimpleNamespace(algorithm=alg, lm_head=head)  # noqa: E731
    assert _head_algorithm(opts("awq", "int4")) == "rtn" and _head_algorithm(opts("gptq", "int4")) == "gptq"
    assert _head_algorithm(opts("awq", "fp16")) is None


def test_swap_restores_linear_layers(cctx, tiny_path, calib, quantized):
    """The export swap on a model with plain Linear layers installs MatMulNBits only for the trace."""
    from medlite.compress.int4.stage import pack_records
    from medlite.compress.int4.swap import MatMulNBitsLinear, matmul_nbits_swap

    model = quantized.loaded.model
    with matmul_nbits_swap(pack_records(quantized.records))(model) as n:
        assert n == len(quantized.records)
        assert sum(isinstance(m, MatMulNBitsLinear) for m in model.modules()) == n
    assert not any(isinstance(m, MatMulNBitsLinear) for m in model.modules())


def test_awq_statistics_skip_left_padding(cctx, tiny_path, calib):
    """AWQ's activation statistics count exactly the real tokens of the calibration batches (no padding)."""
    from unittest import mock

    from llmcompressor.modifiers.transform.awq.base import AWQModifier

    from medlite.calibration.forward import ForwardLoop
    from medlite.checkpoints import load_model
    from medlite.compress.int4.llmc import LlmcOptions, quantize_language_model

    loaded = load_model(tiny_path, ctx=cctx)
    loop = ForwardLoop(loaded, calib.samples[:8], batch_size=4)
    real = sum(int(b.attention_mask.sum()) for b in loop.batches())
    padded = sum(b.attention_mask.numel() for b in loop.batches())
    counts = []
    original = AWQModifier._compute_best_scale

    def spy(self, mapping, *args, **kwargs):
        counts.append(int(self._smooth_activation_stats[mapping.smooth_name][1]))
        return original(self, mapping, *args, **kwargs)

    with mock.patch.object(AWQModifier, "_compute_best_scale", spy):
        quantize_language_model(loaded.model, loop, LlmcOptions("awq", 32, symmetric=False))
    assert real < padded and counts and set(counts) == {real}


def test_int8_compute_sets_accuracy_level_and_stays_close(quantized, tmp_path):
    """``int4_compute: int8``: every MatMulNBits gets accuracy_level 4; ONNX Runtime then quantizes each
    activation block to int8, so the logits move (the attribute takes effect) but stay close to the
    fake-quant reference, and the plain export stays exact."""
    from medlite.compress.int4.stage import ACCURACY_LEVEL, accuracy_level_pass

    proto, path = _decoder(quantized, tmp_path)
    fast = accuracy_level_pass(ACCURACY_LEVEL["int8"])(proto, None)
    levels = [next(a.i for a in n.attribute if a.name == "accuracy_level") for n in fast.graph.node
              if n.op_type == "MatMulNBits"]
    assert levels == [4] * 15
    fast_path = tmp_path / "decoder_int8_compute.onnx"
    onnx.save(fast, str(fast_path))
    p = quantized.probe
    mask = p.attention_mask.bool().numpy()
    ref = quantized.seen["__logits__"]
    rel_fast = max_rel(ort_logits(fast_path, quantized.loaded, p), ref, mask)
    assert 1e-6 < rel_fast <= 5e-2, rel_fast


def test_quantization_draws_no_progress_bar_of_its_own(cctx, tiny_path, calib, capfd):
    """compressed-tensors' "Applying quantization config" tqdm bar, AWQ's "Smoothing" / "Grid search" bars
    and llm-compressor's INFO lines stay out of the build's output (the stage's own progress bar reports)."""
    from medlite.calibration.forward import ForwardLoop
    from medlite.checkpoints import load_model
    from medlite.compress.int4.llmc import LlmcOptions, quantize_language_model

    for algorithm in ("rtn", "awq"):
        loaded = load_model(tiny_path, ctx=cctx)
        capfd.readouterr()
        quantize_language_model(loaded.model, ForwardLoop(loaded, calib.samples[:4], batch_size=4),
                                LlmcOptions(algorithm, 32, symmetric=False))
        out, err = capfd.readouterr()
        for noise in ("Applying quantization config", "Smoothing", "Grid search", "INFO"):
            assert noise not in out + err, (algorithm, out + err)


def test_awq_with_padded_layers_scales_what_it_can_and_says_what_it_cannot(tiny_path, calib, tmp_path):
    """Group 128 on the tiny model (hidden 64): every layer reading the hidden state is quantized zero-padded,
    so AWQ cannot scale q/k/v/o/gate/up (a wrapper has no ``.weight``; its padded inner takes more inputs
    than the smooth layer gives) and warns; up_proj -> down_proj (K = 128) keeps AWQ, with the padded
    up_proj's inner Linear as the smooth layer. The decoder still equals the fake-quant forward."""
    from medlite.calibration.forward import ForwardLoop
    from medlite.checkpoints import load_model
    from medlite.compress.int4.llmc import LlmcOptions, quantize_language_model
    from medlite.context import RunContext

    ctx = RunContext(quiet=True)
    seen, records = {}, {}
    for algorithm in ("rtn", "awq"):
        loaded = load_model(tiny_path, ctx=ctx)
        loop = ForwardLoop(loaded, calib.samples[:8], batch_size=4)
        probe = loop.batch(calib.samples[8:10])
        records[algorithm] = quantize_language_model(
            loaded.model, loop, LlmcOptions(algorithm, 128, symmetric=False), ctx=ctx,
            on_quantized=lambda m, a=algorithm: seen.__setitem__(a, _probe_logits(m, probe)))
    (warning,) = [w for w in ctx.warnings if w.startswith("awq:")]
    assert "12 layer(s) (gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)" in warning, warning
    down = "model.language_model.layers.0.mlp.down_proj"
    up = "model.language_model.layers.0.mlp.up_proj"
    assert not torch.equal(records["awq"][down].dequantized(), records["rtn"][down].dequantized())   # scaled
    q = "model.language_model.layers.0.self_attn.q_proj"
    assert torch.equal(records["awq"][q].qweight, records["rtn"][q].qweight)                           # not scaled
    assert records["awq"][up].shape == records["rtn"][up].shape == (128, 64)
    _, path = export_decoder(loaded, records["awq"], tmp_path)
    rel = max_rel(ort_logits(path, loaded, probe), seen["awq"], probe.attention_mask.bool().numpy())
    assert rel <= 1e-3, rel
