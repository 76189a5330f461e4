"""Geometry of image-token reduction on the vision tower's square token grid (numpy only, no torch).

The vision tower emits ``side × side`` tokens (SigLIP-so400m at 384 px: 27 × 27 = 729; the demo
model: 7 × 7 = 49). Pooling to ``out × out`` tokens uses non-overlapping ``k × k`` windows with
``k = ceil(side / out)`` and stride ``k``.

Odd grids: when ``out · k`` exceeds ``side`` the grid is padded at the **bottom and right** by
``out · k − side`` rows/columns, and padded cells are *excluded* from every mean (a window on the
edge averages only the real tokens it covers) — zero padding would darken the edge tokens. So
27 × 27 → 14 × 14 (k = 2) pads one row and column: the last row/column of windows averages 2 tokens
(the corner window 1); 27 × 27 → 9 × 9 (k = 3) needs no padding; 7 × 7 → 4 × 4 (k = 2) pads one.

A grid missing its first token (TinyLLaVA Factory checkpoints select ``hidden_states[-2]`` with the
``default`` strategy, which drops token 0: 728 = 27² − 1 tokens) is pooled as the full grid with that
cell excluded like padding.

Only counts some ``k`` produces this way are accepted (:func:`achievable_counts`): with 27 × 27,
``[729, 196, 81, 49, 36, 25, 16, 9, 4, 1]``. Every pooling is one linear map of the tokens, the
matrix :func:`pool_matrix`, which the model applies as a single ``MatMul`` (TensorRT 8.5 and ONNX
Runtime run it as is, in any precision).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The token-reduction methods (docs/image-tokens.md compares them on the calibration set's held-out slice).
# ``salient``: inside each window a token weighs by its feature norm, so salient tokens dominate the mean.
METHODS = {
    "avg": "average pooling",
    "salient": "norm-weighted pooling",
}


@dataclass(frozen=True)
class PoolGeometry:
    """``side × side`` tokens → ``out × out`` tokens with ``kernel × kernel`` windows, ``pad`` cells added."""

    side: int
    out: int
    kernel: int
    pad: int
    missing: int = 0          # leading grid cells the tower's output lacks (Factory's dropped first token)

    @property
    def tokens_in(self) -> int:
        return self.side * self.side - self.missing

    @property
    def tokens_out(self) -> int:
        return self.out * self.out

    def describe(self) -> str:
        pad = (f"; grid padded by {self.pad} at the bottom/right, padded cells excluded from the mean"
               if self.pad else "")
        grid = f"{self.side}×{self.side}" + (f" − {self.missing}" if self.missing else "")
        return (f"{grid} = {self.tokens_in} → {self.out}×{self.out} = {self.tokens_out} tokens "
                f"(kernel {self.kernel}, stride {self.kernel}{pad})")


def grid_side(tokens: int) -> int:
    """The side of the square token grid of ``tokens`` tokens (a full grid, or one missing its first token);
    ValueError otherwise."""
    n = int(tokens)
    for side in (math.isqrt(n), math.isqrt(n) + 1):
        if side >= 1 and side * side - n in (0, 1) and (side > 1 or n == 1):
            return side
    raise ValueError(f"{tokens} image tokens is not a square grid (nor one missing its first token)")


def achievable_counts(side: int, missing: int = 0) -> list[int]:
    """Every token count ``ceil(side / k)²`` for ``k = 1 .. side``, largest first (``k = 1`` only for a full grid)."""
    return sorted({math.ceil(side / k) ** 2 for k in range(1 if not missing else 2, side + 1)}, reverse=True)


def geometry(tokens_in: int, tokens_out: int) -> PoolGeometry:
    """The pooling from ``tokens_in`` to ``tokens_out`` tokens; ValueError naming the counts the grid can produce."""
    side = grid_side(tokens_in)
    missing = side * side - int(tokens_in)
    for k in range(1, side + 1):
        out = math.ceil(side / k)
        if out * out == int(tokens_out) and (k > 1 or not missing):
            return PoolGeometry(side, out, k, out * k - side, missing)
    raise ValueError(f"{tokens_out} tokens cannot be pooled from a {side}×{side} grid of {tokens_in}: choose one of "
                     + ", ".join(str(c) for c in achievable_counts(side, missing)))


def pool_matrix(g: PoolGeometry) -> np.ndarray:
    """``[tokens_out, tokens_in]`` float32: row ``r`` averages the real tokens of output cell ``r``'s window
    (tokens in row-major grid order, as the tower emits them)."""
    m = np.zeros((g.tokens_out, g.tokens_in), dtype=np.float32)
    for oy in range(g.out):
        for ox in range(g.out):
            cells = [y * g.side + x - g.missing
                     for y in range(oy * g.kernel, min((oy + 1) * g.kernel, g.side))
                     for x in range(ox * g.kernel, min((ox + 1) * g.kernel, g.side))
                     if y * g.side + x >= g.missing]
            m[oy * g.out + ox, cells] = 1.0 / len(cells)
    return m


def pool_tokens(x: np.ndarray, tokens_out: int) -> np.ndarray:
    """Average-pool ``[..., tokens_in, hidden]`` to ``[..., tokens_out, hidden]`` (the map the ``avg`` method applies)."""
    g = geometry(x.shape[-2], tokens_out)
    return np.einsum("on,...nh->...oh", pool_matrix(g), np.asarray(x, dtype=np.float64)).astype(x.dtype)


__all__ = ["METHODS", "PoolGeometry", "grid_side", "achievable_counts", "geometry", "pool_matrix", "pool_tokens"]
