"""The built-in demo model: a micro TinyLLaVA-Med trained on Micro Med-VQA, cached, rebuilt on demand.

Every command uses it when no ``--model`` is given, so the whole pipeline (load → export → quantize
→ gates) runs offline on a model that *actually answers medical questions* (held-out closed
accuracy ≥ 0.85, chance 0.5; see docs/demo-model.md).

It is written in the **legacy TinyLLaVA format** (``config.json`` with ``mm_vision_tower``,
``model.mm_projector.*``, ``model.vision_tower.vision_tower.vision_model.*`` keys, tokenizer files),
the format of the released TinyLLaVA-Med checkpoints, so the default run exercises the loader path
real users hit. A legacy config names its tower by hub id only; the demo names
:data:`TOWER_REPO` and ships that tower's ``config.json`` + ``preprocessor_config.json`` (no
weights: they are in the checkpoint) as ``vision_tower/`` inside the checkpoint folder, where the
loader looks for a tower copy. As in TinyLLaVA, that config has one layer more than the checkpoint
holds (the tower class deletes the last layer).

Cache: ``ctx.cache_dir / "demo-model" / <key>`` where the key hashes the training code, the data
code, the recipe and the torch/transformers/tokenizers versions. Builds go to a temporary folder
renamed into place (atomic), under a per-key file lock, so a killed or concurrent build never
leaves a half-written model behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from medlite.demo.train import TEMPLATE, DemoRecipe, image_spec_for
from medlite.fileio import replace_into_place

TOWER_REPO = "medlite/siglip-micro-patch8-56"
NAME = "micro-tinyllava-med"         # the model name in artifact paths and summaries
MARKER = "medlite_demo.json"          # written last; its presence means the folder is complete
MIN_ACCURACY = 0.85                   # held-out closed accuracy the demo model must reach
_HASHED_MODULES = (
    # the data: images decoded from the built-in files, the questions and lesions drawn on them
    "medlite.imaging.builtin", "medlite.imaging.images", "medlite.imaging.dicom",
    "medlite.imaging.pixels", "medlite.demo.micro_vqa", "medlite.demo.lesions",
    # the training and the written checkpoint
    "medlite.demo.tokenizer", "medlite.demo.vision", "medlite.demo.train",
    "medlite.demo.model", "medlite.checkpoints.writers")


def demo_model_key(recipe: DemoRecipe | None = None) -> str:
    """Cache key: sha256 over the data/training/writer code, the recipe and the library versions."""
    import importlib.util

    import tokenizers
    import torch
    import transformers

    from medlite.demo.micro_vqa import VERSION

    recipe = recipe or DemoRecipe()
    h = hashlib.sha256()
    for mod in _HASHED_MODULES:
        h.update(mod.encode())
        h.update(Path(importlib.util.find_spec(mod).origin).read_bytes())
    h.update(json.dumps(recipe.to_dict(), sort_keys=True).encode())
    h.update(f"{VERSION}|torch {torch.__version__}|transformers {transformers.__version__}|"
             f"tokenizers {tokenizers.__version__}".encode())
    return h.hexdigest()[:16]


def _complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


@contextlib.contextmanager
def _build_lock(path: Path):
    """An exclusive lock held while one process builds; released by the OS if the process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the tmp-dir + rename still keeps the cache consistent
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_tower_config(model, out: Path, image_spec) -> Path:
    """``out/vision_tower``: the tower repo's config (N+1 layers, as TinyLLaVA expects) + preprocessor."""
    from medlite.checkpoints.writers import preprocessor_dict, vision_dict

    vcfg = model.config.vision_config
    folder = out / "vision_tower"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = vision_dict(vcfg, layers=vcfg.num_hidden_layers + 1, head=False)
    cfg["_name_or_path"] = TOWER_REPO
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_dict(image_spec), indent=2))
    (folder / "README.md").write_text(
        f"Architecture of {TOWER_REPO}, the micro SigLIP tower of the medlite demo model.\n"
        "Its weights are in the checkpoint (model.vision_tower.vision_tower.vision_model.*); TinyLLaVA's\n"
        "tower class deletes the last of the layers this config declares, so the checkpoint holds one fewer.\n")
    return folder


def build_demo_model(out: Path, *, ctx, recipe: DemoRecipe | None = None, key: str = "") -> dict:
    """Train the demo model and write it (legacy format) into ``out``; returns the model card dict.

    The held-out Micro Med-VQA accuracy is measured through the *written* checkpoint
    (``load_model`` → batched greedy answers → :func:`medlite.evaluation.scoring.score`).
    """
    import torch

    from medlite.demo.train import train_demo
    from medlite.demo.micro_vqa import VERSION, micro_med_vqa
    from medlite.checkpoints import load_model, write_checkpoint

    recipe = recipe or DemoRecipe()
    with ctx.stage("demo data") as info:
        train = micro_med_vqa("train", seed=recipe.seed, ctx=ctx, size=recipe.image_size)
        info["detail"] = f"Micro Med-VQA train: {len(train)} questions on {len({s.image_id for s in train})} sources"
    with ctx.stage("train") as info:
        model, tok, history = train_demo(train, recipe, ctx=ctx)
        info["detail"] = (f"{history['params'] / 1e6:.2f} M params, {recipe.steps} steps, "
                          f"final loss {history['loss'][-1][1]:.3f}")
    with ctx.stage("write") as info:
        spec = image_spec_for(recipe)
        write_checkpoint(model, tok, out, fmt="legacy", image_spec=spec, template_name=TEMPLATE,
                         text_backbone="llama", dtype=torch.float32, vision_tower_repo=TOWER_REPO,
                         name=NAME)
        write_tower_config(model, out, spec)
        info["detail"] = f"legacy TinyLLaVA checkpoint in {out.name}"
    del model
    from medlite.evaluation.evaluate import evaluate

    loaded = load_model(out, ctx=ctx)
    test = micro_med_vqa("test", seed=recipe.seed, ctx=ctx, size=recipe.image_size)
    result = evaluate(loaded, test, ctx=ctx)
    acc = result["metrics"]["closed_accuracy"]
    if acc < MIN_ACCURACY:
        ctx.warn(f"demo model held-out closed accuracy {acc:.3f} is below {MIN_ACCURACY} "
                 f"(recipe {recipe.to_dict()}); the gates that use it will be weak")
    card = {"name": "medlite micro TinyLLaVA-Med demo", "key": key, "format": "legacy", "template": TEMPLATE,
            "vision_tower_repo": TOWER_REPO, "data": VERSION, "recipe": recipe.to_dict(),
            "training": {k: v for k, v in history.items() if k not in ("loss", "vision_loss")},
            "loss_curve": history["loss"], "heldout": {k: v for k, v in result.items() if k != "predictions"},
            "built_on": built_on(result["model"]["source"]["files"]["model.safetensors"])}
    (out / MARKER).write_text(json.dumps(card, indent=2, default=str))
    return card


def built_on(weights_sha256: str) -> dict:
    """What a build's weights depend on beyond its cache key: the CPU kernels torch dispatched to, with
    the weights' sha256 (the loader's, from the held-out evaluation) beside them. Two machines build
    different weights under one key (docs/demo-model.md: AVX-512 vs AVX2 kernels sum in different orders
    over 1,500 steps), so gates measured on one build are tied to it."""
    import platform

    import torch

    return {"machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "mkl": torch.backends.mkl.is_available(), "weights_sha256": weights_sha256}


def _clean_stale(root: Path, key: str) -> None:
    """Remove temporary folders left by killed builds of ``key`` (we hold its lock: none is live)."""
    for p in [*root.glob(f".tmp-{key}-*"), *root.glob(f".old-{key}-*")]:
        shutil.rmtree(p, ignore_errors=True)


def ensure_demo_model(ctx, *, force: bool = False, recipe: DemoRecipe | None = None) -> Path:
    """Path of the built-in demo model (legacy TinyLLaVA folder), training it first when missing.

    ``force`` retrains even when a cached copy exists (the new one replaces it atomically).
    ``recipe`` replaces the default recipe (tests train tiny variants; they get their own key).
    """
    recipe = recipe or DemoRecipe()
    key = demo_model_key(recipe)
    root = Path(ctx.cache_dir) / "demo-model"
    final = root / key
    if _complete(final) and not force:
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root / f".{key}.lock"):
        if _complete(final) and not force:  # built by a concurrent process while we waited
            return final
        _clean_stale(root, key)
        ctx.info(f"building the demo model (first use; cached in {final})")
        tmp = root / f".tmp-{key}-{os.getpid()}"
        try:
            build_demo_model(tmp, ctx=ctx, recipe=recipe, key=key)
            replace_into_place(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
