"""The one device-memory model: what ``medlite plan``, the budget check, the engines stage
(``engines.json``, ``build_engines.sh``) and ``report.md`` show (torch-free; :func:`for_export` reads an export's file sizes).

Device memory of a deployed artifact at its limits = **weights + KV cache + activations + runtime
reserve**, each a separate line:

* weights: what the runtime holds resident: the graph files (rescaled to the engine precision for
  TensorRT, except quantized graphs, which already store their deployed width) and the embedding
  table the runtime reads;
* KV cache: keys + values of every layer at the longest context (the engines' profile bound, or
  the decoder's maximum positions where the target has no engines) and the largest batch;
* activations: the largest forward's live tensors at that context: the decoder's prefill (fp32
  logits of every position, fp32 attention scores + probabilities, the MLP's intermediate tensors,
  a few hidden states) or the vision tower's, whichever is larger. Runtimes reuse activation
  buffers from layer to layer, so one layer's worth is counted;
* runtime reserve: the process and runtime themselves. TensorRT on a Jetson: 600 MB for the CUDA +
  TensorRT context (JetPack 5's CUDA context alone is 0.3-0.5 GB; docs/targets.md). ONNX Runtime on
  a CPU: 100 MB (python + numpy + onnxruntime 1.32 + tokenizers + Pillow measured 62 MB RSS on
  x86-64 before any session; the sessions' own structures on top).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from medlite.units import human_bytes

TRT_RESERVE_BYTES = 600_000_000
ORT_RESERVE_BYTES = 100_000_000
DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "int8": 1}


@dataclass(frozen=True)
class ModelDims:
    """The dimensions the memory model needs (from checkpoint facts or ``medlite_runtime.json``)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int = 0
    num_attention_heads: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0
    num_image_tokens: int = 0
    max_positions: int = 0                 # the decoder's max_position_embeddings (0: unknown)
    vision_hidden_size: int = 0
    vision_intermediate_size: int = 0
    vision_num_attention_heads: int = 0
    vision_tokens: int = 0                 # patches the vision tower attends over


def runtime_reserve_bytes(target) -> int:
    """The runtime reserve on ``target``: CUDA + TensorRT context where it runs TensorRT, else ONNX Runtime."""
    return TRT_RESERVE_BYTES if getattr(target, "trt_precisions", ()) else ORT_RESERVE_BYTES


def kv_cache_bytes(dims: ModelDims, tokens: int, batch: int, bytes_per: float) -> int:
    """Keys + values of every layer for ``tokens`` slots and ``batch`` rows."""
    return int(2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * tokens * batch * bytes_per)


def activation_bytes(dims: ModelDims, *, prefill_tokens: int, context_tokens: int, batch: int,
                     bytes_per: float) -> int:
    """Peak live activations of one forward (see the module docstring): decoder prefill or vision tower."""
    s, t, a = int(prefill_tokens), int(context_tokens), bytes_per
    heads = dims.num_attention_heads or (dims.hidden_size // max(dims.head_dim, 1))
    decoder = (s * dims.vocab_size * 4                      # logits of every prefill position, fp32
               # attention scores + probabilities, fp32: prefill attends over itself + the dummy slot,
               # a decode step's one token over the whole context
               + 2 * heads * max(s * (s + 1), t) * 4
               + 3 * s * dims.intermediate_size * a         # gate, up, activation
               + 4 * s * dims.hidden_size * a)              # residual, normed input, attention output, MLP out
    n = dims.vision_tokens
    vision = (2 * dims.vision_num_attention_heads * n * n * 4 + 2 * n * dims.vision_intermediate_size * a
              + 4 * n * dims.vision_hidden_size * a)
    return int(batch * max(decoder, vision))


@dataclass(frozen=True)
class DeviceMemory:
    """One device-memory estimate and what it assumed."""

    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    runtime_reserve_bytes: int
    usable_bytes: int
    context_tokens: int
    batch: int
    context_from: str
    weights_detail: dict

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes + self.runtime_reserve_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes

    def parts(self) -> dict[str, int]:
        """Display name -> bytes, in the order every place shows them."""
        return {"weights": self.weights_bytes, "KV cache": self.kv_cache_bytes,
                "activations": self.activation_bytes, "runtime reserve": self.runtime_reserve_bytes}

    def line(self) -> str:
        """``601 MB (weights … + KV cache … + activations … + runtime reserve …) of 28.0 GB usable``."""
        parts = " + ".join(f"{k} {human_bytes(v)}" for k, v in self.parts().items())
        return f"{human_bytes(self.total_bytes)} ({parts}) of {human_bytes(self.usable_bytes)} usable"

    def context_note(self) -> str:
        """Where the KV cache's context comes from, for reports."""
        return f"KV cache and activations at {self.context_tokens} tokens × batch {self.batch} ({self.context_from})"

    def to_dict(self) -> dict:
        """JSON-able (engines.json, the manifest); ``total_bytes`` and ``fits`` included."""
        d = asdict(self)
        d.update(total_bytes=self.total_bytes, fits=self.fits, parts=self.parts(), line=self.line())
        return d


def estimate(dims: ModelDims, weights: dict[str, int], target, *, context_tokens: int, prefill_tokens: int,
             batch: int, kv_bytes: float, act_bytes: float, context_from: str) -> DeviceMemory:
    """The device-memory estimate: ``weights`` (name -> resident bytes) plus KV cache, activations and reserve."""
    return DeviceMemory(
        weights_bytes=int(sum(weights.values())),
        kv_cache_bytes=kv_cache_bytes(dims, context_tokens, batch, kv_bytes),
        activation_bytes=activation_bytes(dims, prefill_tokens=prefill_tokens, context_tokens=context_tokens,
                                          batch=batch, bytes_per=act_bytes),
        runtime_reserve_bytes=runtime_reserve_bytes(target), usable_bytes=int(target.usable_memory_gb * 1e9),
        context_tokens=int(context_tokens), batch=int(batch), context_from=context_from,
        weights_detail={k: int(v) for k, v in weights.items()})


def limits(dims: ModelDims, engines=None) -> dict:
    """Context, prefill length, batch and where they come from: the engines options' profile bounds,
    else the decoder's maximum positions (one row; the ONNX Runtime path has no other bound)."""
    if engines is not None:
        prefill = dims.num_image_tokens + engines.max_prompt_tokens
        return {"context_tokens": 1 + prefill + engines.max_new_tokens, "prefill_tokens": prefill,
                "batch": engines.max_batch,
                "context_from": "engines options: dummy slot + image tokens + max_prompt_tokens + max_new_tokens"}
    n = dims.max_positions or 0
    return {"context_tokens": 1 + n, "prefill_tokens": n, "batch": 1,
            "context_from": f"the decoder's {n} maximum positions + the dummy slot"
            if n else "maximum positions unknown"}


def engine_weight_bytes(file_bytes: int, *, graph_precision: str, engine_precision: Optional[str],
                        quantized: bool) -> int:
    """Resident bytes of one graph: TensorRT rescales float weights to the engine precision; quantized
    graphs (INT8 Q/DQ, INT4 MatMulNBits) already store their deployed width, and ONNX Runtime
    (``engine_precision`` None) holds the file as written."""
    if engine_precision is None or quantized:
        return int(file_bytes)
    return int(file_bytes * DTYPE_BYTES[engine_precision] / DTYPE_BYTES.get(graph_precision or "fp32", 4))


def dims_from_runtime(cfg: dict) -> ModelDims:
    """:class:`ModelDims` of an export from its ``medlite_runtime.json`` (a dict); sizes an older export
    did not record count as 0 (their activation terms drop out)."""
    m = cfg["model"]
    return ModelDims(
        num_layers=int(m["num_layers"]), num_kv_heads=int(m["num_kv_heads"]), head_dim=int(m["head_dim"]),
        hidden_size=int(m.get("hidden_size", 0)), num_attention_heads=int(m.get("num_attention_heads", 0)),
        intermediate_size=int(m.get("intermediate_size", 0)), vocab_size=int(m.get("vocab_size", 0)),
        num_image_tokens=int(cfg.get("num_image_tokens", 0)), max_positions=int(m.get("max_position_embeddings", 0)),
        vision_hidden_size=int(m.get("vision_hidden_size", 0)),
        vision_intermediate_size=int(m.get("vision_intermediate_size", 0)),
        vision_num_attention_heads=int(m.get("vision_num_attention_heads", 0)),
        vision_tokens=int(m.get("vision_tokens", 0)))


def export_weights(folder, cfg: dict, engine_precision: Optional[str]) -> dict[str, int]:
    """Resident weight bytes per file of the export in ``folder``: with TensorRT engines (``engine_precision``)
    the vision and decoder engines and the embedding table the runtime reads; on ONNX Runtime every graph
    (with its external data) and the table."""
    from pathlib import Path

    folder = Path(folder)
    names = ("vision", "decoder") if engine_precision else tuple(cfg["graphs"])
    table = (cfg.get("embedding_table") or {}).get("file")
    out = {}
    for name in names:
        g = cfg["graphs"][name]
        # the embed graph's external data is the table itself: counted once, below
        size = sum((folder / f).stat().st_size for f in [g["file"], *g.get("data_files", [])] if f != table)
        on_trt = engine_precision if g.get("runtime", "tensorrt") == "tensorrt" else None
        out[g["file"]] = engine_weight_bytes(size, graph_precision=g.get("precision") or cfg["precision"],
                                             engine_precision=on_trt, quantized=bool(g.get("quantization")))
    if table:
        out[table] = (folder / table).stat().st_size
    return out


def for_export(folder, cfg: dict, target, engines=None) -> DeviceMemory:
    """The estimate of the export in ``folder`` on ``target``; ``engines``: the engines stage's options
    (None: no engines, ONNX Runtime at the decoder's maximum positions)."""
    dims = dims_from_runtime(cfg)
    prec = engines.precision if engines is not None else None
    if engines is not None:
        kv = act = 4 if prec == "fp32" else 2          # TensorRT keeps the cache and activations in fp16
    else:
        kv = DTYPE_BYTES.get(str((cfg.get("kv_cache") or {}).get("dtype")), 4)
        act = DTYPE_BYTES.get(cfg.get("precision"), 4)
    return estimate(dims, export_weights(folder, cfg, prec), target, kv_bytes=kv, act_bytes=act,
                    **limits(dims, engines))


__all__ = ["DeviceMemory", "ModelDims", "ORT_RESERVE_BYTES", "TRT_RESERVE_BYTES", "activation_bytes",
           "dims_from_runtime", "engine_weight_bytes", "estimate", "export_weights", "for_export", "kv_cache_bytes",
           "limits", "runtime_reserve_bytes"]
