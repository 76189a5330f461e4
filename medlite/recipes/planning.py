"""``medlite plan``'s arithmetic: parameters per component, expected file bytes, KV cache and the
device memory budget, and each built-in stage's plan function (torch-free).

Parameter counts come from :func:`medlite.checkpoints.headers.inspect_facts`, which reads
``config.json`` and the safetensors headers without torch (no tensor data read, so a 3 GB checkpoint
plans in well under a second).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from medlite.engines.memory import TRT_RESERVE_BYTES

BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "w8a8": 1, "int4": 0.5, "w4a16": 0.5}
# The runtime reserve of a TensorRT target; the device-memory model (weights + KV cache + activations
# + runtime reserve) is medlite.engines.memory, shared with the engines stage and report.md.
CONTEXT_RESERVE_BYTES = TRT_RESERVE_BYTES


@dataclass
class ComponentSizes:
    """Parameters per component of the source model and how they were counted."""

    params: dict
    method: str
    kv: dict = field(default_factory=dict)     # num_layers, num_kv_heads, head_dim
    tied: bool = False                          # lm_head shares the embedding table
    text: dict = field(default_factory=dict)    # hidden_size, intermediate_size, num_attention_heads
    num_image_tokens: int = 0
    vision: dict = field(default_factory=dict)  # hidden_size, intermediate_size, num_attention_heads, tokens


@dataclass
class PlanInputs(ComponentSizes):
    """What a stage's plan function sees: the sizes plus the recipe and the target."""

    recipe: Any = None
    target: Any = None
    quant: dict = field(default_factory=dict)   # component -> precision, set by a quantize stage's estimate
    precision: Optional[str] = None             # float precision of the exported graphs, set by export


def sizes_from_facts(facts) -> ComponentSizes:
    """Parameters per component from :class:`medlite.checkpoints.headers.CheckpointFacts`."""
    t, bd = facts.text, facts.breakdown
    kv = {"num_layers": t["num_hidden_layers"], "num_kv_heads": t["num_key_value_heads"], "head_dim": t["head_dim"]}
    text = {"hidden_size": t["hidden_size"], "intermediate_size": t["intermediate_size"],
            "num_attention_heads": t["num_attention_heads"], "num_layers": t["num_hidden_layers"],
            "num_kv_heads": kv["num_kv_heads"], "head_dim": kv["head_dim"], "vocab_size": t.get("vocab_size", 0),
            "max_positions": t.get("max_position_embeddings", 0)}
    v = facts.vision or {}
    vision = {"hidden_size": int(v.get("hidden_size") or 0), "intermediate_size": int(v.get("intermediate_size") or 0),
              "num_attention_heads": int(v.get("num_attention_heads") or 0),
              "num_layers": int(v.get("num_hidden_layers") or 0), "patch_size": int(v.get("patch_size") or 0),
              "tokens": (int(v["image_size"]) // int(v["patch_size"])) ** 2 if v.get("patch_size") else 0}
    return ComponentSizes(params={"vision": bd["vision_tower"]["params"], "projector": bd["projector"]["params"],
                                  "embed": facts.embed_params, "lm_head": facts.lm_head_params,
                                  "llm": bd["llm"]["params"]},
                          method="checkpoint headers", kv=kv, tied=facts.tied, text=text,
                          num_image_tokens=int(facts.num_image_tokens or 0), vision=vision)


def estimate_files(sizes: ComponentSizes, precision: str, components: list, quant: Optional[dict] = None) -> dict:
    """Estimated bytes of each exported file at ``precision`` (``quant``: component -> precision).

    The token embedding table is stored once in ``embed_tokens.bin`` (read by the embed graph and,
    when tied, by the decoder's head); large graphs put their weights in ``<graph>.onnx.data``.
    """
    from medlite.recipes import file_sizes as fs

    quant = quant or {}
    b = BYTES[precision]
    p = sizes.params
    out = {}
    if "vision" in components:
        out.update(fs.graph_files("vision", fs.vision_bytes(sizes, precision, quant.get("vision"))))
    if "embed" in components or ("decoder" in components and sizes.tied):
        out["embed_tokens.bin"] = int(p["embed"] * b)
    if "embed" in components:
        out["embed.onnx"] = fs.EMBED_GRAPH_BYTES      # a Gather node; the table is the file above
    if "decoder" in components:
        recipe = getattr(sizes, "recipe", None)
        q = recipe.stage("quantize") if recipe is not None else None
        out.update(fs.graph_files("decoder", fs.decoder_bytes(
            sizes, precision, quant.get("llm"), quant.get("lm_head"), group_size=getattr(q, "group_size", 128))))
    return out


def kv_cache_bytes(kv: dict, tokens: int, batch: int = 1, bytes_per: float = 2) -> Optional[int]:
    """Keys + values of every layer for ``tokens`` positions (None when the config is unknown)."""
    if not kv:
        return None
    from medlite.engines.memory import ModelDims, kv_cache_bytes as kv_bytes

    return kv_bytes(ModelDims(kv["num_layers"], kv["num_kv_heads"], kv["head_dim"]), tokens, batch, bytes_per)


def model_dims(sizes: ComponentSizes):
    """The device-memory model's :class:`~medlite.engines.memory.ModelDims` of the planned model."""
    from medlite.engines.memory import ModelDims

    t, v = sizes.text or {}, sizes.vision or {}
    return ModelDims(num_layers=int(sizes.kv.get("num_layers", 0)), num_kv_heads=int(sizes.kv.get("num_kv_heads", 0)),
                     head_dim=int(sizes.kv.get("head_dim", 0)), hidden_size=int(t.get("hidden_size", 0)),
                     num_attention_heads=int(t.get("num_attention_heads", 0)),
                     intermediate_size=int(t.get("intermediate_size", 0)), vocab_size=int(t.get("vocab_size", 0)),
                     num_image_tokens=int(sizes.num_image_tokens), max_positions=int(t.get("max_positions", 0)),
                     vision_hidden_size=int(v.get("hidden_size", 0)),
                     vision_intermediate_size=int(v.get("intermediate_size", 0)),
                     vision_num_attention_heads=int(v.get("num_attention_heads", 0)),
                     vision_tokens=int(v.get("tokens", 0)))


def _resident_weights(files: dict, recipe, quant: dict) -> dict:
    """Planned bytes the runtime holds (the engines stage's rule on the planned files, see
    :func:`medlite.engines.memory.export_weights`)."""
    from medlite.engines.memory import engine_weight_bytes

    eng = recipe.stage("engines") if recipe is not None else None
    if eng is None:
        return {k: int(v) for k, v in files.items() if v and not k.startswith("engines/")}
    exp = recipe.stage("export")
    out = {}
    for name, comp in (("vision", "vision"), ("decoder", "llm")):
        size = sum(int(v or 0) for k, v in files.items() if k.startswith(f"{name}.onnx"))
        q = quant.get(comp)
        out[f"{name}.onnx"] = engine_weight_bytes(
            size, graph_precision="fp32" if q in ("int8", "w8a8") else (exp.precision if exp else "fp16"),
            engine_precision=None if q == "w4a16" else eng.precision, quantized=q is not None)
    if files.get("embed_tokens.bin"):
        out["embed_tokens.bin"] = int(files["embed_tokens.bin"])
    return out


def plan_memory(inp: PlanInputs, files: dict):
    """The device-memory estimate of the plan (:class:`~medlite.engines.memory.DeviceMemory`): the
    engines options' bounds where the recipe has an engines stage, else ONNX Runtime at the decoder's
    maximum positions — the same model the engines stage and report.md use."""
    from medlite.engines import memory

    recipe = inp.recipe
    eng = recipe.stage("engines") if recipe is not None else None
    exp = recipe.stage("export") if recipe is not None else None
    dims = model_dims(inp)
    quant = inp.quant           # set by the quantize stage's estimate (plans chain: pipeline/commands.plan_steps)
    if eng is not None:
        kv = act = 4 if eng.precision == "fp32" else 2
    else:     # ONNX Runtime keeps the cache in the decoder's traced precision (Q/DQ decoders: fp32)
        kv = act = 2 if (exp is not None and exp.precision == "fp16" and quant.get("llm") is None) else 4
    return memory.estimate(dims, _resident_weights(files, recipe, quant), inp.target, kv_bytes=kv, act_bytes=act,
                           **memory.limits(dims, eng))


def budget(mem) -> dict:
    """Device memory at the recipe's limits against the target's usable memory (``mem``: a
    :class:`~medlite.engines.memory.DeviceMemory`)."""
    parts = mem.parts()
    return {"parts": parts, "total": mem.total_bytes, "usable": mem.usable_bytes, "fits": mem.fits,
            "dominant": max(parts, key=parts.get), "line": mem.line(), "context": mem.context_note()}


def budget_error(b: dict, target, where: str) -> Optional[str]:
    """The validation error of an over-budget plan: by how much and which component dominates."""
    from medlite.units import human_bytes

    if b["fits"]:
        return None
    parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in b["parts"].items())
    return (f"{where}: needs {human_bytes(b['total'])} but {target.name} has {human_bytes(b['usable'])} usable "
            f"({human_bytes(b['total'] - b['usable'])} over; {parts}; the {b['dominant']} "
            f"{'dominate' if b['dominant'] == 'activations' else 'dominates'})")


# -- plan functions of the built-in stages ---------------------------------------------------------
def quantize_estimate(index: int, opts, inp: PlanInputs) -> PlanInputs:
    """The sizes after the quantize stage: which components it stores at which precision."""
    import dataclasses

    quant = {k: v for k, v in (("vision", opts.vision), ("llm", opts.llm), ("lm_head", opts.lm_head)) if v != "fp16"}
    return dataclasses.replace(inp, quant={**inp.quant, **quant})


def export_estimate(index: int, opts, inp: PlanInputs) -> PlanInputs:
    """The sizes after the export: the graphs' float precision (what the engines and budget read)."""
    import dataclasses

    return dataclasses.replace(inp, precision=opts.precision)


def export_plan(index: int, opts, inp: PlanInputs) -> dict:
    """Files the export writes and their expected bytes (after quantization, when planned)."""
    quant = inp.quant           # set by the quantize stage's estimate earlier in the chain
    est = estimate_files(inp, opts.precision, opts.components, quant)
    q = f", quantized: {', '.join(f'{k} {v}' for k, v in quant.items())}" if quant else ""
    return {"does": f"({opts.precision}, opset {opts.opset}{q}{_fallback_note(inp, quant)})", "writes": est}


def _fallback_note(inp: PlanInputs, quant: dict) -> str:
    """What the INT8 sensitivity pass can add to the planned Q/DQ graphs (its choice is made in the build)."""
    from medlite.recipes import file_sizes as fs
    from medlite.units import human_bytes

    opts = inp.recipe.stage("quantize") if inp.recipe is not None else None
    graphs = [g for g, c in (("vision", "vision"), ("decoder", "llm")) if quant.get(c) in ("int8", "w8a8")]
    if opts is None or not getattr(opts, "sensitivity", False) or not graphs or not opts.max_fp16_layers:
        return ""
    extra = ", ".join(f"{g}.onnx +{human_bytes(fs.fp16_fallback_bytes(inp, g, opts.max_fp16_layers))}" for g in graphs)
    return (f"; sizes with every matrix int8 — layers the sensitivity pass keeps fp16 add at most {extra} "
            f"(max_fp16_layers {opts.max_fp16_layers} per graph)")


def engines_plan(index: int, opts, inp: PlanInputs) -> dict:
    """The engines bundle and its KV cache at the recipe's limits (the budget: :func:`plan_memory`)."""
    from medlite.units import human_bytes

    tokens = 1 + inp.num_image_tokens + opts.max_prompt_tokens + opts.max_new_tokens
    kv = kv_cache_bytes(inp.kv, tokens, opts.max_batch, 4 if opts.precision == "fp32" else 2) or 0
    return {"does": f"(KV cache at {tokens} tokens × batch {opts.max_batch} ≈ {human_bytes(kv)})",
            "writes": {"engines/build_engines.sh": None, "engines/build_engines.py": None,
                       "engines/engines.json": None}}


def check_plan(index: int, opts, inp: PlanInputs) -> dict:
    """Which split the gates run on."""
    ev = inp.recipe.evaluation
    cap = opts.max_samples or ev.max_samples
    return {"does": f"({ev.dataset} split {ev.split}{f', at most {cap} questions' if cap else ''})"}


def quantize_plan(index: int, opts, inp: PlanInputs) -> dict:
    """Components and their target precision, with the weight bytes before → after."""
    from medlite.units import human_bytes

    p = inp.params
    lines = []
    if opts.vision != "fp16":
        n = p["vision"] + p["projector"]
        lines.append(f"vision {opts.vision}: {human_bytes(n * 2)} → {human_bytes(n * BYTES[opts.vision])}")
    if opts.llm == "w8a8":
        lines.append(f"llm w8a8: {human_bytes(p['llm'] * 2)} → {human_bytes(p['llm'] * BYTES['w8a8'])}")
    if opts.llm == "w4a16":
        from medlite.compress.int4.rules import plan as int4_plan

        lines += int4_plan(index, opts, inp)
    return {"does": "(" + "; ".join(lines) + ")" if lines else ""}
