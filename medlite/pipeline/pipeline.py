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

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from medlite import artifacts as af
from medlite.pipeline.manifest import build_manifest, write_build_info
from medlite.errors import DataError, MedliteError
from medlite.model_choice import ModelChoice, load_source


class StageFailed(MedliteError):
    """A stage ran but failed one of its own checks (the artifact is not written)."""


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
def _version(recipe, source, cal_hash: Optional[str], device=None) -> str:
    import medlite
    from medlite.devices import is_cpu
    from medlite.recipes.registry import numerics_packages

    pk = af.package_versions(tuple(numerics_packages(e.name for e in recipe.stages)))
    hashed = recipe.hashed_dict()
    if not is_cpu(device):    # GPU kernels give other numbers: its own version (CPU: hashed as before)
        hashed["device"] = device.type
    return af.compute_version(recipe.version, source=source.identity, recipe=hashed,
                              calibration_sha256=cal_hash, medlite_version=medlite.__version__, packages=pk)


def check_samples(recipe, eval_samples: list) -> list:
    """The evaluation questions the check stage runs on (stratified when capped)."""
    from medlite.pipeline.references import select_samples

    opts = recipe.stage_with("needs_references")
    if opts is None:
        return []
    return select_samples(eval_samples, getattr(opts, "max_samples", None) or recipe.evaluation.max_samples)


def _prepare_working(state, specs: list, resume=None) -> None:
    """Cache the source's references before the first weight-changing stage, then hand the working
    model to the stages (a copy only when a stage still reads the untouched source; the cached model
    when the build resumes after a cached stage)."""
    src = state.source
    compress = any(s.changes_weights for s in specs)
    keep_source = any(s.needs_source for s in specs)
    opts = state.recipe.stage_with("needs_references")
    if compress and opts is not None:
        with state.ctx.stage("reference") as info:
            refs = src.references(state.check_samples, max_new_tokens=opts.max_new_tokens,
                                  batch_size=opts.batch_size)
            state.references = refs
            state.timings["references_seconds"] = round(refs.seconds, 3)
            info["detail"] = (f"source outputs on {len(refs.qids)} questions / {refs.n_images} images "
                              + ("(cached)" if refs.cached else f"computed and cached ({refs.seconds:.1f} s)"))
    if resume is not None:
        state.model = resume.model
        return
    state.model = src.working_model(keep_source=keep_source) if compress else src.model()


def _runner(spec):
    """The entry's run function: ``"module:function"`` imported now, or a callable as registered."""
    if callable(spec.runner):
        return spec.runner
    module, fn = spec.runner.split(":")
    return getattr(importlib.import_module(module), fn)


def _record(state, i: int, name: str, result, *, detail: str, seconds: float, ok: bool) -> dict:
    state.results[f"stages[{i}].{name}"] = result
    return {"name": name, "detail": detail, "seconds": round(seconds, 3), "ok": ok}


def _run_stages(state, resume=None, cache=None) -> list[dict]:
    """Run the recipe's stages in order; ``resume`` (:class:`medlite.pipeline.resume.Resume`) replays the
    cached ones, ``cache`` stores each cacheable stage's output as it finishes."""
    from medlite.recipes.registry import STAGES

    records = [] if resume is None else resume.replay(state)
    for i, entry in enumerate(state.recipe.stages):
        if i < len(records):
            continue
        run = _runner(STAGES[entry.name])
        with state.ctx.stage(entry.name) as info:
            result = run(state, i, entry.options)
            info["detail"] = result.summary + (f" · {result.note}" if result.note else "")
            info["ok"] = result.ok
        rec = state.ctx.stages[-1]
        records.append(_record(state, i, entry.name, result, detail=result.summary, seconds=rec.seconds, ok=rec.ok))
        if result.note:
            records[-1]["note"] = result.note
        if not result.ok and not STAGES[entry.name].caps.gate:   # a failed gate marks the artifact failed
            raise StageFailed(f"stages[{i}].{entry.name}: {result.summary}")
        if cache is not None:
            cache.store_after(state, i, records)
    return records


def build(resolved, choice: ModelChoice, out_root: Path, ctx, *, force: bool = False, device=None) -> BuildResult:
    """Run ``resolved`` (a :class:`medlite.recipes.ResolvedRecipe`) and write or reuse its artifact.

    ``device``: a ``--device`` spelling or ``torch.device`` (None: the recipe's ``device``, else auto)."""
    from medlite.devices import describe, describe_line, resolve_device
    from medlite.pipeline.contract import BuildState
    from medlite.pipeline.source import Source
    from medlite.engines.targets import TARGETS
    from medlite.recipes.registry import STAGES

    recipe = resolved.recipe
    target = TARGETS[recipe.target]
    dev = device if hasattr(device, "type") else resolve_device(
        device or recipe.device, where="--device" if device else f"{resolved.source}: device")
    for w in resolved.warnings:
        ctx.warn(w)
    t_start = time.perf_counter()
    with ctx.stage("model") as info:
        loaded, source_label = load_source(choice, ctx)
        info["detail"] = f"{model_summary(loaded)} · on {describe_line(describe(dev))}"
    source = Source(choice, loaded, source_label, ctx, device=dev)
    del loaded
    calibration, cal_hash = None, None
    if recipe.calibration is not None:
        with ctx.stage("calibrate") as info:
            calibration, cal_hash, info["detail"] = load_calibration(recipe, ctx)
    eval_samples = (load_evaluation(recipe, calibration, ctx)
                    if recipe.stage_with("needs_references") is not None else [])
    version = _version(recipe, source, cal_hash, dev)
    parent = af.recipe_dir(out_root, source.name, recipe.name)
    final = parent / version
    if final.exists() and not force:
        reused = _try_reuse(final, ctx)
        if reused is not None:
            return reused
    with af.Staging(parent, version) as staging:
        state = BuildState(ctx=ctx, recipe=recipe, target=target, work=staging.path, source=source,
                           eval_samples=eval_samples, calibration=calibration, device=dev)
        state.check_samples = check_samples(recipe, eval_samples)
        from medlite.pipeline.resume import ResumeCache

        cache = ResumeCache(state, resolved, source, cal_hash)
        resume = cache.find()
        _prepare_working(state, [STAGES[e.name] for e in recipe.stages], resume)
        records = _run_stages(state, resume, cache)
        (staging.path / af.RECIPE_FILE).write_text(resolved.to_yaml(), encoding="utf-8")
        manifest = build_manifest(state, resolved, cal_hash, version, records)
        from medlite.report import write_reports

        write_reports(staging.path, manifest, state.rows,
                      {k.split(".", 1)[1]: r.report for k, r in state.results.items()})
        write_build_info(staging.path, records, time.perf_counter() - t_start, resolved, state.timings)
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
