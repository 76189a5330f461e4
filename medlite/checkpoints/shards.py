"""Streaming safetensors writer: tensors go to disk shard by shard, never all in memory at once."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from medlite.errors import CheckpointError

_ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4}


def nbytes(shape: tuple[int, ...], dtype_name: str) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * _ELEMENT_SIZE[dtype_name]


class ShardWriter:
    """Write ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index, in a planned order.

    The caller declares every tensor (name, shape) up front so shard membership is known; tensors
    may then be added one group at a time, and a shard is written (and its tensors released) as
    soon as it is complete. Peak memory: one shard plus the group being produced.
    """

    def __init__(self, out_dir: Path, layout: list[tuple[str, tuple[int, ...]]], *, dtype_name: str,
                 max_shard_bytes: Optional[int] = None, prefix: str = "model"):
        self.out_dir, self.dtype_name, self.prefix = Path(out_dir), dtype_name, prefix
        self.total = sum(nbytes(s, dtype_name) for _, s in layout)
        groups: list[list[str]] = [[]]
        size = 0
        for name, shape in layout:
            b = nbytes(shape, dtype_name)
            if max_shard_bytes and groups[-1] and size + b > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += b
        n = len(groups)
        self.files = ([f"{prefix}.safetensors"] if n == 1 else
                      [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.shard_of = {name: i for i, g in enumerate(groups) for name in g}
        self.shapes = dict(layout)
        self.pending: list[dict] = [dict() for _ in groups]
        self.need = [len(g) for g in groups]
        self.written = [False] * n

    def add(self, name: str, tensor) -> None:
        """Queue one tensor (cast to the writer's dtype); writes its shard when complete."""
        import torch

        if name not in self.shard_of:
            raise CheckpointError(f"internal: tensor {name!r} was not declared to the shard writer")
        if tuple(tensor.shape) != tuple(self.shapes[name]):
            raise CheckpointError(f"internal: {name} has shape {tuple(tensor.shape)}, declared {self.shapes[name]}")
        i = self.shard_of[name]
        self.pending[i][name] = tensor.detach().to(getattr(torch, self.dtype_name)).contiguous()
        if len(self.pending[i]) == self.need[i]:
            from safetensors.torch import save_file

            save_file(self.pending[i], str(self.out_dir / self.files[i]), metadata={"format": "pt"})
            self.pending[i] = {}
            self.written[i] = True

    def close(self) -> list[str]:
        """Check completeness and write the index for sharded output; returns the file names."""
        if not all(self.written):
            missing = [n for n, i in self.shard_of.items() if not self.written[i] and n not in self.pending[i]]
            raise CheckpointError(f"internal: tensors never written: {missing[:10]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {n: self.files[i] for n, i in sorted(self.shard_of.items())}}
            (self.out_dir / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return list(self.files)
