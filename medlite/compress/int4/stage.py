"""The quantize stage's ``llm: w4a16`` part: llm-compressor GPTQ / AWQ / RTN → MatMulNBits decoder.

:func:`apply_w4a16` quantizes the working model's language model in place (calibrated through the
whole VLM with the framework's forward loop), packs the quantizer's integers, scales and zero
points layer by layer and installs them in the working model as
:class:`~medlite.compress.int4.swap.MatMulNBitsLinear` modules (the fp32 weights are dropped: the
working model holds the packed bytes only, and its eager forward gives the fake-quant numbers). It
registers on ``state.export_plan.graph("decoder")`` the module swap (a no-op for layers already
installed) that makes the decoder export emit ``com.microsoft::MatMulNBits`` with exactly those
tensors. The decoder graph is marked ONNX-Runtime-only: TensorRT 8.5 has no INT4.
"""
from __future__ import annotations

from typing import Optional

from medlite.compress.int4.rules import INT4_RUNTIME_REASON

FORMAT = "com.microsoft.MatMulNBits"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("llmcompressor", "compressed-tensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover - llmcompressor always brings both
            out[pkg] = None
    return out


def llmc_options(opts):
    """The recipe's quantize options → :class:`~medlite.compress.int4.llmc.LlmcOptions`."""
    from medlite.compress.int4.llmc import LlmcOptions

    return LlmcOptions(algorithm=opts.algorithm, group_size=int(opts.group_size), symmetric=bool(opts.symmetric),
                       act_order=bool(opts.act_order), lm_head=opts.lm_head)


def pack_record(r) -> tuple:
    """One :class:`~medlite.compress.int4.records.QuantizedLinear` → ``(PackedNBits, bias or None)``."""
    from medlite.compress.int4.pack import pack_matmul_nbits

    return (pack_matmul_nbits(r.qweight.numpy(), r.scales.numpy(), r.zero_points.numpy(), bits=r.bits,
                              block_size=r.group_size, g_idx=None if r.g_idx is None else r.g_idx.numpy()),
            None if r.bias is None else r.bias.numpy())


def pack_records(records: dict) -> dict:
    """``{name: QuantizedLinear}`` → ``{name: (PackedNBits, bias)}`` for :func:`matmul_nbits_swap`."""
    return {n: pack_record(r) for n, r in records.items()}


def packing_installer(model):
    """A ``consume`` for :func:`~medlite.compress.int4.llmc.quantize_language_model`: pack each record and
    install its :class:`~medlite.compress.int4.swap.MatMulNBitsLinear` in the working model for good.

    The fp32 weight and the record's integers are dropped layer by layer, so the working model ends
    with the packed bytes only (full size: 4.4 GB of language-model weights → 0.55 GB); its eager
    forward dequantizes on the fly with the quantizer's numbers (the same as the fake-quant weights).
    """
    from medlite.compress.int4.swap import install_matmul_nbits
    from medlite.memory import release_memory

    def consume(name: str, rec) -> tuple:
        packed = pack_record(rec)
        del rec
        install_matmul_nbits(model, name, *packed)
        # hand the old weight back to the OS now: glibc keeps freed heap mapped, and without this the
        # full-size build's RSS grew while the layers shrank (peak 9.1 GB in this phase, measured)
        release_memory()
        return packed

    return consume


ACCURACY_LEVEL = {"fp32": 0, "int8": 4}   # MatMulNBits accuracy_level per QuantizeOptions.int4_compute


def quantization_record(opts, packed: dict, samples: int) -> dict:
    """The decoder's quantization record (medlite_runtime.json, manifest): deterministic facts only.

    ``packed``: ``{name: (PackedNBits, bias)}`` of every quantized layer."""
    bits = sorted({p.bits for p, _ in packed.values()})
    return {"method": "w4a16", "format": FORMAT, "algorithm": opts.algorithm, "group_size": int(opts.group_size),
            "symmetric": bool(opts.symmetric), "act_order": bool(opts.act_order and opts.algorithm == "gptq"),
            "lm_head": opts.lm_head, "lm_head_algorithm": _head_algorithm(opts), "bits": bits, "layers": len(packed),
            "packed_bytes": int(sum(p.nbytes() for p, _ in packed.values())),
            "calibration_samples": int(samples), "libraries": _versions(),
            "compute": getattr(opts, "int4_compute", "fp32"),
            "accuracy_level": ACCURACY_LEVEL[getattr(opts, "int4_compute", "fp32")]}


def accuracy_level_pass(level: int):
    """A graph pass setting ``accuracy_level`` on every MatMulNBits node (ONNX Runtime's compute type:
    0 = unset, fp32 compute on the dequantized weights; 4 = int8 compute, activations quantized per block)."""

    def matmulnbits_accuracy_onnx_from_onnx(proto, pctx):
        import onnx

        for node in proto.graph.node:
            if node.op_type == "MatMulNBits":
                kept = [a for a in node.attribute if a.name != "accuracy_level"]
                del node.attribute[:]
                node.attribute.extend(kept + [onnx.helper.make_attribute("accuracy_level", int(level))])
        return proto

    return matmulnbits_accuracy_onnx_from_onnx


def apply_w4a16(state, index: int, opts):
    """Quantize ``state.model``'s language model to W4A16 and plan its MatMulNBits export.

    Returns a :class:`~medlite.pipeline.contract.StageResult`. Only the language model's Linear layers
    (and ``lm_head`` when ``opts.lm_head`` is int4/int8) change; the vision tower and projector are
    never touched.
    """
    from medlite.pipeline.contract import ONNXRUNTIME, StageResult
    from medlite.compress.int4.llmc import quantize_language_model
    from medlite.compress.int4.swap import matmul_nbits_swap

    ctx = state.ctx
    # the calibration set's one subset rule: the same rows as every stage that asks for opts.samples
    samples = state.calibration.subset(opts.samples) if state.calibration is not None else None
    loop = state.forward_loop(samples=samples, description=f"{opts.algorithm.upper()} calibration")
    model = state.model.model
    before = sum(int(model.get_submodule(n).weight.numel()) * model.get_submodule(n).weight.element_size()
                 for n in _target_names(model, opts))
    # each layer is packed and installed as a MatMulNBits module as soon as it is read: the working
    # model drops its fp32 language-model weights (the export traces the packed layers directly)
    from medlite.compress.int4.llmc import gpu_estimate
    from medlite.devices import PeakMemory, check_fits, is_cpu, record_peaks

    if not is_cpu(getattr(state, "device", None)):   # before any work: the layer loop must fit the card
        from medlite.checkpoints.generate import prompt_ids

        tokens = max(len(prompt_ids(loop.loaded, s.question)) for s in loop.samples)
        check_fits(state.device, gpu_estimate(model, len(loop), tokens),
                   what=f"{opts.algorithm.upper()} (one decoder layer at a time, {len(loop)} pairs' hidden states)",
                   option=f"set stages[{index}].quantize.samples lower (the hidden states of every pair stay on "
                          "the card), or build with --device cpu")
    peaks = PeakMemory(getattr(state, "device", None))
    with peaks.phase(opts.algorithm):
        packed = quantize_language_model(model, loop, llmc_options(opts), ctx=ctx, consume=packing_installer(model),
                                         device=peaks.device)
    note = record_peaks(state, peaks, f"quantize[{index}] ")
    plan = state.export_plan.graph("decoder")
    plan.swaps.append(("matmul_nbits", matmul_nbits_swap(packed)))
    plan.runtime = ONNXRUNTIME
    plan.runtime_reason = INT4_RUNTIME_REASON
    plan.quantization = quantization_record(opts, packed, len(loop))
    if getattr(opts, "int4_compute", "fp32") != "fp32":
        plan.passes.append(("matmulnbits_accuracy_level", accuracy_level_pass(ACCURACY_LEVEL[opts.int4_compute])))
        ctx.warn(f"int4_compute: {opts.int4_compute} — ONNX Runtime quantizes each {opts.group_size}-element "
                 "activation block to int8 inside MatMulNBits (accuracy_level 4): faster on CPU, not exact W4A16; "
                 "the check stage measures the result")
    after = plan.quantization["packed_bytes"]
    head = "" if opts.lm_head == "fp16" else f", lm_head {opts.lm_head}" + (
        " (round-to-nearest)" if _head_algorithm(opts) == "rtn" and opts.algorithm != "rtn" else "")
    summary = (f"LLM W4A16 {opts.algorithm.upper()} g{opts.group_size} "
               f"{'sym' if opts.symmetric else 'asym'}{head}: {len(packed)} Linear → MatMulNBits, "
               f"{before / 1e6:.1f} → {after / 1e6:.1f} MB · {len(loop)} calibration samples · ONNX Runtime only")
    report = [f"- language model: {len(packed)} Linear layers → `{FORMAT}` ({opts.algorithm}, group "
              f"{opts.group_size}, {'symmetric' if opts.symmetric else 'asymmetric'}"
              f"{', act-order' if opts.act_order and opts.algorithm == 'gptq' else ''}), lm_head {opts.lm_head}"
              f"{'' if opts.lm_head == 'fp16' else ' (' + _head_algorithm(opts) + ')'}",
              f"- calibrated on {len(loop)} image + question pairs through the whole VLM (real image tokens)",
              f"- decoder.onnx runs on ONNX Runtime only: {INT4_RUNTIME_REASON}"]
    return StageResult(summary=summary, changed=sorted(packed), bytes_before=before, bytes_after=after,
                       manifest={"w4a16": plan.quantization}, report=report, note=note)


def _head_algorithm(opts) -> Optional[str]:
    """How lm_head is quantized: None (fp16), or the stage's algorithm — except AWQ, which has no mapping
    into lm_head (llm-compressor switches lm_head off while calibrating), so lm_head is round-to-nearest."""
    if opts.lm_head == "fp16":
        return None
    return "rtn" if opts.algorithm == "awq" else opts.algorithm


def _target_names(model, opts) -> list:
    from medlite.compress.int4.llmc import language_linear_names

    return language_linear_names(model, lm_head=opts.lm_head != "fp16")


__all__ = ["ACCURACY_LEVEL", "FORMAT", "accuracy_level_pass", "apply_w4a16", "llmc_options", "pack_record", "pack_records",
           "packing_installer", "quantization_record"]
