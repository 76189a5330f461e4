"""CLI handler for ``medlite eval``: ``cmd_eval(args, ctx) -> int``."""
from __future__ import annotations

import json
from pathlib import Path

from medlite.errors import DataError
from medlite.fileio import ensure_writable_file, write_json_atomic


def cmd_eval(args, ctx) -> int:
    """``medlite eval [--model M] --dataset SPEC [--images DIR] [--split S] [--limit N] [--out F] [--json]``.

    ``--model`` is a checkpoint (answered in PyTorch) or a built artifact / ONNX export (answered on ONNX
    Runtime, after its files are hash-checked against its manifest as ``ask`` does; ``OUT/<model>/<recipe>``
    means its latest artifact).
    Prints the closed accuracy (whole word), the LLaVA-Med-compatible substring score, open metrics
    and per-modality / per-question-type tables; ``--out`` writes predictions + metrics as JSON and
    ``--json`` prints that JSON (without the predictions) on stdout.
    """
    from medlite.evaluation.evaluate import evaluate, print_report
    from medlite.evaluation.vqa import load_dataset
    from medlite.model_choice import load_from_args

    out = getattr(args, "out", None)
    if out:
        ensure_writable_file(out, "--out")     # before the model loads, not after the evaluation
    if getattr(args, "device", None):          # a device this machine lacks: one line before any work
        from medlite.devices import resolve_device

        resolve_device(args.device)
    dataset = getattr(args, "dataset", None) or "builtin:micro-med-vqa"
    split = getattr(args, "split", None) or "test"
    with ctx.stage("dataset") as info:
        samples = load_dataset(dataset, images_dir=getattr(args, "images", None), split=split)
        limit = getattr(args, "limit", None)
        if limit is not None:
            if limit < 1:
                raise DataError(f"--limit must be at least 1, got {limit}")
            samples = samples[:limit]
        info["detail"] = f"{dataset} [{split}]: {len(samples)} questions"
    artifact = artifact_folder(getattr(args, "model", None))
    if artifact is not None:
        result = evaluate_onnx(artifact, samples, args, ctx)
        name = result["model"]["folder"]
    else:
        loaded = load_from_args(args, ctx)
        result = evaluate(loaded, samples, ctx=ctx)
        name = loaded.name
    result["dataset"] = {"spec": str(dataset), "split": split, "n": len(samples), "limit": limit}
    if out:
        write_json_atomic(Path(out), result)
    if getattr(args, "json", False):
        print(json.dumps({k: v for k, v in result.items() if k != "predictions"}, indent=2, default=str))
    else:
        from medlite.context import make_console

        # the result goes to stdout (ctx.console is stderr, for progress), so --quiet still shows it
        print_report(result, make_console(stderr=False), title=f"{name} on {dataset} [{split}]")
        if out:
            ctx.info(f"predictions and metrics written to {out}")
    return 0


def artifact_folder(model):
    """The artifact / ONNX export folder ``--model`` names (``OUT/<model>/<recipe>`` or its ``latest``
    resolved), or None when it names a checkpoint (or nothing: the demo model)."""
    if not model:
        return None
    from medlite.artifacts import resolve_artifact_path

    path = resolve_artifact_path(Path(model))
    if (path / "medlite_runtime.json").is_file() or (path / "manifest.json").is_file():
        return path
    return None


def evaluate_onnx(folder: Path, samples: list, args, ctx) -> dict:
    """Hash-check the artifact (a plain export: a loud warning), open it on ONNX Runtime and evaluate it;
    the result's ``model`` names the folder, version, hash check and per-graph precision."""
    from medlite.evaluation.evaluate import evaluate_artifact
    from medlite.runtime.commands import _check_artifact
    from medlite.runtime.describe import graph_labels
    from medlite.runtime.vlm import OnnxVlm

    for opt in ("base", "vision_tower", "vision_weights", "template"):
        if getattr(args, opt, None):
            raise DataError(f"--{opt.replace('_', '-')} applies to a checkpoint; {folder} is an ONNX artifact "
                            f"(its graphs already hold the weights and template)")
    model = _check_artifact(folder, ctx)
    with ctx.stage("model") as info:
        vlm = OnnxVlm.open(model["folder"], ctx=ctx)
        model["precision"] = graph_labels(vlm.config)
        info["detail"] = f"{model['folder']} on ONNX Runtime · hashes {model['hash_check']}"
    result = evaluate_artifact(vlm, samples, ctx=ctx)
    result["model"] = {"name": Path(model["folder"]).name, **model}
    return result
