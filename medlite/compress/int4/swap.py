"""Linear layers stored as ``com.microsoft::MatMulNBits`` tensors, traced to that op.

:class:`MatMulNBitsLinear` holds the packed tensors (:mod:`medlite.compress.int4.pack`) as buffers and
nothing else: no fp32 weight. In eager mode it dequantizes its weight for the call (the same float32
arithmetic as the quantizer's fake-quant weights, so the numbers are identical) and frees it again;
while the TorchScript exporter traces it, :class:`_MatMulNBitsFn`'s ``symbolic`` emits one
``MatMulNBits`` node whose ``B`` / ``scales`` / ``zero_points`` (/ ``g_idx``) initializers are the
buffers, unchanged — no re-quantization happens at export — and the forward only has to produce the
output's shape, so nothing is dequantized during the trace. Keeping a dequantized fp32 copy in every
module made the full-size export hold the language model's weights twice (4.4 GB more; measured in
``benchmarks/int4_full_size.py``).

:func:`install_matmul_nbits` replaces a Linear for good (the quantize stage does it, so the working
model drops its fp32 weights once they are packed); :func:`matmul_nbits_swap` is a ``ModuleSwap``
(medlite/pipeline/contract.py): ``swap(model)`` installs the modules for one trace and restores the
original Linear layers (layers that already are MatMulNBits modules are left as they are).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch import nn

from medlite.compress.int4.pack import PackedNBits

MS_DOMAIN = "com.microsoft"


class _MatMulNBitsFn(torch.autograd.Function):
    """``y = x @ W^T`` with ``W`` given by MatMulNBits tensors; exports as ``com.microsoft::MatMulNBits``."""

    @staticmethod
    def forward(ctx, x, B, scales, zero_points, g_idx, K: int, N: int, bits: int, block_size: int):
        if torch.onnx.is_in_onnx_export():
            # the exporter only needs the output's shape and dtype: the node comes from `symbolic`
            return x.new_zeros(*x.shape[:-1], N)
        w = dequantize_torch(B, scales, zero_points, g_idx, K=K, N=N, bits=bits, block_size=block_size)
        return torch.matmul(x, w.to(x.dtype).t())

    @staticmethod
    def symbolic(g, x, B, scales, zero_points, g_idx, K, N, bits, block_size):
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


def _unpack_torch(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 bytes along the last axis → the first ``count`` unsigned values (4 bits: low nibble first)."""
    if bits == 8:
        return packed[..., :count]
    both = torch.stack((packed & 0x0F, packed >> 4), dim=-1)
    return both.reshape(*packed.shape[:-1], -1)[..., :count]


def dequantize_torch(B, scales, zero_points, g_idx, *, K: int, N: int, bits: int, block_size: int) -> torch.Tensor:
    """``[N, K]`` float32 ``(q - zp) * scale`` from MatMulNBits tensors (torch twin of
    :func:`medlite.compress.int4.pack.dequantize_nbits`: the same float32 operations, the same bits)."""
    nb = -(-K // block_size)
    q = _unpack_torch(B.reshape(N, nb, -1), bits, block_size).reshape(N, nb * block_size)[:, :K]
    if zero_points.is_floating_point():          # unpacked zero points (written with g_idx)
        zp = torch.round(zero_points.double()).reshape(N, nb)
    else:
        zp = _unpack_torch(zero_points.reshape(N, -1), bits, nb)
    g = g_idx.long() if g_idx is not None else torch.arange(K) // block_size
    return (q.float() - zp.float()[:, g]) * scales.float().reshape(N, nb)[:, g]


class MatMulNBitsLinear(nn.Module):
    """A Linear whose weight is stored only as MatMulNBits tensors (bias, if any, is a separate Add)."""

    def __init__(self, packed: PackedNBits, dtype: torch.dtype, bias=None):
        super().__init__()
        self.K, self.N, self.bits, self.block_size = packed.K, packed.N, packed.bits, packed.block_size
        self.in_features, self.out_features = packed.K, packed.N
        self.register_buffer("B", torch.from_numpy(np.ascontiguousarray(packed.B)))   # shares the packed bytes
        self.register_buffer("scales", torch.from_numpy(packed.scales.astype(np.float32)).to(dtype))
        zp = torch.from_numpy(np.array(packed.zero_points))
        # unpacked zero points (written with g_idx) are in the activation dtype, like the scales
        self.register_buffer("zero_points", zp.to(dtype) if zp.is_floating_point() else zp)
        self.register_buffer("g_idx", None if packed.g_idx is None else torch.from_numpy(np.array(packed.g_idx)))
        self.bias = None if bias is None else nn.Parameter(torch.as_tensor(bias).to(dtype), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized ``[N, K]`` weight, computed on each access (code that reads
        ``lm_head.weight.shape`` keeps working; nothing keeps it)."""
        return dequantize_torch(self.B, self.scales, self.zero_points, self.g_idx, K=self.K, N=self.N,
                                bits=self.bits, block_size=self.block_size).to(self.scales.dtype)

    def forward(self, x):
        y = _MatMulNBitsFn.apply(x, self.B, self.scales, self.zero_points, self.g_idx,
                                 self.K, self.N, self.bits, self.block_size)
        return y if self.bias is None else y + self.bias


def _parent(model, name: str) -> tuple:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def install_matmul_nbits(model, name: str, packed: PackedNBits, bias=None, dtype=None) -> nn.Module:
    """Replace the Linear ``name`` of ``model`` by a :class:`MatMulNBitsLinear` for good; returns the old module.

    The old module's weight is freed when the caller drops it. ``dtype``: the activation dtype
    (default: the old weight's).
    """
    parent, attr = _parent(model, name)
    old = getattr(parent, attr)
    shape = (old.out_features, old.in_features)       # nn.Linear, or a padded layer during quantization
    if shape != (packed.N, packed.K):
        raise ValueError(f"{name}: weight {shape} does not match the quantized "
                         f"layer ({packed.N}, {packed.K}); was the model changed after quantization?")
    dtype = dtype or next(old.parameters()).dtype
    setattr(parent, attr, MatMulNBitsLinear(packed, dtype, bias))
    return old


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def matmul_nbits_swap(packed: dict[str, tuple[PackedNBits, object]]):
    """A ``ModuleSwap`` replacing each named Linear (``{name: (PackedNBits, bias or None)}``) while tracing.

    Layers that already are :class:`MatMulNBitsLinear` (the quantize stage installs them for good)
    are left in place.
    """

    @contextlib.contextmanager
    def swap(model) -> Iterator[int]:
        dtype = _dtype(model)
        saved = []
        try:
            for name, (p, bias) in packed.items():
                parent, attr = _parent(model, name)
                if isinstance(getattr(parent, attr), MatMulNBitsLinear):
                    continue
                saved.append((parent, attr, install_matmul_nbits(model, name, p, bias, dtype)))
            yield len(saved)
        finally:
            for parent, attr, old in reversed(saved):
                setattr(parent, attr, old)

    return swap


__all__ = ["MS_DOMAIN", "MatMulNBitsLinear", "dequantize_torch", "install_matmul_nbits", "matmul_nbits_swap"]
