"""Cross-field validation rules of the built-in stages, one function per stage (torch-free).

A rule is ``rules(index, opts, view) -> (errors, warnings)``; an error is ``(loc, message)`` with
``loc`` the YAML path as a tuple (``("stages", 2, "quantize", "group_size")``). ``view`` is a
:class:`RecipeView`. The registry (:mod:`medlite.recipes.registry`) attaches each function to its
stage; :mod:`medlite.recipes.semantics` runs them all in one pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from medlite.opset import opset_problem

# the device bundle's onnxruntime pin (medlite/engines/bundle.py PINS), named in the fused-decoder warning
FUSED_DEVICE_PIN = "1.16.3"
GATE_FIELDS = ("max_closed_acc_drop", "min_agreement", "max_mean_kl", "min_vision_cosine")


@dataclass
class RecipeView:
    """What a rule may look at: the target, every stage with its typed options, the raw data."""

    target: Optional[Any]
    stages: list = field(default_factory=list)      # [(index, name, typed options or None)]
    by_name: dict = field(default_factory=dict)     # name -> (index, typed options or None)
    data: dict = field(default_factory=dict)


def export_rules(index: int, opts, view: RecipeView):
    """opset within the target's TensorRT; the check stage needs every component."""
    errors: list = []
    t = view.target
    problem = opset_problem(opts.opset, max_opset=t.max_opset, tensorrt=t.tensorrt,
                            where=f"on {t.name}") if t is not None else None
    if problem:
        errors.append((("stages", index, "export", "opset"), problem))
    chk = view.by_name.get("check")
    if chk and len(opts.components) < 3:
        errors.append((("stages", index, "export", "components"),
                       f"stages[{chk[0]}].check runs the artifact end to end and needs all three components "
                       f"(vision, embed, decoder); got {', '.join(opts.components)}"))
    quant = view.by_name.get("quantize")
    int4 = bool(quant and quant[1] is not None and getattr(quant[1], "llm", None) == "w4a16")
    warnings: list = []
    if getattr(opts, "decoder_graph", "auto") == "fused" and t is not None and t.trt_precisions:
        if not int4:
            errors.append((("stages", index, "export", "decoder_graph"),
                           f"fused is an ONNX Runtime graph, but on {t.name} the decoder goes to TensorRT "
                           f"{t.tensorrt} (only an llm: w4a16 decoder runs on ONNX Runtime there); use auto or plain"))
        else:
            warnings.append(f"stages[{index}].export.decoder_graph: fused on {t.name} needs an onnxruntime on the "
                            f"device whose GroupQueryAttention takes attention_bias and query_seqlens (1.32 does; "
                            f"1.19.2 and the bundle's pinned {FUSED_DEVICE_PIN} do not) — auto keeps the traced decoder "
                            "there (docs/cpu.md)")
    return errors, warnings


def engines_rules(index: int, opts, view: RecipeView):
    """Precision possible in the target's TensorRT; int8 engines need static Q/DQ from a quantize stage."""
    from medlite.engines.targets import INT4_EXPLANATION

    errors: list = []
    t = view.target
    loc = ("stages", index, "engines", "precision")
    if t is not None and not t.trt_precisions:
        errors.append((("stages", index, "engines"),
                       f"{t.name} has no TensorRT: remove the engines stage (the artifact runs on ONNX Runtime)"))
        return errors, []
    if t is not None and not t.supports_trt(opts.precision):
        why = INT4_EXPLANATION if opts.precision == "int4" else \
            f"TensorRT {t.tensorrt} supports {', '.join(t.trt_precisions)}"
        errors.append((loc, f"{opts.precision} engines are impossible on {t.name}: {why}"))
    if opts.precision == "int8":
        quant = view.by_name.get("quantize")
        q = quant[1] if quant else None
        if quant is None or (q is not None and q.vision != "int8" and q.llm != "w8a8"):
            errors.append((loc, "int8 engines need a quantize stage (vision int8 or llm w8a8) that writes static "
                                "Q/DQ scales: TensorRT 8.5 needs constant scales calibrated on medical images"))
    return errors, []


def quantize_rules(index: int, opts, view: RecipeView):
    """Nothing-to-do, lm_head int4 only with w4a16, and the W4A16 rules (INT4 only through ONNX
    Runtime: :func:`medlite.compress.int4.rules.rules`)."""
    from medlite.compress.int4.rules import rules as int4_rules

    errors: list = []
    loc = ("stages", index, "quantize")
    if not opts.active():
        errors.append((loc, "quantizes nothing: set vision: int8 and/or llm: w8a8 | w4a16"))
    if opts.lm_head == "int4" and opts.llm != "w4a16":
        errors.append((loc + ("lm_head",), "int4 lm_head needs llm: w4a16 (INT4 weight-only runs through "
                                           "ONNX Runtime's MatMulNBits)"))
    e4, w4 = int4_rules(index, opts, view)
    return errors + e4, w4


def check_rules(index: int, opts, view: RecipeView):
    """A check stage whose every gate is null cannot fail: say so."""
    if all(getattr(opts, g) is None for g in GATE_FIELDS):
        return [], [f"stages[{index}].check: every gate is null — metrics are reported but cannot fail"]
    return [], []
