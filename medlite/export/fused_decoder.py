"""The fused ONNX Runtime decoder: ``decoder.onnx`` written node by node from the model's weights with
ONNX Runtime's contrib operators, for decoders that run on ONNX Runtime only (docs/cpu.md, issue 31).

The traced decoder (:func:`medlite.export.graphs.decoder_onnx_from_model`) is what TensorRT 8.5 needs:
attention, RMSNorm and rotary embedding as thousands of small standard ops. On ONNX Runtime's CPU
kernels that costs more than the 4-bit weight reads (full size, 869 cache slots, ms per step:
Transpose 29, MatMulNBits 26, Expand 22.8 — the eager ``repeat_kv`` copying 4 KV heads to 32 at every
step — MatMul 7.6, Concat 4.6). This graph has, per layer:

* ``SkipSimplifiedLayerNormalization`` (com.microsoft): residual add + RMSNorm in one kernel (fp32
  statistics); the very first norm has no residual and stays explicit standard ops (once per call);
* the projections as ``MatMulNBits`` (the quantize stage's packed tensors, unchanged) or ``MatMul``;
* ``RotaryEmbedding`` (com.microsoft) on Q and K with the model's own cos/sin tables and the graph's
  ``position_ids`` (left padding keeps working: positions count real tokens only);
* ``GroupQueryAttention`` (com.microsoft): reads the grouped KV heads directly (no ``repeat_kv``, no
  transposed K copy) from the BNSH cache and writes ``present`` = past + new.

**Same interface as the traced graph** (inputs, outputs, names, dtypes, dynamic dims, the dummy-slot
convention), so every runtime — ``OnnxVlm``, its IO-bound KV buffers, batches with left padding, the
device bundle — runs it unchanged. What the traced graph computes from ``attention_mask`` is given to
GQA as an additive ``attention_bias`` (-1e4 on blocked slots, exactly the traced graph's value; GQA
applies the causal part itself), ``seqlens_k`` = total - 1 for every row and ``query_seqlens`` = the
new tokens, so prefill after the dummy slot (past 1, several tokens, batch > 1) is a chunk GQA accepts.

Why written from the weights rather than by rewriting the traced graph or tracing custom symbolic
ops: the traced graph's shape arithmetic changes with every transformers/torch release (a pattern
matcher over 4,900 nodes breaks silently), and a custom-op trace would still carry that arithmetic;
written directly, the graph is a few hundred nodes whose every tensor is known, and the only model
facts it needs are the Llama-family module layout checked by :func:`fused_problem`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from medlite.export.graph_passes import stable_onnx_from_onnx
from medlite.export.graphs import kv_names, text_dims
from medlite.export.modules import MASK_VALUE
from medlite.export.trace import STAGE_MIN_BYTES

MS = "com.microsoft"
BACKBONES = ("llama", "qwen2", "mistral")       # RMSNorm, SiLU-gated MLP, full rotary, q/k/v/o projections
ROPE_TYPES = ("default", "linear", "llama3")      # position-independent cos/sin tables (not "dynamic")
FUSED_OPS = ("GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization", "MatMulNBits")


def _linear_kind(mod) -> Optional[str]:
    from torch import nn

    from medlite.compress.int4.swap import MatMulNBitsLinear

    if isinstance(mod, MatMulNBitsLinear):
        return "nbits"
    if type(mod) is nn.Linear:
        return "linear"
    return None


def fused_problem(model) -> Optional[str]:
    """Why the fused decoder cannot be written for ``model`` (None when it can).

    ``model``: the canonical ``LlavaForConditionalGeneration`` with the export's module swaps applied.
    """
    tc = model.config.text_config
    if tc.model_type not in BACKBONES:
        return f"text backbone {tc.model_type!r} (the fused decoder supports {', '.join(BACKBONES)})"
    if getattr(tc, "hidden_act", "silu") != "silu":
        return f"hidden_act {tc.hidden_act!r} (the fused MLP is SiLU-gated)"
    rope = getattr(tc, "rope_scaling", None) or getattr(tc, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ROPE_TYPES:
        return f"rope type {rope_type!r} (its cos/sin depend on the sequence length)"
    if float(getattr(tc, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        return "partial rotary embedding"
    lm = model.model.language_model
    dims = text_dims(model)
    hd = dims["head_dim"]
    for i, layer in enumerate(lm.layers):
        att, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if _linear_kind(getattr(att, name, None)) is None:
                return f"layers.{i}.self_attn.{name} is {type(getattr(att, name, None)).__name__}, not a Linear"
        for name in ("gate_proj", "up_proj", "down_proj"):
            if _linear_kind(getattr(mlp, name, None)) is None:
                return f"layers.{i}.mlp.{name} is {type(getattr(mlp, name, None)).__name__}, not a Linear"
        if att.k_proj.out_features != dims["num_kv_heads"] * hd or att.q_proj.out_features % hd:
            return f"layers.{i}: {att.k_proj.out_features // hd} KV heads (the cache is {dims['num_kv_heads']})"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "variance_epsilon") or getattr(norm, "bias", None) is not None:
                return f"layers.{i}: {type(norm).__name__} is not an RMSNorm"
    if _linear_kind(model.lm_head) is None:
        return f"lm_head is {type(model.lm_head).__name__}, not a Linear"
    return None


class _Graph:
    """Nodes and initializers being written; initializers of ``STAGE_MIN_BYTES`` or more are staged to a
    file under ``tmp`` at once (absolute external locations, copied by ``write_onnx``), so the proto
    never holds the weights (the full-size fp32 decoder is 4.4 GB)."""

    def __init__(self, tmp: Path):
        self.nodes: list = []
        self.inits: list = []
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.file = self.tmp / "fused-weights.bin"
        self._f = open(self.file, "wb")
        self._offset = 0
        self._n = 0

    def init(self, name: str, arr: np.ndarray) -> str:
        arr = np.ascontiguousarray(arr)
        if arr.nbytes < STAGE_MIN_BYTES:
            self.inits.append(numpy_helper.from_array(arr, name))
            return name
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=list(arr.shape))
        t.data_location = TensorProto.EXTERNAL
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        self._f.write(data)
        for k, v in (("location", str(self.file.resolve())), ("offset", str(self._offset)), ("length", str(len(data)))):
            t.external_data.append(onnx.StringStringEntryProto(key=k, value=v))
        self._offset += len(data)
        self.inits.append(t)
        return name

    def node(self, op: str, inputs: list, outputs, *, domain: str = "", **attrs) -> list:
        outs = [outputs] if isinstance(outputs, str) else list(outputs)
        self._n += 1
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"/{op}_{self._n}", domain=domain, **attrs))
        return outs

    def one(self, op: str, inputs: list, output: str, **kw) -> str:
        return self.node(op, inputs, output, **kw)[0]

    def close(self) -> None:
        self._f.close()


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def _linear(g: _Graph, mod, x: str, prefix: str, dtype) -> str:
    """``x @ W^T (+ b)``: MatMulNBits with the packed tensors as they are, or MatMul with ``W^T``."""
    if _linear_kind(mod) == "nbits":
        ins = [x, g.init(f"{prefix}.B", _np(mod.B)), g.init(f"{prefix}.scales", _np(mod.scales)),
               g.init(f"{prefix}.zero_points", _np(mod.zero_points))]
        if mod.g_idx is not None:
            ins.append(g.init(f"{prefix}.g_idx", _np(mod.g_idx)))
        y = g.one("MatMulNBits", ins, f"{prefix}/out", domain=MS, K=int(mod.K), N=int(mod.N), bits=int(mod.bits),
                  block_size=int(mod.block_size))
    else:
        w = _np(mod.weight).T.astype(dtype)
        y = g.one("MatMul", [x, g.init(f"{prefix}.weight_t", w)], f"{prefix}/out")
    if getattr(mod, "bias", None) is not None:
        y = g.one("Add", [y, g.init(f"{prefix}.bias", _np(mod.bias).astype(dtype))], f"{prefix}/biased")
    return y


def _rms_norm_first(g: _Graph, x: str, norm, dtype, onnx_type: int, opset: int) -> str:
    """The first layer's RMSNorm (no residual yet) as transformers computes it: statistics in fp32, the
    normalised value cast back, then the weight. Standard ops: ``SimplifiedLayerNormalization`` lives in
    the default domain without being an ONNX op, which onnx.checker rejects."""
    xf = g.one("Cast", [x], "norm0/xf", to=TensorProto.FLOAT)
    sq = g.one("Mul", [xf, xf], "norm0/sq")
    if opset >= 18:      # ReduceMean's axes became an input in opset 18
        var = g.one("ReduceMean", [sq, g.init("norm0.axes", np.array([-1], np.int64))], "norm0/var", keepdims=1)
    else:
        var = g.one("ReduceMean", [sq], "norm0/var", axes=[-1], keepdims=1)
    eps = g.init("norm0.eps", np.array(float(norm.variance_epsilon), np.float32))
    inv = g.one("Reciprocal", [g.one("Sqrt", [g.one("Add", [var, eps], "norm0/var_eps")], "norm0/std")], "norm0/inv")
    y = g.one("Cast", [g.one("Mul", [xf, inv], "norm0/normed")], "norm0/normed_t", to=onnx_type)
    return g.one("Mul", [g.init("layers.0.input_layernorm.weight", _np(norm.weight).astype(dtype)), y], "norm0/out")


def _rotary_tables(lm, max_pos: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin ``[max_pos, head_dim / 2]`` from the model's own rotary module (its scaling included)."""
    import torch

    pos = torch.arange(max_pos, dtype=torch.int64)[None]
    probe = torch.zeros(1, dtype=torch.float32)
    cos, sin = lm.rotary_emb(probe, pos)
    half = cos.shape[-1] // 2
    return _np(cos[0, :, :half]).astype(dtype), _np(sin[0, :, :half]).astype(dtype)


def _shared_inputs(g: _Graph, dtype) -> dict:
    """GQA's per-call inputs from the graph's ``attention_mask`` / ``position_ids`` / ``inputs_embeds``."""
    i64 = lambda name, v: g.init(name, np.array(v, np.int64))    # noqa: E731
    mshape = g.one("Shape", ["attention_mask"], "mask/shape")
    batch = g.one("Gather", [mshape, i64("c.zero1", [0])], "mask/batch")          # [1]
    total = g.one("Gather", [mshape, i64("c.one1", [1])], "mask/total")           # [1]
    seq = g.one("Gather", [g.one("Shape", ["inputs_embeds"], "x/shape"), i64("c.one1b", [1])], "x/seq")
    seqlens = g.one("Expand", [g.one("Sub", [total, i64("c.one", 1)], "mask/last"), batch], "mask/seqlens64")
    total_i32 = g.one("Cast", [g.one("Squeeze", [total, i64("c.zero1c", [0])], "mask/total0")], "total_seq_len",
                      to=TensorProto.INT32)
    # blocked slots add MASK_VALUE (-1e4), as the traced graph does; GQA applies the causal part itself
    m = g.one("Cast", ["attention_mask"], "mask/f", to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    blocked = g.one("Sub", [g.init("c.onef", np.array(1.0, dtype)), m], "mask/blocked")
    bias2 = g.one("Mul", [blocked, g.init("c.maskv", np.array(MASK_VALUE, dtype))], "mask/bias2")
    bias4 = g.one("Unsqueeze", [bias2, i64("c.axes12", [1, 2])], "mask/bias4")
    one = i64("c.one1d", [1])
    shape = g.one("Concat", [batch, one, seq, total], "mask/bias_shape", axis=0)
    return {"seqlens_k": g.one("Cast", [seqlens], "seqlens_k", to=TensorProto.INT32),
            "total": total_i32,
            "query_seqlens": g.one("Cast", [g.one("Expand", [seq, batch], "x/seq_b")], "query_seqlens",
                                   to=TensorProto.INT32),
            "bias": g.one("Expand", [bias4, shape], "attention_bias"),
            "pos": g.one("Cast", ["position_ids"], "position_ids64", to=TensorProto.INT64)}


def _attention(g: _Graph, i: int, att, x: str, shared: dict, rope: tuple, kv: tuple, dtype) -> str:
    """Q/K/V projections, rotary on Q and K, GroupQueryAttention over the grouped cache, o_proj."""
    p = f"layers.{i}.self_attn"
    hd = int(att.head_dim)
    nh, kvh = att.q_proj.out_features // hd, att.k_proj.out_features // hd
    q = _linear(g, att.q_proj, x, f"{p}.q_proj", dtype)
    k = _linear(g, att.k_proj, x, f"{p}.k_proj", dtype)
    v = _linear(g, att.v_proj, x, f"{p}.v_proj", dtype)
    cos, sin = rope
    q = g.one("RotaryEmbedding", [q, shared["pos"], cos, sin], f"{p}/q_rot", domain=MS, num_heads=nh,
              rotary_embedding_dim=hd, interleaved=0)
    k = g.one("RotaryEmbedding", [k, shared["pos"], cos, sin], f"{p}/k_rot", domain=MS, num_heads=kvh,
              rotary_embedding_dim=hd, interleaved=0)
    past_k, past_v, present_k, present_v = kv
    # inputs by position: query key value past_key past_value seqlens_k total_sequence_length cos_cache
    # sin_cache position_ids attention_bias head_sink k_scale v_scale q_norm_weight k_norm_weight query_seqlens
    ins = [q, k, v, past_k, past_v, shared["seqlens_k"], shared["total"], "", "", "", shared["bias"],
           "", "", "", "", "", shared["query_seqlens"]]
    out = g.node("GroupQueryAttention", ins, [f"{p}/out", present_k, present_v], domain=MS, num_heads=nh,
                 kv_num_heads=kvh, scale=float(att.scaling), do_rotary=0)[0]
    return _linear(g, att.o_proj, out, f"{p}.o_proj", dtype)


def _mlp(g: _Graph, i: int, mlp, x: str, dtype) -> str:
    """``down(silu(gate(x)) * up(x))``."""
    p = f"layers.{i}.mlp"
    gate = _linear(g, mlp.gate_proj, x, f"{p}.gate_proj", dtype)
    up = _linear(g, mlp.up_proj, x, f"{p}.up_proj", dtype)
    silu = g.one("Mul", [gate, g.one("Sigmoid", [gate], f"{p}/sigmoid")], f"{p}/silu")
    return _linear(g, mlp.down_proj, g.one("Mul", [silu, up], f"{p}/act"), f"{p}.down_proj", dtype)


def _skip_norm(g: _Graph, x: str, residual: str, norm, name: str, dtype) -> tuple[str, str]:
    """``residual + x`` and its RMSNorm in one kernel; returns ``(normed, sum)``."""
    outs = g.node("SkipSimplifiedLayerNormalization", [x, residual, g.init(f"{name}.weight", _np(norm.weight).astype(dtype))],
                  [f"{name}/out", "", "", f"{name}/sum"], domain=MS, epsilon=float(norm.variance_epsilon))
    return outs[0], outs[3]


def _io(dims: dict, onnx_type: int) -> tuple[list, list]:
    """Graph inputs and outputs, named and shaped exactly as the traced decoder's."""
    n, kvh, hd = dims["num_layers"], dims["num_kv_heads"], dims["head_dim"]
    past, present = kv_names(n)
    vi = helper.make_tensor_value_info
    inputs = [vi("inputs_embeds", onnx_type, ["batch", "seq", dims["hidden_size"]]),
              vi("attention_mask", TensorProto.INT32, ["batch", "total"]),
              vi("position_ids", TensorProto.INT32, ["batch", "seq"])]
    inputs += [vi(name, onnx_type, ["batch", kvh, "past", hd]) for name in past]
    outputs = [vi("logits", TensorProto.FLOAT, ["batch", "seq", dims["vocab_size"]])]
    outputs += [vi(name, onnx_type, ["batch", kvh, "total", hd]) for name in present]
    return inputs, outputs


def fused_decoder_onnx_from_model(model, *, opset: int, metadata: dict, tmp_root: Optional[Path] = None,
                                  trace_notes: Optional[list] = None) -> onnx.ModelProto:
    """The fused decoder of ``model`` (same interface as :func:`~medlite.export.graphs.decoder_onnx_from_model`).

    ``model`` must pass :func:`fused_problem`. Large weights are staged under ``tmp_root`` (which must
    exist until :func:`~medlite.export.files.write_onnx` has written the graph)."""
    import tempfile

    import torch

    problem = fused_problem(model)
    if problem:
        from medlite.errors import ExportError

        raise ExportError(f"decoder.onnx: the fused ONNX Runtime decoder cannot be written: {problem}")
    dtype = np.dtype(str(next(model.parameters()).dtype).replace("torch.", ""))
    onnx_type = helper.np_dtype_to_tensor_dtype(dtype)
    dims = text_dims(model)
    lm = model.model.language_model
    if tmp_root is not None:
        Path(tmp_root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="medlite-fused-", dir=tmp_root))
    g = _Graph(tmp)
    try:
        with torch.no_grad():
            shared = _shared_inputs(g, dtype)
            cos, sin = _rotary_tables(lm, int(model.config.text_config.max_position_embeddings), dtype)
            rope = (g.init("rotary.cos_cache", cos), g.init("rotary.sin_cache", sin))
            past, present = kv_names(dims["num_layers"])
            x = _rms_norm_first(g, "inputs_embeds", lm.layers[0].input_layernorm, dtype, onnx_type, opset)
            residual = "inputs_embeds"
            for i, layer in enumerate(lm.layers):
                kv = (past[2 * i], past[2 * i + 1], present[2 * i], present[2 * i + 1])
                att = _attention(g, i, layer.self_attn, x, shared, rope, kv, dtype)
                x, residual = _skip_norm(g, att, residual, layer.post_attention_layernorm,
                                         f"layers.{i}.post_attention_layernorm", dtype)
                down = _mlp(g, i, layer.mlp, x, dtype)
                nxt = lm.layers[i + 1].input_layernorm if i + 1 < len(lm.layers) else lm.norm
                x, residual = _skip_norm(g, down, residual, nxt,
                                         f"layers.{i + 1}.input_layernorm" if i + 1 < len(lm.layers) else "norm", dtype)
            logits = _linear(g, model.lm_head, x, "lm_head", dtype)
            if onnx_type != TensorProto.FLOAT:
                logits = g.one("Cast", [logits], "lm_head/float", to=TensorProto.FLOAT)
            g.one("Identity", [logits], "logits")
    finally:
        g.close()
    inputs, outputs = _io(dims, onnx_type)
    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", int(opset)), helper.make_opsetid(MS, 1)],
                              ir_version=8)
    meta = dict(metadata, **{"medlite.decoder_graph": "fused"})
    return stable_onnx_from_onnx(proto, graph_name="decoder", metadata=meta)


__all__ = ["BACKBONES", "FUSED_OPS", "fused_decoder_onnx_from_model", "fused_problem"]
