"""``medlite sweep SWEEP.yaml --out DIR``: build every variant, tabulate, plot, recommend.

Layout of ``--out`` (rerunning the same command resumes: a variant whose record and artifact are
there and whose artifact's files still match its manifest is read back, not rebuilt)::

    artifacts/<model>/<sweep>.<variant>/<version>/   the variants' artifacts (the build's own layout)
    variants/<variant>.json                          finished variants (key, artifact, data-set scores)
    logs/<variant>.log                               each variant's stage lines and warnings
    results.csv  results.json  results.md  plot.png  the table and the plot
    recommended/<target>.yaml                        the recipe of each target's recommended variant

Exit codes: 0 every valid variant built (gate failures and invalid variants are results, in the table);
1 a variant's build failed (its row has the error); 2 a bad sweep file or option; 130 Ctrl-C.
"""
from __future__ import annotations

import json
import sys
import uuid
from argparse import Namespace
from pathlib import Path
from typing import Optional

from medlite.errors import MedliteError


def add_sweep_args(p) -> None:
    """The ``sweep`` subcommand's options (argparse only; called by ``medlite.cli``)."""
    p.add_argument("sweep", help="sweep file (YAML: base recipe, axes and/or variants, targets; docs/sweeps.md)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="sweep folder: artifacts, table, plot, recommended recipes (a shared path on a cluster)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: --jobs processes on this machine (default); ray: one Ray task per variant")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="local: variants built at once (each gets cores/N threads; default 1)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads per variant (default: cores / --jobs locally, 2 per Ray task)")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="ray: the cluster to use (auto, ray://head:10001); default: a local Ray instance")
    p.add_argument("--return-artifacts", action="store_true",
                   help="ray: workers always send their artifacts back to the driver, which writes them under "
                        "--out (default: only workers that cannot see --out do)")
    p.add_argument("--task-memory-gb", type=float, default=None, metavar="GB",
                   help="ray: memory each task declares (default: 6 x the checkpoint's size + 1 GB)")
    from medlite.devices import add_device_arg  # argparse only

    add_device_arg(p, what="each variant's build (local: CUDA builds run one at a time)")
    p.add_argument("--gpus-per-variant", type=float, default=None, metavar="N",
                   help="ray: GPUs each task declares (default 1 when the variant builds on CUDA, else 0; "
                        "a fraction shares a card)")
    p.add_argument("--bench", action="store_true",
                   help="also measure decode tokens/s and time to first token of each variant on this machine "
                        "(one variant at a time, after the builds)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="checkpoint folder (wins over the sweep file's model; default: the built-in demo model)")
    p.add_argument("--base", default=None, metavar="PATH", help="base checkpoint of a LoRA adapter (--model)")
    p.add_argument("--vision-tower", default=None, metavar="PATH",
                   help="local copy of the vision tower a legacy checkpoint names")


def _choice(args, sweep):
    from medlite.model_choice import ModelChoice

    ns = Namespace(model=getattr(args, "model", None) or sweep.model, base=getattr(args, "base", None),
                   vision_tower=getattr(args, "vision_tower", None), vision_weights=None, template=None)
    return ModelChoice.from_args(ns)


def variant_key(variant, choice, place) -> str:
    """A variant's resume key: its resolved recipe and model, and whether it builds on CUDA."""
    key = variant.key(choice.label)
    suffix = place.key_suffix(variant.resolved.recipe.device)
    return f"{key}-{suffix}" if suffix else key


def own_overrides(sweep, variant) -> list[str]:
    """The variant's own overrides (its axis values or explicit list), without the common ones and its name."""
    return variant.overrides[len(sweep.spec.overrides):-1]


def prefix_key(resolved) -> Optional[str]:
    """Variants with equal keys share their cached prune/distill prefix (None: no cacheable stage)."""
    from medlite.artifacts import sha256_json
    from medlite.recipes.registry import STAGES

    d = resolved.recipe.to_dict()
    n = 0
    while n < len(resolved.recipe.stages) and STAGES[resolved.recipe.stages[n].name].caps.caches_output:
        n += 1
    if n == 0:
        return None
    rest = {k: v for k, v in d.items() if k not in ("name", "version", "description", "model")}
    rest["stages"] = d["stages"][:n]
    return sha256_json(rest)


# -- resume ---------------------------------------------------------------------------------------
def _record_path(out: Path, name: str) -> Path:
    return out / "variants" / f"{name}.json"


def finished_row(out: Path, sweep, variant, key: str, targets: list[str], ctx) -> Optional[dict]:
    """The row of a variant a previous run finished, read back from its artifact after re-hashing its
    files (:func:`medlite.artifacts.verify_files`); None when it must be built (absent, changed inputs,
    changed files — said in a warning)."""
    from medlite import artifacts as af
    from medlite.sweep.rows import read_row

    rec_path = _record_path(out, variant.name)
    if not rec_path.is_file():
        return None
    try:
        rec = json.loads(rec_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    folder = out / rec.get("artifact", "")
    if rec.get("key") != key or not (folder / af.MANIFEST).is_file():
        return None
    problems = af.verify_files(folder)
    if problems:
        ctx.warn(f"{folder}: its files no longer match its manifest ({'; '.join(problems[:2])}): rebuilding "
                 f"variant {variant.name}")
        return None
    row = read_row(variant.name, own_overrides(sweep, variant), folder, targets)
    row.update(dataset=rec.get("dataset"), reused=True)
    return row


# -- running --------------------------------------------------------------------------------------
def _tasks(sweep, todo: list, choice, out: Path, ctx, threads: int, marker: Optional[str], place) -> list:
    from medlite.sweep.variant import VariantTask

    (out / "logs").mkdir(parents=True, exist_ok=True)
    dataset = sweep.spec.dataset.model_dump() if sweep.spec.dataset else None
    return [VariantTask(name=v.name, recipe_path=str(sweep.recipe_path), overrides=list(v.overrides), choice=choice,
                        out_root=str(out / "artifacts"), cache_dir=str(ctx.cache_dir), threads=threads,
                        log=str(out / "logs" / f"{v.name}.log"), dataset=dataset, marker=marker,
                        device=place.device_of(v.resolved.recipe.device), gpus=place.gpus_of(v.resolved.recipe.device))
            for v in todo]


def _task_memory(args, choice, ctx) -> int:
    """Ray's memory declaration per task: given, or 6 x the checkpoint's bytes + 1 GB (fp32 source, working
    copy, teacher, optimizer state and the export's buffers)."""
    if args.task_memory_gb:
        return int(args.task_memory_gb * 1e9)
    folder = choice.folder(ctx)
    size = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    return int(6 * size + 1e9)


def _finish_line(name: str, row: dict) -> str:
    from medlite.sweep.results import accuracy

    if row["status"] in ("passed", "failed gates"):
        acc = accuracy(row)
        mark = "[bold green]✓[/]" if row["status"] == "passed" else "[bold yellow]✓[/]"
        gates = "gates pass" if row["status"] == "passed" else f"gates FAILED ({', '.join(row['failed_gates'])})"
        return (f"{mark} {name:<36} accuracy {'–' if acc is None else f'{100 * acc:.1f} %'} · {gates} · "
                f"{row['build_seconds'] or 0:.0f} s")
    return f"[bold red]✗[/] {name:<36} {row['status']}: {row['error']}"


def run_variants(args, sweep, todo: list, choice, out: Path, targets: list[str], rows: dict, ctx, place) -> None:
    """Build ``todo`` on the chosen executor; each finished variant is recorded at once (resume point)."""
    from medlite.fileio import write_json_atomic
    from medlite.sweep import executors as ex
    from medlite.sweep.results import write_returned
    from medlite.sweep.rows import empty_row, read_row

    jobs = max(1, int(args.jobs))
    threads = args.threads or (ex.thread_budget(jobs) if args.executor == "local" else 2)
    marker = None
    if args.executor == "ray":
        marker = out / f".shared-fs-{uuid.uuid4().hex[:12]}"
        if not getattr(args, "return_artifacts", False):   # else never written: no worker sees it
            marker.write_text("a Ray worker that sees this file shares the driver's file system\n")
    by_name = {v.name: v for v in todo}
    keys = {v.name: variant_key(v, choice, place) for v in todo}

    def on_done(res: dict) -> None:
        v = by_name[res["name"]]
        if res["ok"] and res.get("files") is not None:
            write_returned(out / "artifacts", res["artifact"], res["files"], res.get("latest"))
        if res["ok"]:
            folder = out / "artifacts" / res["artifact"]
            row = read_row(v.name, own_overrides(sweep, v), folder, targets)
            row["dataset"] = res.get("dataset")
            write_json_atomic(_record_path(out, v.name), {
                "variant": v.name, "key": keys[v.name], "artifact": folder.relative_to(out).as_posix(),
                "dataset": res.get("dataset"), "seconds": res.get("seconds")})
        else:
            row = empty_row(v.name, own_overrides(sweep, v), "error", res["error"])
        rows[v.name] = row
        display.finished(v.name, _finish_line(v.name, row))

    tasks = order_by_prefix(_tasks(sweep, todo, choice, out, ctx, threads, str(marker) if marker else None, place),
                            by_name)
    (out / "variants").mkdir(parents=True, exist_ok=True)
    try:
        with ex.Display(ctx, len(tasks)) as display:
            if args.executor == "ray":
                ex.run_ray(tasks, display, on_done, address=args.address, memory_bytes=_task_memory(args, choice, ctx))
            else:
                ex.run_local(tasks, jobs, display, on_done)
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)


def order_by_prefix(tasks: list, variants: dict) -> list:
    """The first variant of each shared prune/distill prefix is a leader; the others wait for it
    (``task.extra["after"]``), so they start after the prefix is in the stage-output cache and reuse it
    instead of computing it again side by side (a failed leader releases them: they build it themselves)."""
    leader: dict = {}
    for t in tasks:
        k = prefix_key(variants[t.name].resolved)
        if k is not None and k in leader:
            t.extra["after"] = leader[k]
        else:
            leader[k] = t.name
    return tasks


# -- the command ----------------------------------------------------------------------------------
def _bench(rows: dict, ctx) -> None:
    """``--bench``: decode tokens/s and time to first token of each built variant, one at a time on this
    machine (after the builds, so no build competes for the cores)."""
    from medlite.bench.commands import run_bench

    for row in rows.values():
        if row.get("artifact") is None:
            continue
        ns = Namespace(model=row["artifact"], image=None, question=None, runs=3, warmup=1, max_new_tokens=32,
                       stop_at_eos=False, ignore_eos=False)
        with ctx.stage(f"bench {row['variant']}") as info:
            r, _ = run_bench(ns, ctx)
            row["bench"] = {"decode_tokens_per_s": r.decode_tokens_per_s, "ttft_ms": r.ttft_ms,
                            "threads": r.threads}
            tps = "–" if r.decode_tokens_per_s is None else f"{r.decode_tokens_per_s:.1f}"
            info["detail"] = f"{tps} tokens/s · TTFT {r.ttft_ms:.0f} ms"


def collect(args, sweep, choice, out: Path, targets: list[str], ctx, place) -> tuple[dict, list]:
    """Rows of invalid and already finished variants; the variants left to build."""
    from medlite.sweep.rows import empty_row

    rows, todo = {}, []
    for v in sweep.variants:
        if not v.valid:
            rows[v.name] = empty_row(v.name, own_overrides(sweep, v), "invalid", "; ".join(v.errors))
            continue
        row = finished_row(out, sweep, v, variant_key(v, choice, place), targets, ctx)
        if row is None:
            todo.append(v)
        else:
            rows[v.name] = row
    return rows, todo


def summarize(sweep, rows: dict, targets: list[str], out: Path, choice, ctx) -> dict:
    """Pareto front, recommendations (recipes written out), table and plot; returns the result."""
    from medlite.sweep.plot import write_plot
    from medlite.sweep.results import mark_pareto, recommend, write_recommended, write_results

    ordered = [rows[v.name] for v in sweep.variants if v.name in rows]
    mark_pareto(ordered, targets[0])
    recs = recommend(ordered, targets)
    write_recommended(out, recs, choice.path)
    result = {"sweep": sweep.spec.name, "source": sweep.source, "recipe": str(sweep.recipe_path),
              "model": choice.label, "targets": targets, "primary_target": targets[0],
              "accuracy_from": (f"{sweep.spec.dataset.dataset} [{sweep.spec.dataset.split}] on ONNX Runtime"
                                if sweep.spec.dataset else "the check stage's held-out split (report.json)"),
              "rows": ordered, "recommendations": recs, "complete": len(ordered) == len(sweep.variants)}
    files = {k: str(out / f"results.{k}") for k in ("csv", "json", "md")}
    try:
        result["plot_points"] = write_plot(result, out / "plot.png")
        files["plot"] = str(out / "plot.png")
    except MedliteError as e:
        ctx.warn(str(e))
    result["files"] = files
    write_results(out, result)
    return result


def cmd_sweep(args, ctx) -> int:
    """Build every variant of a sweep file, then write the table, the plot and the recommendations."""
    from medlite.fileio import ensure_writable_dir
    from medlite.sweep.gpus import check_variants, placement
    from medlite.sweep.spec import load_sweep

    if args.jobs < 1:
        raise MedliteError(f"--jobs must be at least 1, got {args.jobs}")
    if args.executor == "local" and args.address:
        raise MedliteError("--address names a Ray cluster: use it with --executor ray")
    place = placement(args)
    sweep = load_sweep(args.sweep)
    check_variants(place, {v.name: v.resolved.recipe.device for v in sweep.variants if v.valid}, args.jobs)
    out = Path(ensure_writable_dir(args.out, "--out"))
    out.mkdir(parents=True, exist_ok=True)
    choice = _choice(args, sweep)
    valid = [v for v in sweep.variants if v.valid]
    targets = list(sweep.spec.targets) or ([valid[0].resolved.recipe.target] if valid else [])
    if not targets:
        raise MedliteError(f"{sweep.source}: no valid variant and no targets: nothing to build or recommend")
    rows, todo = collect(args, sweep, choice, out, targets, ctx, place)
    ctx.info(f"sweep {sweep.spec.name}: {len(sweep.variants)} variants — {len(todo)} to build, "
             f"{sum(r['reused'] for r in rows.values())} finished before (read back, verified), "
             f"{len(sweep.variants) - len(valid)} invalid")
    for r in rows.values():
        if r["status"] == "invalid":
            ctx.info(f"  ✗ {r['variant']}: invalid — {r['error']}")
    try:
        run_variants(args, sweep, todo, choice, out, targets, rows, ctx, place)
    except KeyboardInterrupt:
        summarize(sweep, rows, targets, out, choice, ctx)
        print(f"interrupted: {sum(1 for r in rows.values() if r['status'] != 'invalid')} of {len(valid)} variants "
              f"finished (recorded in {out / 'variants'}); rerun the same command to build the rest",
              file=sys.stderr)
        raise
    if getattr(args, "bench", False):
        _bench(rows, ctx)
    result = summarize(sweep, rows, targets, out, choice, ctx)
    _report(result, ctx)
    return 1 if any(r["status"] == "error" for r in result["rows"]) else 0


def _report(result: dict, ctx) -> None:
    from medlite.units import human_bytes

    if ctx.json_mode:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
        return
    print(Path(result["files"]["md"]).read_text(encoding="utf-8"))
    for t, rec in result["recommendations"].items():
        if rec is not None:
            ctx.info(f"{t}: {rec['variant']} ({100 * rec['accuracy']:.1f} %, {human_bytes(rec['memory_bytes'])}) "
                     f"→ {rec['recipe']}")
    ctx.info("table  " + "  ".join(result["files"][k] for k in ("csv", "json", "md") if k in result["files"]))
    if "plot" in result["files"]:
        ctx.info(f"plot   {result['files']['plot']} ({result.get('plot_points', 0)} points)")
