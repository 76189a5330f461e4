"""A fake ``tensorrt`` 8.5.2 for tests, generated from medlite/data/tensorrt-8.5-python-api-used.json.

Strict: every module attribute, class member, class attribute and enum value is checked against that
file (TensorRT 8.5.2's own binding names), and anything else raises ``AttributeError`` — as the real
8.5.2 bindings on a Jetson would. Writes to read-only properties raise too. Behind the names, a small
emulation: the "builder" serializes the ONNX path and the profiles it was given; the "runtime" runs
that ONNX graph on ONNX Runtime (CPU) with the profiles enforced and tensors read from / written to
the addresses bound with ``set_tensor_address`` (host memory from the fake ``cuda.cudart`` next to
this package). Python 3.8 compatible. Set ``MEDLITE_TRT_API`` to the data file's path.
"""
import ctypes
import json
import os
from pathlib import Path

import numpy as np

_API = json.loads(Path(os.environ["MEDLITE_TRT_API"]).read_text(encoding="utf-8"))
__version__ = "8.5.2.2"
CALLS = []          # (class, member) of every checked access: tests assert on them


def _members(cls):
    c = _API["classes"][cls]
    out = set(c.get("methods", [])) | set(c.get("properties", [])) | set(c.get("class_attributes", []))
    for b in c.get("bases", []):
        out |= _members(b)
    return out


def _access(cls, name):
    c = _API["classes"][cls]
    if name in c.get("property_access", {}):
        return c["property_access"][name]
    for b in c.get("bases", []):
        a = _access(b, name)
        if a:
            return a
    return None


class _EnumValue:
    def __init__(self, enum, name, value):
        self.enum, self.name, self.value = enum, name, value

    def __int__(self):
        return self.value

    def __index__(self):
        return self.value

    def __repr__(self):
        return f"{self.enum}.{self.name}"


class _Enum:
    def __init__(self, name, values):
        self._name, self._values = name, {v: _EnumValue(name, v, i) for i, v in enumerate(values)}

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in self._values:
            raise AttributeError(f"tensorrt 8.5.2: {self._name} has no value {name!r}")
        CALLS.append((self._name, name))
        return self._values[name]


def _wrap(v):
    if hasattr(v, "_trt_class"):
        return _Strict(v, v._trt_class)
    if callable(v) and not isinstance(v, (type, _EnumValue)):
        def call(*a, **k):
            return _wrap(v(*a, **k))
        return call
    return v


def _unwrap(v):
    return object.__getattribute__(v, "_o") if isinstance(v, _Strict) else v


class _Strict:
    """An instance of API class ``cls``: only its 8.5.2 members are reachable."""

    def __init__(self, obj, cls):
        object.__setattr__(self, "_o", obj)
        object.__setattr__(self, "_c", cls)

    def __getattr__(self, name):
        cls = object.__getattribute__(self, "_c")
        if name not in _members(cls):
            raise AttributeError(f"tensorrt 8.5.2: {cls} has no attribute {name!r}")
        CALLS.append((cls, name))
        return _wrap(getattr(object.__getattribute__(self, "_o"), name))

    def __setattr__(self, name, value):
        cls = object.__getattribute__(self, "_c")
        if _access(cls, name) not in ("rw", "w"):
            raise AttributeError(f"tensorrt 8.5.2: {cls}.{name} is not writable")
        CALLS.append((cls, name))
        setattr(object.__getattribute__(self, "_o"), name, _unwrap(value))

    def __bytes__(self):
        return bytes(object.__getattribute__(self, "_o"))


class _Class:
    """An API class object: constructor + class attributes (e.g. ``Logger.WARNING``)."""

    def __init__(self, name, impl):
        self._name, self._impl = name, impl

    def __call__(self, *a, **k):
        return _Strict(self._impl(*[_unwrap(x) for x in a], **k), self._name)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in _API["classes"][self._name].get("class_attributes", []):
            raise AttributeError(f"tensorrt 8.5.2: {self._name} has no class attribute {name!r}")
        CALLS.append((self._name, name))
        return getattr(self._impl, name)


ENUMS = {e: _Enum(e, v) for e, v in _API["enums"].items()}
_DT = ENUMS["DataType"]._values
_ATTRS = {"float32": _DT["FLOAT"], "float16": _DT["HALF"], "int8": _DT["INT8"], "int32": _DT["INT32"],
          "bool": _DT["BOOL"]}
_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_}
_ORT_TYPES = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int32)": "INT32", "tensor(int8)": "INT8",
              "tensor(bool)": "BOOL"}


# -- behaviour ----------------------------------------------------------------------------------
class _Logger:
    _trt_class = "Logger"
    WARNING, ERROR, INFO, VERBOSE, INTERNAL_ERROR = 2, 1, 3, 4, 0

    def __init__(self, severity=2):
        self.min_severity = severity


class _Tensor:
    _trt_class = "ITensor"

    def __init__(self, dtype):
        self.dtype = dtype


class _Layer:
    _trt_class = "ILayer"

    def __init__(self, kind, dtype):
        self.type, self.num_outputs, self.precision = ENUMS["LayerType"]._values[kind], 1, _DT["FLOAT"]
        self._out = [_Tensor(dtype)]

    def get_output(self, i):
        return self._out[i]

    def set_output_type(self, i, dtype):
        self._out[i].dtype = dtype


class _Network:
    _trt_class = "INetworkDefinition"

    def __init__(self):
        self.layers, self.onnx = [_Layer("SOFTMAX", _DT["FLOAT"]), _Layer("MATRIX_MULTIPLY", _DT["HALF"])], None

    @property
    def num_layers(self):
        return len(self.layers)

    def get_layer(self, i):
        return self.layers[i]


class _Parser:
    _trt_class = "OnnxParser"
    num_errors = 0

    def __init__(self, network, logger):
        self.network = network

    def parse_from_file(self, path):
        self.network.onnx = str(path)
        return Path(path).is_file()


class _Profile:
    _trt_class = "IOptimizationProfile"

    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, mn, opt, mx):
        self.shapes[name] = {"min": list(mn), "opt": list(opt), "max": list(mx)}


class _Cache:
    _trt_class = "ITimingCache"

    def serialize(self):
        return b"TIMING"


class _Config:
    _trt_class = "IBuilderConfig"

    def __init__(self):
        self.flags_set, self.profiles, self.pools = set(), [], {}

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool.name] = size

    def set_flag(self, flag):
        self.flags_set.add(flag.name)

    def add_optimization_profile(self, p):
        self.profiles.append(_unwrap(p))
        return len(self.profiles) - 1

    def create_timing_cache(self, data):
        return _Cache()

    def set_timing_cache(self, cache, ignore_mismatch):
        return True

    def get_timing_cache(self):
        return _Cache()


class _Builder:
    _trt_class = "Builder"

    def __init__(self, logger):
        pass

    def create_network(self, flags):
        return _Network()

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        return json.dumps({"fake_tensorrt_engine": 1, "onnx": _unwrap(network).onnx,
                           "flags": sorted(_unwrap(config).flags_set),
                           "profiles": [p.shapes for p in _unwrap(config).profiles]}).encode()


class _Engine:
    _trt_class = "ICudaEngine"

    def __init__(self, spec):
        import onnxruntime as ort

        self.spec = spec
        opts = ort.SessionOptions()
        quantized = b"DequantizeLinear" in Path(spec["onnx"]).read_bytes()
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if quantized
                                         else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        self.session = ort.InferenceSession(spec["onnx"], sess_options=opts, providers=["CPUExecutionProvider"])
        self.io = [(t.name, "INPUT", t.type) for t in self.session.get_inputs()] + \
                  [(t.name, "OUTPUT", t.type) for t in self.session.get_outputs()]

    @property
    def num_io_tensors(self):
        return len(self.io)

    @property
    def num_optimization_profiles(self):
        return len(self.spec["profiles"])

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return ENUMS["TensorIOMode"]._values[next(m for n, m, _ in self.io if n == name)]

    def get_tensor_dtype(self, name):
        return _DT[_ORT_TYPES[next(t for n, _, t in self.io if n == name)]]

    def get_tensor_profile_shape(self, name, index):
        s = self.spec["profiles"][index][name]
        return [tuple(s["min"]), tuple(s["opt"]), tuple(s["max"])]

    def create_execution_context(self):
        return _Context(self)


def _host_array(ptr, dtype, shape):
    from cuda import cudart

    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    cudart._check_range(ptr, n, strict=True)
    raw = (ctypes.c_uint8 * max(n, 1)).from_address(ptr)
    return np.frombuffer(raw, dtype=np.uint8, count=n).view(dtype).reshape(shape)


class _Context:
    _trt_class = "IExecutionContext"
    SWITCHES = []

    def __init__(self, engine):
        self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}

    def set_optimization_profile_async(self, index, stream):
        _Context.SWITCHES.append(int(index))
        self.profile, self.shapes = int(index), {}
        return True

    def set_input_shape(self, name, shape):
        b = self.engine.spec["profiles"][self.profile].get(name)
        if b is None or len(b["min"]) != len(shape) or any(
                not lo <= n <= hi for n, lo, hi in zip(shape, b["min"], b["max"])):
            return False
        self.shapes[name] = tuple(int(d) for d in shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream):
        eng = self.engine
        feed = {}
        for name, mode, t in eng.io:
            if mode == "INPUT":
                feed[name] = _host_array(self.addresses[name], _NP[_ORT_TYPES[t]], self.shapes[name]).copy()
        outs = eng.session.run([n for n, m, _ in eng.io if m == "OUTPUT"], feed)
        for (name, mode, t), arr in zip([x for x in eng.io if x[1] == "OUTPUT"], outs):
            _host_array(self.addresses[name], arr.dtype, arr.shape)[...] = arr
        return True


class _Runtime:
    _trt_class = "Runtime"

    def __init__(self, logger):
        pass

    def deserialize_cuda_engine(self, data):
        spec = json.loads(bytes(data).decode())
        return _Engine(spec) if spec.get("fake_tensorrt_engine") == 1 else None


_IMPL = {"Logger": _Logger, "Builder": _Builder, "OnnxParser": _Parser, "Runtime": _Runtime}


def __getattr__(name):
    if name in _ATTRS:
        return _ATTRS[name]
    if name in ENUMS:
        return ENUMS[name]
    if name in _API["classes"]:
        if name not in _IMPL:
            raise NotImplementedError(f"fake tensorrt: {name} exists in 8.5.2 but is not emulated")
        return _Class(name, _IMPL[name])
    raise AttributeError(f"tensorrt 8.5.2 has no attribute {name!r} (per {os.environ['MEDLITE_TRT_API']})")
