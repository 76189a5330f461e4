"""Pool per-token image features into one vector per image (numpy only)."""
from __future__ import annotations

import numpy as np

from medlite.embeddings import POOLS
from medlite.errors import DataError


def pool_tokens(tokens: np.ndarray, how: str = "mean") -> np.ndarray:
    """``[B, T, H]`` token features → ``[B, H]`` float32.

    ``mean`` averages the tokens (the usual choice for linear probes), ``max`` takes the per-channel
    maximum, ``first`` keeps the first token (the CLS token of a tower that keeps it). Pooling runs
    in float32 whatever the graph's precision, so fp16 graphs do not lose the mean to rounding.
    """
    arr = np.asarray(tokens)
    if arr.ndim != 3:
        raise DataError(f"image features have shape {arr.shape}; expected [batch, tokens, hidden]")
    arr = arr.astype(np.float32, copy=False)
    if how == "mean":
        return arr.mean(axis=1, dtype=np.float64).astype(np.float32)
    if how == "max":
        return arr.max(axis=1)
    if how == "first":
        return np.ascontiguousarray(arr[:, 0])
    raise DataError(f"--pool {how!r}: use one of {', '.join(POOLS)}")
