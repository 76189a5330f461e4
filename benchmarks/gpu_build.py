"""Benchmark: builds on a GPU (issue 29) — full-size random TinyLLaVA-1.5B, one command.

Phases, each in its own Python process (peak host RSS = that process's ``ru_maxrss``; peak GPU memory =
``torch.cuda.max_memory_allocated`` over the process, plus the per-phase peaks the build records):

1. ``gptq``   — ``medlite build cpu-int4`` (INT4 GPTQ g128) with ``calibration.samples=N``, ``--device DEV``;
2. ``int8``   — ``medlite build xavier-agx-int8`` (SmoothQuant + static Q/DQ) with N pairs, sensitivity pass
   off as in the CPU figure (benchmarks/results/int8_full_size.json);
3. ``prune``  — pruning importance (MLP channels, the stage's ``measure``) on N pairs on the device;
4. ``distill``— distillation steps (teacher + student on the device, fp32 or ``--mixed-precision``),
   timed after the teacher answers/logits: samples/s.

The builds' check stages run on ``--check-samples`` questions (default 16; ONNX Runtime on the CPU is
the slow part at full size, docs/export.md) so the figures are the weight-changing stages' cost.

``--scale F`` (0 < F ≤ 1) measures F × N pairs and F × the distillation steps and scales the times
linearly to N pairs / the full step count (the per-pair forwards and Hessian/statistics accumulation are
linear in pairs; the per-layer quantization is not, so the scaled GPTQ figure is an upper bound).
The JSON says which figures were measured and which scaled.

Usage (on the GPU machine; ``--preset tiny --device cpu`` is the quick dry run)::

    python benchmarks/gpu_build.py --work /tmp/medlite-gpu [--pairs 128] [--distill-steps 100] [--scale 0.25]
    nice python benchmarks/gpu_build.py --preset tiny --device cpu --work /tmp/gb --scale 0.125 --out /tmp/gb.json

Writes ``benchmarks/results/gpu_build.json`` (``--out`` elsewhere).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_child import run_json_child, write_result  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "gpu_build.json"
PHASES = ("gptq", "int8", "prune", "distill")
RECIPES = {"gptq": "cpu-int4", "int8": "xavier-agx-int8"}
GOALS = {"gptq_s": 600, "int8_s": 600, "gptq_peak_gpu_bytes": 8e9, "distill_speedup_vs_cpu": 100}


# -- child side -------------------------------------------------------------------------------------
def _tower_args(ckpt: str) -> list:
    """``--vision-tower CKPT/vision_tower`` where the random checkpoint wrote its tower beside it."""
    tower = Path(ckpt) / "vision_tower"
    return ["--vision-tower", str(tower)] if tower.is_dir() else []


def _peaks() -> dict:
    import resource

    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        import torch

        if torch.cuda.is_available():
            out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    except ImportError:
        pass
    return out


def child_build(a) -> dict:
    """One ``medlite build`` in this process; per-stage seconds and GPU peaks from its JSON/build-info."""
    import contextlib
    import io

    from medlite.cli import main

    buf = io.StringIO()
    # the INT8 figure is the build without the sensitivity pass, as the CPU figure it compares with
    # (benchmarks/results/int8_full_size.json: that pass is ORT-side and would run for days at full size)
    extra = ["quantize.sensitivity=false"] if a.child == "int8" else []
    argv = ["--quiet", "build", RECIPES[a.child], *extra, f"calibration.samples={a.n}", f"check.max_samples={a.check_samples}",
            "check.max_new_tokens=8", "--model", a.ckpt, *_tower_args(a.ckpt), "--out", str(Path(a.work) / "artifacts"),
            "--cache-dir", str(Path(a.work) / "cache"), "--device", a.device, "--force", "--json"]
    t = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    wall = time.perf_counter() - t
    res = json.loads(buf.getvalue())       # build --json prints one (indented) JSON object
    info = json.loads((Path(res["artifact"]) / "build-info.json").read_text())
    stages = {s["name"]: s["seconds"] for s in res["stages"]}
    return {"rc": rc, "status": res["status"], "build_s": round(wall, 2), "stage_s": stages,
            "phase_peak_gpu_bytes": {k: v for k, v in info["timings"].items() if k.endswith("peak_gpu_bytes")},
            "argv": argv[1:], **_peaks()}


def _state(a):
    import torch

    from medlite.pipeline.contract import BuildState
    from medlite.calibration.calibset import build_calibration_set
    from medlite.context import RunContext
    from medlite.devices import resolve_device
    from medlite.evaluation.vqa import load_dataset
    from medlite.model_choice import ModelChoice

    ctx = RunContext(cache_dir=Path(a.work) / "cache", quiet=True)
    tower = _tower_args(a.ckpt)
    loaded = ModelChoice(path=a.ckpt, vision_tower=tower[1] if tower else None).load(ctx)
    cs = build_calibration_set(load_dataset("builtin:micro-med-vqa", split="train"), a.n, ctx=ctx, cache=False)
    dev = resolve_device(a.device)
    torch.manual_seed(0)
    return BuildState(ctx=ctx, recipe=None, target=None, work=Path(a.work), source=None, model=loaded,
                      calibration=cs, device=dev)


def child_prune(a) -> dict:
    from medlite.compress.prune.options import PruneOptions
    from medlite.compress.prune.stage import measure

    state = _state(a)
    t = time.perf_counter()
    scores, samples = measure(state, PruneOptions(mlp=0.25, samples=a.n))
    return {"importance_s": round(time.perf_counter() - t, 2), "pairs": len(samples), "tokens": scores.tokens,
            "phase_peak_gpu_bytes": dict(state.gpu_peaks), **_peaks()}


def child_distill(a) -> dict:
    import copy

    from medlite.compress.distill import data as D
    from medlite.compress.distill.objective import Objective
    from medlite.compress.distill.options import DistillOptions
    from medlite.devices import placed
    from medlite.training.trainer import TrainConfig, Trainer, trainable

    state = _state(a)
    teacher, student = state.model, copy.deepcopy(state.model)
    opts = DistillOptions(steps=a.steps, batch_size=a.batch_size, checkpoint_every=0, eval_every=10 ** 6,
                          mixed_precision=a.mixed_precision)
    samples = state.calibration.samples
    with placed(teacher.model, state.device), placed(student.model, state.device):
        t = time.perf_counter()
        answers = D.teacher_answers(teacher, samples, ctx=state.ctx, max_new_tokens=8)
        examples = [D.encode(student, s, x) for s, x in zip(samples, answers)]
        obj = Objective(student, teacher, D.Batches(student, examples), D.Batches(student, []), opts,
                        ctx=state.ctx, pruned=None)
        prep = time.perf_counter() - t
        cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, learning_rate=1e-3, warmup=2)
        res = Trainer(trainable(student.model.named_parameters()), obj.loss, len(examples), cfg, ctx=state.ctx,
                      description="distill", scaler=obj.scaler).fit()
    return {"teacher_prep_s": round(prep, 2), "train_s": round(res.seconds, 2), "steps": res.steps_run,
            "batch_size": a.batch_size, "samples_per_s": round(res.samples_per_s, 3),
            "mixed_precision": a.mixed_precision, "first_losses": [round(v, 5) for _, v in res.losses[:5]], **_peaks()}


# -- driver -----------------------------------------------------------------------------------------
def _checkpoint(a) -> str:
    ckpt = Path(a.ckpt or Path(a.work) / f"random-{a.preset}")
    if not (ckpt / "config.json").is_file():
        import subprocess

        proc = subprocess.run([sys.executable, "-m", "medlite.cli", "--quiet", "demo", "random", "--preset", a.preset,
                               "--out", str(ckpt)], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"medlite demo random failed:\n{proc.stderr[-3000:]}")
    return str(ckpt)


def _device_facts(device: str) -> dict:
    code = ("import json,torch;from medlite.devices import resolve_device,describe;"
            f"d=resolve_device({device!r});print(json.dumps(dict(describe(d),torch=torch.__version__)))")
    return run_json_child([], code=code, what="device")


def _scale(out: dict, phase: str, factor: float) -> None:
    """Add the figures scaled to the full pair / step count (linear), marked as scaled."""
    if factor == 1.0 or "error" in out:
        return
    if phase in RECIPES:
        out["scaled"] = {k: round(v / factor, 1) for k, v in out["stage_s"].items() if k == "quantize"}
    elif phase == "prune":
        out["scaled"] = {"importance_s": round(out["importance_s"] / factor, 1)}
    elif phase == "distill":
        out["scaled"] = {"train_s": round(out["train_s"] / factor, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="folder for the checkpoint, cache and artifacts")
    ap.add_argument("--ckpt", default=None, help="existing checkpoint (default: WORK/random-PRESET, written once)")
    ap.add_argument("--preset", default="tinyllava-1.5b", help="random checkpoint preset (tiny: the quick dry run)")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for the dry run")
    ap.add_argument("--pairs", type=int, default=128, help="calibration pairs (default 128)")
    ap.add_argument("--distill-steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8, help="distillation batch (default 8, as the recipes)")
    ap.add_argument("--mixed-precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--check-samples", type=int, default=16)
    ap.add_argument("--scale", type=float, default=1.0, help="measure this fraction of pairs/steps and scale")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    ap.add_argument("--out", default=str(RESULT))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        fn = {"gptq": child_build, "int8": child_build, "prune": child_prune, "distill": child_distill}[a.child]
        print(json.dumps(fn(a)))
        return 0
    if not 0 < a.scale <= 1:
        ap.error("--scale must be in (0, 1]")
    Path(a.work).mkdir(parents=True, exist_ok=True)
    n = max(1, round(a.pairs * a.scale))
    steps = max(1, round(a.distill_steps * a.scale))
    ckpt = _checkpoint(a)
    res = {"machine": {"host": platform.node(), "python": platform.python_version(), **_device_facts(a.device)},
           "checkpoint": {"preset": a.preset, "path": ckpt}, "device": a.device,
           "pairs": a.pairs, "distill_steps": a.distill_steps, "scale": a.scale, "measured_pairs": n,
           "measured_distill_steps": steps, "goals": GOALS, "phases": {},
           "note": ("measured at the full counts" if a.scale == 1 else
                    f"measured {n} pairs / {steps} steps and scaled linearly by 1/{a.scale} ('scaled' figures)")}
    for phase in [p for p in a.phases.split(",") if p]:
        if phase not in PHASES:
            ap.error(f"unknown phase {phase!r} (choose from {', '.join(PHASES)})")
        args = [__file__, "--child", phase, "--work", a.work, "--ckpt", ckpt, "--device", a.device, "--n", str(n),
                "--steps", str(steps), "--batch-size", str(a.batch_size), "--mixed-precision", a.mixed_precision,
                "--check-samples", str(a.check_samples)]
        out = run_json_child(args, errors="record", what=phase)
        _scale(out, phase, a.scale)
        res["phases"][phase] = out
        print(f"{phase}: {json.dumps(out)[:400]}", file=sys.stderr)
    write_result(Path(a.out), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
