"""The export module swap: each quantized ``Linear`` → a module that traces to ``com.microsoft::MatMulNBits``.

:class:`MatMulNBitsLinear` holds the packed tensors (:mod:`medlite.compress.int4.pack`) as buffers.
In eager mode it computes ``x @ dequant(B)^T`` (the same numbers, for the trace's shapes and for
tests); while the TorchScript exporter traces it, :class:`_MatMulNBitsFn`'s ``symbolic`` emits one
``MatMulNBits`` node whose ``B`` / ``scales`` / ``zero_points`` (/ ``g_idx``) initializers are the
buffers, unchanged — no re-quantization happens at export.

:func:`matmul_nbits_swap` is a ``ModuleSwap`` (medlite/build/contract.py): ``swap(model)`` returns a
context manager that installs the modules for one trace and restores the original Linear layers.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch import nn

from medlite.compress.int4.pack import PackedNBits, dequantize_nbits

MS_DOMAIN = "com.microsoft"


class _MatMulNBitsFn(torch.autograd.Function):
    """``y = x @ W^T`` with ``W`` given by MatMulNBits tensors; exports as ``com.microsoft::MatMulNBits``."""

    @staticmethod
    def forward(ctx, x, B, scales, zero_points, g_idx, weight, K: int, N: int, bits: int, block_size: int):
        return torch.matmul(x, weight.to(x.dtype).t())

    @staticmethod
    def symbolic(g, x, B, scales, zero_points, g_idx, weight, K, N, bits, block_size):
        inputs = [x, B, scales, zero_points]
        if g_idx is not None and not _is_none(g_idx):
            inputs.append(g_idx)
        out = g.op(f"{MS_DOMAIN}::MatMulNBits", *inputs, K_i=K, N_i=N, bits_i=bits, block_size_i=block_size)
        sizes = x.type().varyingSizes() if hasattr(x.type(), "varyingSizes") else None
        if sizes:
            out.setType(x.type().with_sizes(list(sizes[:-1]) + [N]))
        else:
            out.setType(x.type())
        return out


def _is_none(v) -> bool:
    return hasattr(v, "node") and v.node().kind() == "prim::Constant" and v.node().mustBeNone()


class MatMulNBitsLinear(nn.Module):
    """A Linear whose weight is stored as MatMulNBits tensors (bias, if any, is a separate Add)."""

    def __init__(self, packed: PackedNBits, dtype: torch.dtype, bias=None):
        super().__init__()
        self.K, self.N, self.bits, self.block_size = packed.K, packed.N, packed.bits, packed.block_size
        self.register_buffer("B", torch.from_numpy(packed.B.copy()))
        self.register_buffer("scales", torch.from_numpy(packed.scales.astype(np.float32)).to(dtype))
        zp = torch.from_numpy(packed.zero_points.copy())
        # unpacked zero points (written with g_idx) are in the activation dtype, like the scales
        self.register_buffer("zero_points", zp.to(dtype) if zp.is_floating_point() else zp)
        self.register_buffer("g_idx", None if packed.g_idx is None else torch.from_numpy(packed.g_idx.copy()))
        # The dequantized weight only feeds the eager computation; it is not an input of the exported
        # node, so the traced graph does not keep it (pruned as unused).
        self._weight = torch.from_numpy(dequantize_nbits(packed)).to(dtype)
        self.bias = None if bias is None else nn.Parameter(torch.as_tensor(bias).to(dtype), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized ``[N, K]`` weight (code that reads ``lm_head.weight.shape`` keeps working)."""
        return self._weight

    def forward(self, x):
        y = _MatMulNBitsFn.apply(x, self.B, self.scales, self.zero_points, self.g_idx, self._weight,
                                 self.K, self.N, self.bits, self.block_size)
        return y if self.bias is None else y + self.bias


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def matmul_nbits_swap(packed: dict[str, tuple[PackedNBits, object]]):
    """A ``ModuleSwap`` replacing each named Linear (``{name: (PackedNBits, bias or None)}``) while tracing."""

    @contextlib.contextmanager
    def swap(model) -> Iterator[int]:
        dtype = _dtype(model)
        saved = []
        try:
            for name, (p, bias) in packed.items():
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                old = getattr(parent, attr)
                if tuple(old.weight.shape) != (p.N, p.K):
                    raise ValueError(f"{name}: weight {tuple(old.weight.shape)} does not match the quantized "
                                     f"layer ({p.N}, {p.K}); was the model changed after quantization?")
                saved.append((parent, attr, old))
                setattr(parent, attr, MatMulNBitsLinear(p, dtype, bias))
            yield len(saved)
        finally:
            for parent, attr, old in reversed(saved):
                setattr(parent, attr, old)

    return swap


__all__ = ["MS_DOMAIN", "MatMulNBitsLinear", "matmul_nbits_swap"]
