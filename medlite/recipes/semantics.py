"""Cross-field recipe rules: stage order, implemented stages, target capabilities, data leakage.

They run on the raw (YAML) data in the same pass as the schema so that every problem is reported
at once; values the schema rejected are skipped here (they already have an error).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from medlite.recipes import registry
from medlite.recipes.schema import OPTION_MODELS

Loc = tuple


def _typed_stages(data: dict) -> list[tuple[int, str, Any]]:
    """``(index, name, typed options or None)`` for every recognisable stage item."""
    out = []
    stages = data.get("stages")
    for i, item in enumerate(stages if isinstance(stages, list) else []):
        if isinstance(item, str):
            item = {item: {}}
        if not (isinstance(item, dict) and len(item) == 1):
            continue
        name, raw = next(iter(item.items()))
        if name not in registry.STAGES:
            continue
        opts = _partial(OPTION_MODELS[name], raw)
        out.append((i, name, opts))
    return out


def _partial(model: type[BaseModel], raw: Any) -> Any:
    """Validate stage options, dropping the keys that fail (their errors are already reported by
    the schema pass) so the remaining valid values still get their cross-field checks.
    Dropped keys fall back to defaults, which are all capability-safe."""
    if not isinstance(raw, dict):
        raw = {}
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        bad = {err["loc"][0] for err in e.errors() if err["loc"]}
        try:
            return model.model_validate({k: v for k, v in raw.items() if k not in bad})
        except ValidationError:
            return None


def semantic_checks(data: dict) -> tuple[list[tuple[Loc, str]], list[str]]:
    """Cross-field rules: stage order, implemented stages, target capabilities, data-set leakage.

    Runs on the raw data so it can report alongside schema errors; values that failed the schema
    are skipped here (they already have an error).
    """
    from medlite import __version__
    from medlite.engines.targets import INT4_EXPLANATION, TARGETS

    errors: list[tuple[Loc, str]] = []
    warnings: list[str] = []
    stages = _typed_stages(data)
    errors += [((), e) for e in registry.order_errors([(i, n) for i, n, _ in stages])]
    for i, name, _ in stages:
        if not registry.STAGES[name].implemented:
            errors.append((("stages", i, name), f"stage '{name}' is not implemented in this version "
                           f"(medlite {__version__}); remove it to build this recipe"))
    target = TARGETS.get(data.get("target")) if isinstance(data.get("target"), str) else None
    by_name = {n: (i, o) for i, n, o in stages}
    if target is not None:
        for i, name, opts in stages:
            if opts is None:
                continue
            if name == "export" and opts.opset > target.max_opset:
                errors.append((("stages", i, "export", "opset"),
                               f"opset {opts.opset} is above {target.max_opset}, the highest ONNX opset "
                               f"TensorRT {target.tensorrt} on {target.name} accepts"))
            if name == "engines" and not target.supports_trt(opts.precision):
                why = INT4_EXPLANATION if opts.precision == "int4" else \
                    f"TensorRT {target.tensorrt} supports {', '.join(target.trt_precisions)}"
                errors.append((("stages", i, "engines", "precision"),
                               f"{opts.precision} engines are impossible on {target.name}: {why}"))
            if name == "quantize" and opts.method == "int4":
                if "engines" in by_name:
                    errors.append((("stages", i, "quantize", "method"),
                                   f"int4 weights cannot go into the TensorRT engines of "
                                   f"stages[{by_name['engines'][0]}].engines: {INT4_EXPLANATION}"))
                else:
                    warnings.append(f"stages[{i}].quantize.method: int4 — {INT4_EXPLANATION}")
    eng = by_name.get("engines")
    if eng and eng[1] is not None and eng[1].precision == "int8":
        quant = by_name.get("quantize")
        if quant is None or (quant[1] is not None and quant[1].method not in ("int8", "w8a8")):
            errors.append((("stages", eng[0], "engines", "precision"),
                           "int8 engines need a quantize stage (method int8 or w8a8) that writes static "
                           "Q/DQ scales: TensorRT 8.5 needs constant scales calibrated on medical images"))
    exp = by_name.get("export")
    if "check" in by_name and exp and exp[1] is not None and len(exp[1].components) < 3:
        errors.append((("stages", exp[0], "export", "components"),
                       f"stages[{by_name['check'][0]}].check runs the artifact end to end and needs all "
                       f"three components (vision, embed, decoder); got {', '.join(exp[1].components)}"))
    chk = by_name.get("check")
    if chk and chk[1] is not None and all(getattr(chk[1], g) is None for g in
                                           ("max_closed_acc_drop", "min_agreement", "max_mean_kl",
                                            "min_vision_cosine")):
        warnings.append(f"stages[{chk[0]}].check: every gate is null — metrics are reported but cannot fail")
    needs = [(i, n) for i, n, _ in stages if registry.STAGES[n].needs_calibration]
    if needs and data.get("calibration") is None:
        i, n = needs[0]
        errors.append((("calibration",), f"required by stages[{i}].{n} (calibrates on medical images)"))
    cal, ev = data.get("calibration"), data.get("evaluation") or {}
    if isinstance(cal, dict) and isinstance(ev, dict):
        cds, eds = cal.get("dataset", "builtin:micro-med-vqa"), ev.get("dataset", "builtin:micro-med-vqa")
        if cds == eds and cal.get("split", "train") == ev.get("split", "test"):
            errors.append((("calibration", "split"),
                           f"same data set and split as evaluation ({cds}, split {ev.get('split', 'test')}): "
                           "the gates must run on held-out data, never on calibration images"))
    return errors, warnings
