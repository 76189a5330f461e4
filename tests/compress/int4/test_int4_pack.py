"""MatMulNBits packing against its inverse and against ONNX Runtime's own kernel (independent reference)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from medlite.compress.int4.pack import dequantize_nbits, pack_matmul_nbits, unpack_matmul_nbits


def _random_quant(n, k, block, bits, seed=0, symmetric=False):
    rng = np.random.default_rng(seed)
    nb = -(-k // block)
    q = rng.integers(0, 1 << bits, size=(n, k))
    zp = np.full((n, nb), 1 << (bits - 1)) if symmetric else rng.integers(0, 1 << bits, size=(n, nb))
    sc = rng.uniform(0.001, 0.05, size=(n, nb)).astype(np.float32)
    return q, sc, zp


@pytest.mark.parametrize("k,block,bits", [(352, 32, 4), (352, 64, 4), (352, 128, 4), (64, 128, 4),
                                          (96, 32, 8), (352, 128, 8), (33, 32, 4)])
def test_unpack_gives_back_integers_scales_zero_points(k, block, bits):
    q, sc, zp = _random_quant(5, k, block, bits, seed=k + block)
    p = pack_matmul_nbits(q, sc, zp, bits=bits, block_size=block)
    assert p.B.shape == (5, -(-k // block), block * bits // 8) and p.B.dtype == np.uint8
    q2, sc2, zp2 = unpack_matmul_nbits(p.B, p.scales, p.zero_points, K=k, N=5, bits=bits, block_size=block)
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(sc2, sc)
    np.testing.assert_array_equal(zp2, zp)


def _ort_matmul_nbits(p, x):
    import onnxruntime as ort

    inits = [numpy_helper.from_array(p.B, "B"), numpy_helper.from_array(p.scales, "scales"),
             numpy_helper.from_array(p.zero_points, "zp")]
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zp"], ["Y"], domain="com.microsoft",
                            K=p.K, N=p.N, bits=p.bits, block_size=p.block_size)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, p.K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, p.N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": x})[0]


@pytest.mark.parametrize("k,block,bits,sym", [(352, 64, 4, False), (352, 128, 4, True), (64, 128, 4, False),
                                              (352, 32, 8, True)])
def test_onnxruntime_kernel_agrees_with_numpy_dequantization(k, block, bits, sym):
    """ORT's MatMulNBits on our packed tensors == x @ ((q - zp) * scale)^T in numpy (partial last block)."""
    q, sc, zp = _random_quant(24, k, block, bits, seed=7, symmetric=sym)
    p = pack_matmul_nbits(q, sc, zp, bits=bits, block_size=block)
    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    g = np.arange(k) // block
    ref = x @ ((q - zp[:, g]) * sc[:, g]).T
    np.testing.assert_allclose(dequantize_nbits(p), (q - zp[:, g]) * sc[:, g], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_ort_matmul_nbits(p, x), ref, rtol=1e-4, atol=1e-5)


def test_out_of_range_integers_are_refused():
    q, sc, zp = _random_quant(2, 64, 32, 4)
    with pytest.raises(ValueError, match="outside"):
        pack_matmul_nbits(q + 16, sc, zp, bits=4, block_size=32)
    with pytest.raises(ValueError, match="expected"):
        pack_matmul_nbits(q, sc[:, :1], zp, bits=4, block_size=32)
