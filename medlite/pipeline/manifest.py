"""The artifact's manifest (hashed, reproducible) and build-info (volatile: when, where, how long)."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Optional

from medlite import artifacts as af


def _scrub(text: str, work: Path) -> str:
    # Warnings may quote the staging folder: never let a temporary path into the manifest.
    return str(text).replace(str(work.resolve()), "<artifact>").replace(str(work), "<artifact>")


def _sections(state) -> dict:
    """Each stage's manifest section (its StageResult), keyed by stage name."""
    out = {}
    for key, result in state.results.items():
        name = key.split(".", 1)[1]
        sec = result.section()
        sec["stage"] = key
        out[name] = sec
    return json.loads(_scrub(json.dumps(out, sort_keys=True), state.work))


def _graph_runtimes(state) -> dict:
    """Per exported graph: the runtime that runs it (TensorRT or ONNX Runtime only, with the reason),
    its precision and its quantization record — read back from medlite_runtime.json."""
    from medlite.runtime.config import CONFIG_FILE

    p = state.work / CONFIG_FILE
    if not p.is_file():
        return {}
    cfg = json.loads(p.read_text(encoding="utf-8"))
    return {name: {"runtime": g.get("runtime", "tensorrt"), "runtime_reason": g.get("runtime_reason", ""),
                   "precision": g.get("precision", cfg.get("precision")), "quantization": g.get("quantization", {})}
            for name, g in sorted(cfg.get("graphs", {}).items())}


def _device_field(state) -> dict:
    from medlite.devices import describe, is_cpu

    if is_cpu(state.device):
        return {"type": "cpu"}
    return describe(state.device)


def build_manifest(state, resolved, cal_hash: Optional[str], version: str, records: list) -> dict:
    """The manifest of a finished build (before file hashes are added by ``write_manifest``)."""
    import medlite
    from medlite.checks import failed
    from medlite.recipes.registry import numerics_packages

    recipe = resolved.recipe
    source = dict(state.source.info)
    source["path"] = state.source.label
    stage_failed = any(not r.get("ok", True) for r in records)
    status = "failed" if failed(state.gates) or stage_failed else "passed"
    refs = state.references
    return {
        "format": af.FORMAT,
        "medlite_version": medlite.__version__,
        "model": state.source.name,
        "recipe": {"name": recipe.name, "version": recipe.version,
                   "sha256": af.sha256_json(recipe.hashed_dict()), "overrides": list(resolved.overrides)},
        "version": version,
        "status": status,
        "source": source,
        # (CalibrationSet.notes is left out: "loaded from cache" would differ between rebuilds.)
        "calibration": None if cal_hash is None else {
            "content_hash": cal_hash, "dataset": recipe.calibration.dataset, "split": recipe.calibration.split,
            "n": len(state.calibration.samples), "n_heldout": len(state.calibration.heldout),
            "counts_by_modality": state.calibration.counts_by_modality()},
        "evaluation": {"dataset": recipe.evaluation.dataset, "split": recipe.evaluation.split,
                       "questions": state.metrics.get("n")},
        "references": None if refs is None else {"key": refs.key, "questions": len(refs.qids),
                                                 "images": refs.n_images},
        "packages": af.package_versions(),
        "numerics_packages": af.package_versions(tuple(numerics_packages(e.name for e in recipe.stages))),
        "target": state.target.to_dict(),
        # Where the stages computed (not part of the version hash; docs/gpu-builds.md). CPU: only the type,
        # so manifests stay machine-independent; CUDA: card name and memory (peaks: build-info.json).
        "device": _device_field(state),
        "graphs": _graph_runtimes(state),
        "stages": [{"name": r["name"], "detail": _scrub(r["detail"], state.work), "ok": r.get("ok", True)}
                   for r in records],
        "sections": _sections(state),
        "metrics": state.metrics,
        "gates": [g.to_dict() for g in state.gates],
        "warnings": sorted({_scrub(w, state.work) for w in state.ctx.warnings}),
    }


def write_build_info(folder: Path, records: list, seconds: float, resolved, timings: dict) -> None:
    """Volatile facts (not hashed): when, where, how long, per-phase timings. Kept apart so
    manifests are reproducible."""
    info = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
            "python": platform.python_version(), "platform": platform.platform(),
            "seconds": round(seconds, 3), "stages": records, "timings": timings, "recipe_source": resolved.source}
    (folder / af.VOLATILE[0]).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
