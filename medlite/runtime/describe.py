"""What each graph of an export really runs in, for people (torch-free).

``medlite_runtime.json`` (and the manifest's ``graphs``) give every graph a float ``precision`` (the
precision it was traced in) and a ``quantization`` record written by the stage that quantized it.
The quantization is what runs, so it is what a user is shown: an INT8 Q/DQ vision graph traced in
fp32 is "int8 Q/DQ", not "fp32".
"""
from __future__ import annotations

from typing import Any, Mapping

ORDER = ("vision", "embed", "decoder")


def _get(obj: Any, key: str, default=None):
    """``obj[key]`` for a dict (manifest / raw JSON), ``obj.key`` for a GraphSpec / RuntimeConfig."""
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _int8_label(q: Mapping, graph: str) -> str:
    # An INT8 Q/DQ decoder is the recipe's "llm: w8a8" (weights and activations int8).
    label = "w8a8 int8 Q/DQ" if graph == "decoder" else "int8 Q/DQ"
    kept = q.get("kept_fp16_layers") or []
    return f"{label} ({len(kept)} layer{'' if len(kept) == 1 else 's'} kept fp16)" if kept else label


def _w4a16_label(q: Mapping) -> str:
    parts = [f"int4 weights g{q['group_size']}" if q.get("group_size") else "int4 weights"]
    if q.get("algorithm"):
        parts.append(str(q["algorithm"]))
    if q.get("compute") == "int8":
        parts.append("int8 compute")
    return f"w4a16 ({', '.join(parts)})"


def graph_precision(graph: Any, name: str = "", default: str = "") -> str:
    """One graph's label: its quantization (``int8 Q/DQ``, ``w8a8 int8 Q/DQ``, ``w4a16 (int4 weights g128,
    gptq)``) if it has a record, else its float precision (``fp16``), else ``default``."""
    q = _get(graph, "quantization") or {}
    if q:
        if q.get("method") == "w4a16":
            return _w4a16_label(q)
        if q.get("scheme") == "int8-static-qdq" or q.get("precision") == "int8":
            return _int8_label(q, name)
        return str(q.get("method") or q.get("scheme") or q.get("precision") or "quantized")
    return str(_get(graph, "precision") or default or "unknown")


def graph_precisions(config: Any) -> dict[str, str]:
    """``{graph: label}`` for a RuntimeConfig, a raw ``medlite_runtime.json`` dict or a manifest
    (both have ``graphs``; a manifest has no top-level ``precision``), vision / embed / decoder first."""
    graphs = _get(config, "graphs") or {}
    default = _get(config, "precision") or ""
    names = [n for n in ORDER if n in graphs] + sorted(n for n in graphs if n not in ORDER)
    return {n: graph_precision(graphs[n], n, default) for n in names}


def precision_summary(config: Any) -> str:
    """One line: ``fp32`` when every graph runs the same unquantized precision, else per graph
    (``vision int8 Q/DQ, embed fp16, decoder w8a8 int8 Q/DQ``)."""
    labels = graph_precisions(config)
    if not labels:
        return str(_get(config, "precision") or "unknown")
    if len(set(labels.values())) == 1 and not any(
            _get(g, "quantization") for g in (_get(config, "graphs") or {}).values()):
        return next(iter(labels.values()))
    return ", ".join(f"{n} {label}" for n, label in labels.items())


__all__ = ["graph_precision", "graph_precisions", "precision_summary"]
