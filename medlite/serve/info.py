"""What the page says about the model answering: artifact, version, precision, gates, providers.

Everything comes from the artifact's ``manifest.json`` (hash-checked at start-up) and the runtime
config of the opened export; nothing is recomputed here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def _gate_rows(gates: list) -> list[dict]:
    """Each manifest gate with the build's own one-line description (``agreement 99.6 % ≥ 99.5 %``)."""
    from medlite.checks import Gate

    rows = []
    for g in gates:
        try:
            text = Gate(**g).describe()
        except (TypeError, ValueError):   # a manifest from another medlite version: show the raw fields
            text = f"{g.get('name')}: {g.get('value')} (threshold {g.get('threshold')})"
        rows.append({"name": g.get("name"), "passed": g.get("passed"), "text": text})
    return rows


def serve_info(vlm, artifact=None, *, folder: Optional[Path] = None, limits=None) -> dict:
    """The JSON the page shows in its header (``GET /api/info``).

    ``artifact`` is an opened :class:`medlite.artifacts.Artifact` (None for a bare ``medlite export``
    folder, which has no manifest, hashes or gates).
    """
    from medlite.runtime.describe import graph_labels, precision_summary
    from medlite.serve.uploads import WINDOW_PRESETS

    cfg = vlm.config
    info = {
        "model": cfg.model_name or (artifact.manifest.get("model") if artifact else None),
        "folder": str(artifact.path if artifact else folder),
        # what runs (an INT8 Q/DQ graph traced in fp32 is int8, not fp32): from the quantization records
        "precision": precision_summary(cfg),
        "graph_precision": graph_labels(cfg),
        "providers": dict(getattr(vlm, "providers", {}) or {}),
        "image_size": cfg.image_spec.size,
        "num_image_tokens": cfg.num_image_tokens,
        "artifact": None,
        "windows": [{"key": k, "label": label} for k, (label, _) in WINDOW_PRESETS.items()],
    }
    if artifact is not None:
        m = artifact.manifest
        recipe = m.get("recipe") or {}
        info["artifact"] = {
            "version": artifact.version, "status": artifact.status, "hashes_checked": True,
            "recipe": recipe.get("name"), "recipe_version": recipe.get("version"),
            "target": (m.get("target") or {}).get("name"), "medlite_version": m.get("medlite_version"),
            "gates": _gate_rows(m.get("gates") or []),
            "evaluation": m.get("evaluation"), "metrics": m.get("metrics") or {},
        }
    if limits is not None:
        info["limits"] = {"max_upload_bytes": limits.max_upload_bytes, "max_pixels": limits.max_pixels,
                          "max_queue": limits.max_queue, "max_new_tokens": limits.max_new_tokens}
    return info
