"""The one device-memory model (issue 26 item 5, issue 28): its arithmetic against a hand count, and
plan, the budget check, the engines stage (engines.json, build_engines.sh) and report.md agreeing on
the same export — KV cache counted for targets without an engines stage too."""
from __future__ import annotations

import dataclasses
import json

import pytest

from medlite.recipes.registry import STAGES

from medlite.engines import memory
from medlite.engines.targets import TARGETS
from medlite.recipes import planning
from medlite.recipes.loader import load_recipe

DIMS = memory.ModelDims(num_layers=2, num_kv_heads=2, head_dim=32, hidden_size=128, num_attention_heads=4,
                        intermediate_size=352, vocab_size=641, num_image_tokens=49, max_positions=512,
                        vision_hidden_size=96, vision_intermediate_size=384, vision_num_attention_heads=4,
                        vision_tokens=49)


def test_kv_cache_and_activations_by_hand():
    assert memory.kv_cache_bytes(DIMS, 100, 3, 2) == 2 * 2 * 2 * 32 * 100 * 3 * 2
    # prefill of 10 tokens: fp32 logits 10x641, fp32 scores+probs 4 heads x 10 x 11, fp16 MLP 3x10x352, hidden 4x10x128
    text_only = dataclasses.replace(DIMS, vision_tokens=0)
    want = 10 * 641 * 4 + 2 * 4 * 10 * 11 * 4 + 3 * 10 * 352 * 2 + 4 * 10 * 128 * 2
    assert memory.activation_bytes(text_only, prefill_tokens=10, context_tokens=20, batch=1, bytes_per=2) == want
    # a decode step over a long context: scores over 5000 slots outweigh the 10-token prefill's
    long = memory.activation_bytes(text_only, prefill_tokens=10, context_tokens=5000, batch=2, bytes_per=2)
    assert long == 2 * (want - 2 * 4 * 10 * 11 * 4 + 2 * 4 * 5000 * 4)
    # the tower's 49 patches outweigh a 10-token prompt: scores + probs, fc1 + activation, hidden states
    assert memory.activation_bytes(DIMS, prefill_tokens=10, context_tokens=20, batch=1, bytes_per=2) == (
        2 * 4 * 49 * 49 * 4 + 2 * 49 * 384 * 2 + 4 * 49 * 96 * 2)


def test_estimate_is_four_parts_and_the_reserve_follows_the_runtime():
    trt, cpu = TARGETS["jetson-xavier-agx-32gb"], TARGETS["cpu-x86_64"]
    m = memory.estimate(DIMS, {"a": 1000, "b": 234}, trt, context_tokens=300, prefill_tokens=200, batch=1,
                        kv_bytes=2, act_bytes=2, context_from="test")
    assert list(m.parts()) == ["weights", "KV cache", "activations", "runtime reserve"]
    assert m.weights_bytes == 1234 and m.runtime_reserve_bytes == memory.TRT_RESERVE_BYTES
    assert m.total_bytes == sum(m.parts().values()) and m.usable_bytes == 28_000_000_000 and m.fits
    assert m.line().startswith("6") and " + runtime reserve 600.00 MB) of 28.00 GB usable" in m.line()
    assert memory.runtime_reserve_bytes(cpu) == memory.ORT_RESERVE_BYTES


def _sizes() -> planning.ComponentSizes:
    kv = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 32}
    text = {"hidden_size": 128, "intermediate_size": 352, "num_attention_heads": 4, "num_layers": 2,
            "num_kv_heads": 2, "head_dim": 32, "vocab_size": 641, "max_positions": 512}
    vision = {"hidden_size": 96, "intermediate_size": 384, "num_attention_heads": 4, "num_layers": 2,
              "patch_size": 8, "tokens": 49}
    params = {"vision": 247_000, "projector": 29_000, "embed": 82_000, "lm_head": 82_000, "llm": 430_000}
    return planning.ComponentSizes(params=params, method="test", kv=kv, text=text, num_image_tokens=49, vision=vision)


def _export(folder, files: dict, *, precision: str, quantized: dict, kv_dtype: str) -> dict:
    """A stand-in export whose files have exactly the planned sizes, and its runtime config."""
    graphs = {}
    for name in ("vision", "embed", "decoder"):
        (folder / f"{name}.onnx").write_bytes(b"\0" * files[f"{name}.onnx"])
        q = quantized.get(name)
        graphs[name] = {"file": f"{name}.onnx", "inputs": [], "outputs": [], "precision": "fp32" if q else precision,
                        "runtime": "onnxruntime" if q == "int4" else "tensorrt",
                        "quantization": {"scheme": q} if q else {},
                        # as the export writes it: the embed graph's external data is the table file
                        "data_files": ["embed_tokens.bin"] if name == "embed" else []}
    (folder / "embed_tokens.bin").write_bytes(b"\0" * files["embed_tokens.bin"])
    d = DIMS
    cfg = {"graphs": graphs, "precision": precision, "num_image_tokens": 49, "kv_cache": {"dtype": kv_dtype},
           "embedding_table": {"file": "embed_tokens.bin"},
           "model": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 32, "hidden_size": 128, "vocab_size": 641,
                     "max_position_embeddings": 512, "num_attention_heads": 4, "intermediate_size": 352,
                     "vision_hidden_size": d.vision_hidden_size, "vision_intermediate_size": 384,
                     "vision_num_attention_heads": 4, "vision_tokens": 49}}
    (folder / "medlite_runtime.json").write_text(json.dumps(cfg))
    return cfg


@pytest.mark.parametrize("recipe, quantized, kv_dtype", [
    ("xavier-agx-int8", {"vision": "int8", "decoder": "int8"}, "float32"),
    ("xavier-agx-fp16", {}, "float16"),
    ("cpu-int4", {"decoder": "int4"}, "float32"),
])
def test_plan_budget_engines_and_report_show_one_figure(tmp_path, recipe, quantized, kv_dtype):
    from medlite.pipeline.stages.engines import memory_estimate
    from medlite.report import device_memory, report_md

    r = load_recipe(recipe, check_files=False).recipe
    target = TARGETS[r.target]
    inp = planning.PlanInputs(**vars(_sizes()), recipe=r, target=target)
    for i, entry in enumerate(r.stages):          # the stages' estimates chain, as `medlite plan` runs them
        if STAGES[entry.name].estimate is not None:
            inp = STAGES[entry.name].estimate(i, entry.options, inp)
    exp = r.stage("export")
    files = planning.estimate_files(inp, exp.precision, exp.components, inp.quant)
    planned = planning.plan_memory(inp, files)
    b = planning.budget(planned)
    assert b["total"] == planned.total_bytes and b["parts"]["KV cache"] > 0     # cpu-int4 counted "KV cache 0 B"
    cfg = _export(tmp_path, files, precision=exp.precision, quantized=quantized, kv_dtype=kv_dtype)
    eng = r.stage("engines")
    if eng is not None:
        built = memory_estimate(tmp_path, cfg, eng, target)                    # engines.json, build_engines.sh
        manifest = {"target": {"name": target.name}, "sections": {"engines": {"memory": built}}}
    else:
        built = memory.for_export(tmp_path, cfg, target).to_dict()
        manifest = {"target": {"name": target.name}, "sections": {}}
        assert built["context_tokens"] == 513 and "512 maximum positions" in built["context_from"]
    assert built["parts"] == planned.parts() and built["total_bytes"] == planned.total_bytes
    shown = device_memory(tmp_path, manifest)
    assert shown["line"] == planned.line() == b["line"]
    m = {"model": "m", "recipe": {"name": recipe, "sha256": "0" * 64}, "version": "1", "status": "passed",
         "target": {**target.to_dict()}, "source": {}, "medlite_version": "0", "stages": [], "gates": [],
         "metrics": {}, "packages": {}, "sections": {"export": {"precision": exp.precision, "opset": 17}}}
    assert f"- estimated device memory {planned.line()}; KV cache and activations at" in report_md(m, [], {}, None, shown)
