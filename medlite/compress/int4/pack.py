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
* ``g_idx`` (int32 ``[K]``, the group of each input column) only when the columns are not in
  contiguous groups (GPTQ "group"/"dynamic" act-order). Measured on onnxruntime 1.32's CPU kernel
  (tests/compress/int4/test_int4_g_idx.py): with ``g_idx`` it takes its unpacked dequantize path,
  which only supports 4 bits and **ignores packed uint8 zero points** (it silently uses the default
  ``2^(bits-1)``: relative output error 0.5-1.0), but is exact with zero points given unpacked in the
  activation dtype (``[N * n_blocks]``). So a ``g_idx`` layer is written with float zero points, and
  a trivial ``g_idx`` (``arange(K) // block_size``) is dropped so contiguous layers keep the packed
  MLAS fast path.

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


def contiguous_g_idx(g_idx: Optional[np.ndarray], k: int, block_size: int) -> Optional[np.ndarray]:
    """``g_idx`` as int32, or None when it is absent or trivial (column ``j`` in group ``j // block_size``)."""
    if g_idx is None:
        return None
    g = np.asarray(g_idx).astype(np.int32).reshape(-1)
    if g.shape != (k,):
        raise ValueError(f"g_idx has {g.size} entries, expected K={k}")
    return None if np.array_equal(g, np.arange(k) // block_size) else g


def pack_matmul_nbits(qweight: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, *, bits: int,
                      block_size: int, dtype=np.float32, g_idx: Optional[np.ndarray] = None) -> PackedNBits:
    """Pack unsigned integers ``qweight [N, K]`` with per-group ``scales``/``zero_points [N, n_blocks]``.

    Nothing is re-quantized: the integers, scales and zero points are stored as given (scales cast
    to ``dtype``, the activation dtype of the graph). With a non-trivial ``g_idx`` (column ``j`` uses
    group ``g_idx[j]``) the zero points are written unpacked in ``dtype`` (see the module docstring:
    ONNX Runtime's CPU kernel ignores packed ones there) and only 4 bits are accepted.
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
    gi = contiguous_g_idx(g_idx, k, block_size)
    if gi is not None and (bits != 4 or gi.min() < 0 or gi.max() >= nb):
        raise ValueError(f"g_idx needs 4 bits (onnxruntime's CPU kernel refuses {bits}) and groups in 0..{nb - 1}")
    # int16 (values 0..255): an int64 copy of the full-size lm_head alone was 0.5 GB
    padded = np.repeat(zp.astype(np.int16), block_size, axis=1)     # pad value: the block's zero point
    if gi is not None:
        padded[:] = 1 << (bits - 1)                                   # columns past K are never read then
    padded[:, :k] = q
    blocks = padded.reshape(n, nb, block_size)
    B = _pack_bits(blocks, bits)
    zp_packed = _pack_bits(zp, bits).reshape(-1) if gi is None else zp.astype(dtype).reshape(-1)
    return PackedNBits(B=np.ascontiguousarray(B), scales=sc.astype(dtype).reshape(-1), zero_points=zp_packed,
                       K=k, N=n, bits=bits, block_size=block_size, g_idx=gi)


def unpack_matmul_nbits(B: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, *, K: int, N: int, bits: int,
                        block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits initializers → ``(qweight [N, K], scales [N, n_blocks], zero_points [N, n_blocks])``."""
    nb = -(-K // block_size)
    q = _unpack_bits(np.asarray(B).reshape(N, nb, -1), bits, block_size).reshape(N, nb * block_size)[:, :K]
    sc = np.asarray(scales).reshape(N, nb)
    zpa = np.asarray(zero_points)
    if np.issubdtype(zpa.dtype, np.floating):     # unpacked zero points (written with g_idx)
        zp = np.rint(zpa.astype(np.float64)).astype(np.int16).reshape(N, nb)
    else:
        zp = _unpack_bits(zpa.reshape(N, -1), bits, nb)
    return q, sc, zp


def dequantize_nbits(p: PackedNBits) -> np.ndarray:
    """``[N, K]`` float32 weights ``(q - zp) * scale`` from packed tensors (reference for tests)."""
    q, sc, zp = unpack_matmul_nbits(p.B, p.scales, p.zero_points, K=p.K, N=p.N, bits=p.bits,
                                    block_size=p.block_size)
    g = p.g_idx if p.g_idx is not None else np.arange(p.K) // p.block_size
    return (q.astype(np.float32) - zp[:, g].astype(np.float32)) * sc.astype(np.float32)[:, g]


__all__ = ["PackedNBits", "contiguous_g_idx", "dequantize_nbits", "pack_matmul_nbits", "unpack_matmul_nbits"]
