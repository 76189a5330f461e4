"""The ``engines`` stage: a TensorRT 8.5 build bundle for the target (engines are built on the device).

Writes into ``<artifact>/engines/``:

* ``engines.json``: the engines, their optimisation profiles and bounds (``limits``), precision,
  workspace and the device-memory estimate (:mod:`medlite.engines.memory`: weights + KV cache +
  activations + runtime reserve);
* ``build_engines.py``: the builder (TensorRT Python API, :mod:`medlite.engines.trt_build`) —
  vision engine + one decoder engine with two profiles, ``prefill`` (past = the one masked dummy
  slot) and ``decode`` (one token, past ≥ 1);
* ``build_engines.sh``: runs it on the Jetson, or ``build_engines.sh trtexec`` for plain trtexec
  8.5.2 commands (one profile per engine there, so the decoder gets one profile spanning both
  phases). Every emitted trtexec flag is in ``medlite/data/trtexec-8.5.2-flags.json``.

The embed graph is a single Gather: the runtime reads ``embed_tokens.bin`` directly, so it gets
no engine.
"""
from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from medlite.errors import ExportError
from medlite.units import human_bytes

FLAGS_FILE = "trtexec-8.5.2-flags.json"


def trtexec_flags() -> set[str]:
    """Option names trtexec 8.5.2 parses (shipped data file; source named inside it)."""
    with resources.files("medlite").joinpath("data", FLAGS_FILE).open("r", encoding="utf-8") as f:
        return set(json.load(f)["flags"])


def _shape(spec_shape: list, values: dict) -> list[int]:
    return [int(values[d]) if isinstance(d, str) else int(d) for d in spec_shape]


def profiles(cfg: dict, options) -> dict[str, list[dict]]:
    """Optimisation profiles per graph from the runtime config's symbolic input shapes."""
    n_img, p, g, b = cfg["num_image_tokens"], options.max_prompt_tokens, options.max_new_tokens, options.max_batch
    seq_max = n_img + p                       # prefill: image tokens + the prompt's text tokens
    ctx_max = 1 + n_img + p + g               # dummy slot + prompt + generated tokens

    def dims(graph: str, bounds: dict) -> dict:
        out = {}
        for t in cfg["graphs"][graph]["inputs"]:
            out[t["name"]] = {k: _shape(t["shape"], {d: v[k] for d, v in bounds.items()}) for k in ("min", "opt", "max")}
        return out

    batch = {"min": 1, "opt": 1, "max": b}
    prefill = {"batch": batch, "seq": {"min": 1, "opt": n_img + min(p, 32), "max": seq_max},
               "past": {"min": 1, "opt": 1, "max": 1}}
    prefill["total"] = {k: prefill["seq"][k] + 1 for k in ("min", "opt", "max")}
    decode = {"batch": batch, "seq": {"min": 1, "opt": 1, "max": 1},
              "past": {"min": 1, "opt": 1 + n_img + min(p, 32) + g // 2, "max": ctx_max - 1}}
    decode["total"] = {k: decode["past"][k] + 1 for k in ("min", "opt", "max")}
    both = {"batch": batch, "seq": {"min": 1, "opt": 1, "max": seq_max},
            "past": {"min": 1, "opt": decode["past"]["opt"], "max": ctx_max - 1}}
    both["total"] = {"min": 2, "opt": both["past"]["opt"] + 1, "max": ctx_max}
    return {"vision": [{"name": "default", "shapes": dims("vision", {"batch": batch})}],
            "decoder": [{"name": "prefill", "shapes": dims("decoder", prefill)},
                        {"name": "decode", "shapes": dims("decoder", decode)}],
            "decoder_single": [{"name": "prefill+decode", "shapes": dims("decoder", both)}]}


def memory_estimate(work: Path, cfg: dict, options, target) -> dict:
    """Device memory from the one model every place shows (:mod:`medlite.engines.memory`): weights
    (engines + embedding table) + KV cache + activations at the profiles' bounds + runtime reserve."""
    from medlite.engines.memory import for_export

    mem = for_export(work, cfg, target, options).to_dict()
    mem["max_context_tokens"] = mem["context_tokens"]
    mem["not_included"] = f"the builder workspace ({options.workspace_mb} MB) is only needed while building"
    return mem


def _shape_arg(shapes: dict, key: str) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in s[key])}" for name, s in shapes.items())


def trtexec_commands(spec: dict, single: list[dict]) -> list[list[str]]:
    """The trtexec 8.5.2 command lines (argument lists) for ``build_engines.sh trtexec``."""
    prec = {"fp16": ["--fp16"], "int8": ["--fp16", "--int8"], "fp32": []}[spec["precision"]]
    cmds = []
    for e in spec["engines"]:
        profs = single if e["name"] == "decoder" else e["profiles"]
        shapes = profs[0]["shapes"]
        cmds.append(["$TRTEXEC", f"--onnx={e['onnx']}", f"--saveEngine=../device/{e['name']}.trtexec.engine", *prec,
                     f"--minShapes={_shape_arg(shapes, 'min')}", f"--optShapes={_shape_arg(shapes, 'opt')}",
                     f"--maxShapes={_shape_arg(shapes, 'max')}", f"--memPoolSize=workspace:{spec['workspace_mb']}",
                     "--timingCacheFile=../device/timing.cache", "--buildOnly"])
    return cmds


def check_flags(cmds: list[list[str]]) -> None:
    """Refuse any flag trtexec 8.5.2 does not parse (it would abort the build on the device)."""
    known = trtexec_flags()
    bad = sorted({a.split("=", 1)[0] for c in cmds for a in c[1:] if a.startswith("--")} - known)
    if bad:
        raise ExportError(f"engines: trtexec 8.5.2 has no option(s) {', '.join(bad)}")


def shell_script(spec: dict, cmds: list[list[str]]) -> str:
    """``build_engines.sh``: checks it runs on a Jetson with the right TensorRT, then builds."""
    trtexec = "\n".join("  " + " \\\n      ".join(c) for c in cmds)
    return f"""#!/usr/bin/env bash
# TensorRT engines for this medlite artifact ({spec['target']}, TensorRT {spec['tensorrt']}, {spec['arch']}).
#
# RUN THIS ON THE JETSON ITSELF. TensorRT engines are not portable: an engine only loads on the GPU
# model and the TensorRT version that built it, so medlite ships ONNX graphs and this script instead
# of engines.
#
#   ./build_engines.sh            TensorRT Python API (python3-libnvinfer): vision.engine and ONE
#                                 decoder.engine with two optimisation profiles, prefill and decode
#                                 (weights stored once); fp32 islands of fp16 graphs stay fp32.
#   ./build_engines.sh trtexec    trtexec {spec['tensorrt']} only: one profile per engine, so the decoder
#                                 gets a single profile spanning prefill and decode (slower prefill),
#                                 and fp32 islands are not pinned.
#
# Estimated device memory: {spec['memory']['line']} (see engines.json).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -f /etc/nv_tegra_release ] && [ "${{FORCE:-0}}" != "1" ]; then
  echo "this is not a Jetson (no /etc/nv_tegra_release): build the engines on the device (FORCE=1 to override)" >&2
  exit 2
fi
TRTEXEC="${{TRTEXEC:-/usr/src/tensorrt/bin/trtexec}}"
case "${{1:-python}}" in
python)
  if [ "${{FORCE:-0}}" = "1" ]; then python3 build_engines.py --force; else python3 build_engines.py; fi
  ;;
trtexec)
  mkdir -p ../device   # device-built files: the folder the manifest declares (not hashed)
{trtexec}
  ;;
*)
  echo "usage: $0 [python|trtexec]" >&2; exit 2
  ;;
esac
"""


def _engine_specs(cfg: dict, profs: dict) -> tuple[list, dict]:
    """Engines for the graphs TensorRT runs; graphs marked ONNX-Runtime-only become runtime components."""
    engines, ort = [], {}
    for name in ("vision", "decoder"):
        g = cfg["graphs"][name]
        if g.get("runtime", "tensorrt") != "tensorrt":
            ort[name] = {"onnx": f"../{g['file']}", "runtime": g["runtime"], "reason": g.get("runtime_reason", "")}
            continue
        engines.append({"name": name, "onnx": f"../{g['file']}", "engine": f"{name}.engine", "profiles": profs[name]})
    return engines, ort


def run(state, index: int, options):
    """Write the engines bundle for ``state.target`` next to the exported graphs."""
    from medlite.pipeline.contract import StageResult
    from medlite.engines import trt_build
    from medlite.runtime.config import CONFIG_FILE

    cfg = json.loads((state.work / CONFIG_FILE).read_text(encoding="utf-8"))
    missing = [g for g in ("vision", "decoder") if g not in cfg["graphs"]]
    if missing:
        raise ExportError(f"stages[{index}].engines needs the exported {' and '.join(missing)} graph(s)")
    if not state.target.supports_trt(options.precision):   # validation refuses this too
        raise ExportError(f"stages[{index}].engines.precision {options.precision}: not a TensorRT precision "
                          f"on {state.target.name}")
    profs = profiles(cfg, options)
    t = state.target
    engines, ort = _engine_specs(cfg, profs)
    spec = {"format": "medlite-engines/1", "target": t.name, "tensorrt": t.tensorrt, "arch": t.arch,
            "precision": options.precision, "workspace_mb": options.workspace_mb, "keep_fp32_islands": True,
            "engines": engines, "onnxruntime_components": ort,
            # the profiles' bounds (recipe options): the runtime refuses requests past them (runtime/limits.py)
            "limits": {"max_batch": options.max_batch, "max_prompt_tokens": options.max_prompt_tokens,
                       "max_new_tokens": options.max_new_tokens,
                       "max_context_tokens": 1 + cfg["num_image_tokens"] + options.max_prompt_tokens
                       + options.max_new_tokens},
            "embed": "no engine: embed.onnx is one Gather; the runtime reads embed_tokens.bin directly",
            "memory": memory_estimate(state.work, cfg, options, t)}
    cmds = trtexec_commands(spec, profs["decoder_single"])
    check_flags(cmds)
    out = state.work / "engines"
    out.mkdir()
    (out / "engines.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(trt_build.__file__, out / "build_engines.py")
    sh = out / "build_engines.sh"
    sh.write_text(shell_script(spec, cmds), encoding="utf-8")
    sh.chmod(0o755)
    mem = spec["memory"]
    if not mem["fits"]:
        state.ctx.warn(f"engines: estimated device memory {mem['line']} on {t.name}: it does not fit")
    manifest = {"precision": options.precision, "memory": mem,
                "profiles": {e["name"]: [p["name"] for p in e["profiles"]] for e in spec["engines"]},
                "onnxruntime_components": sorted(ort)}
    ort_note = f" · {', '.join(ort)} on ONNX Runtime" if ort else ""
    return StageResult(summary=(f"bundle for {t.name} · est. device memory {human_bytes(mem['total_bytes'])} of "
                                f"{human_bytes(mem['usable_bytes'])}{ort_note} · build on the device: "
                                "engines/build_engines.sh"),
                       changed=["engines/"], manifest=manifest, ok=bool(mem["fits"]))

