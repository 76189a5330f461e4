"""Trace a torch module to an in-memory ONNX model with the TorchScript exporter.

Why the TorchScript exporter (``dynamo=False``): the dynamo exporter always emits opset 18 for the
language model and cannot be downgraded (measured with torch 2.13: ``axes_input_to_attribute``
fails), and TensorRT 8.5 stops at opset 17.

Weights never stay in the protobuf while the graph passes run: the exporter writes large graphs
(> 2 GB) as external data (one file per tensor) into a folder under ``tmp_root``, and every
initializer of at least :data:`STAGE_MIN_BYTES` that the exporter left inline is moved to a staging
file there too. Their external-data locations are absolute; :func:`medlite.export.files.write_onnx`
copies them one tensor at a time into the final layout. Measured on the full-size fp16 decoder
(2.07 GB, just under the exporter's 2 GB limit, so written inline): shape inference on the in-memory
proto serialises and re-parses it, which raised the export's peak from 7.4 GB to 10.7 GB.
"""
from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence

import onnx
import torch

from medlite.errors import ExportError
from medlite.export.graph_passes import folded_onnx_from_onnx, stable_onnx_from_onnx

STAGE_MIN_BYTES = 1 << 20   # inline initializers this large are staged to disk during the passes


def onnx_from_module(module: torch.nn.Module, args: Sequence[torch.Tensor], *, input_names: list[str],
                     output_names: list[str], dynamic_axes: dict[str, dict[int, str]], opset: int,
                     graph_name: str, metadata: dict[str, str], tmp_root: Optional[Path] = None,
                     trace_notes: Optional[list[str]] = None) -> onnx.ModelProto:
    """Export ``module(*args)`` at ``opset``, fold constant shape arithmetic, strip unstable fields.

    Tracer warnings (a Python branch on a tensor value may have been frozen into the trace) are
    collected into ``trace_notes`` instead of being printed; the tests that compare the graphs at
    shapes other than the traced ones are what guards against them.

    A graph over 2 GB keeps its weights in files under ``tmp_root`` (absolute external-data
    locations), which must exist until :func:`~medlite.export.files.write_onnx` has written it.
    """
    if tmp_root is not None:
        Path(tmp_root).mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"medlite-{graph_name}-", dir=tmp_root)
    keep = False
    try:
        path = Path(tmp) / f"{graph_name}.onnx"
        traced_shapes: list = []
        hook = module.register_forward_hook(lambda _m, _i, out: traced_shapes.append(
            [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else (out,))]))
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                torch.onnx.export(module, tuple(args), str(path), input_names=input_names,
                                  output_names=output_names, dynamic_axes=dynamic_axes, opset_version=opset,
                                  dynamo=False, do_constant_folding=True)
            except Exception as e:  # noqa: BLE001 - re-raised with the graph named
                raise ExportError(f"exporting {graph_name}.onnx at opset {opset} failed: {type(e).__name__}: {e}") from e
            finally:
                hook.remove()
        if trace_notes is not None:
            for w in caught:
                if issubclass(w.category, (torch.jit.TracerWarning, UserWarning)):
                    msg = f"{graph_name}: {str(w.message).splitlines()[0][:200]}"
                    if msg not in trace_notes:
                        trace_notes.append(msg)
        model = onnx.load(str(path), load_external_data=False)
        _stage_inline_weights(model, Path(tmp) / "staged.bin")
        model = folded_onnx_from_onnx(model)
        if traced_shapes:
            _static_output_dims(model, traced_shapes[-1], dynamic_axes)
        keep = _absolute_external_locations(model, Path(tmp))
        return stable_onnx_from_onnx(model, graph_name=graph_name, metadata=metadata)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _stage_inline_weights(model: onnx.ModelProto, file: Path) -> None:
    """Move inline initializers of >= STAGE_MIN_BYTES to ``file`` (absolute external locations)."""
    offset = 0
    with open(file, "wb") as f:
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL or not t.HasField("raw_data"):
                continue
            n = len(t.raw_data)
            if n < STAGE_MIN_BYTES:
                continue
            f.write(t.raw_data)
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", str(file.resolve())), ("offset", str(offset)), ("length", str(n))):
                t.external_data.append(onnx.StringStringEntryProto(key=k, value=v))
            offset += n


def _absolute_external_locations(model: onnx.ModelProto, folder: Path) -> bool:
    """Point external tensors at their files by absolute path; True if there were any."""
    found = False
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location":
                    e.value = str((folder / e.value).resolve())
                    found = True
    return found


def _static_output_dims(model: onnx.ModelProto, shapes: list[tuple], dynamic_axes: dict) -> None:
    """Write the traced size into every output axis that is not declared dynamic.

    The exporter leaves some static axes symbolic (e.g. ``Addimage_embeds_dim_1`` for the number
    of image tokens); an axis not listed in ``dynamic_axes`` was fixed by the trace, so its size
    is known and the runtime config can state it.
    """
    for vi, shape in zip(model.graph.output, shapes):
        dyn = dynamic_axes.get(vi.name, {})
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            raise ExportError(f"{vi.name}: graph output has rank {len(dims)} but the traced output has shape {shape}")
        for axis, (d, size) in enumerate(zip(dims, shape)):
            if axis in dyn:
                d.dim_param = dyn[axis]
            else:
                d.dim_value = int(size)
