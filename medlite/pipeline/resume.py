"""Resuming a build after its last cached stage (the pipeline's side of :mod:`medlite.pipeline.stage_cache`).

Only the leading run of stages that declare ``caches_output`` (their whole output is the working
model and their result: prune, distill) is cached; a stage whose output includes export
contributions (quantize's graph passes and module swaps) ends the cacheable prefix. A resumed build
prints each replayed stage's own line with "resumed from the stage cache", records the original
stage line in the manifest (so the artifact equals one built with an empty cache) and runs the rest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from medlite.pipeline.contract import StageResult
from medlite.pipeline.stage_cache import StageCache, stage_key


@dataclass
class Resume:
    """A cache hit: the model after stage ``index`` and what the stages up to it returned."""

    index: int
    key: str
    model: Any
    saved: dict = field(default_factory=dict)   # {"records": [...], "results": {...}, "timings": {...}}

    def replay(self, state) -> list[dict]:
        """Put the cached stages' results into ``state`` and print their lines; returns their records."""
        records = []
        for rec in self.saved["records"]:
            key = f"stages[{len(records)}].{rec['name']}"
            state.results[key] = StageResult(**self.saved["results"][key])
            with state.ctx.stage(rec["name"]) as info:
                info["detail"] = f"{rec['detail']} · resumed from the stage cache ({self.key[:12]})"
                info["ok"] = rec.get("ok", True)
            records.append(dict(rec))
        state.timings.update(self.saved.get("timings", {}))
        state.timings["resumed_after_stage"] = self.index
        return records


class ResumeCache:
    """The stage-output cache of one build: which stages may be cached, their keys, lookups and stores."""

    def __init__(self, state, resolved, source, cal_hash: Optional[str]):
        import medlite
        from medlite import artifacts as af
        from medlite.recipes.registry import STAGES, numerics_packages

        self.state = state
        recipe = resolved.recipe
        names = [e.name for e in recipe.stages]
        self.prefix = 0
        while self.prefix < len(names) and STAGES[names[self.prefix]].caps.caches_output:
            self.prefix += 1
        data = recipe.to_dict()
        from medlite.devices import is_cpu

        if not is_cpu(getattr(state, "device", None)):   # GPU numbers differ: never resume a CPU entry
            data["device"] = state.device.type
        runners = tuple(_runner_name(STAGES[n].runner) for n in names)
        self.keys = [stage_key(source_identity=source.identity, recipe=data, index=i, calibration_sha256=cal_hash,
                               seed=state.ctx.seed, medlite_version=medlite.__version__, runners=runners,
                               packages=af.package_versions(tuple(numerics_packages(names[:i + 1]))))
                     for i in range(self.prefix)]
        self.cache = StageCache(state.ctx.cache_dir, state.ctx)
        self.recipe_name = recipe.name

    def find(self) -> Optional[Resume]:
        """The latest cached stage of the cacheable prefix, or None."""
        for i in reversed(range(self.prefix)):
            hit = self.cache.load(self.keys[i])
            if hit is not None:
                loaded, saved = hit
                return Resume(i, self.keys[i], loaded, saved)
        return None

    def store_after(self, state, index: int, records: list) -> None:
        """Store the working model after stage ``index`` when it is in the cacheable prefix."""
        if index >= self.prefix:
            return
        keys = [f"stages[{k}].{r['name']}" for k, r in enumerate(records)]
        saved = {"records": records, "timings": dict(state.timings),
                 "results": {k: _fields(state.results[k]) for k in keys}}
        try:
            self.cache.store(self.keys[index], stage=keys[-1], recipe=self.recipe_name, loaded=state.model,
                             result=saved)
        except OSError as e:     # a full disk must not fail the build: the cache is an optimisation
            state.ctx.warn(f"stage cache: could not store the model after {keys[-1]} ({e})")


def _runner_name(runner) -> str:
    """``"module:function"`` of a stage's runner (a registered callable by its qualified name)."""
    if isinstance(runner, str):
        return runner
    return f"{getattr(runner, '__module__', '?')}:{getattr(runner, '__qualname__', repr(runner))}"


def _fields(result: StageResult) -> dict:
    from dataclasses import asdict

    return asdict(result)
