"""Handlers of ``medlite validate | plan | build | verify | recipes ls | recipes cp``.

Each handler is ``cmd_x(args, ctx) -> int`` (exit code); ``medlite/cli.py`` wires argparse. The
arguments each one reads from ``args``:

* ``validate RECIPE [KEY=VALUE ...] [--json]``: ``recipe``, ``overrides``, ``json``
* ``plan RECIPE [KEY=VALUE ...] [--model PATH] [--json]``: + ``model``, ``base``, ``vision_tower``,
  ``vision_weights``
* ``build RECIPE [KEY=VALUE ...] [--model PATH] [--out DIR] [--force] [--json]``: + ``out``, ``force``
* ``verify ARTIFACT [--json] [--skip-checks] [--model PATH]``: ``artifact``, ``json``, ``skip_checks``,
  optional model options (default: the source recorded in the manifest)
* ``recipes ls``; ``recipes cp NAME DEST``: ``name``, ``dest``

Exit codes: 0 success; 1 a gate failed or an artifact does not verify; 2 (raised MedliteError,
printed by the CLI) invalid recipe, missing files and other user errors. ``--json`` prints exactly
one JSON object on stdout; human output goes to stderr through ``ctx``.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from medlite.errors import MedliteError, RecipeError
from medlite.fileio import ensure_writable_dir, ensure_writable_file


def _say(ctx, text: str) -> None:
    """One human line on stderr, never wrapped (paths must stay copy-pasteable)."""
    ctx.console.print(text, soft_wrap=True)


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def _json_errors(fn):
    """In --json mode a user error still yields one JSON object on stdout (status "error"), exit 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(args, ctx):
        try:
            return fn(args, ctx)
        except MedliteError as e:
            if not ctx.json_mode:
                raise
            _emit({"status": "error", "error": str(e), "errors": getattr(e, "errors", [str(e)])})
            return 2
    return wrapper


def _load(args, ctx):
    from medlite.recipes import load_recipe

    return load_recipe(args.recipe, list(getattr(args, "overrides", None) or []))


# -- validate -------------------------------------------------------------------------------------
def cmd_validate(args, ctx) -> int:
    """Validate a recipe: every error at once with its YAML path; exit 2 when invalid."""
    try:
        resolved = _load(args, ctx)
    except RecipeError as e:
        if ctx.json_mode:
            _emit({"valid": False, "source": e.source, "errors": e.errors})
            return 2
        raise
    r = resolved.recipe
    for w in resolved.warnings:
        ctx.warn(w)
    # The memory budget depends on the model's size: validate has no model, plan and build check it.
    budget = (f"device memory budget of {r.target} not checked (it depends on the model): "
              f"`medlite plan {args.recipe} [--model PATH]` checks it")
    if ctx.json_mode:
        _emit({"valid": True, "source": resolved.source, "errors": [], "warnings": resolved.warnings,
               "budget_checked": False, "notes": [budget], "recipe": r.to_dict()})
    else:
        chain = " → ".join(s.name for s in r.stages)
        _say(ctx, f"[bold green]✓[/] {resolved.source}: valid — {r.name} {r.version} for {r.target} "
                          f"({chain})")
        ctx.info(f"  {budget}")
    return 0


# -- plan -----------------------------------------------------------------------------------------
def plan_steps(resolved, inspected, target) -> dict:
    """Each stage's plan (its registry entry's ``plan``), the files, and the device memory budget.

    ``inspected``: :class:`medlite.checkpoints.headers.CheckpointFacts` (``ModelChoice.inspect``)."""
    from medlite.recipes import planning
    from medlite.recipes.registry import STAGES

    r = resolved.recipe
    sizes = planning.sizes_from_facts(inspected)
    inp = planning.PlanInputs(**vars(sizes), recipe=r, target=target)
    files: dict[str, int] = {}
    steps = []
    for i, entry in enumerate(r.stages):
        spec = STAGES[entry.name]
        step = {"stage": entry.name, "path": f"stages[{i}].{entry.name}", "does": spec.summary}
        extra = spec.plan(i, entry.options, inp) if spec.plan else None
        if isinstance(extra, list):
            extra = {"does": "; ".join(extra)}
        if extra:
            step["does"] = f"{spec.summary} {extra.get('does', '')}".rstrip()
            step.update({k: v for k, v in extra.items() if k != "does"})
        files.update(step.get("writes") or {})
        steps.append(step)
        if spec.estimate is not None:   # plans chain: later stages see the sizes this one leaves
            inp = spec.estimate(i, entry.options, inp)
    weights = sum(v for v in files.values() if v)
    # the one device-memory model (medlite.engines.memory), as the engines stage and report.md show it
    return {"sizes": sizes, "after": inp, "steps": steps, "files": files, "weights": weights,
            "budget": planning.budget(planning.plan_memory(inp, files))}


def check_budget(plan: dict, target, where: str) -> None:
    """An over-budget plan is a recipe error: by how much, and which component dominates."""
    from medlite.recipes.planning import budget_error

    msg = budget_error(plan["budget"], target, "device memory")
    if msg:
        raise RecipeError(where, [msg])


@_json_errors
def cmd_plan(args, ctx) -> int:
    """Show the stages, the files they write and estimated sizes, without running anything (torch-free:
    sizes come from config.json and the safetensors headers, :mod:`medlite.checkpoints.headers`)."""
    from medlite.engines.targets import TARGETS
    from medlite.model_choice import ModelChoice
    from medlite.units import human_bytes

    resolved = _load(args, ctx)
    r = resolved.recipe
    target = TARGETS[r.target]
    choice = ModelChoice.from_args(args, r, resolved.source)
    inspected = choice.inspect(ctx)
    p = plan_steps(resolved, inspected, target)
    sizes, b = p["sizes"], p["budget"]
    out = {"recipe": r.name, "version": r.version, "target": target.name, "model": choice.label,
           "count_method": sizes.method, "params": sizes.params, "params_after": p["after"].params,
           "stages": p["steps"], "files": p["files"],
           "estimated_bytes": p["weights"], "usable_memory_bytes": b["usable"], "budget": b,
           "warnings": resolved.warnings}
    check_budget(p, target, f"{resolved.source}: plan")
    if ctx.json_mode:
        _emit(out)
        return 0
    for w in resolved.warnings:
        ctx.warn(w)
    _say(ctx, f"[bold]{r.name} {r.version}[/] → {target.description} ({target.name}); model {choice.label}")
    _say(ctx, f"  parameters ({sizes.method}): " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in sizes.params.items()))
    if p["after"].params != sizes.params:
        _say(ctx, "  after the compress stages: " + ", ".join(
            f"{k} {v / 1e6:.2f} M" for k, v in p["after"].params.items() if v != sizes.params.get(k)))
    for st in p["steps"]:
        _say(ctx, f"  {st['path']:<22} {st['does']}")
        for name, size in (st.get("writes") or {}).items():
            _say(ctx, f"      {name:<28} " + (f"~{human_bytes(size)}" if size is not None else ""))
    parts = " + ".join(f"{k} {human_bytes(v)}" for k, v in b["parts"].items())
    _say(ctx, f"  device memory ≈ {human_bytes(b['total'])} ({parts}) of {human_bytes(b['usable'])} usable on "
              f"{target.name}; {b['context']}")
    return 0


# -- build ----------------------------------------------------------------------------------------
@_json_errors
def cmd_build(args, ctx) -> int:
    """Run a recipe; exit 1 with one line per failed gate when a gate fails."""
    from medlite.model_choice import ModelChoice
    from medlite.pipeline.pipeline import build

    resolved = _load(args, ctx)
    ensure_writable_dir(getattr(args, "out", None) or "artifacts", "--out")   # before any model loads
    from medlite.devices import resolve_device

    # --device > the recipe's device > auto; a device this machine lacks is one line before any work
    spec = getattr(args, "device", None)
    device = resolve_device(spec or resolved.recipe.device,
                            where="--device" if spec else f"{resolved.source}: device")
    if not ctx.json_mode:
        _say(ctx, f"[dim]# resolved recipe ({resolved.source})\n{resolved.to_yaml().rstrip()}[/]")
    choice = ModelChoice.from_args(args, resolved.recipe, resolved.source)
    from medlite.engines.targets import TARGETS

    target = TARGETS[resolved.recipe.target]
    # Before any weight loads: a recipe that cannot fit the device is a recipe error.
    check_budget(plan_steps(resolved, choice.inspect(ctx), target), target, f"{resolved.source}: build")
    from medlite.memory import map_large_allocations

    map_large_allocations()   # this process: freed activations go straight back to the OS (see offload.py)
    result = build(resolved, choice, Path(getattr(args, "out", None) or "artifacts"), ctx,
                   force=bool(getattr(args, "force", False)), device=device)
    lines = result.failed_gate_lines
    if ctx.json_mode:
        out = result.to_json()
        out["recipe"] = resolved.recipe.to_dict()
        _emit(out)
    else:
        _say(ctx, f"artifact    {result.path}  ({'report.md'})"
                          + ("" if result.status == "passed" else "  [bold red]FAILED[/]"))
    for line in lines:
        print(line, file=sys.stderr)
    return 0 if result.status == "passed" else 1


# -- verify ---------------------------------------------------------------------------------------
@_json_errors
def cmd_verify(args, ctx) -> int:
    """Re-hash an artifact's files and (unless --skip-checks) re-run its gates; exit 1 on a mismatch."""
    from medlite import artifacts as af
    from medlite.pipeline.stages.check import rerun_checks

    path = af.resolve_artifact_path(Path(args.artifact))
    if not path.is_dir():
        raise MedliteError(f"{path}: no such artifact folder")
    manifest = af.read_manifest(path)
    problems = af.verify_files(path, manifest)
    out = {"artifact": str(path), "version": manifest.get("version"), "status": manifest.get("status"),
           "files_ok": not problems, "file_problems": problems, "checks": None}
    if problems:
        for p in problems:
            print(f"✗ {p}", file=sys.stderr)
    elif not getattr(args, "skip_checks", False):
        out["checks"] = rerun_checks(path, manifest, args, ctx)
    ok = not problems and (out["checks"] is None or out["checks"]["ok"])
    out["ok"] = ok
    if ctx.json_mode:
        _emit(out)
    else:
        n = len(manifest["files"])
        if not problems:
            _say(ctx, f"[bold green]✓[/] files     {n} files match manifest.json")
        else:
            _say(ctx, f"[bold red]✗[/] files     {len(problems)} problem(s) in {n} files: {path}")
        if out["checks"] is not None:
            c = out["checks"]
            mark = "[bold green]✓[/]" if c["ok"] else "[bold red]✗[/]"
            ok_text = c.get("note") or "recorded metrics and gate results reproduced"
            _say(ctx, f"{mark} checks    " + (ok_text if c["ok"] else "; ".join(c["differences"])))
    return 0 if ok else 1


# -- recipes ls / cp ------------------------------------------------------------------------------
def cmd_recipes_ls(args, ctx) -> int:
    """List the shipped recipes (name, version, target, stages, description)."""
    from medlite.recipes import builtin_recipes, load_recipe

    rows = []
    for name, path in builtin_recipes().items():
        r = load_recipe(path).recipe
        rows.append({"name": name, "version": r.version, "target": r.target,
                     "stages": [s.name for s in r.stages], "description": r.description, "path": str(path)})
    if getattr(args, "json", False):
        _emit({"recipes": rows})
        return 0
    for row in rows:
        print(f"{row['name']:<24} {row['version']:<8} {row['target']:<24} {' → '.join(row['stages'])}")
        if row["description"]:
            print(f"{'':<24} {row['description']}")
    return 0


def cmd_recipes_cp(args, ctx) -> int:
    """Copy a shipped recipe to DEST (a file, or a folder to put NAME.yaml in); never overwrites, never
    creates folders."""
    from medlite.recipes import builtin_recipes
    from medlite.recipes.loader import _suggest

    shipped = builtin_recipes()
    name = args.name[:-5] if args.name.endswith(".yaml") else args.name
    if name not in shipped:
        raise MedliteError(f"no shipped recipe '{args.name}'{_suggest(name, shipped)}; "
                           f"shipped: {', '.join(shipped)}")
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / f"{name}.yaml"
    if not dest.parent.is_dir():   # a typo in the folder would otherwise create a tree of folders silently
        raise MedliteError(f"recipes cp {dest}: the folder {dest.parent} does not exist; create it first or "
                           f"choose an existing folder (nothing was written)")
    ensure_writable_file(dest, "recipes cp")
    if dest.exists():
        raise MedliteError(f"{dest} already exists; choose another destination (nothing was overwritten)")
    shutil.copyfile(shipped[name], dest)
    print(f"{dest}  (copy of {name}; edit it, then `medlite validate {dest}`)")
    return 0
