"""The ``check`` stage: accuracy gates of the exported artifact against the source model.

Also :func:`rerun_checks`, which ``medlite verify`` uses to re-measure an existing artifact and
compare with the metrics its manifest recorded.
"""
from __future__ import annotations

from pathlib import Path

from medlite.errors import DataError, MedliteError


def _summary(metrics: dict, gates: list) -> str:
    g = {x.name: x for x in gates}
    parts = []
    sa, aa = metrics.get("source_closed_acc"), metrics.get("artifact_closed_acc")
    if sa is not None and aa is not None:
        drop = g["closed_acc_drop"]
        tail = f" ({drop.describe().replace('closed_acc_drop ', 'drop ')})" if drop.threshold is not None else ""
        parts.append(f"closed acc {sa:.2f} → {aa:.2f}{tail}")
    for name in ("agreement", "mean_kl", "vision_cosine"):
        if g[name].value is not None:
            parts.append(g[name].describe().replace("mean_kl", "KL").replace("vision_cosine", "cosine"))
    return " · ".join(parts) + f" · {metrics.get('n')} questions"


def run(state, index: int, options):
    """Compare the graphs in ``state.work`` with the source's cached references on the evaluation split.

    A failed gate makes the result not ok: the stage line shows ✗ and the build is marked failed
    (the artifact is still written, with its report, so the failure can be inspected).
    """
    from medlite.pipeline.contract import StageResult
    from medlite.checks import compare, failed
    from medlite.runtime import OnnxVlm

    samples = state.check_samples
    if not samples:
        raise DataError("check: the evaluation split has no questions")
    refs = state.references
    if refs is None:   # no compress stage ran: the source is still untouched
        refs = state.references = state.source.references(samples, max_new_tokens=options.max_new_tokens,
                                                          batch_size=options.batch_size)
        state.timings["references_seconds"] = round(refs.seconds, 3)
    vlm = OnnxVlm.open(state.work, providers=["CPUExecutionProvider"], ctx=state.ctx)
    result = compare(refs, vlm, samples, options, state.ctx)
    state.metrics, state.gates, state.rows = result.metrics, result.gates, result.rows
    state.timings.update(result.timings)
    bad = failed(result.gates)
    manifest = {"questions": len(samples), "images": result.metrics.get("n_images"),
                "dataset": state.recipe.evaluation.dataset, "split": state.recipe.evaluation.split,
                "references": refs.key}
    report = [f"- {g.describe()}" for g in result.gates]
    return StageResult(summary=_summary(result.metrics, result.gates), manifest=manifest, report=report,
                       ok=not bad)


def _calibration(recipe, manifest: dict, ctx):
    """The build's calibration set (its images are left out of the evaluation, as the build did), or None.

    Rebuilt from the recipe (deterministic, usually from the cache); a content hash other than the
    manifest's means the calibration data changed since the build, and the re-run would not compare
    like with like.
    """
    if recipe.calibration is None:
        return None
    from medlite.pipeline.pipeline import load_calibration

    cal, digest, _ = load_calibration(recipe, ctx)
    recorded = (manifest.get("calibration") or {}).get("content_hash")
    if recorded is not None and digest != recorded:
        raise MedliteError(f"verify: the calibration set rebuilt from the recipe has content hash {digest[:12]}, "
                           f"manifest.json records {recorded[:12]}: the calibration data changed since the build")
    return cal


def rerun_checks(path: Path, manifest: dict, args, ctx) -> dict:
    """Re-run an artifact's check stage and compare with its manifest.

    The source model is ``--model`` (and friends) when given, else the source recorded in the
    manifest; its file hashes must equal the recorded ones, otherwise the comparison would be
    meaningless. The source's references come from the cache when present.
    """
    from medlite import artifacts as af
    from medlite.pipeline.pipeline import check_samples, load_evaluation
    from medlite.pipeline.source import Source
    from medlite.checks import compare, compare_metrics
    from medlite.model_choice import DEMO_SOURCE, ModelChoice, load_source
    from medlite.recipes.loader import parse_yaml, validate_data
    from medlite.runtime import OnnxVlm

    data, index = parse_yaml((path / af.RECIPE_FILE).read_text(encoding="utf-8"), str(path / af.RECIPE_FILE))
    recipe = validate_data(data, str(path / af.RECIPE_FILE), [], index).recipe
    options = recipe.stage("check")
    if options is None:
        return {"ok": True, "differences": [], "note": "the recipe has no check stage: nothing to re-run"}
    recorded_src = manifest.get("source", {})
    choice = ModelChoice.from_args(args)
    if choice.path is None and recorded_src.get("path") not in (None, DEMO_SOURCE):
        choice.path = recorded_src["path"]
    with ctx.stage("model") as info:
        loaded, label = load_source(choice, ctx)
        info["detail"] = f"{loaded.name} ({loaded.source.format})"
    if dict(loaded.source.files) != dict(recorded_src.get("files", {})):
        raise MedliteError(f"verify: the source checkpoint ({choice.path or DEMO_SOURCE}) does not have the file "
                           "hashes recorded in manifest.json; pass the original checkpoint with --model")
    samples = check_samples(recipe, load_evaluation(recipe, _calibration(recipe, manifest, ctx), ctx))
    source = Source(choice, loaded, label, ctx)
    with ctx.stage("check") as info:
        refs = source.references(samples, max_new_tokens=options.max_new_tokens, batch_size=options.batch_size)
        result = compare(refs, OnnxVlm.open(path, providers=["CPUExecutionProvider"], ctx=ctx), samples, options, ctx)
        info["detail"] = _summary(result.metrics, result.gates)
        info["ok"] = result.passed
    diffs = compare_metrics(manifest.get("metrics", {}), result.metrics)
    recorded_gates = {g["name"]: g.get("passed") for g in manifest.get("gates", [])}
    for g in result.gates:
        if recorded_gates.get(g.name) != g.passed:
            diffs.append(f"gate {g.name}: recorded {recorded_gates.get(g.name)}, now {g.passed}")
    return {"ok": not diffs, "differences": diffs, "metrics": result.metrics,
            "gates": [g.to_dict() for g in result.gates]}
