"""Build the TensorRT 8.5 engines of a medlite artifact — run ON THE JETSON, next to ``engines.json``.

This file is copied into every artifact's ``engines/`` folder as ``build_engines.py`` and run by
``build_engines.sh`` on the device (TensorRT engines are specific to the GPU and the TensorRT
version that built them: an engine built anywhere else will not load on a Xavier).

It needs only the Python standard library and the ``tensorrt`` bindings JetPack 5.1.x installs
(``python3-libnvinfer``, TensorRT 8.5.2). Unlike ``trtexec`` 8.5.2, which builds one optimisation
profile per engine, the builder API gives the decoder two profiles in ONE engine (weights stored
once): ``prefill`` (many tokens, one masked dummy past slot) and ``decode`` (one token, a growing
past). Layers the exporter kept in fp32 inside an fp16 graph (normalisation, softmax, logits) are
pinned to fp32, because fp16 RMSNorm/softmax can overflow.

Usage: ``python3 build_engines.py [--only vision|decoder] [--force] [--out DIR]`` (engines and
``timing.cache`` go to ``../device/``, the folder the artifact's manifest declares for device-built files)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SPEC_FILE = "engines.json"
# Engines and the timing cache go to the artifact's declared device folder (manifest "device_files",
# medlite.artifacts.DEVICE_FILES), which verification leaves unhashed: building engines keeps the
# artifact verifiable. Relative to this script's folder (<artifact>/engines/).
OUT_DIR = "../device"


def _dims(v):
    return tuple(int(x) for x in v)


def pin_fp32_islands(trt, network) -> int:
    """Pin every layer whose float outputs are FLOAT (not HALF) to fp32; returns how many were pinned."""
    skip = {getattr(trt.LayerType, n) for n in ("CONSTANT", "SHAPE", "IDENTITY", "CAST") if hasattr(trt.LayerType, n)}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in skip:
            continue
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if outs and all(o.dtype == trt.float32 for o in outs):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def build_engine(trt, spec: dict, engine_spec: dict, folder: Path, logger, out: Path = None) -> bytes:
    """Parse one ONNX graph and build its serialized engine with the profiles in ``engine_spec``
    (the timing cache is read from and written to ``out``, default ``folder``)."""
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    parser = trt.OnnxParser(network, logger)
    onnx_path = (folder / engine_spec["onnx"]).resolve()
    # parse_from_file resolves external weight files (decoder.onnx.data) next to the graph.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SystemExit(f"{onnx_path}: TensorRT could not parse the graph:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec["workspace_mb"]) << 20)
    if spec["precision"] in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if spec["precision"] == "int8":
        config.set_flag(trt.BuilderFlag.INT8)       # scales come from the graph's Q/DQ nodes
    if spec["precision"] != "fp32" and spec.get("keep_fp32_islands", True):
        n = pin_fp32_islands(trt, network)
        if n:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            print(f"  {engine_spec['name']}: {n} fp32 layer(s) pinned to fp32")
    for prof in engine_spec["profiles"]:
        p = builder.create_optimization_profile()
        for name, s in prof["shapes"].items():
            p.set_shape(name, _dims(s["min"]), _dims(s["opt"]), _dims(s["max"]))
        config.add_optimization_profile(p)
    cache_file = (out or folder) / "timing.cache"
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SystemExit(f"{engine_spec['name']}: TensorRT failed to build the engine (see the log above)")
    cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def main(argv=None, trt=None) -> int:
    """Build every engine listed in ``engines.json`` (``trt`` is injectable for tests)."""
    ap = argparse.ArgumentParser(description="build TensorRT engines for a medlite artifact (on the device)")
    ap.add_argument("--only", choices=["vision", "decoder"], default=None)
    ap.add_argument("--force", action="store_true", help="build even if TensorRT is not 8.5")
    ap.add_argument("--out", default=None, help=f"folder for engines + timing cache (default {OUT_DIR}, "
                    "the artifact's declared device folder)")
    args = ap.parse_args(argv)
    folder = Path(__file__).resolve().parent
    out = Path(args.out) if args.out else (folder / OUT_DIR).resolve()
    spec = json.loads((folder / SPEC_FILE).read_text())
    if trt is None:
        try:
            import tensorrt as trt
        except ImportError:
            raise SystemExit("the TensorRT Python bindings are missing: on JetPack 5.1.x install python3-libnvinfer")
    want = spec["tensorrt"].rsplit(".", 1)[0]
    if not str(trt.__version__).startswith(want) and not args.force:
        raise SystemExit(f"TensorRT {trt.__version__} found, this bundle targets {spec['tensorrt']} "
                         f"({spec['target']}); use --force to build anyway")
    logger = trt.Logger(trt.Logger.WARNING)
    if (spec.get("memory") or {}).get("line"):   # the figure plan and report.md show (medlite.engines.memory)
        print(f"estimated device memory: {spec['memory']['line']}")
    out.mkdir(parents=True, exist_ok=True)
    for e in spec["engines"]:
        if args.only and e["name"] != args.only:
            continue
        print(f"building {out / e['engine']} ({', '.join(p['name'] for p in e['profiles'])} profile(s))")
        (out / e["engine"]).write_bytes(build_engine(trt, spec, e, folder, logger, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
