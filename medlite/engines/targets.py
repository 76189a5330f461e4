"""Deployment targets: what each Jetson Xavier module can run, checked when a recipe is validated.

Every number here comes from a public source (see docs/targets.md): the Jetson AGX Xavier and
Xavier NX data sheets (memory, bandwidth), JetPack 5.1.x (the last JetPack for Xavier: CUDA 11.4,
TensorRT 8.5.2) and the onnx-tensorrt 8.5-GA operator table (max opset 17, no LayerNormalization).

``usable_memory_gb`` is a planning budget, not a data-sheet number: Xavier's memory is shared by
the CPU and GPU, and Ubuntu + the CUDA/TensorRT context take several GB, so a model has to fit
in what is left. The values are deliberately conservative.

The module is torch-free and cheap to import (the validator and ``medlite plan`` use it).
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field

# Why int4 never reaches a TensorRT 8.5 engine; shown in validation errors and warnings.
INT4_EXPLANATION = (
    "TensorRT 8.5 (the last TensorRT for Jetson Xavier) has no INT4; INT4 weight-only layers run only "
    "through ONNX Runtime's MatMulNBits operator, which needs onnxruntime >= 1.17 built with CUDA for "
    "sm_72 (prebuilt JetPack 5 wheels stop near 1.16, so build it from source on the device)")


@dataclass(frozen=True)
class Target:
    """One deployment target and its capabilities."""

    name: str
    description: str
    arch: str                        # CUDA compute capability, e.g. "sm_72"
    jetpack: str
    tensorrt: str
    cuda: str
    max_opset: int                   # highest ONNX opset the TensorRT parser accepts
    trt_precisions: tuple[str, ...]  # precisions a TensorRT engine can use
    ort_precisions: tuple[str, ...]  # precisions only ONNX Runtime can run (with the caveat above)
    unsupported_ops: tuple[str, ...]  # ONNX ops the TensorRT parser rejects although the opset allows them
    memory_gb: float                 # physical memory (shared CPU + GPU)
    usable_memory_gb: float          # planning budget for one model's weights + KV cache + activations
    bandwidth_gbs: float             # peak memory bandwidth, GB/s
    dla_cores: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        """JSON-able description (goes into manifests and reports)."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def supports_trt(self, precision: str) -> bool:
        """Whether a TensorRT engine on this target can run ``precision`` (fp32/fp16/int8/int4)."""
        return precision in self.trt_precisions


def _xavier(name: str, description: str, memory: float, usable: float, bandwidth: float,
            notes: tuple[str, ...] = ()) -> Target:
    # Every Xavier module shares the Volta GPU (sm_72), JetPack 5.1.x and the TensorRT 8.5.2 parser.
    return Target(
        name=name, description=description, arch="sm_72", jetpack="5.1.x", tensorrt="8.5.2", cuda="11.4",
        max_opset=17, trt_precisions=("fp32", "fp16", "int8"), ort_precisions=("int4",),
        unsupported_ops=("LayerNormalization",), memory_gb=memory, usable_memory_gb=usable,
        bandwidth_gbs=bandwidth, dla_cores=2,
        notes=("TensorRT engines are not portable: build them on the device itself",
               "no 2:4 sparsity speed-up on Volta",) + notes)


def _cpu(name: str, description: str, arch: str, memory: float, usable: float, bandwidth: float) -> Target:
    # CPU-only clinics (a laptop, no GPU): ONNX Runtime's CPU EP runs everything, no TensorRT, no
    # engines stage. Memory/bandwidth are planning assumptions for a common machine of the class
    # (docs/cpu.md), not a data sheet: dual-channel DDR4-3200 (51.2 GB/s) for x86-64, LPDDR4X for arm64.
    return Target(name=name, description=description, arch=arch, jetpack="-", tensorrt="none", cuda="-",
                  max_opset=17, trt_precisions=(), ort_precisions=("fp32", "int8", "int4"), unsupported_ops=(),
                  memory_gb=memory, usable_memory_gb=usable, bandwidth_gbs=bandwidth,
                  notes=("ONNX Runtime CPU execution provider only (MLAS kernels); no TensorRT engines",
                         "fp16 graphs are slow on CPU: use fp32, int8 or int4 (docs/cpu.md)"))


TARGETS: dict[str, Target] = {t.name: t for t in (
    _xavier("jetson-xavier-agx-32gb", "Jetson AGX Xavier 32 GB", 32.0, 28.0, 137.0),
    _xavier("jetson-xavier-agx-64gb", "Jetson AGX Xavier 64 GB", 64.0, 58.0, 137.0),
    _xavier("jetson-xavier-nx-8gb", "Jetson Xavier NX 8 GB", 8.0, 5.5, 51.2,
            ("the desktop session alone takes ~1 GB: run headless",)),
    _xavier("jetson-xavier-nx-16gb", "Jetson Xavier NX 16 GB", 16.0, 13.0, 51.2),
    _cpu("cpu-x86_64", "x86-64 laptop or desktop, 8 GB RAM, no GPU", "x86_64", 8.0, 5.0, 51.2),
    _cpu("cpu-arm64", "arm64 laptop or single-board computer, 8 GB RAM, no GPU", "arm64", 8.0, 5.0, 17.0),
)}


def get_target(name: str) -> Target:
    """The target called ``name``; ``KeyError`` with close matches in its message otherwise."""
    try:
        return TARGETS[name]
    except KeyError:
        raise KeyError(unknown_target_message(name)) from None


def unknown_target_message(name: str) -> str:
    """``unknown target 'x' (did you mean 'y'?); known: ...`` for error messages."""
    close = difflib.get_close_matches(str(name), list(TARGETS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown target '{name}'{hint}; known targets: {', '.join(TARGETS)}"
