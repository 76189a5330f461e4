"""Detect a checkpoint folder's format and work out its conversion plan (headers only).

Shared by :mod:`medlite.checkpoints.loader` and :mod:`medlite.checkpoints.lora` (a LoRA base is
planned the same way), so neither imports the other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from medlite.checkpoints.assemble import Plan
from medlite.checkpoints.formats import PLANNERS, detect_format, read_config, recorded_name
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
    plan = PLANNERS[fmt](path, cfg, pool, vision_tower=vision_tower, vision_weights=vision_weights, ctx=ctx)
    plan.name = recorded_name(path) or ""
    return plan


def norm_dtype(dtype) -> Optional[str]:
    """``dtype`` (a torch dtype or its name) as one of float32 / float16 / bfloat16; None stays None."""
    if dtype is None:
        return None
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise CheckpointError(f"dtype {dtype!r} not supported; choose one of {', '.join(_DTYPES)}")
    return name
