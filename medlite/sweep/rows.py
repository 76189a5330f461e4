"""A variant's row of the results table, read from its artifact's own files (nothing recomputed).

* gates, metrics, status: ``manifest.json`` (the same numbers as ``report.json``);
* bytes per graph: the graph files named in ``medlite_runtime.json`` (with their external data);
* device memory per target: the one device-memory model (:mod:`medlite.engines.memory`) — for the
  recipe's own target exactly ``report.json``'s ``device_memory``, for the sweep's other targets the
  same model on that target (the recipe's engines options where the target runs TensorRT);
* build time: ``build-info.json`` (volatile: not hashed, timings of the build that wrote it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

# metric keys of the manifest -> column names of the table
METRICS = {"artifact_closed_acc": "closed_acc", "source_closed_acc": "source_closed_acc",
           "closed_acc_drop": "drop", "agreement": "agreement", "mean_kl": "mean_kl"}


def empty_row(name: str, overrides: list[str], status: str, error: Optional[str] = None) -> dict:
    """A row without an artifact: an invalid variant (``error``: the rule's message) or a failed build."""
    row = {"variant": name, "status": status, "overrides": list(overrides), "error": error, "artifact": None,
           "version": None, "graph_bytes": {}, "bytes_total": None, "memory_bytes": {}, "fits": {},
           "failed_gates": [], "gates_passed": None, "build_seconds": None, "dataset": None, "bench": None,
           "pareto": False, "reused": False}
    row.update({col: None for col in METRICS.values()})
    return row


def graph_bytes(folder: Path, cfg: dict) -> dict[str, int]:
    """Bytes on disk of each graph (its file plus external data), in the runtime config's order."""
    return {name: sum((folder / f).stat().st_size for f in [g["file"], *g.get("data_files", [])])
            for name, g in cfg["graphs"].items()}


def memory_per_target(folder: Path, manifest: dict, cfg: dict, targets: list[str]) -> dict[str, dict]:
    """``{target: DeviceMemory.to_dict()}``: the report's own estimate for the recipe's target, the same
    model for the others."""
    from medlite.engines.memory import for_export
    from medlite.engines.targets import TARGETS
    from medlite.recipes.options import EnginesOptions
    from medlite.report import device_memory

    import yaml

    own = manifest["target"]["name"]
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8"))    # the resolved recipe
    engines = next((s["engines"] for s in recipe.get("stages", []) if isinstance(s, dict) and "engines" in s), None)
    out = {}
    for name in targets:
        if name == own:
            out[name] = device_memory(folder, manifest)
            continue
        target = TARGETS[name]
        opts = EnginesOptions(**engines) if engines is not None and target.trt_precisions else None
        if opts is not None and not target.supports_trt(opts.precision):
            opts = None
        out[name] = for_export(folder, cfg, target, opts).to_dict()
    return out


def read_row(name: str, overrides: list[str], folder: Path, targets: list[str]) -> dict:
    """The row of a built variant, from its artifact folder."""
    from medlite import artifacts as af
    from medlite.runtime.config import CONFIG_FILE

    folder = Path(folder)
    manifest = af.read_manifest(folder)
    cfg = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    gates = manifest.get("gates", [])
    failed = [g["name"] for g in gates if g.get("passed") is False]
    row = empty_row(name, overrides, "passed" if manifest["status"] == "passed" else "failed gates")
    m = manifest.get("metrics", {})
    row.update({col: m.get(key) for key, col in METRICS.items()})
    gb = graph_bytes(folder, cfg)
    mem = memory_per_target(folder, manifest, cfg, targets)
    info = folder / "build-info.json"
    seconds = json.loads(info.read_text(encoding="utf-8")).get("seconds") if info.is_file() else None
    row.update(artifact=str(folder), version=manifest["version"], target=manifest["target"]["name"],
               graph_bytes=gb, bytes_total=sum(gb.values()),
               memory_bytes={t: d["total_bytes"] for t, d in mem.items()},
               fits={t: bool(d["fits"]) for t, d in mem.items()},
               failed_gates=failed, gates_passed=not failed and manifest["status"] == "passed",
               build_seconds=seconds)
    return row
