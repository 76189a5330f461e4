"""Helpers shared by the sweep tests (a module of its own: ``conftest`` is not importable by name when
several test folders have one)."""
from __future__ import annotations

import json
from pathlib import Path

BUILT = ["precision-fp32", "precision-fp16", "strict"]     # the tiny sweep's variants that build (conftest.py)


def comparable(row: dict) -> dict:
    """A row without what differs between two runs of the same variant (paths, timings, resume flag)."""
    return {k: v for k, v in row.items() if k not in ("artifact", "build_seconds", "reused")}


def rows_by_name(result: dict) -> dict:
    return {r["variant"]: r for r in result["rows"]}


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def worker_pid(task) -> dict:
    """A stand-in for a variant's build in a local worker: which process ran it (executor tests)."""
    import os

    return {"name": task.name, "pid": os.getpid()}
