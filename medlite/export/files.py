"""Writing exported graphs: external data, the shared embedding table, deterministic bytes.

Layout written into an export folder:

* ``<graph>.onnx`` holds the graph and, when its weights total less than
  :data:`EXTERNAL_THRESHOLD`, the weights too. Larger graphs (the fp32 decoder of a 1.1 B LLM is
  4.4 GB; protobuf stops at 2 GB) keep every initializer of at least 1 KiB in ``<graph>.onnx.data``,
  written in initializer order with no padding, so the bytes are the same on every export.
* ``embed_tokens.bin`` holds the token embedding table as raw little-endian ``[vocab, hidden]``
  (offset 0). ``embed.onnx`` reads it as external data; a runtime can also memory-map it directly
  (the runtime config records its dtype and shape). When ``lm_head`` is tied to the embeddings,
  ``decoder.onnx`` references the same file through a ``Transpose`` instead of storing a second copy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

EXTERNAL_THRESHOLD = 1536 * 1024 * 1024   # bytes of weights above which a graph uses external data
MIN_EXTERNAL_TENSOR = 1024               # smaller tensors stay inside the .onnx file
EMBED_TABLE_NAME = "embed_tokens.weight"
EMBED_TABLE_FILE = "embed_tokens.bin"


def _external(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def is_staged(t: TensorProto) -> bool:
    """External data left by the exporter in a temporary folder (absolute location, see trace.py)."""
    return t.data_location == TensorProto.EXTERNAL and Path(_external(t).get("location", "")).is_absolute()


def _nbytes(t: TensorProto) -> int:
    if is_staged(t):
        ext = _external(t)
        if "length" in ext:
            return int(ext["length"])
        return Path(ext["location"]).stat().st_size - int(ext.get("offset", 0))
    return len(_tensor_bytes(t))


def _tensor_bytes(t: TensorProto) -> bytes:
    if is_staged(t):
        ext = _external(t)
        with open(ext["location"], "rb") as f:
            f.seek(int(ext.get("offset", 0)))
            return f.read(int(ext["length"])) if "length" in ext else f.read()
    if t.HasField("raw_data"):
        return t.raw_data
    arr = numpy_helper.to_array(t)
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def tensor_array(t: TensorProto) -> np.ndarray:
    """An initializer as numpy, also when its bytes are still in the exporter's staging folder."""
    if is_staged(t):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        return np.frombuffer(_tensor_bytes(t), dtype=dtype.newbyteorder("<")).reshape(list(t.dims))
    return numpy_helper.to_array(t)


def _make_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    ext = TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims))
    ext.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        ext.external_data.append(onnx.StringStringEntryProto(key=k, value=v))
    t.CopyFrom(ext)


def _make_inline(t: TensorProto, data: bytes) -> None:
    inline = TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims), raw_data=data)
    t.CopyFrom(inline)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers still to be written (in the proto or in the exporter's staging folder)."""
    return sum(_nbytes(t) for t in model.graph.initializer
               if t.data_location != TensorProto.EXTERNAL or is_staged(t))


def write_onnx(model: onnx.ModelProto, path: Path, *, shared: Iterable[str] = (),
               external_threshold: int = EXTERNAL_THRESHOLD) -> list[Path]:
    """Write ``model`` to ``path``; return every file written (the graph first).

    Initializers named in ``shared`` (only :data:`EMBED_TABLE_NAME` today) go to
    :data:`EMBED_TABLE_FILE` in the same folder. Weights are copied one tensor at a time (from the
    proto or from the exporter's staging folder) and moved out of the proto as they are written, so
    do not use ``model`` afterwards.
    """
    path = Path(path)
    folder = path.parent
    written = [path]
    shared = set(shared)
    for t in model.graph.initializer:
        if t.name in shared:
            data = _tensor_bytes(t)
            table = folder / EMBED_TABLE_FILE
            table.write_bytes(data)
            _make_external(t, EMBED_TABLE_FILE, 0, len(data))
            written.append(table)
    if weight_bytes(model) > external_threshold:
        data_name = f"{path.name}.data"
        offset = 0
        with open(folder / data_name, "wb") as f:
            for t in model.graph.initializer:
                if t.data_location == TensorProto.EXTERNAL and not is_staged(t):
                    continue
                data = _tensor_bytes(t)
                if len(data) < MIN_EXTERNAL_TENSOR:
                    _make_inline(t, data)
                    continue
                f.write(data)
                _make_external(t, data_name, offset, len(data))
                offset += len(data)
                del data
        written.append(folder / data_name)
    else:
        for t in model.graph.initializer:
            if is_staged(t):
                _make_inline(t, _tensor_bytes(t))
    with open(path, "wb") as f:
        f.write(model.SerializeToString(deterministic=True))
    return written


def check_onnx_file(path: Path) -> None:
    """``onnx.checker`` on a written graph (by path, so external data and > 2 GB graphs work)."""
    from medlite.errors import ExportError

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ExportError(f"{path}: onnx.checker rejected the graph: {e}") from e




def tie_lm_head_to_table(model: onnx.ModelProto, table: np.ndarray) -> bool:
    """Make the decoder read ``lm_head`` from the shared embedding table (tied weights).

    The exporter stores ``lm_head`` as an initializer holding ``table.T`` (the transpose is folded).
    That initializer is replaced by ``Transpose(embed_tokens.weight)`` so the table is stored once
    (in :data:`EMBED_TABLE_FILE`); TensorRT and ONNX Runtime fold the Transpose when they build/load.
    Returns False when no initializer equal to ``table.T`` is found.
    """
    g = model.graph
    want_dims = [table.shape[1], table.shape[0]]
    target = None
    for t in g.initializer:
        if list(t.dims) == want_dims and t.data_type == numpy_helper.from_array(table[:1, :1]).data_type:
            if np.array_equal(tensor_array(t), table.T):
                target = t
                break
    if target is None:
        return False
    old = target.name
    g.initializer.remove(target)
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table), name=EMBED_TABLE_NAME))
    new_out = "lm_head.weight_transposed"
    for node in g.node:
        for i, n in enumerate(node.input):
            if n == old:
                node.input[i] = new_out
    g.node.insert(0, onnx.helper.make_node("Transpose", [EMBED_TABLE_NAME], [new_out], perm=[1, 0],
                                           name="/lm_head/TiedTranspose"))
    return True
