"""Shared by the INT4 tests: export the decoder with the MatMulNBits swap and run it on ONNX Runtime."""
from __future__ import annotations

import numpy as np
import onnx


def export_decoder(loaded, records, tmp_path):
    """``decoder.onnx`` of ``loaded`` with each record's Linear as MatMulNBits; returns ``(proto, path)``."""
    from medlite.compress.int4.stage import pack_records
    from medlite.compress.int4.swap import matmul_nbits_swap
    from medlite.export.graphs import decoder_onnx_from_model

    with matmul_nbits_swap(pack_records(records))(loaded.model):
        proto = decoder_onnx_from_model(loaded.model, opset=17, metadata={})
    path = tmp_path / "decoder.onnx"
    onnx.save(proto, str(path))
    return proto, path


def ort_logits(path, loaded, probe) -> np.ndarray:
    """The exported decoder's logits for a ForwardLoop batch (one masked past position, empty cache)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tc = loaded.model.config.text_config
    b = probe.inputs_embeds.shape[0]
    feed = {"inputs_embeds": probe.inputs_embeds.numpy(),
            "attention_mask": np.concatenate([np.zeros((b, 1), np.int32), probe.attention_mask.int().numpy()], 1),
            "position_ids": probe.position_ids.int().numpy()}
    hd = tc.hidden_size // tc.num_attention_heads
    for i in range(tc.num_hidden_layers):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((b, tc.num_key_value_heads, 1, hd), np.float32)
    return sess.run(["logits"], feed)[0]


def max_rel(a: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """``max |a - ref| / max |ref|`` over the real (unpadded) positions."""
    return float(np.abs(a[mask] - ref[mask]).max() / np.abs(ref[mask]).max())
