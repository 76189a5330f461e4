"""Benchmark: fewer image tokens on the full-size random TinyLLaVA-1.5B shape, ONNX Runtime on this CPU.

Steps:

1. ``checkpoint`` — ``medlite demo random --preset tinyllava-1.5b`` (random weights, real shapes: SigLIP
   tower cut to 26 layers, 27 × 27 = 729 image tokens, TinyLlama-1.1B decoder);
2. ``export`` — fp32 export at 729 tokens (all graphs); for each reduced count, only the vision graph
   of the model with the pooling installed (:func:`medlite.checkpoints.token_pool.install`), in a
   folder whose decoder / embed files are hard links to the 729 export's (pooling changes the vision
   graph and ``num_image_tokens`` only: the decoder is the same graph with a shorter prompt);
3. ``speed`` — ``medlite bench --runs 1 --warmup 1 --max-new-tokens 8`` on each folder, the same image and
   question, one after the other: time to first token, prefill, image encode, prompt tokens;
4. ``memory`` — ``medlite plan`` of ``xavier-nx-tokens16`` on the checkpoint with ``tokens.count`` set
   to each count (729: no pooling), target jetson-xavier-nx-8gb: the device-memory estimate.

Usage::

    flock /tmp/medlite-fullsize.lock nice .venv/bin/python benchmarks/image_tokens_full_size.py \
        --work /tmp/medlite-tokens [--counts 729,196,81] [--steps checkpoint,export,speed,memory]

Writes ``benchmarks/results/image_tokens_full_size.json`` (merged with earlier steps' results).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "image_tokens_full_size.json"
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_child import keep_history, read_result, run_json_child, write_result  # noqa: E402

MEDLITE = [str(Path(sys.executable).with_name("medlite"))]   # the venv's console script

EXPORT_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from medlite.checkpoints import load_model
from medlite.checkpoints.token_pool import install
from medlite.context import RunContext
from medlite.export import export_onnx
from medlite.memory import map_large_allocations
map_large_allocations()
ckpt, out, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
ctx = RunContext(quiet=True)
t = time.time()
loaded = load_model(ckpt, ctx=ctx, dtype="float32")
comps = ["vision", "embed", "decoder"]
if count != loaded.num_image_tokens:
    install(loaded.model, loaded.num_image_tokens, count, "avg")
    loaded.num_image_tokens = count
    comps = ["vision"]
export_onnx(loaded, out, ctx=ctx, precision="fp32", allow_trt_issues=True, components=comps)
print(json.dumps({"count": count, "components": comps, "export_s": round(time.time() - t, 1),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg": list(os.getloadavg())}


def step_checkpoint(work: Path) -> dict:
    ckpt = work / "ckpt"
    if (ckpt / "config.json").is_file():
        return {"checkpoint": str(ckpt), "reused": True}
    t = time.time()
    subprocess.run([*MEDLITE, "demo", "random", "--preset", "tinyllava-1.5b", "--out", str(ckpt), "--quiet"],
                   cwd=ROOT, check=True)
    return {"checkpoint": str(ckpt), "seconds": round(time.time() - t, 1)}


def _assemble(full: Path, vision_only: Path, out: Path) -> None:
    """``out``: the reduced vision graph + the full export's decoder / embed files (hard links), one runtime config."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg = json.loads((full / "medlite_runtime.json").read_text())
    vcfg = json.loads((vision_only / "medlite_runtime.json").read_text())
    for f in full.iterdir():
        if f.is_file() and not f.name.startswith("vision.onnx") and f.name != "medlite_runtime.json":
            os.link(f, out / f.name)
    for f in vision_only.iterdir():
        if f.name.startswith("vision.onnx"):
            os.link(f, out / f.name)
    cfg["graphs"]["vision"] = vcfg["graphs"]["vision"]
    cfg["num_image_tokens"] = vcfg["num_image_tokens"]
    (out / "medlite_runtime.json").write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")


def step_export(work: Path, counts: list[int]) -> dict:
    res = {}
    full = work / "export-729"
    if not (full / "medlite_runtime.json").is_file():
        res["729"] = run_json_child([work / "ckpt", full, 729], code=EXPORT_CHILD, what="export 729")
    for c in counts:
        if c == 729:
            continue
        part = work / f"vision-{c}"
        if not (part / "medlite_runtime.json").is_file():
            res[str(c)] = run_json_child([work / "ckpt", part, c], code=EXPORT_CHILD, what=f"export {c}")
        _assemble(full, part, work / f"export-{c}")
    return res


def _folder(work: Path, c: int) -> Path:
    return work / f"export-{c}"


def step_speed(work: Path, counts: list[int], image: str, question: str) -> dict:
    out = {"image": image, "question": question, "loadavg_before": list(os.getloadavg())}
    for c in counts:
        img = ["--image", image] if image else []
        proc = subprocess.run([*MEDLITE, "bench", "--model", str(_folder(work, c)), *img,
                               "--question", question, "--runs", "1", "--warmup", "1", "--max-new-tokens", "8",
                               "--no-write", "--json"], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            out[str(c)] = {"error": proc.stderr[-1500:]}
            continue
        r = json.loads(proc.stdout)
        r = r.get("results", [r])[0] if isinstance(r.get("results"), list) else r
        out[str(c)] = {k: r.get(k) for k in ("prompt_tokens", "image_encode_ms", "prefill_ms", "ttft_ms",
                                             "decode_tokens_per_s", "peak_rss_bytes")}
    out["loadavg_after"] = list(os.getloadavg())
    base = out.get("729", {}).get("ttft_ms")
    for c in counts:
        t = out.get(str(c), {}).get("ttft_ms")
        if base and t:
            out[str(c)]["ttft_speedup_vs_729"] = round(base / t, 2)
    return out


def step_memory(work: Path, counts: list[int]) -> dict:
    out = {"target": "jetson-xavier-nx-8gb", "recipe": "xavier-nx-tokens16 (fp16 engines)"}
    for c in counts:
        proc = subprocess.run([*MEDLITE, "plan", "recipes/xavier-nx-tokens16.yaml", "--model", str(work / "ckpt"),
                               "--json", f"tokens.count={c}"], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            out[str(c)] = {"error": proc.stderr[-800:]}
            continue
        b = json.loads(proc.stdout)["budget"]
        out[str(c)] = {"total_bytes": b["total"], "parts": b["parts"], "line": b["line"], "context": b["context"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/medlite-tokens"))
    ap.add_argument("--counts", default="729,196,81")
    ap.add_argument("--steps", default="checkpoint,export,speed,memory")
    ap.add_argument("--image", default=None, help="bench --image (default: bench's own, the first held-out image)")
    ap.add_argument("--question", default="Is there an abnormality in this image?")
    a = ap.parse_args()
    counts = [int(c) for c in a.counts.split(",")]
    a.work.mkdir(parents=True, exist_ok=True)
    res = read_result(RESULT)
    res.update(benchmark="image_tokens_full_size", command=" ".join(sys.argv), machine=_machine())
    steps = a.steps.split(",")
    for name in ("checkpoint", "export", "speed", "memory"):
        if name not in steps:
            continue
        keep_history(res, name)
        res[name] = {"checkpoint": lambda: step_checkpoint(a.work), "export": lambda: step_export(a.work, counts),
                     "speed": lambda: step_speed(a.work, counts, a.image, a.question),
                     "memory": lambda: step_memory(a.work, counts)}[name]()
        res[name]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_result(RESULT, res)


if __name__ == "__main__":
    main()
