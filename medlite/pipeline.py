"""``medlite build``: run a validated recipe on a model and write a versioned artifact.

Order of work:

1. load the model (``--model`` > recipe ``model`` > the built-in demo model) and, when the recipe
   declares one, the calibration set; load the held-out evaluation split when a check stage runs;
2. derive the version from the inputs; if ``OUT/<model>/<recipe>/<version>`` exists and its files
   still match its manifest, reuse it (``force`` rebuilds);
3. run the stages in a staging folder, write ``recipe.yaml``, reports and ``manifest.json``, and
   rename the folder into place; ``latest`` moves only for passing artifacts.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from medlite import artifacts as af
from medlite.errors import DataError
from medlite.model_choice import ModelChoice, load_source


@dataclass
class BuildResult:
    """What ``build`` produced (also the ``--json`` output)."""

    path: Path
    version: str
    status: str                     # "passed" | "failed"
    manifest: dict
    reused: bool = False
    stages: list[dict] = field(default_factory=list)   # name, detail, seconds, ok

    @property
    def failed_gate_lines(self) -> list[str]:
        from medlite.checks import Gate

        return [Gate(**g).line() for g in self.manifest.get("gates", []) if g.get("passed") is False]

    def to_json(self) -> dict:
        m = self.manifest
        return {"status": self.status, "artifact": str(self.path), "version": self.version,
                "reused": self.reused, "metrics": m.get("metrics", {}), "gates": m.get("gates", []),
                "failed_gates": self.failed_gate_lines, "stages": self.stages,
                "report": str(self.path / "report.md")}


# -- inputs ---------------------------------------------------------------------------------------
def model_summary(loaded) -> str:
    """``micro-tinyllava-med (legacy format) · 6.1 M params · 49 image tokens``."""
    params = loaded.param_breakdown()["total"]["params"]
    size = f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.1f} M"
    return (f"{loaded.name} ({loaded.source.format} format) · {size} params · "
            f"{loaded.num_image_tokens} image tokens")


def load_calibration(recipe, ctx) -> tuple[Any, str, str]:
    """The recipe's calibration set: ``(CalibrationSet, content hash, summary line)``."""
    from medlite.calibration.calibset import build_calibration_set
    from medlite.evaluation.vqa import load_dataset

    spec = recipe.calibration
    samples = load_dataset(spec.dataset, images_dir=spec.images, split=spec.split)
    cs = build_calibration_set(samples, spec.samples, seed=spec.seed, ctx=ctx, allow_synthetic=spec.allow_synthetic)
    return cs, cs.content_hash, cs.summary()


def load_evaluation(recipe, calibration, ctx) -> list:
    """The held-out evaluation samples, without any question about a calibration image.

    Official splits are not image-disjoint (VQA-RAD, SLAKE), so overlapping questions are dropped
    with a warning rather than silently scored on images the compression stages have seen.
    """
    from medlite.evaluation.vqa import load_dataset

    ev = recipe.evaluation
    samples = load_dataset(ev.dataset, images_dir=ev.images, split=ev.split)
    if not samples:
        raise DataError(f"evaluation: {ev.dataset} split {ev.split!r} has no questions")
    if calibration is not None:
        from medlite.calibration.calibset import exclude_calibration_images

        samples = exclude_calibration_images(samples, calibration, ctx=ctx)
    return samples


# -- build ----------------------------------------------------------------------------------------
def build(resolved, choice: ModelChoice, out_root: Path, ctx, *, force: bool = False) -> BuildResult:
    """Run ``resolved`` (a :class:`medlite.recipes.ResolvedRecipe`) and write or reuse its artifact."""
    import medlite
    from medlite.engines.targets import TARGETS
    from medlite.stages import BuildState, runner

    recipe = resolved.recipe
    target = TARGETS[recipe.target]
    for w in resolved.warnings:
        ctx.warn(w)
    t_start = time.perf_counter()
    with ctx.stage("model") as info:
        loaded, source_label = load_source(choice, ctx)
        info["detail"] = model_summary(loaded)
    calibration, cal_hash = None, None
    if recipe.calibration is not None:
        with ctx.stage("calibrate") as info:
            calibration, cal_hash, info["detail"] = load_calibration(recipe, ctx)
    eval_samples = load_evaluation(recipe, calibration, ctx) if recipe.stage("check") is not None else []

    identity = af.source_identity(loaded.source.to_dict(), getattr(loaded.template, "name", None))
    version = af.compute_version(recipe.version, source=identity, recipe=recipe.hashed_dict(),
                                 calibration_sha256=cal_hash, medlite_version=medlite.__version__)
    parent = af.recipe_dir(out_root, loaded.name, recipe.name)
    final = parent / version
    if final.exists() and not force:
        reused = _try_reuse(final, ctx)
        if reused is not None:
            return reused

    state_stages: list[dict] = []
    with af.Staging(parent, version) as staging:
        state = BuildState(ctx=ctx, recipe=recipe, target=target, loaded=loaded, work=staging.path,
                           eval_samples=eval_samples, calibration=calibration)
        for i, entry in enumerate(recipe.stages):
            with ctx.stage(entry.name) as info:
                info["detail"] = runner(entry.name)(state, i, entry.options)
            rec = ctx.stages[-1]
            state_stages.append({"name": entry.name, "detail": rec.detail, "seconds": round(rec.seconds, 3)})
        (staging.path / af.RECIPE_FILE).write_text(resolved.to_yaml(), encoding="utf-8")
        manifest = _manifest(state, resolved, source_label, cal_hash, version, state_stages)
        from medlite.report import write_reports

        write_reports(staging.path, manifest, state.rows)
        _write_build_info(staging.path, state_stages, time.perf_counter() - t_start, resolved, staging.path)
        manifest = af.write_manifest(staging.path, manifest)
        path = staging.commit()
    if manifest["status"] == "passed":
        af.update_latest(parent, version)
    elif af.read_latest(parent) == version:
        # A forced rebuild of the version `latest` named failed its gates: `latest` must only ever
        # name a passing artifact.
        (parent / af.LATEST).unlink()
        ctx.warn(f"{parent / af.LATEST} removed: {version} no longer passes its gates")
    return BuildResult(path=path, version=version, status=manifest["status"], manifest=manifest,
                       stages=[{"name": r.name, "detail": r.detail, "seconds": round(r.seconds, 3), "ok": r.ok}
                               for r in ctx.stages])


def _try_reuse(final: Path, ctx) -> Optional[BuildResult]:
    try:
        manifest = af.read_manifest(final)
        problems = af.verify_files(final, manifest)
    except af.ArtifactError as e:
        problems = [str(e)]
    if problems:
        ctx.warn(f"{final} exists but does not match its manifest ({'; '.join(problems[:3])}): rebuilding it")
        return None
    with ctx.stage("reuse") as info:
        info["detail"] = f"identical inputs: {final.name} re-hashed and reused (--force rebuilds)"
    return BuildResult(path=final, version=manifest["version"], status=manifest["status"], manifest=manifest,
                       reused=True, stages=[{"name": r.name, "detail": r.detail, "seconds": round(r.seconds, 3),
                                             "ok": r.ok} for r in ctx.stages])


def _scrub(text: str, work: Path) -> str:
    # Warnings may quote the staging folder: never let a temporary path into the manifest.
    return str(text).replace(str(work.resolve()), "<artifact>").replace(str(work), "<artifact>")


def _manifest(state, resolved, source_label: str, cal_hash: Optional[str], version: str,
              stages: list[dict]) -> dict:
    import medlite
    from medlite.checks import failed

    recipe = resolved.recipe
    source = state.loaded.source.to_dict()
    source["path"] = source_label
    status = "failed" if failed(state.gates) else "passed"
    return {
        "format": af.FORMAT,
        "medlite_version": medlite.__version__,
        "model": state.loaded.name,
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
        "packages": af.package_versions(),
        "target": state.target.to_dict(),
        "stages": [{"name": s["name"], "detail": _scrub(s["detail"], state.work)} for s in stages],
        "sections": json.loads(_scrub(json.dumps(state.sections, sort_keys=True), state.work)),
        "metrics": state.metrics,
        "gates": [g.to_dict() for g in state.gates],
        "warnings": sorted({_scrub(w, state.work) for w in state.ctx.warnings}),
    }


def _write_build_info(folder: Path, stages: list[dict], seconds: float, resolved, work: Path) -> None:
    """Volatile facts (not hashed): when, where and how long. Kept apart so manifests are reproducible."""
    info = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
            "python": platform.python_version(), "platform": platform.platform(),
            "seconds": round(seconds, 3), "stages": stages, "recipe_source": resolved.source}
    (folder / af.VOLATILE[0]).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
