"""Benchmark: what the web layer of ``medlite serve`` costs (import time, resident memory), next to
the runtime it serves and, when it can be imported, Gradio (what the LLaVA / TinyLLaVA demos use).

    .venv/bin/python benchmarks/serve_footprint.py ARTIFACT [--gradio-path DIR] [--repeat 5]

Each figure comes from a fresh ``python -c`` process: wall time of the imports (the best of
``--repeat`` runs, so disk cache effects are gone) and that process's peak RSS (``ru_maxrss``).
``--gradio-path`` is a folder that holds gradio and the dependencies this venv lacks (for example
``pip install --no-deps --target DIR gradio==6.31.0 ...``); it is put on ``sys.path`` only for the
gradio rows. Writes ``benchmarks/results/serve_footprint.json``.
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
RESULT = ROOT / "benchmarks" / "results" / "serve_footprint.json"

_PROBE = """
import json, resource, sys, time
sys.path[:0] = {extra!r}
t0 = time.perf_counter()
{body}
dt = time.perf_counter() - t0
print("@@BENCH@@" + json.dumps({{"seconds": round(dt, 4), "peak_rss_mb":
      round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      "torch": "torch" in sys.modules}}))
"""

_SERVE = """
from pathlib import Path
from medlite.artifacts import open_artifact
from medlite.runtime import OnnxVlm
{web}
art = open_artifact(Path({artifact!r}))
vlm = OnnxVlm.open(art.path)
{app}
from medlite.imaging.images import load_image
from pydicom.data import get_testdata_file
vlm.answer(load_image(get_testdata_file("CT_small.dcm")), "Is there a lesion?")
"""


def probe(body: str, extra: list[str], repeat: int) -> dict:
    """Best-of-``repeat`` seconds and the peak RSS of a fresh interpreter running ``body``."""
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", _PROBE.format(extra=extra, body=body)],
                             capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if out.returncode != 0:
            return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
        runs.append(json.loads(out.stdout.split("@@BENCH@@", 1)[1]))
    best = min(runs, key=lambda r: r["seconds"])
    return {"seconds": best["seconds"], "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "torch": best["torch"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", help="a built artifact folder (e.g. artifacts/micro-tinyllava-med/xavier-agx-fp16/<v>)")
    ap.add_argument("--gradio-path", default=None, help="folder holding gradio (+ missing deps) to import from")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    gradio = [str(Path(args.gradio_path).resolve())] if args.gradio_path else []
    art = str(Path(args.artifact).resolve())
    rows = {
        "python (nothing imported)": probe("pass", [], args.repeat),
        "starlette + uvicorn + python-multipart": probe(
            "import starlette.applications, starlette.responses, uvicorn, python_multipart", [], args.repeat),
        "medlite.serve.app (the whole web layer)": probe("import medlite.serve.app", [], args.repeat),
        "medlite.runtime (onnxruntime, tokenizers)": probe("import medlite.runtime", [], args.repeat),
        "runtime: open the artifact + one answer": probe(
            _SERVE.format(web="", app="", artifact=art), [], args.repeat),
        "serve: open the artifact + create_app + one answer": probe(
            _SERVE.format(web="from medlite.serve.app import create_app", artifact=art,
                          app="app = create_app(vlm, artifact=art); app.state.worker.close()"), [], args.repeat),
    }
    if gradio:
        rows["gradio (import gradio)"] = probe("import gradio", gradio, args.repeat)
    result = {"benchmark": "serve_footprint", "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "artifact": Path(art).name, "python": platform.python_version(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "rows": rows}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for name, r in rows.items():
        print(f"{name:<55} " + (f"{r['seconds']:7.3f} s  {r['peak_rss_mb']:7.1f} MB  torch={r['torch']}"
                                if "seconds" in r else r["error"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
