"""A fake ``cuda.cudart`` (cuda-python 11.8): "device" memory is host memory, bounds-checked.

Every ``cudaMemcpyAsync`` and every tensor the fake TensorRT reads or writes must lie inside one
allocation, so an undersized buffer fails the test instead of corrupting memory. Python 3.8 compatible.
"""
import ctypes
import enum

import numpy as np

_ALLOCS = {}      # address -> numpy uint8 array (kept alive here)
MALLOCS = []      # sizes of every cudaMalloc (tests: nothing is allocated per token)


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


def _check_range(ptr, n, strict=False):
    """``n`` bytes at ``ptr`` must lie inside one allocation (``strict``: ptr must be device memory)."""
    for base, arr in _ALLOCS.items():
        if base <= ptr and ptr + n <= base + arr.nbytes:
            return
    if strict or any(base <= ptr < base + arr.nbytes for base, arr in _ALLOCS.items()):
        raise MemoryError(f"fake cudart: {n} bytes at {ptr:#x} are not inside one cudaMalloc allocation")


def cudaMalloc(n):
    arr = np.zeros(int(n), dtype=np.uint8)
    ptr = int(arr.ctypes.data)
    _ALLOCS[ptr] = arr
    MALLOCS.append(int(n))
    return cudaError_t.cudaSuccess, ptr


def cudaStreamCreate():
    return cudaError_t.cudaSuccess, 1


def cudaStreamSynchronize(stream):
    return (cudaError_t.cudaSuccess,)


def cudaMemcpyAsync(dst, src, n, kind, stream):
    if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
        _check_range(int(dst), int(n))
    else:
        _check_range(int(src), int(n))
    ctypes.memmove(int(dst), int(src), int(n))
    return (cudaError_t.cudaSuccess,)
