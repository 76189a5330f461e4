"""The stage-output cache: the working model after each cacheable weight-changing stage, so that a
build whose recipe prefix matches resumes after the last cached stage instead of repeating it.

An entry's key hashes everything the model after stage ``i`` depends on: the source's file hashes
(and chat template), the resolved recipe up to and including stage ``i`` (with the target, the
calibration and evaluation sections, and which function runs each stage; never the recipe's name, version or description — sweep
variants share their prefix), the calibration set's content hash, the seed, the versions of the
packages that change those stages' numbers, and medlite's version.

Layout: ``<cache>/stages/<key>/`` holds ``model.pt`` (the pickled working ``LoadedModel``),
``result.json`` (the stage's :class:`~medlite.pipeline.contract.StageResult`) and ``entry.json``
(sha256 and size of both, the stage, when it was written); ``last-used`` is touched on every hit.
Entries are written to a temporary folder and renamed into place; a corrupted entry (a hash that
does not match) is reported, deleted and rebuilt. The folder is capped (``MEDLITE_STAGE_CACHE_GB``,
default 20 GB): least recently used entries are evicted first. ``medlite cache ls / clear``.

The pickle is only ever read back after its sha256 matched the one written beside it, from the
user's own cache folder (never from an artifact or a download).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from medlite.fileio import sha256_file

SUBDIR = "stages"
MODEL, RESULT, ENTRY, USED = "model.pt", "result.json", "entry.json", "last-used"
DEFAULT_LIMIT_GB = 20.0


@dataclass
class CacheEntry:
    """One stored stage output, as ``medlite cache ls`` lists it."""

    key: str
    stage: str
    recipe: str
    bytes: int
    created: float
    last_used: float
    path: Path


def cache_root(cache_dir) -> Path:
    """``<cache>/stages``."""
    return Path(cache_dir) / SUBDIR


def limit_bytes() -> int:
    """The cache's size limit (``MEDLITE_STAGE_CACHE_GB``, default 20 GB; 0 disables storing)."""
    text = os.environ.get("MEDLITE_STAGE_CACHE_GB", str(DEFAULT_LIMIT_GB))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:       # also NaN
        from medlite.errors import MedliteError

        raise MedliteError(f"MEDLITE_STAGE_CACHE_GB={text!r}: must be a number of GB, 0 or more (0 stores nothing)")
    return int(value * 1e9)


def stage_key(*, source_identity: dict, recipe: dict, index: int, calibration_sha256: Optional[str],
              seed: int, packages: dict, medlite_version: str, runners: tuple = ()) -> str:
    """The key of the model after ``recipe['stages'][index]`` (see the module docstring)."""
    from medlite.artifacts import sha256_json

    prefix = {k: v for k, v in recipe.items() if k not in ("name", "version", "description", "model")}
    prefix["stages"] = list(recipe["stages"][:index + 1])
    payload = {"source": source_identity, "recipe": prefix, "calibration": calibration_sha256, "seed": seed,
               "packages": packages, "medlite": medlite_version, "runners": list(runners[:index + 1])}
    return sha256_json(payload)[:24]


class StageCache:
    """Store and look up stage outputs under ``<cache_dir>/stages`` (see the module docstring)."""

    def __init__(self, cache_dir, ctx=None):
        self.root, self.ctx = cache_root(cache_dir), ctx

    def _warn(self, msg: str) -> None:
        if self.ctx is not None:
            self.ctx.warn(msg)

    def load(self, key: str) -> Optional[tuple[Any, dict]]:
        """``(LoadedModel, StageResult fields)`` of ``key``, or None when absent or corrupted (a
        corrupted entry is reported and removed, so the stage runs again and stores a good one)."""
        folder = self.root / key
        if not (folder / ENTRY).is_file():
            return None
        try:
            entry = json.loads((folder / ENTRY).read_text(encoding="utf-8"))
            for name in (MODEL, RESULT):
                if sha256_file(folder / name) != entry["files"][name]["sha256"]:
                    raise ValueError(f"{name}: sha256 does not match entry.json")
            import torch

            loaded = _model_from(torch.load(folder / MODEL, map_location="cpu", weights_only=False))
            result = json.loads((folder / RESULT).read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, EOFError, RuntimeError, TypeError, AttributeError) as e:
            self._warn(f"stage cache entry {folder} is corrupted ({e}): removed, the stage runs again")
            shutil.rmtree(folder, ignore_errors=True)
            return None
        (folder / USED).write_text(f"{time.time():.3f}\n", encoding="utf-8")
        return loaded, result

    def store(self, key: str, *, stage: str, recipe: str, loaded, result) -> Optional[Path]:
        """Write the entry atomically (temporary folder renamed into place), then evict down to the limit."""
        limit = limit_bytes()
        if limit <= 0:
            return None
        import torch

        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / key
        tmp = self.root / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            torch.save(_model_state(loaded), tmp / MODEL)
            (tmp / RESULT).write_text(json.dumps(_result_fields(result), sort_keys=True, default=str),
                                      encoding="utf-8")
            files = {n: {"sha256": sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size} for n in (MODEL, RESULT)}
            entry = {"key": key, "stage": stage, "recipe": recipe, "created": time.time(), "files": files}
            (tmp / ENTRY).write_text(json.dumps(entry, indent=1), encoding="utf-8")
            (tmp / USED).write_text(f"{time.time():.3f}\n", encoding="utf-8")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.evict(limit, keep=key)
        return final

    def entries(self) -> list[CacheEntry]:
        """Every complete entry, most recently used first."""
        out = []
        for folder in sorted(self.root.glob("*")) if self.root.is_dir() else []:
            if folder.name.startswith(".") or not (folder / ENTRY).is_file():
                continue
            try:
                e = json.loads((folder / ENTRY).read_text(encoding="utf-8"))
                used = float((folder / USED).read_text().strip()) if (folder / USED).is_file() else e["created"]
            except (OSError, ValueError, KeyError):
                continue
            size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
            out.append(CacheEntry(folder.name, e.get("stage", "?"), e.get("recipe", "?"), size,
                                  float(e.get("created", 0)), used, folder))
        return sorted(out, key=lambda x: -x.last_used)

    def evict(self, limit: int, *, keep: Optional[str] = None) -> list[CacheEntry]:
        """Remove least recently used entries until the folder fits ``limit`` bytes (never ``keep``)."""
        entries, removed = self.entries(), []
        total = sum(e.bytes for e in entries)
        for e in reversed(entries):
            if total <= limit:
                break
            if e.key == keep:
                continue
            shutil.rmtree(e.path, ignore_errors=True)
            total -= e.bytes
            removed.append(e)
        return removed

    def clear(self) -> tuple[int, int]:
        """Remove every entry (and leftover temporary folders): ``(entries, bytes)`` removed."""
        entries = self.entries()
        n, size = len(entries), sum(e.bytes for e in entries)
        if self.root.is_dir():
            for folder in self.root.iterdir():
                shutil.rmtree(folder, ignore_errors=True) if folder.is_dir() else folder.unlink()
        return n, size


def _model_state(loaded) -> dict:
    """What rebuilds the working model: its config (pruning updates it), weights, and the processor
    fields. Not the module object itself: transformers installs unpicklable local hooks on it."""
    import dataclasses

    model = loaded.model
    return {"config": model.config.to_dict(), "attn": getattr(model.config, "_attn_implementation", None),
            "dtype": str(next(model.parameters()).dtype), "state_dict": model.state_dict(),
            "meta": dataclasses.replace(loaded, model=None)}


def _model_from(state: dict):
    """The ``LoadedModel`` :func:`_model_state` saved (strict: every weight has its place and shape)."""
    import dataclasses

    from transformers import LlavaConfig

    from medlite.checkpoints.assemble import empty_model

    config = LlavaConfig.from_dict(state["config"])
    if state.get("attn"):
        config._attn_implementation = state["attn"]
    sd = state["state_dict"]
    model = empty_model(config, meta=False, lm_head_bias="lm_head.bias" in sd)
    model.load_state_dict(sd, strict=True)
    model.eval()
    return dataclasses.replace(state["meta"], model=model)


def _result_fields(result) -> dict:
    return asdict(result) if hasattr(result, "__dataclass_fields__") else dict(result)
