"""Pack a quantizer's integers, scales and zero points into ``com.microsoft::MatMulNBits`` tensors, and back.

Layout (onnxruntime's contrib-op spec, docs/ContribOperators.md "com.microsoft.MatMulNBits", and the
packer onnxruntime-genai's model builder uses for GPTQ/AWQ checkpoints):

* ``B``: uint8 ``[N, n_blocks, block_size * bits / 8]``, ``n_blocks = ceil(K / block_size)``; for
  4 bits two values per byte, the even K index in the low nibble. The last block of a K that is not
  a multiple of ``block_size`` is padded with the block's zero point (dequantizes to exactly 0).
* ``scales``: ``[N * n_blocks]`` in the activation dtype.
* ``zero_points``: uint8 ``[N * ceil(n_blocks * bits / 8)]`` (4 bits: two blocks per byte, low nibble
  first). Always written, even for symmetric quantization (all ``2^(bits-1)``), so the graph carries
  the quantizer's zero points explicitly.
* ``g_idx`` (int32 ``[K]``) only when input columns are not in contiguous groups.

numpy only (no torch), so the packer and its inverse can be tested against each other and used by
tools that never import torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class PackedNBits:
    """The MatMulNBits initializers and attributes of one Linear."""

    B: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    K: int
    N: int
    bits: int
    block_size: int
    g_idx: Optional[np.ndarray] = None

    @property
    def n_blocks(self) -> int:
        return -(-self.K // self.block_size)

    def nbytes(self) -> int:
        """Bytes of the packed weights, scales and zero points (what a decode step reads)."""
        return int(self.B.nbytes + self.scales.nbytes + self.zero_points.nbytes
                   + (self.g_idx.nbytes if self.g_idx is not None else 0))


def _pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ints along the last axis → bytes (4 bits: pairs, low nibble first; 8 bits: as is)."""
    v = values.astype(np.uint8)
    if bits == 8:
        return v
    if bits != 4:
        raise ValueError(f"MatMulNBits packing supports 4 or 8 bits, not {bits}")
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (v[..., 0::2] & 0x0F) | ((v[..., 1::2] & 0x0F) << 4)


def _unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`_pack_bits`: the first ``count`` values along the last axis."""
    if bits == 8:
        return packed[..., :count].astype(np.int16)
    low, high = packed & 0x0F, packed >> 4
    out = np.stack([low, high], axis=-1).reshape(packed.shape[:-1] + (-1,))
    return out[..., :count].astype(np.int16)


def pack_matmul_nbits(qweight: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, *, bits: int,
                      block_size: int, dtype=np.float32, g_idx: Optional[np.ndarray] = None) -> PackedNBits:
    """Pack unsigned integers ``qweight [N, K]`` with per-group ``scales``/``zero_points [N, n_blocks]``.

    Nothing is re-quantized: the integers, scales and zero points are stored as given (scales cast
    to ``dtype``, the activation dtype of the graph).
    """
    q = np.asarray(qweight)
    n, k = q.shape
    nb = -(-k // block_size)
    zp = np.asarray(zero_points).astype(np.int64)
    sc = np.asarray(scales)
    if sc.shape != (n, nb) or zp.shape != (n, nb):
        raise ValueError(f"scales {sc.shape} / zero_points {zp.shape}: expected ({n}, {nb}) for K={k}, "
                         f"block_size={block_size}")
    if q.min() < 0 or q.max() >= (1 << bits) or zp.min() < 0 or zp.max() >= (1 << bits):
        raise ValueError(f"integers outside 0..{(1 << bits) - 1}")
    padded = np.repeat(zp, block_size, axis=1).astype(np.int64)     # pad value: the block's zero point
    padded[:, :k] = q
    blocks = padded.reshape(n, nb, block_size)
    B = _pack_bits(blocks, bits)
    zp_packed = _pack_bits(zp, bits).reshape(-1)
    gi = None if g_idx is None else np.asarray(g_idx, dtype=np.int32)
    return PackedNBits(B=np.ascontiguousarray(B), scales=sc.astype(dtype).reshape(-1), zero_points=zp_packed,
                       K=k, N=n, bits=bits, block_size=block_size, g_idx=gi)


def unpack_matmul_nbits(B: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, *, K: int, N: int, bits: int,
                        block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits initializers → ``(qweight [N, K], scales [N, n_blocks], zero_points [N, n_blocks])``."""
    nb = -(-K // block_size)
    q = _unpack_bits(np.asarray(B).reshape(N, nb, -1), bits, block_size).reshape(N, nb * block_size)[:, :K]
    sc = np.asarray(scales).reshape(N, nb)
    zp = _unpack_bits(np.asarray(zero_points).reshape(N, -1), bits, nb)
    return q, sc, zp


def dequantize_nbits(p: PackedNBits) -> np.ndarray:
    """``[N, K]`` float32 weights ``(q - zp) * scale`` from packed tensors (reference for tests)."""
    q, sc, zp = unpack_matmul_nbits(p.B, p.scales, p.zero_points, K=p.K, N=p.N, bits=p.bits,
                                    block_size=p.block_size)
    g = p.g_idx if p.g_idx is not None else np.arange(p.K) // p.block_size
    return (q.astype(np.float32) - zp[:, g].astype(np.float32)) * sc.astype(np.float32)[:, g]


__all__ = ["PackedNBits", "dequantize_nbits", "pack_matmul_nbits", "unpack_matmul_nbits"]
