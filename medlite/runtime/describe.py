"""What an artifact runs, in words: per-graph precision labels read from ``medlite_runtime.json``.

One place for every command that shows precision (``ask``, ``serve``, ``bench``): a quantized graph is
labelled by the quantization that runs (``int8 Q/DQ``, ``w8a8 int8 Q/DQ``, ``w4a16 int4``), never by
the float precision it was traced in. Torch-free and onnxruntime-free: it reads JSON only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Union

GRAPH_ORDER = ("vision", "embed", "decoder")


def _get(graph: Any, key: str, default=None):
    """A field of a raw graph dict or of a :class:`medlite.runtime.config.GraphSpec`."""
    if isinstance(graph, Mapping):
        return graph.get(key, default)
    return getattr(graph, key, default)


def graph_label(name: str, graph: Any, default_precision: str = "") -> str:
    """One graph's precision as it runs: ``fp16``, ``int8 Q/DQ``, ``w8a8 int8 Q/DQ``, ``w4a16 int4 g128 gptq``.

    ``graph`` is the graph's entry of ``medlite_runtime.json`` (a dict or a ``GraphSpec``);
    ``default_precision`` is the file's top-level ``precision`` (older files have no per-graph one).
    """
    q = _get(graph, "quantization") or {}
    traced = _get(graph, "precision") or default_precision or "?"
    if not q:
        return traced
    if q.get("scheme") == "int8-static-qdq":
        # the decoder's projections are what a recipe calls llm: w8a8; vision/embed are plain int8
        label = "w8a8 int8 Q/DQ" if name == "decoder" else "int8 Q/DQ"
        kept = q.get("kept_fp16_layers") or []
        return label + (f" ({len(kept)} layer{'s' if len(kept) != 1 else ''} kept fp16)" if kept else "")
    if q.get("method") == "w4a16":
        bits = q.get("bits") or [4]
        parts = [f"w4a16 int{'/'.join(str(b) for b in bits)}"]
        if q.get("group_size"):
            parts.append(f"g{q['group_size']}")
        if q.get("algorithm"):
            parts.append(str(q["algorithm"]))
        return " ".join(parts)
    return str(q.get("scheme") or q.get("method") or "quantized")


def graph_labels(config: Union[Mapping, Any]) -> dict[str, str]:
    """``{graph: label}`` in vision, embed, decoder order, from a raw ``medlite_runtime.json`` dict or a
    parsed :class:`medlite.runtime.config.RuntimeConfig`."""
    graphs = config.get("graphs", {}) if isinstance(config, Mapping) else getattr(config, "graphs", {})
    default = (config.get("precision") if isinstance(config, Mapping) else getattr(config, "precision", "")) or ""
    names = [g for g in GRAPH_ORDER if g in graphs] + sorted(g for g in graphs if g not in GRAPH_ORDER)
    return {n: graph_label(n, graphs[n], default) for n in names}


def precision_summary(config: Union[Mapping, Any]) -> str:
    """``vision int8 Q/DQ, embed fp16, decoder w8a8 int8 Q/DQ`` (one string for a status line)."""
    return ", ".join(f"{n} {label}" for n, label in graph_labels(config).items())


def read_graph_labels(folder: Union[str, Path]) -> dict[str, str]:
    """:func:`graph_labels` of ``folder/medlite_runtime.json`` (empty when the file is missing or unreadable)."""
    from medlite.runtime.config import CONFIG_FILE

    try:
        raw = json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return graph_labels(raw) if isinstance(raw, dict) else {}
