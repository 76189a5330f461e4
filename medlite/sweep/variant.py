"""One variant in a worker process, and its row read back from the artifact's own files.

A worker runs the normal build (:func:`medlite.pipeline.pipeline.build`, after the same budget check as
``medlite build``), so artifacts, gates, the reference cache and the stage-output cache are shared
with every other build. It returns where the artifact is, never the figures: the driver reads every
figure of the table from the artifact (``manifest.json``, ``report.json``, ``build-info.json``,
``medlite_runtime.json``), so a built, a resumed and a Ray-built variant give the same row.
"""
from __future__ import annotations

import contextlib
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MEDLITE_ORT_THREADS")


@dataclass
class VariantTask:
    """Everything a worker needs (picklable: sent to a process or a Ray task)."""

    name: str
    recipe_path: str
    overrides: list[str]
    choice: object                      # medlite.model_choice.ModelChoice
    out_root: str                       # the artifacts root (``OUT/artifacts``)
    cache_dir: str
    threads: int = 1
    log: Optional[str] = None           # the worker's stage lines and warnings go here
    dataset: Optional[dict] = None      # the sweep's ``dataset`` (DatasetSpec as a dict)
    marker: Optional[str] = None        # a file the driver wrote: invisible to the worker = no shared file system
    device: Optional[str] = None        # --device for the build (None: the recipe's device, else auto)
    gpus: float = 0.0                   # GPUs the Ray task declares (medlite.sweep.gpus)
    extra: dict = field(default_factory=dict)


def set_threads(n: int) -> None:
    """This process's thread budget: BLAS/OpenMP and ONNX Runtime (environment, read when they start) and
    torch's intra-op pool (now, when torch is already imported)."""
    for var in THREAD_VARS:
        os.environ[var] = str(int(n))
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(n))


def _build(task: VariantTask, root: Path, ctx):
    from medlite.pipeline.commands import check_budget, plan_steps
    from medlite.pipeline.pipeline import build
    from medlite.memory import map_large_allocations
    from medlite.engines.targets import TARGETS
    from medlite.recipes import load_recipe

    import torch

    torch.set_num_threads(int(task.threads))
    resolved = load_recipe(task.recipe_path, list(task.overrides))
    target = TARGETS[resolved.recipe.target]
    check_budget(plan_steps(resolved, task.choice.inspect(ctx), target), target, f"variant {task.name}")
    map_large_allocations()
    return build(resolved, task.choice, root, ctx, device=task.device)


def _score(task: VariantTask, folder: Path, ctx) -> dict:
    """The variant's artifact on the sweep's data set, on ONNX Runtime (``medlite eval --model ARTIFACT``)."""
    from medlite.evaluation.evaluate import evaluate_artifact
    from medlite.evaluation.vqa import load_dataset
    from medlite.runtime.vlm import OnnxVlm

    d = task.dataset
    samples = load_dataset(d["dataset"], images_dir=d.get("images"), split=d.get("split") or "test")
    samples = samples[:d["limit"]] if d.get("limit") else samples
    m = evaluate_artifact(OnnxVlm.open(folder, ctx=ctx), samples, ctx=ctx)["metrics"]
    return {k: m.get(k) for k in ("n", "n_closed", "n_open", "closed_accuracy", "open_recall")}


def _read_tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_variant(task: VariantTask, events=None) -> dict:
    """Build one variant (in a worker): ``{"name", "ok", "artifact" (relative to out_root), "error",
    "seconds", "dataset", "files", "latest"}``; ``files`` (path in the artifact → bytes) only when the worker does not
    share the driver's file system. A failure is returned as ``error``, never raised (Ctrl-C is)."""
    import tempfile

    from medlite.context import RunContext

    set_threads(task.threads)
    shared = task.marker is None or Path(task.marker).exists()
    t0 = time.perf_counter()
    out = {"name": task.name, "ok": False, "artifact": None, "error": None, "dataset": None, "files": None}
    log = open(task.log, "a", encoding="utf-8", buffering=1) if task.log and shared else open(os.devnull, "w")
    with log, contextlib.redirect_stderr(log), tempfile.TemporaryDirectory(prefix="medlite-sweep-") as tmp:
        root = Path(task.out_root) if shared else Path(tmp)
        ctx = RunContext(cache_dir=Path(task.cache_dir))
        if events is not None:
            stage = ctx.stage

            def announced(name: str):
                events.put((task.name, name))
                return stage(name)
            ctx.stage = announced
        try:
            result = _build(task, root, ctx)
            folder = Path(result.path)
            if task.dataset:
                out["dataset"] = _score(task, folder, ctx)
            out.update(ok=True, artifact=folder.relative_to(root).as_posix())
            if not shared:     # the driver writes it under its --out
                latest = folder.parent / "latest"
                out["files"] = _read_tree(folder)
                out["latest"] = latest.read_text(encoding="utf-8") if latest.is_file() else None
        except Exception as e:   # noqa: BLE001 — a failing variant is a row with its error, not a stopped sweep
            from medlite.errors import MedliteError

            if isinstance(e, MedliteError):    # one line: a RecipeError's problems joined
                errors = getattr(e, "errors", None)
                out["error"] = "; ".join(errors) if errors else " ".join(str(e).split())
            else:
                out["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc(file=log)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out
