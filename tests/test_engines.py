"""The engines bundle: trtexec 8.5.2 flags, shell script, profiles valid for the real graphs, the
on-device builder run against a recording stand-in for the TensorRT API, memory estimate."""
import json
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from medlite.context import RunContext
from medlite.engines.targets import TARGETS
from medlite.errors import ExportError
from medlite.recipes.schema import EnginesOptions
from medlite.pipeline.contract import BuildState
from medlite.pipeline.stages import engines as eng

OPTS = EnginesOptions(precision="fp16", max_batch=2, max_prompt_tokens=24, max_new_tokens=8, workspace_mb=512)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """(artifact folder, engines.json) of a tiny fp16 export with an engines bundle."""
    from medlite.checkpoints import load_model
    from medlite.checkpoints.random_ckpt import write_random_checkpoint
    from medlite.export import export_onnx

    root = tmp_path_factory.mktemp("eng")
    ctx = RunContext(cache_dir=root / "cache", quiet=True)
    ckpt = write_random_checkpoint("tiny", root / "ckpt", ctx=ctx)
    loaded = load_model(ckpt, ctx=ctx, vision_tower=ckpt / "vision_tower")
    work = root / "artifact"
    export_onnx(loaded, work, ctx=ctx, precision="fp16")
    state = BuildState(ctx=ctx, recipe=None, target=TARGETS["jetson-xavier-nx-8gb"], work=work, source=None,
                       model=loaded)
    result = eng.run(state, 1, OPTS)
    assert result.ok and result.summary.startswith("bundle for jetson-xavier-nx-8gb · est. device memory")
    return work, json.loads((work / "engines" / "engines.json").read_text()), result


def test_every_emitted_trtexec_flag_exists_in_8_5_2(bundle):
    work, spec, _ = bundle
    text = (work / "engines" / "build_engines.sh").read_text()
    flags = set(re.findall(r"(?<![\w-])(--[A-Za-z][A-Za-z0-9]*)", text.split("trtexec)", 1)[1]))
    known = set(json.loads((Path(eng.__file__).parents[2] / "data" / eng.FLAGS_FILE).read_text())["flags"])
    assert flags and flags <= known, flags - known
    assert {"--onnx", "--saveEngine", "--minShapes", "--optShapes", "--maxShapes", "--fp16"} <= flags
    with pytest.raises(ExportError, match="--builderOptimizationLevel"):
        eng.check_flags([["$TRTEXEC", "--onnx=x", "--builderOptimizationLevel=3"]])


def test_script_refuses_to_run_off_device_and_passes_shapes_to_trtexec(bundle, tmp_path):
    work, spec, _ = bundle
    sh = work / "engines" / "build_engines.sh"
    assert subprocess.run(["bash", "-n", str(sh)]).returncode == 0
    assert "RUN THIS ON THE JETSON ITSELF" in sh.read_text()
    env = {k: v for k, v in os.environ.items() if k != "FORCE"}
    if not Path("/etc/nv_tegra_release").exists():
        r = subprocess.run(["bash", str(sh), "trtexec"], env=env, capture_output=True, text=True)
        assert r.returncode == 2 and "build the engines on the device" in r.stderr
    log = tmp_path / "calls.txt"
    fake = tmp_path / "trtexec"
    fake.write_text(f'#!/usr/bin/env bash\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    r = subprocess.run(["bash", str(sh), "trtexec"], env={**env, "FORCE": "1", "TRTEXEC": str(fake)},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    calls = [shlex.split(line) for line in log.read_text().splitlines()]
    assert [c[0] for c in calls] == ["--onnx=../vision.onnx", "--onnx=../decoder.onnx"]
    assert {a for c in calls for a in c if a.startswith(("--saveEngine", "--timingCacheFile"))} == {
        "--saveEngine=../device/vision.trtexec.engine", "--saveEngine=../device/decoder.trtexec.engine",
        "--timingCacheFile=../device/timing.cache"}
    dec = dict(a[2:].split("=", 1) for a in calls[1] if "=" in a)
    parsed = {k: {t.split(":")[0]: [int(d) for d in t.split(":")[1].split("x")] for t in dec[k].split(",")}
              for k in ("minShapes", "optShapes", "maxShapes")}
    # One profile spanning prefill and decode: attention mask covers past + new tokens.
    mn, opt, mx = parsed["minShapes"], parsed["optShapes"], parsed["maxShapes"]
    for s in (mn, opt):     # decode-like shapes: one new token after the past
        assert s["inputs_embeds"][1] == 1 and s["attention_mask"][1] == s["past_key_values.0.key"][2] + 1
    assert mx["attention_mask"][1] == mx["past_key_values.0.key"][2] + 1      # longest decode step
    assert mx["inputs_embeds"][1] + 1 <= mx["attention_mask"][1]              # longest prefill fits too
    assert mx["inputs_embeds"][0] == OPTS.max_batch


def _onnx_inputs(path):
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
            for i in m.graph.input}


def test_profiles_match_the_graphs_and_run_in_onnxruntime(bundle):
    """Independent check: every profile's min and max shapes are accepted by the real ONNX graph
    (ONNX Runtime) and agree with its static dimensions."""
    import onnxruntime as ort

    work, spec, _ = bundle
    cfg = json.loads((work / "medlite_runtime.json").read_text())
    dtypes = {"float16": np.float16, "float32": np.float32, "int32": np.int32, "int64": np.int64}
    for e in spec["engines"]:
        graph = work / e["onnx"].replace("../", "")
        static = _onnx_inputs(graph)
        names = [p["name"] for p in e["profiles"]]
        assert names == (["prefill", "decode"] if e["name"] == "decoder" else ["default"])
        gspec = {t["name"]: t for t in cfg["graphs"][e["name"]]["inputs"]}
        sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        for prof in e["profiles"]:
            assert set(prof["shapes"]) == set(static)
            for name, s in prof["shapes"].items():
                for a, b, c in zip(s["min"], s["opt"], s["max"]):
                    assert 1 <= a <= b <= c
                for i, d in enumerate(static[name]):
                    if d:
                        assert s["min"][i] == s["max"][i] == d, (name, i)
            for key in ("min", "max"):
                feeds = {}
                for name, s in prof["shapes"].items():
                    arr = np.zeros(s[key], dtype=dtypes[gspec[name]["dtype"]])
                    if name == "attention_mask":
                        arr[:] = 1
                    if name == "position_ids":
                        arr[:] = np.arange(arr.shape[1])
                    feeds[name] = arr
                outs = sess.run(None, feeds)
                assert all(np.isfinite(o.astype(np.float32)).all() for o in outs if o.dtype.kind == "f")
        if e["name"] == "decoder":
            pre, dec = (p["shapes"] for p in e["profiles"])
            assert pre["past_key_values.0.key"]["max"][2] == 1                  # prefill: the dummy slot only
            assert dec["inputs_embeds"]["max"][1] == 1                          # decode: one token
            ctx_max = 1 + cfg["num_image_tokens"] + OPTS.max_prompt_tokens + OPTS.max_new_tokens
            assert dec["attention_mask"]["max"][1] == ctx_max
            assert pre["inputs_embeds"]["max"][1] == cfg["num_image_tokens"] + OPTS.max_prompt_tokens
            assert pre["inputs_embeds"]["max"][0] == OPTS.max_batch


class _Recorder:
    """A stand-in for the ``tensorrt`` module that records what the builder is asked to do."""

    def __init__(self, version="8.5.2.2"):
        self.__version__ = version
        self.calls = []
        rec = self
        self.float32, self.float16 = "FLOAT", "HALF"
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, lvl: None})
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8",
                                                 OBEY_PRECISION_CONSTRAINTS="OBEY")
        self.LayerType = types.SimpleNamespace(CONSTANT="CONSTANT", SHAPE="SHAPE", IDENTITY="IDENTITY", CAST="CAST")

        class Out:
            def __init__(self, dtype):
                self.dtype = dtype

        class Layer:
            def __init__(self, type_, dtypes):
                self.type, self._outs, self.precision, self.num_outputs = type_, [Out(d) for d in dtypes], None, len(dtypes)

            def get_output(self, j):
                return self._outs[j]

            def set_output_type(self, j, t):
                self._outs[j].dtype = t

        class Network:
            layers = []

            @property
            def num_layers(self):
                return len(self.layers)

            def get_layer(self, i):
                return self.layers[i]

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                # Layers as TensorRT would see the real graph: ONNX node outputs with their inferred types.
                import onnx

                m = onnx.shape_inference.infer_shapes(onnx.load(path, load_external_data=False))
                types_ = {v.name: v.type.tensor_type.elem_type for v in list(m.graph.value_info) + list(m.graph.output)}
                name = {1: rec.float32, 10: rec.float16}
                self.network.layers = [Layer(n.op_type.upper(), [name.get(types_.get(o), "OTHER") for o in n.output])
                                       for n in m.graph.node]
                rec.calls.append(("parse", Path(path).name))
                return True

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, mn, opt, mx):
                self.shapes[name] = (mn, opt, mx)

        class Cache:
            def serialize(self):
                return b"cache"

        class Config:
            def __init__(self):
                self.flags, self.profiles = set(), []

            def set_memory_pool_limit(self, pool, n):
                rec.calls.append(("workspace", n))

            def set_flag(self, f):
                self.flags.add(f)

            def add_optimization_profile(self, p):
                self.profiles.append(p)

            def create_timing_cache(self, data):
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                pass

            def get_timing_cache(self):
                return Cache()

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                rec.calls.append(("build", sorted(config.flags), [p.shapes for p in config.profiles],
                                  [l for l in network.layers if l.precision == rec.float32]))
                return b"ENGINE"

        self.Builder, self.OnnxParser = Builder, Parser


def test_on_device_builder_sets_two_decoder_profiles_and_pins_fp32_islands(bundle, monkeypatch, capsys):
    work, spec, _ = bundle
    script = work / "engines" / "build_engines.py"
    sys.path.insert(0, str(script.parent))
    try:
        import importlib

        mod = importlib.import_module("build_engines")
    finally:
        sys.path.pop(0)
    trt = _Recorder()
    assert mod.main([], trt=trt) == 0
    # the builder shows the engines stage's device-memory figure (the one plan and report.md show)
    assert f"estimated device memory: {spec['memory']['line']}" in capsys.readouterr().out
    builds = [c for c in trt.calls if c[0] == "build"]
    assert [c[1] for c in trt.calls if c[0] == "parse"] == ["vision.onnx", "decoder.onnx"]
    (vflags, vprof, vpinned), (dflags, dprof, dpinned) = (b[1:] for b in builds)
    assert "FP16" in dflags and "OBEY" in dflags
    assert len(dprof) == 2 and len(vprof) == 1
    for prof, want in zip(dprof, spec["engines"][1]["profiles"]):
        assert prof == {k: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for k, v in want["shapes"].items()}
    # the exporter keeps normalisation/softmax in fp32 inside fp16 graphs: those layers are pinned
    assert dpinned and {"SOFTMAX"} & {l.type for l in dpinned}
    # engines and the timing cache go to the artifact's declared device folder, not engines/
    assert (work / "device" / "decoder.engine").read_bytes() == b"ENGINE"
    assert (work / "device" / "timing.cache").is_file() and not (work / "engines" / "decoder.engine").exists()
    assert ("workspace", OPTS.workspace_mb << 20) in trt.calls
    with pytest.raises(SystemExit, match="TensorRT 10.0.1 found"):
        mod.main([], trt=_Recorder("10.0.1"))


def test_memory_estimate_adds_weights_kv_cache_activations_and_reserve(bundle):
    from medlite.engines.memory import TRT_RESERVE_BYTES
    from medlite.units import human_bytes

    work, spec, result = bundle
    mem = spec["memory"]
    cfg = json.loads((work / "medlite_runtime.json").read_text())
    m = cfg["model"]
    ctx_max = 1 + cfg["num_image_tokens"] + OPTS.max_prompt_tokens + OPTS.max_new_tokens
    assert mem["context_tokens"] == ctx_max == spec["limits"]["max_context_tokens"] and mem["batch"] == OPTS.max_batch
    assert mem["kv_cache_bytes"] == 2 * m["num_layers"] * m["num_kv_heads"] * m["head_dim"] * ctx_max * OPTS.max_batch * 2
    w = mem["weights_detail"]
    assert w["decoder.onnx"] == (work / "decoder.onnx").stat().st_size     # fp16 export → fp16 engine
    assert w["embed_tokens.bin"] == (work / "embed_tokens.bin").stat().st_size and "embed.onnx" not in w
    assert mem["runtime_reserve_bytes"] == TRT_RESERVE_BYTES and mem["activation_bytes"] > 0
    assert mem["total_bytes"] == (mem["weights_bytes"] + mem["kv_cache_bytes"] + mem["activation_bytes"]
                                  + mem["runtime_reserve_bytes"]) and mem["weights_bytes"] == sum(w.values())
    assert mem["fits"] and result.manifest["profiles"] == {"vision": ["default"],
                                                                     "decoder": ["prefill", "decode"]}
    # build_engines.sh shows the same figure in human units (was "0.00 GB" for small models)
    sh = (work / "engines" / "build_engines.sh").read_text()
    assert f"# Estimated device memory: {human_bytes(mem['total_bytes'])} (weights {human_bytes(mem['weights_bytes'])}" in sh
    assert " GB usable" in sh and "0.00 GB" not in sh
