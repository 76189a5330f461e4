"""CLI handler for ``medlite demo model``: ``cmd_demo_model(args, ctx) -> int``."""
from __future__ import annotations

import json


def cmd_demo_model(args, ctx) -> int:
    """Build (first use, or ``--force``) or locate the built-in demo model; print its path on stdout."""
    from medlite.demo.model import MARKER, ensure_demo_model

    path = ensure_demo_model(ctx, force=bool(getattr(args, "force", False)))
    card = json.loads((path / MARKER).read_text())
    acc = (card.get("heldout", {}).get("metrics") or {}).get("closed_accuracy")
    if acc is not None:
        ctx.info(f"demo model: legacy TinyLLaVA-Med, Micro Med-VQA held-out closed accuracy {acc:.3f}")
    print(path)
    return 0
