"""``export_onnx``: a loaded model → ``vision.onnx``, ``embed.onnx``, ``decoder.onnx``, runtime config, tokenizer."""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import onnx

from medlite.errors import ExportError
from medlite.export.files import (EMBED_TABLE_FILE, EMBED_TABLE_NAME, check_onnx_file,
                                  tie_lm_head_to_table, write_onnx)
from medlite.export.graph_passes import op_counts
from medlite.memory import modules_idle_for, release_memory, weights_on_disk
from medlite.export.graphs import (decoder_onnx_from_model, embed_onnx_from_model, text_dims,
                                   vision_onnx_from_model)
from medlite.export.plan import ONNXRUNTIME, TENSORRT, ExportPlan, PassContext
from medlite.export.precision import PRECISIONS, check_fp32_islands, model_for_precision
from medlite.export.runtime_config import graph_spec_from_onnx, runtime_config_from_loaded
from medlite.export.trt_ops import trt_check_from_onnx
from medlite.fileio import sha256_file
from medlite.opset import export_opset_problem
from medlite.units import human_bytes
from medlite.runtime.config import CONFIG_FILE, GRAPHS

_OWN_FILES = [f"{g}.onnx" for g in GRAPHS] + [f"{g}.onnx.data" for g in GRAPHS] + [
    EMBED_TABLE_FILE, CONFIG_FILE, "tokenizer.json"]


@dataclass
class ExportResult:
    """What an export wrote and what the checks found."""

    out_dir: str
    precision: str
    opset: int
    files: dict[str, dict] = field(default_factory=dict)       # name -> {"bytes", "sha256"}
    ops: dict[str, dict[str, int]] = field(default_factory=dict)
    trt_check: dict[str, dict] = field(default_factory=dict)    # graph -> TrtCheck.to_dict()
    fp32_ops: dict[str, dict] = field(default_factory=dict)     # fp16 only: graph -> island counts
    tied_embeddings: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    trace_notes: list[str] = field(default_factory=list)
    passes: dict[str, list[str]] = field(default_factory=dict)   # graph -> plan passes that ran
    # which decoder was written when the fused one was asked for ("fused" or "auto"): {"graph": "fused",
    # "ops": [...]} or {"graph": "plain", "reason": ...}; empty for the plain request (TensorRT decoders)
    decoder_graph: dict = field(default_factory=dict)

    @property
    def trt_ok(self) -> bool:
        return all(c["ok"] for c in self.trt_check.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["trt_ok"] = self.trt_ok
        return d


def _is_tied(model) -> bool:
    emb = model.model.language_model.get_input_embeddings().weight
    head = model.lm_head.weight
    return emb is head or (emb.data_ptr() == head.data_ptr() and emb.shape == head.shape)


def _rename_table(proto: onnx.ModelProto) -> None:
    """Name the embed graph's Gather table ``embed_tokens.weight`` (it goes to ``embed_tokens.bin``)."""
    gather = next((n for n in proto.graph.node if n.op_type == "Gather"), None)
    if gather is None:
        raise ExportError("embed.onnx: the traced graph has no Gather")
    old = gather.input[0]
    for t in proto.graph.initializer:
        if t.name == old:
            t.name = EMBED_TABLE_NAME
    for n in proto.graph.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = EMBED_TABLE_NAME


DECODER_GRAPHS = ("plain", "fused", "auto")
# graph passes that make sense on the fused decoder too (they only set MatMulNBits attributes)
_FUSED_PASSES = ("matmulnbits_accuracy_level",)
FUSED_REASON = ("fused decoder: com.microsoft GroupQueryAttention / RotaryEmbedding / "
                "SkipSimplifiedLayerNormalization are ONNX Runtime operators")


def _decoder_proto(model, gp, choice: str, common: dict, res: ExportResult, ctx):
    """The traced decoder, or the fused ONNX Runtime one (``choice`` "fused"; "auto": fused where the
    model allows it, else the traced one with the reason recorded and warned about)."""
    if choice == "plain":
        return decoder_onnx_from_model(model, **common)
    from medlite.export.fused_decoder import FUSED_OPS, fused_decoder_onnx_from_model, fused_problem

    problem = fused_problem(model) or next((f"graph pass {n} rewrites the traced decoder" for n, _ in gp.passes
                                            if n not in _FUSED_PASSES), None)
    if problem and choice == "fused":
        raise ExportError(f"decoder.onnx: decoder_graph fused cannot be written for this model: {problem} "
                          "(decoder_graph: auto writes the traced decoder instead)")
    if problem:
        ctx.warn(f"decoder.onnx: the traced (plain) decoder is written, not the fused ONNX Runtime one: {problem}")
        res.decoder_graph = {"graph": "plain", "reason": problem}
        return decoder_onnx_from_model(model, **common)
    res.decoder_graph = {"graph": "fused", "ops": list(FUSED_OPS)}
    if gp.runtime != ONNXRUNTIME:    # a CPU target's fp32/fp16 decoder: contrib ops make it ONNX-Runtime-only
        gp.runtime, gp.runtime_reason = ONNXRUNTIME, FUSED_REASON
    return fused_decoder_onnx_from_model(model, **common)


def _trace(name: str, model, loaded, gp, common: dict, tied: bool, table, swaps, *, decoder_graph: str = "plain",
           res: Optional[ExportResult] = None, ctx=None) -> tuple:
    """Trace one graph with the plan's module swaps applied; returns ``(proto, shared initializer names)``."""
    vcfg = model.config.vision_config
    shared: list[str] = []
    # the modules this graph never runs are parked, so the exporter's copy of what it does run does
    # not stack on them (full-size export peaks, benchmarks/int8_full_size.py: the fp32 decoder,
    # 4.4 GB, during the vision trace; the vision tower during the decoder's). The embed graph's copy
    # is only its table: parking the rest for it would write gigabytes to disk for nothing.
    idle = modules_idle_for(model, name) if name != "embed" else []
    with swaps, weights_on_disk(idle, folder=common.get("tmp_root")):
        if name == "vision":
            proto = vision_onnx_from_model(model, image_size=int(vcfg.image_size), **common)
        elif name == "embed":
            proto = embed_onnx_from_model(model, **common)
            _rename_table(proto)
            shared = [EMBED_TABLE_NAME]
        else:
            proto = _decoder_proto(model, gp, decoder_graph, common, res, ctx)
    if name == "decoder" and tied:
        if not tie_lm_head_to_table(proto, table):
            raise ExportError("decoder.onnx: lm_head is tied to the embeddings but its weight was "
                              "not found in the traced graph")
        shared = [EMBED_TABLE_NAME]
    return proto, shared


def _check_graph(name: str, path: Path, gp, res: ExportResult, trt_summary: dict, allow_trt_issues: bool,
                 ctx) -> str:
    """onnx.checker, op counts, fp32 islands and — for graphs that go to TensorRT — the TensorRT check."""
    check_onnx_file(path)
    skeleton = onnx.load(str(path), load_external_data=False)
    res.ops[name] = op_counts(skeleton)
    if gp.precision == "fp16":
        res.fp32_ops[name] = check_fp32_islands(skeleton, name)
    if gp.runtime != TENSORRT:
        res.trt_check[name] = {"ok": True, "skipped": True, "target": None, "issues": [],
                               "int64_tensors": 0, "reason": gp.runtime_reason}
        trt_summary[name] = {"ok": True, "skipped": True, "runtime": gp.runtime, "reason": gp.runtime_reason}
        return f"ONNX Runtime only ({gp.runtime_reason})"
    trt = trt_check_from_onnx(skeleton)
    res.trt_check[name] = trt.to_dict()
    trt_summary[name] = {"ok": trt.ok, "target": trt.target, "issues": len(trt.issues),
                         "int64_tensors": trt.int64_tensors}
    if not trt.ok:
        msg = f"{path.name} would not parse on TensorRT 8.5:\n{trt.summary()}"
        if not allow_trt_issues:
            raise ExportError(msg)
        ctx.warn(msg)
    return f"TensorRT 8.5 {'ok' if trt.ok else f'{len(trt.issues)} issue(s)'}"


def _export_one(name: str, model, loaded, out: Path, res: ExportResult, specs: dict, trt_summary: dict, *,
                gp, plan, pass_state, tmp_root: Path, tied: bool, table, allow_trt_issues: bool, ctx,
                decoder_graph: str = "plain") -> None:
    """Trace (with swaps), run the plan's graph passes, write and check one graph."""
    t0 = time.perf_counter()
    with ctx.stage(name) as info:
        meta = {"medlite.graph": name, "medlite.precision": gp.precision, "medlite.model": loaded.name}
        if gp.quantization:
            meta["medlite.quantization"] = gp.quantization.get("scheme", "yes")
        common = dict(opset=res.opset, metadata=meta, tmp_root=tmp_root, trace_notes=res.trace_notes)
        proto, shared = _trace(name, model, loaded, gp, common, tied, table, plan.swaps_for(name, model),
                               decoder_graph=decoder_graph, res=res, ctx=ctx)
        for pass_name, fn in gp.passes:
            proto = fn(proto, PassContext(graph=name, ctx=ctx, model=loaded, state=pass_state, tmp_dir=tmp_root))
            res.passes.setdefault(name, []).append(pass_name)
        # writing and checking need no torch weights: park them all, so the writer's and the checker's
        # copies of the graph (a 1.1 GB full-size INT8 decoder is parsed ~twice by onnx.checker) do not
        # stack on the model (full-size export peak, benchmarks/int8_full_size.py)
        with weights_on_disk([model], folder=tmp_root.parent / ".medlite-export-park"):
            written = write_onnx(proto, out / f"{name}.onnx", shared=shared)
            del proto
            shutil.rmtree(tmp_root, ignore_errors=True)   # the exporter's staged weights, now copied
            release_memory()
            path = written[0]
            verdict = _check_graph(name, path, gp, res, trt_summary, allow_trt_issues, ctx)
            skeleton = onnx.load(str(path), load_external_data=False)
        spec = graph_spec_from_onnx(skeleton, path.name, [p.name for p in written[1:]])
        specs[name] = replace(spec, runtime=gp.runtime, runtime_reason=gp.runtime_reason, precision=gp.precision,
                              quantization=dict(gp.quantization),
                              fused=dict(res.decoder_graph) if name == "decoder" and
                              res.decoder_graph.get("graph") == "fused" else {})
        size = sum(p.stat().st_size for p in written)
        info["detail"] = f"→ {path.name} {human_bytes(size)}, {sum(res.ops[name].values())} nodes, {verdict}"
    res.seconds[name] = round(time.perf_counter() - t0, 2)


def _graph_plans(plan: ExportPlan, components: list, precision: str) -> dict:
    """Each component's GraphPlan with its precision resolved (the plan's, else the export's)."""
    plans = {}
    for name in components:
        gp = plan.graph(name)
        gp.precision = gp.precision or precision
        if gp.precision not in PRECISIONS:
            raise ExportError(f"{name}: precision {gp.precision!r} is not one of {', '.join(PRECISIONS)}")
        plans[name] = gp
    return plans


def export_onnx(loaded, out_dir, *, ctx, precision: str = "fp32", opset: int = 17,
                components: Sequence[str] = GRAPHS, allow_trt_issues: bool = False,
                plan: Optional[ExportPlan] = None, pass_state=None, decoder_graph: str = "plain") -> ExportResult:
    """Export ``loaded`` (a ``LoadedModel``) to ONNX graphs plus ``medlite_runtime.json`` and ``tokenizer.json``.

    Composition (``plan``, filled by compress stages; see :mod:`medlite.pipeline.contract`): each graph
    is traced in its own precision with the plan's module swaps applied, then the standard passes
    (folding never removes Q/DQ or custom-domain nodes), then the plan's graph passes, then written
    and checked. Graphs that go to TensorRT are checked against TensorRT 8.5's operator table (a
    graph it would reject raises :class:`ExportError` unless ``allow_trt_issues``); graphs marked
    ONNX-Runtime-only skip that check and say so in the runtime config. fp16 graphs must keep
    normalisation and softmax in fp32 (checked). Output bytes depend only on the model and the
    arguments (two exports give identical files).

    ``decoder_graph``: "plain" (the traced decoder; what TensorRT needs), "fused" (the ONNX Runtime
    decoder of :mod:`medlite.export.fused_decoder`: same interface, contrib operators; an
    :class:`ExportError` when the model has no fused form) or "auto" (fused where possible, else plain
    with the reason in ``ExportResult.decoder_graph`` and a warning). Only for decoders that run on
    ONNX Runtime: the export stage resolves the recipe's choice against the target.
    """
    problem = export_opset_problem(opset)
    if problem:
        raise ExportError(problem)
    if decoder_graph not in DECODER_GRAPHS:
        raise ExportError(f"decoder_graph {decoder_graph!r}: choose from {', '.join(DECODER_GRAPHS)}")
    components = list(dict.fromkeys(components))
    unknown = [c for c in components if c not in GRAPHS]
    if unknown or not components:
        raise ExportError(f"components {unknown or components!r}: choose from {', '.join(GRAPHS)}")
    _check_model(loaded, components)
    plan = plan if plan is not None else ExportPlan()
    plans = _graph_plans(plan, components, precision)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in _OWN_FILES:          # stale files of an earlier export would mix with this one
        (out / name).unlink(missing_ok=True)
    table_prec = plans.get("embed", plans.get("decoder", next(iter(plans.values())))).precision
    base = loaded.model
    tied = _is_tied(base)
    if tied and "decoder" in plans and plans["decoder"].precision != table_prec:
        raise ExportError("the lm_head is tied to the embedding table, so embed and decoder must share a precision "
                          f"(got {table_prec} and {plans['decoder'].precision})")
    dims = text_dims(base)
    table = base.model.language_model.get_input_embeddings().weight.detach().to(PRECISIONS[table_prec]).cpu().numpy()
    res = ExportResult(out_dir=str(out), precision=precision, opset=int(opset), tied_embeddings=tied)
    tmp_root = out / ".medlite-export-tmp"   # the exporter's staging folder (ours; removed after each graph)
    specs, trt_summary, uses_table = {}, {}, False
    try:
        # Largest graph first: the exporter's peak memory is highest for the decoder, and it should
        # not stack on what the vision trace leaves behind (see docs/export.md, full-size benchmark).
        for name in sorted(components, key=("decoder", "vision", "embed").index):
            gp = plans[name]
            # a converted copy holds only what this graph runs, and lives only while it is exported
            model = model_for_precision(loaded, gp.precision, ctx=ctx, graph=name)
            _export_one(name, model, loaded, out, res, specs, trt_summary, gp=gp, plan=plan,
                        pass_state=pass_state, tmp_root=tmp_root, tied=tied, table=table,
                        allow_trt_issues=allow_trt_issues, ctx=ctx, decoder_graph=decoder_graph)
            del model
            uses_table = uses_table or name == "embed" or (name == "decoder" and tied)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
        shutil.rmtree(out / ".medlite-export-park", ignore_errors=True)
    _write_runtime_files(loaded, out, res, specs, trt_summary, dims, table if uses_table else None, tied,
                         kv_precision=plans["decoder"].precision if "decoder" in plans else precision)
    return res


def _check_model(loaded, components: list) -> None:
    vcfg = loaded.model.config.vision_config
    tcfg = loaded.model.config.text_config
    if getattr(tcfg, "use_sliding_window", False) and getattr(tcfg, "sliding_window", None):
        # The decoder graph builds a plain causal mask; a sliding window would be silently ignored.
        raise ExportError(f"text_config.use_sliding_window with sliding_window {tcfg.sliding_window} is not "
                          "supported by the ONNX decoder graph")
    if "vision" in components and int(vcfg.image_size) != int(loaded.image_spec.size):
        raise ExportError(f"image_spec.size {loaded.image_spec.size} differs from the vision tower's image_size "
                          f"{vcfg.image_size}")


def _write_runtime_files(loaded, out: Path, res: ExportResult, specs: dict, trt_summary: dict, dims: dict,
                         table, tied: bool, *, kv_precision: str) -> None:
    loaded.tokenizer.save(str(out / "tokenizer.json"))
    table_info = None
    if table is not None:
        table_info = {"dtype": table.dtype.name, "shape": list(table.shape), "tied_lm_head": tied}
    cfg = runtime_config_from_loaded(loaded, precision=res.precision, opset=res.opset, graphs=specs, dims=dims,
                                     table=table_info, fp32_ops=res.fp32_ops, trt_check=trt_summary,
                                     kv_precision=kv_precision)
    (out / CONFIG_FILE).write_text(cfg.to_json(), encoding="utf-8")
    for name in _OWN_FILES:
        p = out / name
        if p.is_file():
            res.files[name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}


__all__ = ["ExportResult", "export_onnx"]
