"""Benchmark: pruning (25 % of MLP channels) and distillation steps on the full-size random TinyLLaVA-1.5B.

Each step runs in its own process so peak RSS is that step's (``ru_maxrss``):

1. ``medlite demo random --preset tinyllava-1.5b`` (legacy, fp16 on disk) unless ``--ckpt`` exists;
2. **prune**: load in fp32, MLP-channel importance on ``--samples`` Micro Med-VQA calibration pairs
   through the whole VLM (the stage's own forward loop), surgery, ``save_pretrained`` of the result;
3. **distill**: teacher (the source) answers and answer-position logits, teacher freed; then the
   pruned student runs ``--steps`` training steps of batch 1 — forward, KL on the answer tokens,
   backward, and (``--adam``) the AdamW update — timed per sample; one step is counted with
   ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs per sample, measured, not estimated).

Writes ``benchmarks/results/prune_distill_full_size.json``. Usage::

    nice .venv/bin/python benchmarks/prune_distill_full_size.py --work /tmp/medlite-bench [--steps 3] [--adam]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "prune_distill_full_size.json"

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import torch
mode, a = sys.argv[1], json.loads(sys.argv[2])
torch.set_num_threads(a["threads"])
from medlite.context import RunContext
from medlite.checkpoints import load_model
from medlite.calibration.calibset import build_calibration_set
from medlite.evaluation.vqa import load_dataset
ctx = RunContext(cache_dir=Path(a["cache"]), quiet=True)
out = {}
T = time.perf_counter
t0 = T()
cal = build_calibration_set(load_dataset("builtin:micro-med-vqa", split="train"), a["samples"], ctx=ctx)
if mode == "prune":
    from types import SimpleNamespace
    from medlite.pipeline.contract import BuildState
    from medlite.compress.prune.options import PruneOptions
    from medlite.compress.prune.stage import run
    t = T(); m = load_model(a["ckpt"], ctx=ctx, dtype=torch.float32); out["load_s"] = round(T() - t, 1)
    state = BuildState(ctx=ctx, recipe=None, target=None, work=None, source=None, model=m, calibration=cal)
    t = T(); res = run(state, 0, PruneOptions(mlp=0.25)); out["prune_s"] = round(T() - t, 1)
    out.update(summary=res.summary, bytes_before=res.bytes_before, bytes_after=res.bytes_after,
               params_before=res.manifest["params_before"], params_after=res.manifest["params_after"],
               tokens=res.manifest["importance_tokens"], samples=res.manifest["importance_samples"])
    out["peak_rss_prune_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = T(); m.model.save_pretrained(a["pruned"]); out["save_s"] = round(T() - t, 1)
else:
    import gc
    from transformers import LlavaForConditionalGeneration
    from torch.utils.flop_counter import FlopCounterMode
    from medlite.compress.distill import data as D
    from medlite.compress.distill.losses import forward_answers, kd_kl
    from medlite.compress.distill.objective import _teacher_logits, _stack
    samples = cal.samples[: a["samples"]]
    teacher = load_model(a["ckpt"], ctx=ctx, dtype=torch.float32)
    t = T(); answers = D.teacher_answers(teacher, samples, ctx=ctx, max_new_tokens=2)
    exs = [D.encode(teacher, s, x) for s, x in zip(samples, answers)]
    logits = _teacher_logits(teacher, D.Batches(teacher, exs), ctx=ctx, batch_size=1, description="teacher")
    out["teacher_s_per_sample"] = round((T() - t) / len(samples), 2)
    student = teacher
    student.model = None; gc.collect()
    student.model = LlavaForConditionalGeneration.from_pretrained(a["pruned"], dtype=torch.float32)
    m = student.model
    m.eval()
    for n, p in m.named_parameters():
        p.requires_grad_(".language_model." in f".{n}" and "embed_tokens" not in n or ".multi_modal_projector." in f".{n}")
    params = [p for p in m.parameters() if p.requires_grad]
    out["trainable_params"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-5) if a["adam"] else None
    batches = D.Batches(student, exs)
    times = []
    for step in range(a["steps"]):
        i = step % len(exs)
        b = batches.batch([i], torch.float32)
        counter = FlopCounterMode(display=False) if step == 0 else None
        t = T()
        if counter is not None:
            counter.__enter__()
        s_logits, _ = forward_answers(m, b)
        loss = kd_kl(s_logits, _stack(logits, [i], s_logits.shape[1], s_logits), b["targets"], 2.0)
        loss.backward()
        if counter is not None:
            counter.__exit__(None, None, None)
            out["flops_per_sample"] = int(counter.get_total_flops())
            out["tokens_per_sample"] = int(b["attention_mask"].sum())
        if opt is not None:
            opt.step()
        for p in params:
            p.grad = None
        times.append(T() - t)
    out["step_s"] = [round(x, 2) for x in times]
    out["s_per_sample"] = round(sum(times[1:]) / max(len(times) - 1, 1), 2) if len(times) > 1 else round(times[0], 2)
    out["adam"] = bool(a["adam"])
out["seconds"] = round(T() - t0, 1)
out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("@@RESULT@@" + json.dumps(out))
"""


def run_child(mode: str, args: dict) -> dict:
    """One step in a fresh interpreter; its result line as a dict."""
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, json.dumps(args)], cwd=ROOT, text=True,
                          capture_output=True)
    marker = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")]
    if proc.returncode != 0 or not marker:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"step {mode} failed (exit {proc.returncode})")
    return json.loads(marker[-1][len("@@RESULT@@"):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/medlite-bench")
    ap.add_argument("--ckpt", default=None, help="existing tinyllava-1.5b checkpoint (default: WORK/ckpt)")
    ap.add_argument("--samples", type=int, default=4, help="calibration pairs for importance / distillation")
    ap.add_argument("--steps", type=int, default=3, help="distillation steps (batch 1) to time")
    ap.add_argument("--adam", action="store_true", help="include the AdamW update (+2 fp32 copies of the weights)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULT))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = Path(a.ckpt) if a.ckpt else work / "ckpt"
    result: dict = {"benchmark": "prune_distill_full_size", "samples": a.samples, "threads": a.threads,
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                                "loadavg_at_start": list(os.getloadavg())}}
    if not (ckpt / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "medlite.cli", "--cache-dir", str(work / "cache"), "demo", "random",
                        "--preset", "tinyllava-1.5b", "--format", "legacy", "--out", str(ckpt)], cwd=ROOT, check=True)
    args = {"ckpt": str(ckpt), "cache": str(work / "cache"), "pruned": str(work / "pruned-mlp25"),
            "samples": a.samples, "steps": a.steps, "adam": a.adam, "threads": a.threads}
    result["prune"] = run_child("prune", args)
    result["machine"]["loadavg_after_prune"] = list(os.getloadavg())
    result["distill"] = run_child("distill", args)
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
