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


def run(state, index: int, options) -> str:
    """Compare the graphs in ``state.work`` with the source model on the evaluation split."""
    from medlite.checks import TorchReference, compare, select_samples
    from medlite.runtime import OnnxVlm

    limit = options.max_samples or state.recipe.evaluation.max_samples
    samples = select_samples(state.eval_samples, limit)
    if not samples:
        raise DataError("check: the evaluation split has no questions")
    vlm = OnnxVlm.open(state.work)
    result = compare(TorchReference(state.loaded), vlm, samples, options, state.ctx)
    state.metrics, state.gates, state.rows = result.metrics, result.gates, result.rows
    state.sections["check"] = {"stage": f"stages[{index}].check", "questions": len(samples),
                               "dataset": state.recipe.evaluation.dataset, "split": state.recipe.evaluation.split}
    return _summary(result.metrics, result.gates)


def rerun_checks(path: Path, manifest: dict, args, ctx) -> dict:
    """Re-run an artifact's check stage and compare with its manifest.

    The source model is ``--model`` (and friends) when given, else the source recorded in the
    manifest; its file hashes must equal the recorded ones, otherwise the comparison would be
    meaningless.
    """
    from medlite import artifacts as af
    from medlite.checks import TorchReference, compare, compare_metrics, select_samples
    from medlite.model_choice import DEMO_SOURCE, ModelChoice, load_source
    from medlite.pipeline import load_evaluation
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
        loaded, _ = load_source(choice, ctx)
        info["detail"] = f"{loaded.name} ({loaded.source.format})"
    if dict(loaded.source.files) != dict(recorded_src.get("files", {})):
        raise MedliteError(f"verify: the source checkpoint ({choice.path or DEMO_SOURCE}) does not have the file "
                           "hashes recorded in manifest.json; pass the original checkpoint with --model")
    samples = select_samples(load_evaluation(recipe, None, ctx), options.max_samples or recipe.evaluation.max_samples)
    with ctx.stage("check") as info:
        result = compare(TorchReference(loaded), OnnxVlm.open(path), samples, options, ctx)
        info["detail"] = _summary(result.metrics, result.gates)
    diffs = compare_metrics(manifest.get("metrics", {}), result.metrics)
    recorded_gates = {g["name"]: g.get("passed") for g in manifest.get("gates", [])}
    for g in result.gates:
        if recorded_gates.get(g.name) != g.passed:
            diffs.append(f"gate {g.name}: recorded {recorded_gates.get(g.name)}, now {g.passed}")
    return {"ok": not diffs, "differences": diffs, "metrics": result.metrics,
            "gates": [g.to_dict() for g in result.gates]}
