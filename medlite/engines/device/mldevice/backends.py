"""Engine backends behind one interface: TensorRT 8.5 engines, or ONNX Runtime stand-ins of the same graphs.

Both expose what the runtime needs from a TensorRT execution context: the I/O tensor names, the
optimisation profiles (min/opt/max per input), ``select_profile(i)``, ``set_input_shape(name, shape)``
(False when the shape is outside the active profile — TensorRT's ``set_input_shape`` returns False
too), ``bind(name, buffer)`` (``set_tensor_address``) and ``execute()``. Buffers are allocated once
by the caller and bound by address; the stand-in binds host buffers through ONNX Runtime IO binding,
so the whole buffer-binding logic runs on a machine without a GPU.

TensorRT names used here are all in the TensorRT 8.5.2 Python bindings (``trt_api_8_5.json``;
checked by a test with a fake ``tensorrt`` generated from that list).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

class ProfileError(ValueError):
    """An input shape outside the engine's optimisation profile (TensorRT would refuse it too)."""


def profile_problem(bounds: dict, name: str, shape) -> str:
    """Why ``shape`` is outside ``bounds[name]`` ({min, opt, max}), or '' when it fits."""
    b = bounds.get(name)
    if b is None:
        return f"{name}: not an input of this profile"
    lo, hi = list(b["min"]), list(b["max"])
    if len(lo) != len(shape):
        return f"{name}: rank {len(shape)}, profile rank {len(lo)}"
    for axis, (n, mn, mx) in enumerate(zip(shape, lo, hi)):
        if not mn <= n <= mx:
            return f"{name}: dimension {axis} is {n}, profile allows {mn}..{mx}"
    return ""


class HostBuffer:
    """A flat host buffer allocated once; ``view(shape)`` is a view on its first elements."""

    allocations = 0   # class-wide count: tests check nothing is reallocated inside a question

    def __init__(self, nbytes: int, dtype):
        self.dtype = np.dtype(dtype)
        self.array = np.zeros(max(1, nbytes // self.dtype.itemsize), dtype=self.dtype)
        self.nbytes = self.array.nbytes
        HostBuffer.allocations += 1

    def view(self, shape) -> np.ndarray:
        n = int(np.prod(shape))
        if n > self.array.size:
            raise ProfileError(f"buffer of {self.array.size} elements cannot hold shape {tuple(shape)}")
        return self.array[:n].reshape(shape)

    def upload(self, arr: np.ndarray) -> None:
        self.view(arr.shape)[...] = arr

    def download(self, shape) -> np.ndarray:
        return self.view(shape).copy()

    @property
    def address(self) -> int:
        return int(self.array.ctypes.data)


class StandinEngine:
    """ONNX Runtime session of the graph an engine is built from, with the engine's profiles enforced."""

    kind = "standin"

    def __init__(self, onnx_path: Path, profiles: list, *, optimization: str = "all"):
        from mlrt.sessions import open_session

        self.session, self.providers = open_session(Path(onnx_path), ["CPUExecutionProvider"],
                                                    optimization=optimization)
        self.profiles = profiles
        self.profile_names = [p["name"] for p in profiles]
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self._dtypes = {t.name: _ort_dtype(t.type) for t in self.session.get_inputs() + self.session.get_outputs()}
        self.active = 0
        self._shapes: dict = {}
        self._bound: dict = {}

    def dtype(self, name: str):
        return self._dtypes[name]

    def profile_bounds(self, index: int) -> dict:
        return self.profiles[index]["shapes"]

    def select_profile(self, index: int) -> None:
        self.active = int(index)
        self._shapes = {}

    def set_input_shape(self, name: str, shape) -> bool:
        if profile_problem(self.profile_bounds(self.active), name, list(shape)):
            return False
        self._shapes[name] = tuple(int(d) for d in shape)
        return True

    def bind(self, name: str, buffer, shape) -> None:
        """Bind ``buffer`` (a :class:`HostBuffer`) for tensor ``name`` with ``shape`` (set_tensor_address)."""
        self._bound[name] = (buffer, tuple(int(d) for d in shape))

    def execute(self) -> None:
        missing = [n for n in self.inputs if n not in self._shapes]
        if missing:
            raise ProfileError(f"input shape(s) not set: {', '.join(missing)}")
        io = self.session.io_binding()
        for name in self.inputs + self.outputs:
            buf, shape = self._bound[name]
            arr = buf.view(shape)
            if name in self.inputs:
                io.bind_input(name, "cpu", 0, arr.dtype, list(shape), arr.ctypes.data)
            else:
                io.bind_output(name, "cpu", 0, arr.dtype, list(shape), arr.ctypes.data)
        self.session.run_with_iobinding(io)


def _ort_dtype(t: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
            "tensor(int64)": np.int64, "tensor(int8)": np.int8, "tensor(bool)": np.bool_}[t]


class CudaBuffer:
    """Device memory allocated once (cuda-python ``cudart``), with explicit host copies."""

    allocations = 0

    def __init__(self, nbytes: int, dtype, cudart, stream):
        self.dtype, self.nbytes, self.cudart, self.stream = np.dtype(dtype), max(256, int(nbytes)), cudart, stream
        err, self.ptr = cudart.cudaMalloc(self.nbytes)
        _check(cudart, err, "cudaMalloc")
        CudaBuffer.allocations += 1

    @property
    def address(self) -> int:
        return int(self.ptr)

    def upload(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        if arr.nbytes > self.nbytes:
            raise ProfileError(f"buffer of {self.nbytes} bytes cannot hold {arr.nbytes}")
        (err,) = self.cudart.cudaMemcpyAsync(self.ptr, arr.ctypes.data, arr.nbytes,
                                             self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream)
        _check(self.cudart, err, "cudaMemcpyAsync")
        (err,) = self.cudart.cudaStreamSynchronize(self.stream)   # arr may be freed after return
        _check(self.cudart, err, "cudaStreamSynchronize")

    def download(self, shape) -> np.ndarray:
        out = np.empty(shape, dtype=self.dtype)
        (err,) = self.cudart.cudaMemcpyAsync(out.ctypes.data, self.ptr, out.nbytes,
                                             self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream)
        _check(self.cudart, err, "cudaMemcpyAsync")
        (err,) = self.cudart.cudaStreamSynchronize(self.stream)
        _check(self.cudart, err, "cudaStreamSynchronize")
        return out


def _check(cudart, err, what: str) -> None:
    if int(err) != 0:
        raise RuntimeError(f"CUDA {what} failed: {err}")


def load_cuda():
    """``(cudart, stream)`` from cuda-python; a clear message when it is missing."""
    try:
        from cuda import cudart
    except ImportError:
        raise SystemExit("cuda-python is missing: pip3 install cuda-python==11.8.1 (see README.md), "
                         "or run with --standin (ONNX Runtime, no GPU)") from None
    err, stream = cudart.cudaStreamCreate()
    _check(cudart, err, "cudaStreamCreate")
    return cudart, stream


class TrtEngine:
    """A deserialized TensorRT 8.5 engine and ONE execution context (profiles switched per call)."""

    kind = "tensorrt"

    def __init__(self, engine_path: Path, profiles: list, trt, cuda):
        self.trt, (self.cudart, self.stream) = trt, cuda
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        # (tensorrt.nptype maps bool to np.bool at 8.5.2, which fails on numpy >= 1.24: the table below is ours)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise SystemExit(f"{engine_path}: TensorRT could not load the engine (built by another TensorRT "
                             "version or GPU? rebuild it: python3 medlite_device.py build)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        np_types = {trt.float32: np.float32, trt.float16: np.float16, trt.int8: np.int8, trt.int32: np.int32,
                    trt.bool: np.bool_}
        self._dtypes = {n: np_types[self.engine.get_tensor_dtype(n)] for n in names}
        self.profile_names = [p["name"] for p in profiles]
        if self.engine.num_optimization_profiles != len(profiles):
            raise SystemExit(f"{engine_path}: {self.engine.num_optimization_profiles} optimisation profile(s), "
                             f"engines.json lists {len(profiles)}: rebuild the engine")
        # Profile bounds as the engine reports them (get_tensor_profile_shape: [min, opt, max]).
        self.profiles = []
        for i, p in enumerate(profiles):
            shapes = {}
            for n in self.inputs:
                mn, opt, mx = self.engine.get_tensor_profile_shape(n, i)
                shapes[n] = {"min": list(mn), "opt": list(opt), "max": list(mx)}
            self.profiles.append({"name": p["name"], "shapes": shapes})
        self.active = 0

    def dtype(self, name: str):
        return self._dtypes[name]

    def profile_bounds(self, index: int) -> dict:
        return self.profiles[index]["shapes"]

    def select_profile(self, index: int) -> None:
        self.context.set_optimization_profile_async(int(index), int(self.stream))
        self.active = int(index)

    def set_input_shape(self, name: str, shape) -> bool:
        return bool(self.context.set_input_shape(name, tuple(int(d) for d in shape)))

    def bind(self, name: str, buffer, shape) -> None:
        if not self.context.set_tensor_address(name, buffer.address):
            raise RuntimeError(f"TensorRT refused the address of {name}")

    def execute(self) -> None:
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the log above)")
        (err,) = self.cudart.cudaStreamSynchronize(self.stream)
        _check(self.cudart, err, "cudaStreamSynchronize")


def read_engines_spec(folder: Path) -> dict:
    """``engines/engines.json`` of the artifact."""
    return json.loads((Path(folder) / "engines" / "engines.json").read_text(encoding="utf-8"))
