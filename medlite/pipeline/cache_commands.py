"""``medlite cache ls`` / ``medlite cache clear``: the stage-output cache (:mod:`medlite.pipeline.stage_cache`)."""
from __future__ import annotations

import json
import time


def cmd_cache_ls(args, ctx) -> int:
    """List the stage-output cache's entries (most recently used first) with their sizes."""
    from medlite.pipeline.stage_cache import StageCache, cache_root, limit_bytes
    from medlite.units import human_bytes

    entries = StageCache(ctx.cache_dir).entries()
    total = sum(e.bytes for e in entries)
    if ctx.json_mode:
        print(json.dumps({"root": str(cache_root(ctx.cache_dir)), "limit_bytes": limit_bytes(), "bytes": total,
                          "entries": [{"key": e.key, "stage": e.stage, "recipe": e.recipe, "bytes": e.bytes,
                                       "created": e.created, "last_used": e.last_used} for e in entries]}, indent=1))
        return 0
    print(f"stage cache {cache_root(ctx.cache_dir)}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
          f"{human_bytes(total)} of {human_bytes(limit_bytes())} (MEDLITE_STAGE_CACHE_GB)")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        print(f"  {e.key}  {human_bytes(e.bytes):>9}  {e.recipe} {e.stage}  last used {used}")
    return 0


def cmd_cache_clear(args, ctx) -> int:
    """Remove every entry of the stage-output cache."""
    from medlite.pipeline.stage_cache import StageCache
    from medlite.units import human_bytes

    n, size = StageCache(ctx.cache_dir).clear()
    if ctx.json_mode:
        print(json.dumps({"removed": n, "bytes": size}))
    else:
        print(f"removed {n} entr{'y' if n == 1 else 'ies'} ({human_bytes(size)}) from the stage cache")
    return 0
