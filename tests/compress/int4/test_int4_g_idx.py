"""MatMulNBits with ``g_idx`` (act-order groups that are not contiguous), against independent references.

compressed-tensors 0.19 no longer produces a ``g_idx`` (its "group"/"dynamic" act-order raises, and
GPTQ's remaining "weight" ordering keeps groups contiguous), so the model-level test makes one from
llm-compressor's own result: the MLP hidden units of a tiny model are permuted (the function is
unchanged), GPTQ quantizes the permuted model with contiguous groups, and the units are permuted
back — ``down_proj``'s input columns, and so its groups, are then in permuted order, exactly the
layout "group" act-order writes (column ``j`` in group ``g_idx[j]``).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from int4_decoder import export_decoder, max_rel, ort_logits
from onnx import TensorProto, helper, numpy_helper

from medlite.compress.int4.pack import dequantize_nbits, pack_matmul_nbits, unpack_matmul_nbits


def _random(n, k, block, seed):
    rng = np.random.default_rng(seed)
    nb = -(-k // block)
    q = rng.integers(0, 16, size=(n, k))
    zp = rng.integers(0, 16, size=(n, nb))
    sc = rng.uniform(0.01, 0.1, size=(n, nb)).astype(np.float32)
    perm = rng.permutation(k)
    g = np.empty(k, np.int32)
    g[perm] = np.arange(k) // block            # "group" act-order: groups follow a column permutation
    return q, sc, zp, g


def _ort(p, x, zero_points):
    import onnxruntime as ort

    inits = [numpy_helper.from_array(p.B, "B"), numpy_helper.from_array(p.scales, "s"),
             numpy_helper.from_array(zero_points, "zp"), numpy_helper.from_array(p.g_idx, "g")]
    node = helper.make_node("MatMulNBits", ["A", "B", "s", "zp", "g"], ["Y"], domain="com.microsoft",
                            K=p.K, N=p.N, bits=p.bits, block_size=p.block_size)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, p.K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, p.N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": x})[0]


@pytest.mark.parametrize("k,block", [(352, 32), (352, 128), (256, 64), (33, 16)])
def test_g_idx_pack_unpack_and_onnxruntime_kernel(k, block):
    """Packed with g_idx: unpacks exactly; ORT's kernel == numpy x @ ((q - zp[:, g]) * s[:, g])^T."""
    q, sc, zp, g = _random(24, k, block, seed=k + block)
    p = pack_matmul_nbits(q, sc, zp, bits=4, block_size=block, g_idx=g)
    assert p.g_idx is not None and p.zero_points.dtype == np.float32
    q2, sc2, zp2 = unpack_matmul_nbits(p.B, p.scales, p.zero_points, K=k, N=24, bits=4, block_size=block)
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(sc2, sc)
    np.testing.assert_array_equal(zp2, zp)
    np.testing.assert_array_equal(p.g_idx, g)
    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    ref = x @ ((q - zp[:, g]) * sc[:, g]).T
    np.testing.assert_allclose(dequantize_nbits(p), (q - zp[:, g]) * sc[:, g], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_ort(p, x, p.zero_points), ref, rtol=1e-4, atol=1e-5)


def test_onnxruntime_ignores_packed_zero_points_with_g_idx():
    """Why g_idx layers carry float zero points: ORT 1.32's CPU kernel drops packed uint8 ones there.

    If this starts failing, onnxruntime fixed its g_idx path and packed zero points could be used.
    """
    q, sc, zp, g = _random(24, 128, 32, seed=3)
    p = pack_matmul_nbits(q, sc, zp, bits=4, block_size=32, g_idx=g)
    packed_zp = pack_matmul_nbits(q, sc, zp, bits=4, block_size=32).zero_points   # uint8, two per byte
    x = np.random.default_rng(2).standard_normal((3, 128)).astype(np.float32)
    ref = x @ ((q - zp[:, g]) * sc[:, g]).T
    rel = np.abs(_ort(p, x, packed_zp) - ref).max() / np.abs(ref).max()
    assert rel > 0.1, rel


def test_trivial_g_idx_is_dropped_and_8_bits_refused():
    q, sc, zp, _ = _random(4, 96, 32, seed=5)
    p = pack_matmul_nbits(q, sc, zp, bits=4, block_size=32, g_idx=np.arange(96) // 32)
    assert p.g_idx is None and p.zero_points.dtype == np.uint8      # contiguous: packed fast path
    _, _, _, g = _random(4, 96, 32, seed=6)
    with pytest.raises(ValueError, match="4 bits"):
        pack_matmul_nbits(q, sc, zp, bits=8, block_size=32, g_idx=g)


def _permute_mlp_units(lm, order) -> None:
    """Reorder every MLP's hidden units (gate/up rows, down_proj columns): the function is unchanged."""
    with torch.no_grad():
        for layer in lm.layers:
            m = layer.mlp
            m.gate_proj.weight.copy_(m.gate_proj.weight[order])
            m.up_proj.weight.copy_(m.up_proj.weight[order])
            m.down_proj.weight.copy_(m.down_proj.weight[:, order])


@pytest.fixture(scope="module")
def act_ordered(cctx, tiny_path, calib):
    from medlite.calibration.forward import ForwardLoop
    from medlite.checkpoints import load_model
    from medlite.compress.int4.llmc import LlmcOptions, quantize_language_model

    loaded = load_model(tiny_path, ctx=cctx)
    lm = loaded.model.model.language_model
    inter = lm.layers[0].mlp.down_proj.in_features
    perm = torch.randperm(inter, generator=torch.Generator().manual_seed(0))
    inv = torch.argsort(perm)
    _permute_mlp_units(lm, perm)
    loop = ForwardLoop(loaded, calib.samples[:8], batch_size=4)
    records = quantize_language_model(loaded.model, loop, LlmcOptions("gptq", 32, symmetric=False))
    _permute_mlp_units(lm, inv)                 # the baked (dequantized) weights go back to the unit order
    for name, r in records.items():            # and so do the quantizer's integers, scales, zero points
        if name.endswith(("gate_proj", "up_proj")):
            r.qweight, r.scales, r.zero_points = r.qweight[inv], r.scales[inv], r.zero_points[inv]
        elif name.endswith("down_proj"):
            r.qweight, r.g_idx = r.qweight[:, inv], (torch.arange(inter, dtype=torch.int32) // 32)[inv]
    probe = loop.batch(calib.samples[8:10])
    with torch.no_grad():
        out = lm(inputs_embeds=probe.inputs_embeds, attention_mask=probe.attention_mask, position_ids=probe.position_ids)
        logits = loaded.model.lm_head(out.last_hidden_state).numpy()
    return SimpleNamespace(loaded=loaded, records=records, probe=probe, logits=logits)


def test_g_idx_record_dequantizes_to_the_model_weights(act_ordered):
    downs = [n for n in act_ordered.records if n.endswith("down_proj")]
    assert downs
    for name in downs:
        rec = act_ordered.records[name]
        assert rec.g_idx is not None and not torch.equal(rec.g_idx, torch.arange(rec.shape[1]) // 32)
        torch.testing.assert_close(rec.dequantized(), act_ordered.loaded.model.get_submodule(name).weight,
                                   rtol=0, atol=0)


def test_g_idx_decoder_unpacks_and_matches_pytorch(act_ordered, tmp_path):
    """The exported MatMulNBits carry g_idx; unpacking gives the records back; ORT == PyTorch <= 1e-3."""
    from medlite.compress.int4.stage import pack_records

    proto, path = export_decoder(act_ordered.loaded, act_ordered.records, tmp_path)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    with_g = [n for n in nodes if len(n.input) > 4 and n.input[4]]
    downs = {n: r for n, r in act_ordered.records.items() if n.endswith("down_proj")}
    assert len(with_g) == len(downs) and len(nodes) == len(act_ordered.records)
    packed = pack_records(downs)
    for node in with_g:
        g = inits[node.input[4]]
        name = next(n for n, (p, _) in packed.items() if np.array_equal(p.B, inits[node.input[1]]))
        rec, attrs = downs[name], {a.name: a.i for a in node.attribute}
        q, sc, zp = unpack_matmul_nbits(*(inits[i] for i in node.input[1:4]), K=attrs["K"], N=attrs["N"],
                                        bits=attrs["bits"], block_size=attrs["block_size"])
        np.testing.assert_array_equal(q, rec.qweight.numpy())
        np.testing.assert_array_equal(sc, rec.scales.numpy())
        np.testing.assert_array_equal(zp, rec.zero_points.numpy())
        np.testing.assert_array_equal(g, rec.g_idx.numpy())
    p = act_ordered.probe
    rel = max_rel(ort_logits(path, act_ordered.loaded, p), act_ordered.logits, p.attention_mask.bool().numpy())
    assert rel <= 1e-3, rel


@pytest.mark.parametrize("act_order,expected", [(False, None), (True, "weight")])
def test_gptq_act_order_option_reaches_llmcompressor(act_order, expected):
    """``act_order: false`` really disables it (GPTQModifier's default would turn it into "static")."""
    from medlite.compress.int4.llmc import LlmcOptions, _modifiers

    mod = _modifiers({4: ["model.language_model.layers.0.mlp.up_proj"]}, LlmcOptions("gptq", 32, act_order=act_order))[0]
    assert [g.weights.actorder for g in mod.resolve_quantization_config().config_groups.values()] == [expected]


@pytest.mark.parametrize("kind", ["group", "dynamic"])
def test_compressed_tensors_no_longer_has_g_idx_act_order(kind):
    """The act-order variants that store weight_g_idx are gone in compressed-tensors 0.19."""
    from compressed_tensors.quantization import QuantizationArgs

    with pytest.raises(ValueError, match="has been removed"):
        QuantizationArgs(num_bits=4, strategy="group", group_size=32, actorder=kind)


def test_record_keeps_a_quantizers_g_idx():
    """A module carrying ``weight_g_idx`` (older compressed-tensors' "group" act-order) → record.g_idx,
    integers from compressed-tensors' formula with each column's group (recomputed here in numpy)."""
    from compressed_tensors.quantization import QuantizationArgs

    from medlite.compress.int4.llmc import record_from_module

    rng = np.random.default_rng(4)
    _, sc, zp, g = _random(6, 64, 32, seed=9)
    w = rng.standard_normal((6, 64)).astype(np.float32) * 0.05
    m = torch.nn.Linear(64, 6, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(w))
    m.weight_scale = torch.nn.Parameter(torch.from_numpy(sc), requires_grad=False)
    m.weight_zero_point = torch.nn.Parameter(torch.from_numpy(zp - 8).to(torch.int8), requires_grad=False)
    m.weight_g_idx = torch.nn.Parameter(torch.from_numpy(g), requires_grad=False)
    m.quantization_scheme = SimpleNamespace(weights=QuantizationArgs(num_bits=4, strategy="group", group_size=32,
                                                                     symmetric=False))
    rec = record_from_module("x", m, symmetric=False)
    np.testing.assert_array_equal(rec.g_idx.numpy(), g)
    expect = np.clip(np.round(w / sc[:, g] + (zp - 8)[:, g].astype(np.float32)), -8, 7) + 8   # float32, as torch
    np.testing.assert_array_equal(rec.qweight.numpy(), expect)
    np.testing.assert_array_equal(rec.zero_points.numpy(), zp)
