"""The ``quantize`` stage's INT8 path: ``apply_int8(state, index, opts) -> StageResult``.

For ``vision: int8`` and/or ``llm: w8a8``:

1. ``llm: w8a8`` with ``smoothquant_alpha``: SmoothQuant on the working model's language model
   (:mod:`.smoothquant`), calibrated through the framework's forward loop (real image tokens); with
   ``smooth_extra`` also the inputs without a norm in front (o_proj, down_proj; :mod:`.smooth_extra`).
2. Per graph (vision, decoder): trace the fp32 graph exactly as the export does, calibrate static
   activation ranges on the calibration set (:mod:`.calib_feeds`, :mod:`.qdq_onnx`), and — with
   ``sensitivity`` — choose the layers kept in fp16 on the calibration set's held-out slice
   (:mod:`.sensitivity`).
3. Register on ``state.export_plan``: ``precision="fp32"`` (Q/DQ scales and the math between them
   in fp32; float weights stored fp16) and the graph pass :func:`int8_qdq_pass` that inserts the
   Q/DQ nodes with the ranges calibrated here, plus the graph's quantization record.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from collections import Counter
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto

from medlite.pipeline.contract import StageResult
from medlite.compress.int8 import qdq_onnx as Q
from medlite.compress.int8.smooth_pass import smooth_for_int8

PASS_NAME = "int8_static_qdq"
MAX_HELDOUT = 128    # default of QuantizeOptions.sensitivity_rows (held-out pairs of the sensitivity pass)
FEED_BYTES = 1 << 30      # calibrated activations per ORT calibration feed (see feed_rows)
PROMPT_TEXT_TOKENS = 64   # template + question tokens of a prompt, for sizing decoder feeds
SCHEME = ("INT8 static Q/DQ (onnxruntime.quantization QDQ): weights per-channel symmetric along the output "
          "channel, activations per-tensor symmetric static scales, zero point 0, opset 17")


@dataclass
class GraphChoice:
    """What the stage decided for one graph (vision / decoder)."""

    graph: str
    targets: list                         # QuantTarget
    kept_fp16: list = field(default_factory=list)
    ranges: dict = field(default_factory=dict)   # ORT TensorsData.to_dict()
    fallback: object = None               # sensitivity.Fallback
    bytes_fp16: int = 0
    bytes_int8: int = 0
    feeds: int = 0
    observed_forward: bool = False        # ranges from the SmoothQuant pass, not ORT's calibrator

    def nodes(self) -> list[str]:
        return [t.node for t in self.targets if t.layer not in self.kept_fp16]

    def excluded_nodes(self) -> list[str]:
        return [t.node for t in self.targets if t.layer in self.kept_fp16]


def initializer_bytes(proto: onnx.ModelProto, *, as_fp16: bool = False) -> int:
    """Bytes of a graph's initializers (``as_fp16``: float tensors counted at 2 bytes, the fp16 export)."""
    size = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.INT8: 1, TensorProto.INT32: 4,
            TensorProto.INT64: 8, TensorProto.UINT8: 1}
    total = 0
    for t in proto.graph.initializer:
        b = size.get(t.data_type, 4)
        if as_fp16 and t.data_type == TensorProto.FLOAT:
            b = 2
        total += int(np.prod(t.dims)) * b
    return total


def _trace(state, graph: str, tmp: Path) -> onnx.ModelProto:
    from medlite.memory import modules_idle_for, release_memory, weights_on_disk
    from medlite.export.graphs import decoder_onnx_from_model, vision_onnx_from_model

    release_memory()   # SmoothQuant's / the previous graph's freed peak would stack on the trace's
    model = state.model.model
    meta = {"medlite.graph": graph}
    # what the graph never runs is parked while the exporter holds its own copy of what it does
    # (full size: the fp32 decoder, 4.4 GB, during the vision trace; the tower during the decoder's)
    with weights_on_disk(modules_idle_for(model, graph), folder=tmp):
        if graph == "vision":
            return vision_onnx_from_model(model, image_size=int(model.config.vision_config.image_size), opset=17,
                                          metadata=meta, tmp_root=tmp / "trace")
        return decoder_onnx_from_model(model, opset=17, metadata=meta, tmp_root=tmp / "trace")


def _feeds(state, graph: str, samples: list, *, batch_size: int = 8):
    from medlite.compress.int8.calib_feeds import decoder_feeds, vision_feeds
    from medlite.export.graphs import text_dims

    loop = state.forward_loop(samples=samples, batch_size=batch_size, description=f"int8 {graph} feeds")
    if graph == "vision":
        return vision_feeds(loop, batch_size=batch_size)
    return decoder_feeds(loop, state.model.model, text_dims(state.model.model), batch_size=batch_size)


def feed_rows(fp32: Path, tensors: set, tokens: int, *, cap: int = 8, budget: int = FEED_BYTES) -> int:
    """Rows per calibration feed, so the activations ONNX Runtime's calibrator returns for one feed
    (every calibrated tensor at once, fp32) stay under ``budget`` bytes; at most ``cap``.

    Measured on the full-size shape (benchmarks/int8_full_size.py, per-phase RSS): 8 rows per feed
    made the decoder's calibration the build's peak (15.0 GB; ~0.8 GB of activations per row of ~800
    tokens). The demo model stays at ``cap`` (well under a MB per row), so its ranges are unchanged.
    """
    proto = onnx.load(str(fp32), load_external_data=False)
    inits = {t.name: t for t in proto.graph.initializer}
    width = {}
    for n in proto.graph.node:
        if len(n.input) > 1 and n.input[0] in tensors and n.input[1] in inits:
            dims = list(inits[n.input[1]].dims)
            width[n.input[0]] = dims[0] if n.op_type == "MatMul" else int(np.prod(dims[1:]))
    per_row = 4 * max(tokens, 1) * sum(width.values())
    return int(max(1, min(cap, budget // max(per_row, 1))))


def _gate(state, graph: str, opts, n_graphs: int):
    """The held-out gate of one graph: the check stage's thresholds, and the KL target shared by the graphs."""
    from medlite.compress.int8.sensitivity import Gate

    share = opts.sensitivity_max_kl / max(n_graphs, 1)
    check = state.recipe.stage_with("gate") if state.recipe is not None else None
    if check is None:
        return Gate(min_cosine=0.999 if graph == "vision" else None, max_kl=share, min_top1=0.995)
    kl = share if check.max_mean_kl is None else min(share, check.max_mean_kl)
    return Gate(min_cosine=check.min_vision_cosine if graph == "vision" else None, max_kl=kl,
                min_top1=check.min_agreement)


def quantized_proto(fp32_path: Path, out_dir: Path, ranges_path: Path, nodes, *, method: str) -> onnx.ModelProto:
    """Q/DQ on ``nodes`` + fp16 storage of the other float weights; external data staged in ``out_dir``."""
    from medlite.export.files import EMBED_TABLE_NAME

    out_dir.mkdir(parents=True, exist_ok=True)
    q = Q.quantize_graph(fp32_path, out_dir / "q.onnx", ranges_path, nodes, method=method)
    proto = Q.load_staged(q)
    Q.float_weights_to_fp16(proto, out_dir / "fp16_weights.bin", keep=[EMBED_TABLE_NAME])
    return proto


def _heldout(state, graph: str, fp32: Path, heldout: list):
    """The held-out reference of one graph: the vision graph through the whole VLM's answer token, the
    decoder on its prefill feeds (both: first-answer-token KL and top-1 vs the fp32 graph)."""
    from medlite.compress.int8.answer_heldout import VisionAnswerHeldOut
    from medlite.compress.int8.sensitivity import HeldOut

    if graph == "vision":
        return VisionAnswerHeldOut(fp32, state.forward_loop(samples=heldout, description="int8 vision held-out"),
                                   state.model.model)
    return HeldOut(graph, fp32, list(_feeds(state, graph, heldout)))


def _calibrate(state, graph: str, opts, samples: list, choice: GraphChoice, fp32: Path, ranges: Path, tmp: Path,
               fr=None) -> tuple[int, bool]:
    """Write ``graph``'s static ranges to ``ranges``: from the SmoothQuant pass's observation (``fr``),
    else ONNX Runtime's calibrator over the traced graph. Returns (feeds or pairs/images used, whether
    the ranges are the forward observation)."""
    names = {t.node for t in choice.targets}
    nodes = {n.name: n.input[0] for n in onnx.load(str(fp32), load_external_data=False).graph.node if n.name in names}
    missing = fr.write(graph, nodes, ranges) if fr is not None else []
    if fr is not None and not missing:
        return fr.samples[graph], True
    if missing:
        state.ctx.warn(f"int8 {graph}: no forward observation of {missing[:3]}; ranges from ONNX Runtime's calibrator")
    tensors = set(nodes.values())
    image_tokens = int(getattr(state.model, "num_image_tokens", 0) or 0)
    rows = feed_rows(fp32, tensors, image_tokens + (PROMPT_TEXT_TOKENS if graph == "decoder" else 0))
    with _parked(state, tmp):     # the feeds need only the vision tower, projector and embeddings
        return Q.calibrate_ranges(fp32, _feeds(state, graph, samples, batch_size=rows), ranges,
                                  method=opts.activation_calibration, percentile=opts.percentile,
                                  work_dir=tmp / graph, tensors=tensors), False


def _choose(state, graph: str, opts, samples: list, tmp: Path, n_graphs: int = 1, fr=None) -> GraphChoice:
    """Trace, calibrate and (optionally) run the sensitivity fallback for one graph."""
    from medlite.compress.int8.sensitivity import choose_fallback

    ctx = state.ctx
    proto = _trace(state, graph, tmp)
    choice = GraphChoice(graph, Q.quant_targets(proto, graph, lm_head=(opts.lm_head == "int8")))
    choice.bytes_fp16 = initializer_bytes(proto, as_fp16=True)
    fp32 = Q.save_for_ort(proto, tmp / graph / "fp32.onnx")
    del proto
    ranges = tmp / graph / "ranges.json"
    choice.feeds, choice.observed_forward = _calibrate(state, graph, opts, samples, choice, fp32, ranges, tmp, fr)
    choice.ranges = json.loads(ranges.read_text())
    layers = list(dict.fromkeys(t.layer for t in choice.targets))
    # the calibration set's one subset rule (the same rows as every stage that asks for this many)
    heldout = state.calibration.heldout_subset(opts.sensitivity_rows) if state.calibration is not None else []
    step = [0]

    def measure(excluded) -> object:
        step[0] += 1
        d = tmp / graph / f"m{step[0]}"
        nodes = [t.node for t in choice.targets if t.layer not in excluded]
        p = Q.save_for_ort(quantized_proto(fp32, d / "staged", ranges, nodes, method=opts.activation_calibration),
                           d / "q_loadable.onnx")
        m = ref.metric(p)
        shutil.rmtree(d, ignore_errors=True)
        return m

    if heldout and opts.sensitivity:
        ref = _heldout(state, graph, fp32, heldout)
        choice.fallback = choose_fallback(layers, measure, _gate(state, graph, opts, n_graphs),
                                          max_fp16=opts.max_fp16_layers, confidence=opts.sensitivity_confidence, ctx=ctx)
        choice.kept_fp16 = list(choice.fallback.kept_fp16)
    elif opts.sensitivity:
        ctx.warn(f"int8 {graph}: the calibration set has no held-out slice: no sensitivity pass, every layer INT8")
    # sensitivity off: no held-out run at all (on the full-size model its reference alone costs
    # > 20 min on 2 cores); the check stage still gates the artifact
    with _parked(state, tmp):
        final = quantized_proto(fp32, tmp / graph / "final", ranges, choice.nodes(), method=opts.activation_calibration)
        choice.bytes_int8 = initializer_bytes(final)
        del final
    return choice


def _parked(state, folder: Optional[Path]):
    """The working model's decoder blocks (and untied lm_head) parked on disk while ONNX Runtime
    holds a copy of the traced graph (:mod:`medlite.memory`; full-size peak RSS)."""
    from medlite.memory import idle_decoder_modules, weights_on_disk

    model = state.model.model
    return weights_on_disk(idle_decoder_modules(model), keep=[model.get_input_embeddings()], folder=folder)


def int8_qdq_pass(choice: GraphChoice, *, method: str):
    """The graph pass for ``choice.graph``: static Q/DQ with the stage's ranges (a ``GraphPass``)."""

    def int8_qdq_onnx_from_onnx(proto: onnx.ModelProto, pctx) -> onnx.ModelProto:
        tmp = Path(pctx.tmp_dir or tempfile.mkdtemp(prefix="medlite-int8-")) / f"int8-{choice.graph}"
        fp32 = Q.save_for_ort(proto, tmp / "fp32.onnx")
        ranges = tmp / "ranges.json"
        ranges.write_text(json.dumps(choice.ranges))
        # the traced proto's weights are now copied to disk: drop them from the caller's proto too
        # (the export reassigns it to this pass's result), so quantize_static's in-memory copy of
        # the fp32 graph does not stack on them
        del proto.graph.initializer[:]
        names = {n for node in onnx.load(str(fp32), load_external_data=False).graph.node
                 for n in list(node.input) + list(node.output)}
        missing = [n for n in json.loads(ranges.read_text()).get("data", {}) if n not in names][:3]
        if missing and getattr(pctx, "ctx", None) is not None:
            pctx.ctx.warn(f"int8 {choice.graph}: calibrated tensors {missing} are not in the exported graph; "
                          "their activations are quantized with ONNX Runtime's defaults")
        state = getattr(pctx, "state", None)
        with (_parked(state, tmp) if getattr(state, "model", None) is not None else contextlib.nullcontext()):
            return quantized_proto(fp32, tmp / "staged", ranges, choice.nodes(), method=method)

    return int8_qdq_onnx_from_onnx


def _record(choice: GraphChoice, opts, smooth) -> dict:
    """The graph's quantization record (medlite_runtime.json and the manifest)."""
    rec = {"scheme": "int8-static-qdq", "description": SCHEME, "precision": "int8",
           "activation_calibration": opts.activation_calibration,
           "weights": "int8 per-channel symmetric (output channel)", "activations": "int8 per-tensor static symmetric",
           "float_weights": f"fp16 initializers + Cast to fp32 (>= {Q.FP16_MIN_ELEMENTS} elements)",
           "quantized_nodes": len(choice.nodes()), "excluded_nodes": choice.excluded_nodes(),
           "kept_fp16_layers": list(choice.kept_fp16)}
    if opts.activation_calibration == "percentile":
        rec["percentile"] = opts.percentile
    if opts.activation_calibration == "minmax":
        rec["minmax_ranges"] = ("observed during the SmoothQuant pass (module inputs / smoothing factors)"
                                if choice.observed_forward else "ONNX Runtime MinMax calibrator on the traced graph")
    if choice.graph == "decoder":
        rec["lm_head"] = opts.lm_head
        rec["smoothquant_alpha"] = smooth.alpha if smooth is not None else None
    if opts.smooth_extra:
        rec["smooth_extra"] = list(opts.smooth_extra)
    return rec


def _component(choice: GraphChoice) -> dict:
    fb = choice.fallback
    scores = fb.scores if fb is not None else {}
    kept = [{"layer": k, "score": scores.get(k), "why": "most sensitive on the held-out slice; kept fp16 until "
             "the gate held"} for k in choice.kept_fp16]
    out = {"precision": "int8", "bytes_before": choice.bytes_fp16, "bytes_after": choice.bytes_int8,
           "ratio_vs_fp16": round(choice.bytes_int8 / max(choice.bytes_fp16, 1), 4),
           "int8_nodes": len(choice.nodes()), "kept_fp16": kept, "calibration_feeds": choice.feeds}
    if fb is not None:
        out["sensitivity"] = fb.to_dict()
    return out


def _report(choices: dict, smooth, calib_info: dict, opts) -> list[str]:
    lines = [f"**INT8** ({opts.activation_calibration} activation calibration"
             + (f", SmoothQuant alpha {smooth.alpha}" if smooth else "") + ")", "",
             f"Calibration: {calib_info['n_used']} pairs, {calib_info.get('counts_by_modality')}, "
             f"hash `{str(calib_info.get('content_hash'))[:12]}`; held-out slice {calib_info['n_heldout']} pairs.", "",
             "| graph | precision | bytes fp16 export | bytes int8 | ratio | int8 nodes | kept fp16 (score) | held-out |",
             "|---|---|---|---|---|---|---|---|"]
    for g, c in choices.items():
        kept = ", ".join(f"{k} ({c.fallback.scores.get(k, float('nan')):.3g})" for k in c.kept_fp16) or "none"
        m = c.fallback.metric_final.to_dict() if c.fallback else {}
        lines.append(f"| {g} | int8 | {c.bytes_fp16:,} | {c.bytes_int8:,} | {c.bytes_int8 / max(c.bytes_fp16, 1):.3f} "
                     f"| {len(c.nodes())} | {kept} | {m} |")
    return lines


def apply_int8(state, index: int, opts) -> StageResult:
    """INT8 for TensorRT 8.5 on the working model and the export plan (see the module docstring)."""
    ctx = state.ctx
    graphs = [g for g, on in (("vision", opts.vision == "int8"), ("decoder", opts.llm == "w8a8")) if on]
    if not graphs:
        return StageResult(summary="int8: nothing to do (vision fp16, llm not w8a8)")
    t0 = time.perf_counter()
    import torch

    if next(state.model.model.parameters()).dtype != torch.float32:
        # SmoothQuant statistics, the traced graphs and their ranges are fp32 (the Q/DQ graphs are fp32-based)
        ctx.warn("int8: the working model is not fp32; converting it to fp32 for calibration and the Q/DQ graphs")
        state.model.model.float()
    samples = state.calibration.subset(opts.samples) if state.calibration is not None else []
    fr = None
    if opts.activation_calibration == "minmax" and opts.minmax_ranges == "forward":
        from medlite.compress.int8.forward_ranges import ForwardRanges

        fr = ForwardRanges(state.model.model, graphs, lm_head=opts.lm_head == "int8")
    from medlite.devices import PeakMemory, is_cpu, placed, record_peaks, to_host

    peaks = PeakMemory(getattr(state, "device", None))
    # SmoothQuant statistics (and the forward ranges observed in the same passes) on the build's device;
    # the weights go back to the host before the ONNX side (traces, ranges, feeds) runs. CPU: no-op.
    with placed(state.model.model, peaks.device), peaks.phase("smoothquant"):
        smooth, vsmooth, extra = smooth_for_int8(state, opts, graphs, samples, fr)
    note = ""
    if not is_cpu(getattr(state, "device", None)):
        to_host([fr, smooth, vsmooth, extra])
        note = record_peaks(state, peaks, f"quantize[{index}] ")
    state.timings[f"quantize[{index}] int8 smoothquant"] = round(time.perf_counter() - t0, 2)
    choices: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="medlite-int8-", dir=ctx.cache_dir if ctx.cache_dir.is_dir() else None))
    try:
        for g in graphs:
            t1 = time.perf_counter()
            choices[g] = _choose(state, g, opts, samples, tmp, len(graphs), fr)
            state.timings[f"quantize[{index}] int8 {g}"] = round(time.perf_counter() - t1, 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for g, c in choices.items():
        plan = state.export_plan.graph(g)
        plan.precision = "fp32"
        plan.passes.append((PASS_NAME, int8_qdq_pass(c, method=opts.activation_calibration)))
        plan.quantization = _record(c, opts, smooth)
    cal = state.calibration
    calib_info = {"content_hash": getattr(cal, "content_hash", None), "n_used": len(samples),
                  "n_heldout": len(getattr(cal, "heldout", []) or []),
                  "counts_by_modality": dict(sorted(Counter(s.modality for s in samples).items())),
                  "modalities": "image+question pairs (real image tokens)"}
    manifest = {"method": SCHEME, "activation_calibration": opts.activation_calibration,
                "smoothquant": smooth.to_dict() if smooth else None,
                "smoothquant_vision": vsmooth.to_dict() if vsmooth else None, "calibration": calib_info,
                **({"smoothquant_no_norm_inputs": extra.to_dict()} if extra else {}),
                "components": {g: _component(c) for g, c in choices.items()}}
    before = sum(c.bytes_fp16 for c in choices.values())
    after = sum(c.bytes_int8 for c in choices.values())
    kept = sum(len(c.kept_fp16) for c in choices.values())
    ok = all(c.fallback is None or c.fallback.gate_holds for c in choices.values())
    state.timings[f"quantize[{index}] int8"] = round(time.perf_counter() - t0, 2)
    summary = (f"int8 {'+'.join(graphs)}: {after / max(before, 1):.2f}x the fp16 bytes, "
               f"{sum(len(c.nodes()) for c in choices.values())} int8 nodes, {kept} layer(s) kept fp16"
               + ("" if ok else " (held-out gate still fails)"))
    return StageResult(summary=summary, changed=[f"{g}: int8" for g in graphs] + (["llm: smoothquant"] if smooth else []),
                       bytes_before=before, bytes_after=after, manifest=manifest, note=note,
                       report=_report(choices, smooth, calib_info, opts))


__all__ = ["GraphChoice", "PASS_NAME", "apply_int8", "feed_rows", "initializer_bytes", "int8_qdq_pass",
           "quantized_proto"]
