"""A "tensor pool": every tensor of a checkpoint folder, read lazily, consumed exactly once.

Loaders never call ``from_pretrained`` on a checkpoint folder (that would run whatever code or
config magic the folder asks for, and silently drop or invent tensors). Instead they take tensors
by name from a :class:`TensorPool`. The pool remembers what was taken; at the end
:meth:`TensorPool.check_all_consumed` turns leftovers into a :class:`CheckpointError` that lists
them. Tensors that the source model provably never uses (e.g. a SigLIP head that the VLM bypasses)
are consumed explicitly with :meth:`TensorPool.discard` and a reason, so nothing disappears silently.

Formats: ``*.safetensors`` (single or sharded through ``model.safetensors.index.json``) and
PyTorch ``*.bin`` files, which are read only through ``torch.load(weights_only=True)``.
Shapes and dtypes of safetensors files come from their headers, so planning/inspecting a
3 GB checkpoint reads a few kilobytes.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from medlite.errors import CheckpointError
from medlite.fileio import sha256_file

# safetensors dtype names -> torch dtype names
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_NUMPY_DTYPES = {"float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors refuses headers above 100 MB as well


def _list_preview(names: Iterable[str], n: int = 20) -> str:
    names = sorted(names)
    head = ", ".join(names[:n])
    more = f" … (+{len(names) - n} more)" if len(names) > n else ""
    return f"{len(names)} tensor(s): {head}{more}"


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype name, shape) from a safetensors header, with a clear error for corrupt files."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes, no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt safetensors header (declared header length {n} bytes, "
                                  f"file has {size} bytes) — the file is truncated or not safetensors")
        blob = f.read(n)
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (invalid JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    data_len = size - 8 - n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], tuple(int(s) for s in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}: {meta!r}") from None
        if end > data_len or start > end:
            raise CheckpointError(f"{path}: tensor {name!r} lies outside the file (offsets {start}..{end}, "
                                  f"data section {data_len} bytes) — the file is truncated")
        out[name] = (_ST_DTYPES.get(dtype, dtype.lower()), shape)
    return out


def _load_bin(path: Path) -> dict:
    """``torch.load(weights_only=True)``: a pickle that needs anything but tensors is refused."""
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True) refused this pickle — it contains more than tensors "
            f"({first}). medlite never unpickles arbitrary objects; convert the file to safetensors with "
            f"trusted code first.") from None
    except Exception as e:  # zip/corrupt errors
        raise CheckpointError(f"{path}: cannot read PyTorch weights ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{path}: expected a dict of name -> tensor, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {_list_preview(bad)}")
    return obj


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, honouring sharding index files."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
            files = sorted({folder / f for f in wmap.values()})
            missing = [str(f.name) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard file(s) missing: {', '.join(missing)}")
            return files
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return st
    return sorted(p for p in folder.glob("*.bin") if p.name not in ("training_args.bin", "optimizer.bin"))


@dataclass
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]


@dataclass
class TensorPool:
    """All tensors of one folder; ``take`` hands each out once, ``check_all_consumed`` finds leftovers."""

    label: str
    folder: Path
    entries: dict[str, _Entry] = field(default_factory=dict)
    consumed: dict[str, str] = field(default_factory=dict)   # name -> "used" | discard reason
    _bins: dict[Path, dict] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: Path | str, *, label: Optional[str] = None, required: bool = True) -> "TensorPool":
        """Index the weight files of ``folder`` (headers only for safetensors)."""
        folder = Path(folder)
        pool = cls(label or str(folder), folder)
        files = weight_files(folder)
        if not files and required:
            raise CheckpointError(f"{folder}: no weight files (*.safetensors or *.bin) found")
        for f in files:
            if f.suffix == ".safetensors":
                header = read_safetensors_header(f)
                for name, (dtype, shape) in header.items():
                    pool._add(name, _Entry(f, dtype, shape))
            else:
                tensors = _load_bin(f)
                pool._bins[f] = tensors
                for name, t in tensors.items():
                    pool._add(name, _Entry(f, str(t.dtype).replace("torch.", ""), tuple(t.shape)))
        return pool

    def _add(self, name: str, entry: _Entry) -> None:
        if name in self.entries:
            raise CheckpointError(f"{self.label}: tensor {name!r} appears in both {self.entries[name].file.name} "
                                  f"and {entry.file.name}")
        self.entries[name] = entry

    # -- queries ------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def with_prefix(self, prefix: str) -> list[str]:
        return [k for k in self.entries if k.startswith(prefix)]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> str:
        return self._entry(name).dtype

    def dtypes(self) -> dict[str, int]:
        """Parameter count per dtype (to report the source dtype)."""
        out: dict[str, int] = {}
        for e in self.entries.values():
            n = 1
            for s in e.shape:
                n *= s
            out[e.dtype] = out.get(e.dtype, 0) + n
        return out

    def main_dtype(self) -> str:
        d = self.dtypes()
        return max(d, key=d.get) if d else "float32"

    def _entry(self, name: str) -> _Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"{self.label}: tensor {name!r} not found") from None

    # -- consumption --------------------------------------------------------------------------
    def read(self, name: str):
        """Load a tensor without marking it consumed (used to compare two copies)."""
        e = self._entry(name)
        if e.file in self._bins:
            return self._bins[e.file][name]
        from safetensors import safe_open

        try:
            with safe_open(str(e.file), framework="pt", device="cpu") as f:
                return f.get_tensor(name)
        except Exception as ex:  # safetensors raises its own error types
            raise CheckpointError(f"{e.file}: cannot read tensor {name!r} ({ex})") from None

    def read_numpy(self, name: str):
        """The tensor as a numpy array without torch, or None where numpy cannot hold it (bfloat16, float8,
        PyTorch ``*.bin`` files): then :meth:`read` is the way."""
        e = self._entry(name)
        if e.file in self._bins or e.dtype not in _NUMPY_DTYPES:
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(e.file), framework="numpy") as f:
                return f.get_tensor(name)
        except Exception as ex:  # safetensors raises its own error types
            raise CheckpointError(f"{e.file}: cannot read tensor {name!r} ({ex})") from None

    def take(self, name: str):
        """Load a tensor and mark it consumed; taking the same tensor twice is a bug in the loader."""
        if name in self.consumed:
            raise CheckpointError(f"{self.label}: tensor {name!r} consumed twice ({self.consumed[name]})")
        t = self.read(name)
        self.consumed[name] = "used"
        return t

    def mark_used(self, name: str) -> None:
        """Mark a tensor consumed without reading it (planning / inspect on the meta device)."""
        self._entry(name)
        if name in self.consumed:
            raise CheckpointError(f"{self.label}: tensor {name!r} consumed twice ({self.consumed[name]})")
        self.consumed[name] = "used"

    def discard(self, names: Iterable[str], reason: str) -> int:
        """Consume tensors that the source model never uses, recording why."""
        n = 0
        for name in names:
            self._entry(name)
            if name in self.consumed:
                raise CheckpointError(f"{self.label}: tensor {name!r} consumed twice")
            self.consumed[name] = reason
            n += 1
        return n

    def remaining(self) -> list[str]:
        return [k for k in self.entries if k not in self.consumed]

    def check_all_consumed(self) -> None:
        """Leftover tensors mean the loader does not understand this checkpoint: refuse to guess."""
        left = self.remaining()
        if left:
            raise CheckpointError(
                f"{self.label}: {len(left)} tensor(s) were not used by the conversion, so this checkpoint does "
                f"not match the architecture medlite derived from its config — leftover {_list_preview(left)}")

    def discarded(self) -> dict[str, list[str]]:
        """reason -> names of the tensors discarded for it."""
        out: dict[str, list[str]] = {}
        for k, r in self.consumed.items():
            if r != "used":
                out.setdefault(r, []).append(k)
        return out

    def file_hashes(self) -> dict[str, str]:
        """Relative name -> sha256 for the weight files and the small json/tokenizer files of the folder."""
        names = {e.file for e in self.entries.values()}
        for p in self.folder.iterdir():
            if p.is_file() and (p.suffix in (".json", ".model", ".txt") or p.name == "tokenizer.json"):
                names.add(p)
        return {p.name: sha256_file(p) for p in sorted(names)}
