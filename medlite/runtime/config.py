"""``medlite_runtime.json``: everything a runtime needs besides the graphs and ``tokenizer.json``.

Written by ``medlite.export`` (generated from the model, like onnxruntime-genai's
``genai_config.json``), read here without torch. Every field a runtime reads is validated on load
and errors name the file and key at fault.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from medlite.errors import DataError
from medlite.preprocess import ImageSpec
from medlite.prompting import ChatTemplate

CONFIG_FILE = "medlite_runtime.json"
FORMAT = "medlite-onnx-vlm"
SCHEMA_VERSION = 1
GRAPHS = ("vision", "embed", "decoder")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input/output: name, numpy dtype name and shape (ints or symbolic names)."""

    name: str
    dtype: str
    shape: list


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX file and its interface; ``data_files`` are its external-data files (if any)."""

    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    data_files: list[str] = field(default_factory=list)
    # Which runtime may run this graph: "tensorrt" (also ONNX Runtime) or "onnxruntime" only (e.g. INT4
    # MatMulNBits, a com.microsoft op TensorRT 8.5 cannot parse), with the reason.
    runtime: str = "tensorrt"
    runtime_reason: str = ""
    precision: str = ""                  # float precision the graph was traced in
    quantization: dict = field(default_factory=dict)   # scheme, method, excluded layers ... (empty: none)
    # the fused ONNX Runtime decoder (medlite/export/fused_decoder.py): {"graph": "fused", "ops": [...]};
    # empty for traced graphs, and then not written at all (their runtime config stays byte-identical)
    fused: dict = field(default_factory=dict)

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


@dataclass
class RuntimeConfig:
    """The parsed ``medlite_runtime.json``. ``kv_cache`` documents the dummy-slot convention:

    the decoder always takes ``past >= 1``; prefill passes one slot of zeros with attention mask 0
    (``prefill_past_slots``), so prefill and decode run in one graph; ``position_ids`` count real
    tokens only (the dummy slot has no position).
    """

    graphs: dict[str, GraphSpec]
    precision: str
    opset: int
    model: dict[str, int]                # hidden_size, num_layers, num_kv_heads, head_dim, vocab_size
    image_token_id: int
    num_image_tokens: int
    eos_token_ids: list[int]
    bos_token_id: Optional[int]
    pad_token_id: int
    suppress_token_ids: list[int]
    image_spec: ImageSpec
    template: ChatTemplate
    tokenizer_file: str
    embedding_table: dict[str, Any]      # file, dtype, shape, offset, tied_lm_head
    kv_cache: dict[str, Any]
    mask_value: float
    model_name: str = ""
    source: dict = field(default_factory=dict)
    generator: dict = field(default_factory=dict)
    fp32_ops: dict = field(default_factory=dict)
    trt_check: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        for g in d["graphs"].values():
            if not g.get("fused"):
                g.pop("fused", None)
        d["image_spec"] = self.image_spec.to_dict()
        d["template"] = self.template.to_dict()
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, **d}

    def to_json(self) -> str:
        """Stable JSON text (sorted keys) so identical exports give identical bytes."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    def past_name(self, layer: int, kind: str) -> str:
        return self.kv_cache["past_name"].format(layer=layer, kind=kind)

    def present_name(self, layer: int, kind: str) -> str:
        return self.kv_cache["present_name"].format(layer=layer, kind=kind)

    @classmethod
    def load(cls, folder) -> "RuntimeConfig":
        """Read and validate ``folder/medlite_runtime.json``."""
        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            raise DataError(f"{path}: not found (is {folder} an ONNX export folder?)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON: {e}") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = CONFIG_FILE) -> "RuntimeConfig":
        def need(d: dict, key: str, where: str):
            if not isinstance(d, dict) or key not in d:
                raise DataError(f"{source}: key {where}{key!r} is missing")
            return d[key]

        if raw.get("format") != FORMAT:
            raise DataError(f"{source}: format {raw.get('format')!r} is not {FORMAT!r}")
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise DataError(f"{source}: schema_version {raw.get('schema_version')!r} is not {SCHEMA_VERSION} "
                            "(re-export with this medlite version)")
        graphs = {}
        for name, g in need(raw, "graphs", "").items():
            try:
                graphs[name] = GraphSpec(
                    file=g["file"], data_files=list(g.get("data_files", [])),
                    inputs=[TensorSpec(t["name"], t["dtype"], list(t["shape"])) for t in g["inputs"]],
                    outputs=[TensorSpec(t["name"], t["dtype"], list(t["shape"])) for t in g["outputs"]],
                    runtime=g.get("runtime", "tensorrt"), runtime_reason=g.get("runtime_reason", ""),
                    precision=g.get("precision", ""), quantization=dict(g.get("quantization") or {}),
                    fused=dict(g.get("fused") or {}))
            except (KeyError, TypeError) as e:
                raise DataError(f"{source}: graphs.{name} is malformed (missing {e})") from None
        model = need(raw, "model", "")
        for k in ("hidden_size", "num_layers", "num_kv_heads", "head_dim", "vocab_size"):
            need(model, k, "model.")
        kv = need(raw, "kv_cache", "")
        for k in ("past_name", "present_name", "dtype", "convention", "prefill_past_slots"):
            need(kv, k, "kv_cache.")
        table = need(raw, "embedding_table", "")
        for k in ("file", "dtype", "shape"):
            need(table, k, "embedding_table.")
        return cls(
            graphs=graphs, precision=need(raw, "precision", ""), opset=int(need(raw, "opset", "")),
            model={k: int(v) for k, v in model.items()},
            image_token_id=int(need(raw, "image_token_id", "")),
            num_image_tokens=int(need(raw, "num_image_tokens", "")),
            eos_token_ids=[int(t) for t in need(raw, "eos_token_ids", "")],
            bos_token_id=raw.get("bos_token_id"), pad_token_id=int(need(raw, "pad_token_id", "")),
            suppress_token_ids=[int(t) for t in raw.get("suppress_token_ids", [])],
            image_spec=ImageSpec.from_dict(need(raw, "image_spec", "")),
            template=ChatTemplate.from_dict(need(raw, "template", "")),
            tokenizer_file=need(raw, "tokenizer_file", ""), embedding_table=table, kv_cache=kv,
            mask_value=float(need(raw, "mask_value", "")), model_name=raw.get("model_name", ""),
            source=raw.get("source", {}), generator=raw.get("generator", {}), fp32_ops=raw.get("fp32_ops", {}),
            trt_check=raw.get("trt_check", {}))
