"""``load_model``: any supported checkpoint folder → the canonical :class:`LoadedModel`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from medlite.checkpoints.assemble import assemble
from medlite.checkpoints.model import LoadedModel
from medlite.checkpoints.planning import norm_dtype, plan_checkpoint
from medlite.errors import CheckpointError


def load_model(path, *, ctx, base=None, vision_tower=None, vision_weights=None, dtype=None,
               template: Optional[str] = None) -> LoadedModel:
    """Load a legacy TinyLLaVA, TinyLLaVA Factory or HF Llava checkpoint as the canonical model.

    ``path`` is the checkpoint folder (the built-in demo model's comes from
    :class:`medlite.model_choice.ModelChoice`). ``base`` is the base checkpoint of a LoRA adapter
    (``path`` then holds ``adapter_config.json``). ``vision_tower`` is a local copy of the vision tower
    repository a legacy checkpoint names; ``vision_weights`` ("checkpoint" | "tower") settles which
    copy wins when both exist and differ. ``dtype`` defaults to float32. ``template`` overrides the
    chat template. Nothing is downloaded and no code from the folder is executed.
    """
    if path is None:
        raise CheckpointError("no checkpoint folder given (medlite.model_choice.ModelChoice picks the demo model)")
    path = Path(path).expanduser()
    if (path / "adapter_config.json").is_file():
        try:
            from medlite.checkpoints.lora import load_adapter
        except ImportError:
            raise CheckpointError(f"{path}: this is a LoRA/PEFT adapter; adapter merging is not available in this "
                                  f"build (medlite.checkpoints.lora)") from None
        return load_adapter(path, ctx=ctx, base=base, vision_tower=vision_tower, vision_weights=vision_weights,
                            dtype=dtype, template=template)
    if base is not None:
        raise CheckpointError(f"{path}: --base is only for LoRA adapters, and this folder has no adapter_config.json")
    with ctx.stage("load") as info:
        plan = plan_checkpoint(path, vision_tower=vision_tower, vision_weights=vision_weights, ctx=ctx)
        loaded = assemble(plan, dtype=norm_dtype(dtype), template=template, ctx=ctx)
        n = loaded.param_breakdown()["total"]["params"]
        info["detail"] = (f"{path.name}: {plan.fmt} {plan.text_backbone}, {n / 1e6:.1f} M params, "
                          f"{loaded.num_image_tokens} image tokens")
    return loaded


def inspect_checkpoint(path, *, ctx=None, base=None, vision_tower=None, vision_weights=None,
                       template=None) -> LoadedModel:
    """Like :func:`load_model` but on the ``meta`` device: shapes, sizes and notes, no tensor data read.

    A LoRA adapter folder is checked against its ``base`` (names, shapes, options) without merging.
    """
    if (Path(path).expanduser() / "adapter_config.json").is_file():
        from medlite.checkpoints.lora import inspect_adapter

        return inspect_adapter(Path(path).expanduser(), ctx=ctx, base=base, vision_tower=vision_tower,
                               vision_weights=vision_weights, template=template)
    if base is not None:
        raise CheckpointError(f"{path}: --base is only for LoRA adapters, and this folder has no adapter_config.json")
    plan = plan_checkpoint(path, vision_tower=vision_tower, vision_weights=vision_weights, ctx=ctx)
    return assemble(plan, meta=True, hash_files=False, template=template, ctx=ctx)
