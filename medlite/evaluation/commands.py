"""CLI handler for ``medlite eval``: ``cmd_eval(args, ctx) -> int``."""
from __future__ import annotations

import json
from pathlib import Path

from medlite.errors import DataError
from medlite.fileio import ensure_writable_file, write_json_atomic


def cmd_eval(args, ctx) -> int:
    """``medlite eval [--model M] --dataset SPEC [--images DIR] [--split S] [--limit N] [--out F] [--json]``.

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
    loaded = load_from_args(args, ctx)
    result = evaluate(loaded, samples, ctx=ctx)
    result["dataset"] = {"spec": str(dataset), "split": split, "n": len(samples), "limit": limit}
    if out:
        write_json_atomic(Path(out), result)
    if getattr(args, "json", False):
        print(json.dumps({k: v for k, v in result.items() if k != "predictions"}, indent=2, default=str))
    else:
        from medlite.context import make_console

        # the result goes to stdout (ctx.console is stderr, for progress), so --quiet still shows it
        print_report(result, make_console(stderr=False), title=f"{loaded.name} on {dataset} [{split}]")
        if out:
            ctx.info(f"predictions and metrics written to {out}")
    return 0
