"""``load_model``: any supported checkpoint folder → the canonical :class:`LoadedModel`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from medlite.checkpoints.assemble import Plan, assemble
from medlite.checkpoints.formats import PLANNERS, detect_format, read_config
from medlite.checkpoints.model import LoadedModel
from medlite.checkpoints.pool import TensorPool
from medlite.errors import CheckpointError

_DTYPES = ("float32", "float16", "bfloat16")


def plan_checkpoint(path, *, vision_tower=None, vision_weights=None, ctx=None) -> Plan:
    """Detect the format of ``path`` and work out the conversion (headers only, no tensor data)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder not found")
    cfg = read_config(path)
    fmt = detect_format(cfg, where=str(path / "config.json"))
    pool = TensorPool.open(path, label=f"checkpoint {path}")
    return PLANNERS[fmt](path, cfg, pool, vision_tower=vision_tower, vision_weights=vision_weights, ctx=ctx)


def _norm_dtype(dtype) -> Optional[str]:
    if dtype is None:
        return None
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise CheckpointError(f"dtype {dtype!r} not supported; choose one of {', '.join(_DTYPES)}")
    return name


def load_model(path, *, ctx, base=None, vision_tower=None, vision_weights=None, dtype=None,
               template: Optional[str] = None) -> LoadedModel:
    """Load a legacy TinyLLaVA, TinyLLaVA Factory or HF Llava checkpoint as the canonical model.

    ``path`` None means the built-in demo model. ``base`` is the base checkpoint of a LoRA adapter
    (``path`` then holds ``adapter_config.json``). ``vision_tower`` is a local copy of the vision tower
    repository a legacy checkpoint names; ``vision_weights`` ("checkpoint" | "tower") settles which
    copy wins when both exist and differ. ``dtype`` defaults to float32. ``template`` overrides the
    chat template. Nothing is downloaded and no code from the folder is executed.
    """
    if path is None:
        from medlite.calibration.demo_model import ensure_demo_model

        path = ensure_demo_model(ctx)
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
        loaded = assemble(plan, dtype=_norm_dtype(dtype), template=template, ctx=ctx)
        from medlite.calibration.demo_model import MARKER as DEMO_MARKER, NAME as DEMO_NAME

        if (path / DEMO_MARKER).is_file():  # the demo cache folder is named by its key, not the model
            loaded.source.name = DEMO_NAME
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
