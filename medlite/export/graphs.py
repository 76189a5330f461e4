"""The three graphs: ``vision_onnx_from_model``, ``embed_onnx_from_model``, ``decoder_onnx_from_model``.

Each takes the canonical ``LlavaForConditionalGeneration`` already in the export dtype (see
:func:`medlite.export.precision.model_for_precision`) and returns an in-memory ``onnx.ModelProto``
with its weights. The example inputs used for tracing have every dynamic dimension > 1 and
pairwise different (batch 2, seq 3, past 2), so no dimension is specialised by broadcasting.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import onnx
import torch

from medlite.export.modules import (DecoderGraph, EmbedGraph, VisionGraph, decomposed_layer_norms,
                                    export_attention)
from medlite.export.trace import onnx_from_module

TRACE_BATCH, TRACE_SEQ, TRACE_PAST = 2, 3, 2


def text_dims(model) -> dict[str, int]:
    """hidden size, layers, KV heads, head dim and vocab of the language model."""
    tc = model.config.text_config
    heads = tc.num_attention_heads
    return {
        "hidden_size": int(tc.hidden_size),
        "num_layers": int(tc.num_hidden_layers),
        "num_kv_heads": int(getattr(tc, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(tc, "head_dim", None) or tc.hidden_size // heads),
        "vocab_size": int(model.lm_head.weight.shape[0]),
    }


def kv_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(past input names, present output names), key before value, layer by layer."""
    past = [f"past_key_values.{i}.{k}" for i in range(num_layers) for k in ("key", "value")]
    present = [f"present.{i}.{k}" for i in range(num_layers) for k in ("key", "value")]
    return past, present


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def vision_onnx_from_model(model, *, image_size: int, opset: int, metadata: dict[str, str],
                           tmp_root: Optional[Path] = None, trace_notes: Optional[list] = None) -> onnx.ModelProto:
    """``pixel_values [batch,3,S,S]`` float32 → ``image_embeds [batch, n_img_tokens, hidden]``."""
    dtype = _dtype(model)
    module = VisionGraph(model, dtype).eval()
    example = torch.zeros(TRACE_BATCH, 3, image_size, image_size, dtype=torch.float32)
    with export_attention(model), decomposed_layer_norms(model.model.vision_tower), \
            decomposed_layer_norms(model.model.multi_modal_projector):
        return onnx_from_module(module, (example,), input_names=["pixel_values"], output_names=["image_embeds"],
                                dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
                                opset=opset, graph_name="vision", metadata=metadata, tmp_root=tmp_root,
                                trace_notes=trace_notes)


def embed_onnx_from_model(model, *, opset: int, metadata: dict[str, str], tmp_root: Optional[Path] = None,
                          trace_notes: Optional[list] = None) -> onnx.ModelProto:
    """``input_ids [batch, seq]`` int32 → ``inputs_embeds [batch, seq, hidden]`` (one Gather)."""
    module = EmbedGraph(model).eval()
    example = torch.zeros(TRACE_BATCH, TRACE_SEQ, dtype=torch.int32)
    return onnx_from_module(module, (example,), input_names=["input_ids"], output_names=["inputs_embeds"],
                            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "inputs_embeds": {0: "batch", 1: "seq"}},
                            opset=opset, graph_name="embed", metadata=metadata, tmp_root=tmp_root,
                            trace_notes=trace_notes)


def decoder_onnx_from_model(model, *, opset: int, metadata: dict[str, str], tmp_root: Optional[Path] = None,
                            trace_notes: Optional[list] = None) -> onnx.ModelProto:
    """Language model + lm_head with explicit KV cache (see :class:`~medlite.export.modules.DecoderGraph`)."""
    dtype = _dtype(model)
    dims = text_dims(model)
    n, kvh, hd, h = dims["num_layers"], dims["num_kv_heads"], dims["head_dim"], dims["hidden_size"]
    module = DecoderGraph(model, n, dtype).eval()
    b, s, p = TRACE_BATCH, TRACE_SEQ, TRACE_PAST
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(b, s, h, generator=gen).to(dtype),
            torch.ones(b, p + s, dtype=torch.int32),
            torch.arange(p, p + s, dtype=torch.int32).repeat(b, 1)]
    args += [torch.randn(b, kvh, p, hd, generator=gen).to(dtype) for _ in range(2 * n)]
    past, present = kv_names(n)
    axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({name: {0: "batch", 2: "past"} for name in past})
    axes.update({name: {0: "batch", 2: "total"} for name in present})
    with export_attention(model), decomposed_layer_norms(model.model.language_model), \
            decomposed_layer_norms(model.lm_head):
        return onnx_from_module(module, args, input_names=["inputs_embeds", "attention_mask", "position_ids", *past],
                                output_names=["logits", *present], dynamic_axes=axes, opset=opset,
                                graph_name="decoder", metadata=metadata, tmp_root=tmp_root, trace_notes=trace_notes)
