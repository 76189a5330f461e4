"""Static INT8 Q/DQ on an exported fp32 graph with ``onnxruntime.quantization`` (kept at opset 17).

* Which nodes: vision graph — every ``MatMul`` with a constant weight and the patch-embedding
  ``Conv``; decoder graph — the projection ``MatMul`` s (q/k/v/o, gate/up/down) and ``lm_head`` when
  asked. Attention score/value matmuls (no constant input), LayerNorm/RMSNorm math, softmax, GELU,
  rotary embeddings and the KV cache stay in float (docs/quantization-int8.md says why).
* How: ``quantize_static(quant_format=QDQ, per_channel=True, QInt8/QInt8, ActivationSymmetric,
  WeightSymmetric, QuantizeBias=False)``: per-channel weight scales along the output channel
  (axis 1 of a MatMul weight ``[K, N]``, axis 0 of a Conv weight), one static per-tensor scale per
  activation, zero point 0, INT8 weights stored as INT8 initializers. Bias quantization is off
  (TensorRT 8.5 takes no INT32 DequantizeLinear) and so is ORT's default output quantization of
  MatMul/Conv (``OpTypesToExcludeOutputQuantization``): Q/DQ sit on the inputs of the quantized
  ops only, TensorRT's recommended placement, and the bias ``Add`` stays in float.
* Calibration: :func:`calibrate_ranges` runs ORT's own calibrators (MinMax, Percentile, Entropy)
  one feed per ``collect_data`` call — their histograms merge across calls, and feeds of different
  sequence lengths never get stacked (the "inhomogeneous shape" failure). The ranges are saved in
  ORT's calibration-cache JSON and handed to ``quantize_static(calibration_cache_path=...)``, so a
  graph is calibrated once and re-quantized cheaply with different fp16 exclusions.
* Bytes: weights left in float (``lm_head`` by default, embeddings of the vision tower, layers kept
  in fp16) are stored as FP16 initializers followed by a ``Cast`` to FP32 (TensorRT 8.5 and ORT fold
  it at build/load time), so the fp32-based Q/DQ graph is not larger than the fp16 export.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto

METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
_DECODER_PROJ = re.compile(r"/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/MatMul$")
FP16_MIN_ELEMENTS = 4096     # float initializers at least this large are stored as fp16 + Cast
HIST_BINS = 2048             # percentile histogram bins (ORT's default)
# Entropy: TensorRT's own calibrator uses 2048 bins, but ORT's Python implementation costs O(bins²)
# per tensor (measured: 372 s for the tiny decoder's 39 tensors at 2048 bins, busy 2-core machine).
ENTROPY_BINS = 512


@dataclass
class QuantTarget:
    """One quantizable node: its node name and the model layer (module path) it belongs to."""

    node: str
    layer: str
    op: str
    weight: str
    elements: int


def layer_of(node_name: str) -> str:
    """``/lm/layers.0/self_attn/q_proj/MatMul`` → ``lm.layers.0.self_attn.q_proj``."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1]) if len(parts) > 1 else node_name


def quant_targets(model: onnx.ModelProto, graph: str, *, lm_head: bool = False) -> list[QuantTarget]:
    """The nodes Q/DQ goes on, in graph order (see the module docstring)."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Conv") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        w = inits[n.input[1]]
        if w.data_type != TensorProto.FLOAT:
            continue
        if graph == "decoder":
            is_head = n.name.startswith("/head/")
            if not (_DECODER_PROJ.search(n.name) or (lm_head and is_head)):
                continue
        out.append(QuantTarget(n.name, layer_of(n.name), n.op_type, w.name, int(np.prod(w.dims))))
    return out


def save_for_ort(proto: onnx.ModelProto, path: Path) -> Path:
    """Write ``proto`` with every weight in ``<path>.data`` (relative: ONNX Runtime loads it)."""
    from medlite.export.files import write_onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    write_onnx(proto, path, external_threshold=0)
    return path


class _OneFeed:
    """A CalibrationDataReader over one feed (ORT's calibrators merge across collect_data calls)."""

    def __init__(self, feed: dict):
        self.feed = feed

    def get_next(self):
        feed, self.feed = self.feed, None
        return feed

    def __len__(self) -> int:
        return 1


def _calibrator(model_path: Path, method: str, percentile: float, augmented: Path, tensors: Optional[set]):
    """ORT's calibrator for ``method``, observing only ``tensors`` (None: every MatMul/Conv tensor).

    Same construction as ``onnxruntime.quantization.calibrate.create_calibrator``; the subclass only
    narrows ``select_tensors_to_calibrate`` to the activations that get a Q/DQ (on the decoder
    ~4x fewer tensors: less memory per feed and, for entropy, less time).
    """
    from onnxruntime.quantization import calibrate as C

    base = {"minmax": C.MinMaxCalibrater, "percentile": C.PercentileCalibrater, "entropy": C.EntropyCalibrater}[method]

    class Narrowed(base):
        def select_tensors_to_calibrate(self, model):
            found, infos = super().select_tensors_to_calibrate(model)
            return (found if tensors is None else {t for t in found if t in tensors}), infos

    kw = dict(augmented_model_path=str(augmented), use_external_data_format=True, symmetric=True)
    if method == "percentile":
        kw.update(num_bins=HIST_BINS, percentile=float(percentile))
    elif method == "entropy":
        kw.update(num_bins=ENTROPY_BINS, num_quantized_bins=128)
    cal = Narrowed(Path(model_path), ["MatMul", "Conv"], **kw)
    cal.augment_graph()
    # ORT keeps the graph it loaded (every weight, 4.1 GB for the full-size fp32 decoder) as
    # ``cal.model`` for the calibrator's lifetime; after augment_graph() only its names and outputs are
    # read, and clearing the tensors' raw_data does not return protobuf's arena memory. The augmented
    # graph without its weights is equivalent for that and costs nothing (measured: full-size decoder
    # calibration peak, benchmarks/int8_full_size.py).
    cal.model = onnx.load(str(augmented), load_external_data=False)
    gc.collect()
    cal.create_inference_session()
    return cal


def calibrate_ranges(model_path: Path, feeds: Iterable[dict], cache_path: Path, *, method: str = "minmax",
                     percentile: float = 99.99, tensors: Optional[Iterable[str]] = None,
                     work_dir: Optional[Path] = None, on_feed=None) -> int:
    """Static activation ranges of the graph at ``model_path`` (the inputs of MatMul/Conv nodes, or
    only ``tensors``), saved to ``cache_path`` (ORT calibration-cache JSON). Returns the feeds used."""
    import shutil
    import tempfile

    from onnxruntime.quantization.calibrate import save_tensors_data

    if method not in METHODS:
        raise ValueError(f"activation calibration {method!r}: choose from {', '.join(METHODS)}")
    # ORT writes the augmented graph and uuid-named external-data files next to it: own folder
    work = Path(tempfile.mkdtemp(prefix="calib-", dir=work_dir or model_path.parent))
    try:
        cal = _calibrator(model_path, method, percentile, work / "augmented.onnx",
                          set(tensors) if tensors is not None else None)
        n = 0
        for feed in feeds:
            cal.collect_data(_OneFeed(feed))
            n += 1
            if on_feed:
                on_feed(feed)
        if n == 0:
            raise ValueError(f"{model_path.name}: no calibration feeds")
        save_tensors_data(cal.compute_data(), cache_path)
        del cal
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return n


def activation_inputs(model_path: Path, nodes: Iterable[str]) -> set:
    """The activation (first) inputs of ``nodes``: the tensors that get a per-tensor Q/DQ."""
    want = set(nodes)
    return {n.input[0] for n in onnx.load(str(model_path), load_external_data=False).graph.node if n.name in want}


def quantize_graph(model_path: Path, out_path: Path, cache_path: Path, nodes: Sequence[str], *,
                   method: str = "minmax") -> Path:
    """Static Q/DQ on ``nodes`` of the graph at ``model_path`` with the cached ranges; writes ``out_path``."""
    if not nodes:
        raise ValueError("no node to quantize")
    with _quiet_root_logger():
        _quantize_static(model_path, out_path, cache_path, nodes, method)
    return out_path


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime.quantization logs "Please consider pre-processing before quantization" through the
    root logger at every call (its shape-inference pre-processing does not apply to our exported
    graphs); hide that advice while it runs, keep errors."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _quantize_static(model_path: Path, out_path: Path, cache_path: Path, nodes: Sequence[str], method: str) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(model_path), str(out_path), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Conv"], per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, nodes_to_quantize=list(nodes), use_external_data_format=True,
                    calibrate_method=getattr(CalibrationMethod, METHODS[method]),
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                   # inputs only: ORT would also quantize each MatMul/Conv output
                                   # (before the bias Add): a second rounding TensorRT does not need
                                   "OpTypesToExcludeOutputQuantization": ["MatMul", "Conv"]},
                    calibration_cache_path=str(cache_path))


def _attribute_tensors(graph: onnx.GraphProto):
    """Tensors held in node attributes (``Constant`` values), subgraphs included."""
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _attribute_tensors(a.g)
            for sub in a.graphs:
                yield from _attribute_tensors(sub)


def load_staged(path: Path) -> onnx.ModelProto:
    """Load a graph without its weights; external locations become absolute (``files.is_staged``).

    Tensors in node attributes are read back into the graph: ``quantize_static`` saves with
    ``convert_attribute=True``, so a ``Constant`` over 1 KB (full size: the SigLIP position
    embedding's folded table, 3.4 MB) lands in ``q.onnx.data`` too, and the export writer stages
    initializers only — left external, the shipped vision.onnx pointed at a file it does not carry.
    """
    from onnx.external_data_helper import load_external_data_for_tensor

    proto = onnx.load(str(path), load_external_data=False)
    for t in proto.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location" and not Path(e.value).is_absolute():
                    e.value = str((path.parent / e.value).resolve())
    for t in _attribute_tensors(proto.graph):
        if t.data_location == TensorProto.EXTERNAL:
            load_external_data_for_tensor(t, str(path.parent))
            t.data_location = TensorProto.DEFAULT
            del t.external_data[:]
    return proto


def float_weights_to_fp16(proto: onnx.ModelProto, data_file: Path, *, keep: Iterable[str] = (),
                          min_elements: int = FP16_MIN_ELEMENTS) -> int:
    """Store FP32 initializers of ``>= min_elements`` as FP16 + ``Cast`` to FP32 (in place).

    Q/DQ scales and the names in ``keep`` (e.g. the shared embedding table) stay FP32. The FP16
    bytes go to ``data_file`` (absolute external locations). Returns the bytes saved.
    """
    from medlite.export.files import tensor_array

    g = proto.graph
    # Q/DQ scales and zero points must stay constant initializers (TensorRT 8.5); per-channel scales
    # of a wide layer (full size: 5632 gate/up channels) are otherwise big enough to be converted
    keep = set(keep) | {name for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                        for name in list(n.input)[1:]}
    casts, saved, offset = [], 0, 0
    with open(data_file, "wb") as f:
        for t in g.initializer:
            if t.data_type != TensorProto.FLOAT or t.name in keep or int(np.prod(t.dims)) < min_elements:
                continue
            arr = tensor_array(t).astype(np.float16)
            name = t.name
            data = arr.astype("<f2").tobytes()
            new = TensorProto(name=f"{name}__fp16", data_type=TensorProto.FLOAT16, dims=list(t.dims))
            new.data_location = TensorProto.EXTERNAL
            for k, v in (("location", str(data_file.resolve())), ("offset", str(offset)), ("length", str(len(data)))):
                new.external_data.append(onnx.StringStringEntryProto(key=k, value=v))
            f.write(data)
            offset += len(data)
            saved += len(data)
            t.CopyFrom(new)
            casts.append(onnx.helper.make_node("Cast", [new.name], [name], to=TensorProto.FLOAT,
                                               name=f"/medlite/fp16_weight/{name}"))
    for i, node in enumerate(casts):
        g.node.insert(i, node)
    return saved


__all__ = ["ENTROPY_BINS", "FP16_MIN_ELEMENTS", "METHODS", "QuantTarget", "activation_inputs", "calibrate_ranges", "float_weights_to_fp16",
           "layer_of", "load_staged", "quant_targets", "quantize_graph", "save_for_ort"]
