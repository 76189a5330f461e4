"""CLI handlers for ``medlite eval`` and ``medlite demo model``: ``cmd_x(args, ctx) -> int``."""
from __future__ import annotations

import json
import os
from pathlib import Path

from medlite.errors import DataError


def cmd_demo_model(args, ctx) -> int:
    """Build (first use, or ``--force``) or locate the built-in demo model; print its path on stdout."""
    from medlite.calibration.demo_model import MARKER, ensure_demo_model

    path = ensure_demo_model(ctx, force=bool(getattr(args, "force", False)))
    card = json.loads((path / MARKER).read_text())
    acc = (card.get("heldout", {}).get("metrics") or {}).get("closed_accuracy")
    if acc is not None:
        ctx.info(f"demo model: legacy TinyLLaVA-Med, Micro Med-VQA held-out closed accuracy {acc:.3f}")
    print(path)
    return 0


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def cmd_eval(args, ctx) -> int:
    """``medlite eval [--model M] --dataset SPEC [--images DIR] [--split S] [--limit N] [--out F] [--json]``.

    Prints the closed accuracy (whole word), the LLaVA-Med-compatible substring score, open metrics
    and per-modality / per-question-type tables; ``--out`` writes predictions + metrics as JSON and
    ``--json`` prints that JSON (without the predictions) on stdout.
    """
    from medlite.calibration.evaluate import evaluate, print_report
    from medlite.calibration.vqa import load_dataset
    from medlite.checkpoints import load_model

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
    loaded = load_model(getattr(args, "model", None), ctx=ctx, base=getattr(args, "base", None),
                        vision_tower=getattr(args, "vision_tower", None),
                        vision_weights=getattr(args, "vision_weights", None), template=getattr(args, "template", None))
    result = evaluate(loaded, samples, ctx=ctx)
    result["dataset"] = {"spec": str(dataset), "split": split, "n": len(samples), "limit": limit}
    out = getattr(args, "out", None)
    if out:
        _write_json_atomic(Path(out), result)
    if getattr(args, "json", False):
        print(json.dumps({k: v for k, v in result.items() if k != "predictions"}, indent=2, default=str))
    else:
        from rich.console import Console

        # the result goes to stdout (ctx.console is stderr, for progress), so --quiet still shows it
        print_report(result, Console(highlight=False), title=f"{loaded.name} on {dataset} [{split}]")
        if out:
            ctx.info(f"predictions and metrics written to {out}")
    return 0
