"""Benchmark: medlite's cpu-int4 export on ONNX Runtime vs llama.cpp (Q4_0, Q4_K_M) on this CPU, same weights.

Issue 31's first acceptance bullet. The same full-size random TinyLlama-1.1B-shaped language model
(``medlite demo random --preset tinyllava-1.5b``; ``--preset tiny`` for a quick smoke run) is written

* as GGUF: its language model as a plain Hugging Face ``LlamaForCausalLM`` folder (the legacy checkpoint's
  text keys already have that layout) → llama.cpp's ``convert_hf_to_gguf.py`` (f16, with llama.cpp's own
  ``gguf-py``) → ``llama-quantize`` Q4_0 and Q4_K_M;
* as medlite's cpu-int4 export: round-to-nearest g128 MatMulNBits (the GPTQ recipe's graph: same ops, bits,
  block size and shapes), int4 lm_head, ``int4_compute: int8``, fp32 export — built by
  ``benchmarks/int4_full_size.py``'s build step; with ``--medlite plain,fused`` also with the fused
  ONNX Runtime decoder (when this medlite's export has that option: :func:`fused_available`).

Then, in interleaved rounds (every runtime once per round, so a busy machine hits them alike), with the
same thread count: medlite ``bench --ignore-eos`` (decode tokens/s after its image + question prompt,
prefill, TTFT including the vision tower) and ``llama-bench`` (prefill of the same number of tokens,
decode at that context depth ``-d`` and on an empty context). Bandwidth efficiency = (weight bytes read per
token + the KV cache at that depth) × tokens/s ÷ the measured copy bandwidth. The load average is recorded
around every measurement (the machine is shared).

llama.cpp is a benchmark dependency only (the product never needs it): ``--llama-cpp DIR`` (or
``$MEDLITE_LLAMA_CPP``) names a llama.cpp source folder (built there when it has no ``build/bin/llama-bench``);
without it the script builds llama.cpp from the ``llama-cpp-python==0.3.36`` sdist's ``vendor/llama.cpp``
under ``--work`` (``nice -n 15``, ~10+ min on 2 cores), or skips llama.cpp with a message when it cannot.

Usage::

    nice .venv/bin/python benchmarks/cpu_vs_llamacpp.py --dry-run                  # what it would do
    nice .venv/bin/python benchmarks/cpu_vs_llamacpp.py --preset tiny --rounds 1   # smoke (not the results file)
    nice .venv/bin/python benchmarks/cpu_vs_llamacpp.py --llama-cpp /tmp/llama.cpp --rounds 2

Writes ``benchmarks/results/cpu_vs_llamacpp.json`` (full size; a tiny run writes under ``--work``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import int4_full_size as i4  # noqa: E402  (its build step, bandwidth and bench helpers)
from bench_child import run_json_child  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "cpu_vs_llamacpp.json"
SDIST = "llama-cpp-python==0.3.36"
TOOLS = ("llama-bench", "llama-quantize")
GGUF_TYPES = ("Q4_0", "Q4_K_M")


def _run(cmd: list, *, cwd=None, log=None, env=None) -> subprocess.CompletedProcess:
    """Run ``cmd`` (output to ``log`` when given); raise with its tail on failure."""
    out = open(log, "a") if log else subprocess.PIPE
    try:
        p = subprocess.run([str(c) for c in cmd], cwd=cwd, stdout=out, stderr=subprocess.STDOUT if log else
                           subprocess.PIPE, text=True, env=env)
    finally:
        if log:
            out.close()
    if p.returncode:
        tail = Path(log).read_text()[-2000:] if log else (p.stderr or "")[-2000:]
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} … failed ({p.returncode}):\n{tail}")
    return p


# -- llama.cpp: find or build ---------------------------------------------------------------------
def _built(src: Path) -> bool:
    return all((src / "build" / "bin" / t).is_file() for t in TOOLS) and (src / "convert_hf_to_gguf.py").is_file()


def _build(src: Path, log: Path) -> None:
    """cmake as the earlier measurement did (docs/cpu.md), niced: the machine is shared."""
    nice = ["nice", "-n", "15"]
    _run(nice + ["cmake", "-B", "build", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release"],
         cwd=src, log=log)
    _run(nice + ["cmake", "--build", "build", "-j2", "--target", *TOOLS], cwd=src, log=log)


def llama_cpp(arg: str | None, work: Path, may_build: bool) -> tuple[Path | None, str]:
    """A built llama.cpp source folder, or None and why not (the benchmark then skips llama.cpp)."""
    given = arg or os.environ.get("MEDLITE_LLAMA_CPP")
    src = Path(given) if given else work / "llama.cpp"
    if _built(src):
        return src, f"found at {src}"
    if not may_build:
        return None, f"no built llama.cpp at {src} (--llama-cpp DIR or $MEDLITE_LLAMA_CPP) and --no-build"
    missing = [t for t in ("cmake", "c++", "tar") if shutil.which(t) is None]
    if missing:
        return None, f"cannot build llama.cpp: {', '.join(missing)} not found"
    log = work / "llama-cpp-build.log"
    try:
        if not (src / "CMakeLists.txt").is_file():
            if given:
                return None, f"{src} is not a llama.cpp source folder (no CMakeLists.txt)"
            sdist = work / "sdist"
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", sdist],
                 log=log)
            tarball = next(sdist.glob("llama_cpp_python-*.tar.gz"))
            _run(["tar", "xzf", tarball, "-C", sdist], log=log)
            shutil.move(str(next(sdist.glob("llama_cpp_python-*/vendor/llama.cpp"))), str(src))
        print(f"building llama.cpp in {src} (nice -n 15, ~10+ min on 2 cores; log {log})", file=sys.stderr)
        _build(src, log)
    except (RuntimeError, StopIteration, OSError) as e:
        return None, f"could not get or build llama.cpp ({type(e).__name__}: {str(e)[:300]})"
    return (src, f"built from {SDIST} vendor/llama.cpp") if _built(src) else (None, "the build made no llama-bench")


# -- the weights ----------------------------------------------------------------------------------
def checkpoint(work: Path, preset: str, given: str | None) -> Path:
    """The random legacy checkpoint (written once under ``--work``)."""
    ckpt = Path(given) if given else work / f"ckpt-{preset}"
    if not (ckpt / "config.json").is_file():
        # (its --json prints nothing on stdout today: run it plainly and look for the folder)
        _run([sys.executable, "-m", "medlite.cli", "demo", "random", "--preset", preset, "--format", "legacy",
              "--quiet", "--out", ckpt], cwd=ROOT)
    return ckpt


def write_hf_llama(ckpt: Path, out: Path) -> Path:
    """The checkpoint's language model as a plain HF ``LlamaForCausalLM`` folder, shard by shard (a legacy
    checkpoint stores it under exactly those key names; the tower and projector are left out)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, shard in enumerate(sorted(ckpt.glob("*.safetensors"))):
        with safe_open(str(shard), framework="np") as f:
            keep = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(("model.vision_tower.", "model.mm_"))}
        if keep:
            save_file(keep, str(tmp / f"model-{i:05d}.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith(("mm_", "vision", "tokenizer_", "image_"))}
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], torch_dtype="float16")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (ckpt / name).is_file():
            shutil.copy(ckpt / name, tmp / name)
    tmp.rename(out)
    return out


def convert_python(work: Path) -> Path:
    """A Python for convert_hf_to_gguf.py: this one when it has sentencepiece (the script imports it for every
    Llama), else a separate venv under ``--work`` with only sentencepiece installed that sees this venv's
    packages (torch, transformers, numpy) through a ``.pth`` line — medlite's own venv is never changed."""
    import importlib.util
    import sysconfig

    if importlib.util.find_spec("sentencepiece") is not None:
        return Path(sys.executable)
    venv = work / "convert-venv"
    py = venv / "bin" / "python"
    if not py.is_file():
        _run([sys.executable, "-m", "venv", venv])
        _run([py, "-m", "pip", "install", "-q", "sentencepiece"])
        site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
        (site / "zz-medlite-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


def write_ggufs(src: Path, hf: Path, work: Path) -> dict:
    """f16 GGUF (convert_hf_to_gguf.py with llama.cpp's own gguf-py) → Q4_0 and Q4_K_M: name → path."""
    log = work / "gguf.log"
    f16 = work / "model-f16.gguf"
    if not f16.is_file():
        env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
        _run(["nice", "-n", "10", convert_python(work), src / "convert_hf_to_gguf.py", hf, "--outtype", "f16",
              "--outfile", f16], log=log, env=env)
    out = {}
    for q in GGUF_TYPES:
        path = work / f"model-{q}.gguf"
        if not path.is_file():
            _run(["nice", "-n", "10", src / "build" / "bin" / "llama-quantize", f16, path, q, "2"], log=log)
        out[q] = path
    return out


def gguf_bytes_per_token(src: Path, path: Path) -> dict:
    """Bytes of the GGUF tensors a decode step reads: all but the token embedding (one row per token)."""
    sys.path.insert(0, str(src / "gguf-py"))
    from gguf import GGUFReader

    tensors = GGUFReader(str(path)).tensors
    embed = sum(int(t.n_bytes) for t in tensors if t.name == "token_embd.weight")
    total = sum(int(t.n_bytes) for t in tensors)
    return {"file_bytes": path.stat().st_size, "tensor_bytes": total, "bytes_per_token": total - embed}


def fused_available() -> bool:
    """Whether this medlite's export can write the fused ONNX Runtime decoder (``export.decoder_graph``) and
    ``benchmarks/fused_decoder_full_size.py`` (its plain + fused build from one quantization) is here."""
    try:
        from medlite.recipes.options import ExportOptions
    except ImportError:
        return False
    return "decoder_graph" in ExportOptions.model_fields and (ROOT / "benchmarks" / "fused_decoder_full_size.py").is_file()


def medlite_exports(ckpt: Path, work: Path, decoders: list, samples: int, given: str | None) -> dict:
    """decoder ("plain", "fused") → medlite cpu-int4 export folder: RTN g128 MatMulNBits (the GPTQ recipe's
    graph: same ops, bits, block size and shapes), int4 lm_head, int8 compute, fp32 export. Both decoders come
    from one quantization (``fused_decoder_full_size.py``'s build child: the same weights); without the fused
    option, ``int4_full_size.py``'s build child writes the plain one. ``given``: a folder holding plain/ and
    fused/ from an earlier build of the same checkpoint (built with the same settings)."""
    root = Path(given) if given else work / "medlite-int4"
    missing = [d for d in decoders if not (root / d / "decoder.onnx").is_file()]
    if missing and not given:
        for d in ("plain", "fused"):
            shutil.rmtree(root / d, ignore_errors=True)      # a half-written export of an interrupted run
        root.mkdir(parents=True, exist_ok=True)
        if fused_available():
            import fused_decoder_full_size as fd

            res = run_json_child([str(ckpt), str(root), str(samples), "rtn"], code=fd.BUILD, what="medlite build")
        else:
            res = run_json_child([str(ckpt), str(root / "plain"), str(samples), "int4", "rtn", "int8"], code=i4.BUILD,
                                 what="medlite build")
        (root / "build.json").write_text(json.dumps(res, indent=1))
    return {d: root / d for d in decoders if (root / d / "decoder.onnx").is_file()}


# -- measuring ------------------------------------------------------------------------------------
def bench_medlite(export: Path, tokens: int) -> dict:
    """``medlite bench --ignore-eos`` (one warm-up, one timed run) on the export."""
    r = run_json_child(["-m", "medlite.cli", "bench", "--model", str(export), "--json", "--ignore-eos",
                        "--max-new-tokens", str(tokens), "--runs", "1", "--warmup", "1", "--no-write"],
                       errors="record")
    if "error" in r:
        return r
    out = {"decode_tps_at_depth": r.get("decode_tokens_per_s"), "prefill_s": r["prefill_ms"] / 1e3,
           "ttft_s": r["ttft_ms"] / 1e3, "vision_s": r.get("image_encode_ms", 0) / 1e3,
           "prompt_tokens": r.get("prompt_tokens"), "threads": r.get("threads"),
           "peak_rss_bytes": r.get("peak_rss_bytes")}
    if r.get("followup_ttft_ms") is not None:
        out["followup_ttft_s"] = r["followup_ttft_ms"] / 1e3
    return out


def _llama_bench(src: Path, gguf: Path, threads: int, args: list) -> list:
    cmd = [src / "build" / "bin" / "llama-bench", "-m", gguf, "-t", str(threads), "-r", "1", "-o", "json", *args]
    return json.loads(_run(cmd).stdout)


def bench_llama(src: Path, gguf: Path, threads: int, depth: int, tokens: int) -> dict:
    """llama-bench: prefill of ``depth`` tokens and decode on an empty context, then decode at ``depth``."""
    try:
        a = _llama_bench(src, gguf, threads, ["-p", str(depth), "-n", str(tokens), "-d", "0"])
        b = _llama_bench(src, gguf, threads, ["-p", "0", "-n", str(tokens), "-d", str(depth)])
    except (RuntimeError, ValueError) as e:
        return {"error": str(e)[-2000:]}
    pp = next(x["avg_ts"] for x in a if x["n_prompt"] and not x["n_gen"])
    tg0 = next(x["avg_ts"] for x in a if x["n_gen"])
    tgd = next(x["avg_ts"] for x in b if x["n_gen"])
    return {"decode_tps_at_depth": tgd, "decode_tps_empty": tg0, "prefill_s": depth / pp,
            "ttft_s": depth / pp + 1 / tg0, "ttft_note": "text only: prefill + one decode step (no vision tower)",
            "build_info": {k: a[0].get(k) for k in ("build_commit", "cpu_info", "backends", "type_k")}}


def kv_bytes(ckpt: Path, depth: int, itemsize: int) -> int:
    """The K and V cache a decode step reads at ``depth`` past tokens (``itemsize`` bytes per value)."""
    c = json.loads((ckpt / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim * depth * itemsize


def run_rounds(plan: dict, a, res: dict, result: Path) -> None:
    """Every runtime once per round, medlite first (its prompt length is llama-bench's depth); the results
    file is rewritten after each measurement."""
    for rnd in range(1, a.rounds + 1):
        for name, what in plan.items():
            before = list(os.getloadavg())
            t = time.perf_counter()
            if what["kind"] == "medlite":
                r = bench_medlite(what["path"], a.tokens)
                res["depth"] = res.get("depth") or r.get("prompt_tokens")
            else:
                r = bench_llama(what["src"], what["path"], a.threads, res.get("depth") or a.depth, a.tokens)
            r.update(round=rnd, loadavg_before=before, loadavg_after=list(os.getloadavg()),
                     wall_s=round(time.perf_counter() - t, 1))
            res["runs"].setdefault(name, []).append(r)
            print(f"round {rnd} {name}: " + json.dumps({k: r.get(k) for k in ("decode_tps_at_depth", "prefill_s",
                                                                              "ttft_s", "error")}), file=sys.stderr)
            write_json(result, res)


def write_json(path: Path, res: dict) -> None:
    """The results file (sorted keys), rewritten after every measurement."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")


def summarize(res: dict, plan: dict) -> dict:
    """Medians over rounds, bandwidth efficiency, and medlite ÷ llama.cpp Q4_0 at the same depth."""
    bw = res["bandwidth_gbs"] * 1e9
    out = {}
    for name, runs in res["runs"].items():
        ok = [r for r in runs if "error" not in r]
        med = {k: statistics.median(r[k] for r in ok) for k in ("decode_tps_at_depth", "decode_tps_empty",
                                                                  "prefill_s", "ttft_s", "vision_s")
               if ok and all(r.get(k) is not None for r in ok)}
        per = {k: [round(r[k], 3) for r in ok if r.get(k) is not None] for k in med}
        read = plan[name]["bytes_per_token"] + plan[name]["kv_bytes_per_past_token"] * res["depth"]
        if "decode_tps_at_depth" in med:
            med["bandwidth_efficiency"] = read * med["decode_tps_at_depth"] / bw
        out[name] = {"median": med, "per_round": per, "bytes_read_per_token": read, "errors": len(runs) - len(ok)}
    ref = out.get("llama.cpp Q4_0", {}).get("median", {})
    for name, s in out.items():
        if name.startswith("medlite") and ref.get("decode_tps_at_depth") and "decode_tps_at_depth" in s["median"]:
            s["vs_llama_q4_0"] = {"decode_at_depth": s["median"]["decode_tps_at_depth"] / ref["decode_tps_at_depth"],
                                  "prefill_time": s["median"]["prefill_s"] / ref["prefill_s"]}
    return out


def table(res: dict) -> str:
    """The docs/cpu.md table (Markdown) from a results file."""
    rows = ["| runtime (%d threads, %d interleaved rounds) | GB read per token | decode tok/s at depth %s | "
            "decode tok/s, empty context | prefill of %s tokens | TTFT | bandwidth efficiency |"
            % (res["threads"], res["rounds"], res.get("depth"), res.get("depth")), "|---|---|---|---|---|---|---|"]
    for name, s in res.get("summary", {}).items():
        m, p = s["median"], s["per_round"]
        f = lambda k, fmt: " / ".join(fmt.format(v) for v in p.get(k, [])) or "–"   # noqa: E731
        rows.append(f"| {name} | {s['bytes_read_per_token'] / 1e9:.2f} | {f('decode_tps_at_depth', '{:.1f}')} | "
                    f"{f('decode_tps_empty', '{:.1f}')} | {f('prefill_s', '{:.1f} s')} | {f('ttft_s', '{:.1f} s')} | "
                    f"{m['bandwidth_efficiency']:.2f} |" if "bandwidth_efficiency" in m else f"| {name} | – | – | – | – | – | – |")
    return "\n".join(rows)


def prepare(a, work: Path, res: dict) -> dict:
    """Weights in every format: runtime name → {kind, path, bytes_per_token, kv_bytes_per_past_token}."""
    src, why = llama_cpp(a.llama_cpp, work, not a.no_build)
    res["llama_cpp"] = {"source": str(src) if src else None, "status": why, "sdist": SDIST}
    if src is None:
        print(f"llama.cpp: skipped — {why}", file=sys.stderr)
    ckpt = checkpoint(work, a.preset, a.ckpt)
    res["checkpoint"] = str(ckpt)
    plan = {}
    decoders = [d for d in a.medlite.split(",") if d]        # --medlite "": llama.cpp only
    if "fused" in decoders and not fused_available() and not a.medlite_exports:
        decoders.remove("fused")
        res.setdefault("not_measured", []).append("medlite fused decoder: this medlite's export has no such option")
    t = time.perf_counter()
    exports = medlite_exports(ckpt, work, decoders, a.samples, a.medlite_exports) if decoders else {}
    res.setdefault("setup_s", {})["medlite"] = round(time.perf_counter() - t, 1)
    for decoder, path in exports.items():
        wbytes = sum(p.stat().st_size for p in path.glob("decoder.onnx*"))
        plan[f"medlite cpu-int4 ({decoder} decoder)"] = {"kind": "medlite", "path": path, "bytes_per_token": wbytes,
                                                         "kv_bytes_per_past_token": kv_bytes(ckpt, 1, 4)}
    if src is not None:
        t = time.perf_counter()
        ggufs = write_ggufs(src, write_hf_llama(ckpt, work / f"hf-llama-{a.preset}"), work)
        res.setdefault("setup_s", {})["gguf"] = round(time.perf_counter() - t, 1)
        for q, path in ggufs.items():
            b = gguf_bytes_per_token(src, path)
            plan[f"llama.cpp {q}"] = {"kind": "llama.cpp", "src": src, "path": path, **b,
                                      "kv_bytes_per_past_token": kv_bytes(ckpt, 1, 2)}   # f16 cache
    return plan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/medlite-cpu-vs-llamacpp", help="weights, exports, llama.cpp build")
    ap.add_argument("--llama-cpp", default=None, metavar="DIR",
                    help="llama.cpp source folder (built there if needed; default $MEDLITE_LLAMA_CPP, else "
                         "WORK/llama.cpp from the llama-cpp-python 0.3.36 sdist)")
    ap.add_argument("--no-build", action="store_true", help="never build llama.cpp: skip it when none is found")
    ap.add_argument("--preset", default="tinyllava-1.5b", help="random checkpoint preset (tiny: a smoke run)")
    ap.add_argument("--ckpt", default=None, help="an existing legacy checkpoint of that preset")
    ap.add_argument("--medlite", default="plain,fused", help="medlite decoders: plain, fused (when available)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="threads for both runtimes")
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per measurement")
    ap.add_argument("--depth", type=int, default=836,
                    help="context depth for llama-bench until medlite's prompt length is known")
    ap.add_argument("--medlite-exports", default=None, metavar="DIR",
                    help="use DIR/plain and DIR/fused (benchmarks/fused_decoder_full_size.py's folders, same checkpoint "
                         "and settings) instead of building them")
    ap.add_argument("--samples", type=int, default=8, help="calibration pairs the build step loads (RTN uses none)")
    ap.add_argument("--result", default=None, help="results file (default: benchmarks/results/cpu_vs_llamacpp.json "
                                                   "at full size, WORK/cpu_vs_llamacpp.json otherwise)")
    ap.add_argument("--dry-run", action="store_true", help="say what would run (llama.cpp found or not) and stop")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    result = Path(a.result) if a.result else (RESULT if a.preset == "tinyllava-1.5b" else work / RESULT.name)
    for var in ("MEDLITE_ORT_THREADS", "OMP_NUM_THREADS"):
        os.environ[var] = str(a.threads)          # medlite's children: the same thread count as llama-bench -t
    if a.dry_run:
        given = a.llama_cpp or os.environ.get("MEDLITE_LLAMA_CPP")
        src = Path(given) if given else work / "llama.cpp"
        print(json.dumps({"llama_cpp": str(src), "built": _built(src), "would_build": not _built(src) and not a.no_build,
                          "fused_decoder_option": fused_available(), "preset": a.preset, "result": str(result),
                          "medlite": a.medlite, "rounds": a.rounds, "threads": a.threads}, indent=1))
        return 0
    res = {"machine": {"cpus": os.cpu_count(), "machine": platform.machine(), "cpu": _cpu_name(),
                       "note": "2 cores shared with other sessions: see the load averages"},
           "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "loadavg_start": list(os.getloadavg()),
           "preset": a.preset, "rounds": a.rounds, "threads": a.threads, "tokens": a.tokens, "runs": {},
           "code": i4._git_head(), "command": " ".join(sys.argv)}
    if result.is_file():       # earlier runs' summaries stay (a shared machine: runs differ a lot)
        prev = json.loads(result.read_text())
        res["history"] = prev.pop("history", []) + [{k: prev.get(k) for k in ("started", "code", "rounds", "depth",
                                                                              "loadavg_start", "loadavg_end",
                                                                              "bandwidth_gbs", "summary")}]
    plan = prepare(a, work, res)
    res["bandwidth_gbs"] = i4.bandwidth_gbs()
    res["bandwidth_method"] = "numpy copy of 1 GiB, best of 5, bytes read + written (int4_full_size.bandwidth_gbs)"
    res["weights"] = {n: {k: (str(v) if isinstance(v, Path) else v) for k, v in p.items() if k != "src"}
                      for n, p in plan.items()}
    run_rounds(plan, a, res, result)
    res["depth"] = res.get("depth") or a.depth
    res["summary"] = summarize(res, plan)
    res["loadavg_end"] = list(os.getloadavg())
    write_json(result, res)
    print(table(res))
    print(f"results: {result}", file=sys.stderr)
    return 0


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
