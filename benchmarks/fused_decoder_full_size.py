"""Benchmark: the fused ONNX Runtime decoder vs the traced (plain) one at full size (issue 31).

The random TinyLLaVA-1.5B checkpoint (``medlite demo random --preset tinyllava-1.5b``, created in
``WORK/ckpt`` when missing) is quantized once as the cpu-int4 recipe does it for speed runs
(round-to-nearest g128, int4 lm_head, ``int4_compute: int8``; ``--algorithm gptq`` for GPTQ) and
exported twice from the same working model and plan: ``WORK/plain`` (the whole export, traced decoder)
and ``WORK/fused`` (the fused decoder; vision/embed/tokenizer files are the plain export's, and its
runtime config is the plain one with the decoder entry replaced — the vision tower is not traced twice).
Then, interleaved per round: ``benchmarks/decoder_profile.py`` (op profile at ``--past`` slots + the
Python loop) and ``medlite bench --ignore-eos --max-new-tokens 64``.

    flock /tmp/medlite-fullsize.lock nice .venv/bin/python benchmarks/fused_decoder_full_size.py \
        --work /tmp/medlite-fused-full --rounds 2

Writes ``benchmarks/results/fused_decoder_full_size.json`` (load average recorded per step).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "fused_decoder_full_size.json"
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_child import read_result, run_json_child, write_result  # noqa: E402
from int4_full_size import CHILD_PRELUDE  # noqa: E402

BUILD = CHILD_PRELUDE + r"""
import shutil
from pathlib import Path
from medlite.pipeline.contract import BuildState
from medlite.compress.int4.stage import apply_w4a16
from medlite.memory import map_large_allocations
from medlite.export import export_onnx
map_large_allocations()
ckpt, work, samples, algorithm = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rss = PhaseRss().__enter__()
ctx, loaded, calib = load_and_calibration(rss, ckpt, samples)
state = BuildState(ctx=ctx, recipe=None, target=None, work=None, source=None, model=loaded, calibration=calib)
t0 = time.perf_counter()
with rss.phase("quantize"):
    apply_w4a16(state, 0, QuantizeOptions(vision="fp16", llm="w4a16", lm_head="int4", algorithm=algorithm,
                                          int4_compute="int8", group_size=128, symmetric=True))
t1 = time.perf_counter()
with rss.phase("export plain"):
    export_onnx(loaded, work / "plain", ctx=ctx, precision="fp32", plan=state.export_plan, decoder_graph="plain")
t2 = time.perf_counter()
with rss.phase("export fused decoder"):
    res = export_onnx(loaded, work / "fused", ctx=ctx, precision="fp32", plan=state.export_plan,
                      components=["decoder"], decoder_graph="fused")
t3 = time.perf_counter()
plain_cfg = json.loads((work / "plain" / "medlite_runtime.json").read_text())
fused_cfg = json.loads((work / "fused" / "medlite_runtime.json").read_text())
plain_cfg["graphs"]["decoder"] = fused_cfg["graphs"]["decoder"]
for p in (work / "plain").iterdir():
    if not p.name.startswith("decoder.onnx") and p.name != "medlite_runtime.json":
        shutil.copy2(p, work / "fused" / p.name)
(work / "fused" / "medlite_runtime.json").write_text(json.dumps(plain_cfg, indent=1, sort_keys=True) + "\n")
rss.__exit__()
size = lambda f: sum(p.stat().st_size for p in (work / f).glob("decoder.onnx*"))
print(json.dumps({"quantize_s": t1 - t0, "export_plain_s": t2 - t1, "export_fused_decoder_s": t3 - t2,
                  "peak_rss_gb_by_phase": rss.to_dict(), "fused_ops": res.ops["decoder"],
                  "decoder_bytes": {"plain": size("plain"), "fused": size("fused")}}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/medlite-fused-full")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--algorithm", default="rtn", choices=["rtn", "gptq"])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--past", type=int, default=869, help="cache slots of the profiled step (issue 31: 869)")
    ap.add_argument("--steps", default="build,profile,bench")
    ap.add_argument("--order", default="plain,fused", help="order of the forms in each round (alternate it)")
    ap.add_argument("--tag", default="", help="prefix of this run's result keys (a second run keeps the first)")
    a = ap.parse_args()
    work, steps = Path(a.work), set(a.steps.split(","))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = Path(a.ckpt) if a.ckpt else work / "ckpt"
    res = read_result(RESULT)
    res["machine"] = {"cpus": os.cpu_count(), "note": "2 cores shared with other sessions: a busy machine"}
    if "build" in steps:
        if not (ckpt / "config.json").is_file():
            # its --json object is indented over several lines: run it plainly
            subprocess.run([sys.executable, "-m", "medlite.cli", "demo", "random", "--preset", "tinyllava-1.5b",
                            "--format", "legacy", "--quiet", "--out", str(ckpt)], cwd=ROOT, check=True)
        for f in ("plain", "fused"):
            shutil.rmtree(work / f, ignore_errors=True)
        res["build"] = run_json_child([str(ckpt), str(work), str(a.samples), a.algorithm], code=BUILD)
        res["build"].update(algorithm=a.algorithm, loadavg_after=list(os.getloadavg()))
        write_result(RESULT, res)
    for r in range(a.rounds):
        for form in a.order.split(","):
            folder = work / form
            if "profile" in steps:
                out = run_json_child(["benchmarks/decoder_profile.py", str(folder), "--past", str(a.past), "--steps",
                                      "10", "--warmup", "2", "--new", "16", "--key", f"full_{form}_{r}", "--out",
                                      str(work / "profile.json")], errors="record")
                prof = json.loads((work / "profile.json").read_text()).get(f"full_{form}_{r}", out)
                res.setdefault("profile", {})[f"{a.tag}{form}_{r}"] = prof
            if "bench" in steps:
                b = run_json_child(["-m", "medlite.cli", "bench", "--model", str(folder), "--json", "--ignore-eos",
                                    "--max-new-tokens", "64", "--runs", str(a.runs), "--warmup", "1", "--no-write"],
                                   errors="record")
                b["loadavg_after"] = list(os.getloadavg())
                res.setdefault("bench", {})[f"{a.tag}{form}_{r}"] = b
            write_result(RESULT, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
