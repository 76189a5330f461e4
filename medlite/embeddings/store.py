"""The embeddings file: one float32 vector per image, the image names, and how they were made.

Two formats, chosen by the file name:

* ``.npz`` (always available): arrays ``embeddings`` ``[N, D]`` float32, ``files`` and ``paths``
  (unicode), ``metadata`` (a JSON string) — readable with ``numpy.load(f)`` (no pickle);
* ``.parquet`` (needs pyarrow): columns ``file``, ``path``, ``embedding`` (fixed-size list of
  float32); the same JSON under the schema metadata key ``medlite``.

Both are written through :func:`medlite.fileio.write_bytes_atomic`: a reader (or a killed run)
never sees half a file.
"""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medlite.errors import DataError
from medlite.fileio import write_bytes_atomic

FORMAT = "medlite-embeddings/1"
SUFFIXES = (".npz", ".parquet")
PARQUET_HINT = "pip install pyarrow (or write .npz, which needs nothing extra)"


@dataclass
class EmbeddingSet:
    """``vectors[i]`` is the embedding of ``files[i]`` (its name as matched by labels.csv)."""

    files: list[str]
    vectors: np.ndarray
    paths: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vectors = np.asarray(self.vectors, dtype=np.float32)
        if not self.paths:
            self.paths = list(self.files)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.files) or len(self.paths) != len(self.files):
            raise DataError(f"embeddings: {len(self.files)} names and {len(self.paths)} paths for vectors of "
                            f"shape {self.vectors.shape}")


def file_format(path) -> str:
    """``npz`` or ``parquet`` from the name; a one-line DataError for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: embeddings file must end in .npz or .parquet")
    return suffix[1:]


def _pyarrow(path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: writing or reading .parquet needs pyarrow, which is not installed: "
                        f"{PARQUET_HINT}") from None
    return pa, pq


def check_writable_format(path) -> None:
    """Fail before any model loads when the output format cannot be written here."""
    if file_format(path) == "parquet":
        _pyarrow(path)


def write_embeddings(path, data: EmbeddingSet) -> Path:
    """Write ``data`` to ``path`` (.npz or .parquet) atomically; returns the path."""
    meta = json.dumps({"format": FORMAT, **data.metadata}, sort_keys=True, default=str)
    if file_format(path) == "npz":
        buf = io.BytesIO()
        np.savez(buf, embeddings=data.vectors, files=np.array(data.files, dtype=str),
                 paths=np.array(data.paths, dtype=str), metadata=np.array(meta))
        return write_bytes_atomic(path, buf.getvalue())
    pa, pq = _pyarrow(path)
    dim = int(data.vectors.shape[1])
    flat = pa.array(np.ascontiguousarray(data.vectors).reshape(-1), type=pa.float32())
    table = pa.table({"file": pa.array(data.files, type=pa.string()),
                      "path": pa.array(data.paths, type=pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)})
    table = table.replace_schema_metadata({"medlite": meta})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return write_bytes_atomic(path, sink.getvalue().to_pybytes())


def _read_npz(path: Path) -> EmbeddingSet:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("embeddings", "files", "metadata") if k not in z.files]
            if missing:
                raise DataError(f"{path}: not a medlite embeddings file (no {', '.join(missing)} array)")
            paths = [str(p) for p in z["paths"]] if "paths" in z.files else []
            return EmbeddingSet([str(f) for f in z["files"]], z["embeddings"], paths,
                                json.loads(str(z["metadata"])))
    except (OSError, ValueError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable embeddings file ({e})") from None


def _read_parquet(path: Path) -> EmbeddingSet:
    pa, pq = _pyarrow(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: unreadable parquet file ({e})") from None
    missing = [c for c in ("file", "embedding") if c not in table.column_names]
    raw = (table.schema.metadata or {}).get(b"medlite")
    if missing or raw is None:
        what = f"no {', '.join(missing)} column" if missing else "no medlite metadata"
        raise DataError(f"{path}: not a medlite embeddings file ({what})")
    emb = table.column("embedding").combine_chunks()
    n = table.num_rows
    vectors = np.asarray(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, -1)
    paths = table.column("path").to_pylist() if "path" in table.column_names else []
    return EmbeddingSet(table.column("file").to_pylist(), vectors, paths, json.loads(raw))


def read_embeddings(path) -> EmbeddingSet:
    """Read a file written by :func:`write_embeddings`; one-line DataError when it is not one."""
    path = Path(path).expanduser()
    kind = file_format(path)
    if not path.is_file():
        raise DataError(f"{path}: embeddings file not found")
    data = _read_npz(path) if kind == "npz" else _read_parquet(path)
    if data.metadata.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} file (format {data.metadata.get('format')!r})")
    return data
