"""``export.decoder_graph`` (auto | fused | plain): the fused ONNX Runtime decoder is a recipe choice,
refused where the decoder goes to TensorRT, warned about for a Jetson's INT4 decoder (the device's
onnxruntime), shipped in cpu-int4, and invisible in the resolved recipe (and so in the artifact version)
of recipes that do not set it."""
from __future__ import annotations

import textwrap

import pytest

from medlite.errors import RecipeError
from medlite.recipes import load_recipe
from medlite.export.plan import ONNXRUNTIME, TENSORRT, decoder_graph_choice


def _recipe(tmp_path, target: str, stages: str, extra: str = ""):
    p = tmp_path / "r.yaml"
    p.write_text(f"name: t\nversion: 1.0.0\ntarget: {target}\n{extra}stages:\n"
                 + textwrap.indent(textwrap.dedent(stages), "  "))
    return p


def test_fused_on_a_tensorrt_decoder_is_a_validation_error(tmp_path):
    p = _recipe(tmp_path, "jetson-xavier-agx-32gb", "- export: {precision: fp16, decoder_graph: fused}\n")
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    assert any(e.startswith("stages[0].export.decoder_graph: fused is an ONNX Runtime graph, but on "
                            "jetson-xavier-agx-32gb the decoder goes to TensorRT") for e in ei.value.errors), \
        ei.value.errors
    # an INT4 decoder runs on ONNX Runtime on the Jetson too: allowed, with a warning about the device's
    # onnxruntime; a CPU target always runs its decoder on ONNX Runtime
    ok = load_recipe(_recipe(tmp_path, "jetson-xavier-nx-8gb",
                             "- quantize: {llm: w4a16}\n- export: {decoder_graph: fused}\n",
                             "calibration: {dataset: 'builtin:micro-med-vqa', split: train, samples: 8}\n"))
    assert ok.recipe.stage("export").decoder_graph == "fused"
    assert any("decoder_graph: fused on jetson-xavier-nx-8gb needs an onnxruntime on the device" in w
               for w in ok.warnings), ok.warnings
    cpu = _recipe(tmp_path, "cpu-arm64", "- export: {precision: fp32, decoder_graph: fused}\n")
    assert load_recipe(cpu).recipe.stage("export").decoder_graph == "fused"


def test_shipped_recipes_choose_as_documented():
    for name in ("cpu-int4",):
        r = load_recipe(name).recipe
        assert r.stage("export").decoder_graph == "fused", name
        assert r.to_dict()["stages"][[list(s)[0] for s in r.to_dict()["stages"]].index("export")]["export"][
            "decoder_graph"] == "fused"
    for name in ("xavier-agx-fp16", "xavier-agx-int8", "xavier-agx-int8-vision", "xavier-nx-int4"):
        r = load_recipe(name).recipe
        assert r.stage("export").decoder_graph == "auto"
        # the default is not written: the resolved recipe and its hash are what they were before the option
        assert "decoder_graph" not in str(r.to_dict()), name


def test_choice_is_plain_for_every_decoder_tensorrt_builds():
    assert decoder_graph_choice("auto", tensorrt_target=True, decoder_runtime=TENSORRT) == "plain"
    # a Jetson's INT4 decoder: the device's onnxruntime cannot run the fused graph, so auto keeps the traced one
    assert decoder_graph_choice("auto", tensorrt_target=True, decoder_runtime=ONNXRUNTIME) == "plain"
    assert decoder_graph_choice("fused", tensorrt_target=True, decoder_runtime=ONNXRUNTIME) == "fused"
    assert decoder_graph_choice("auto", tensorrt_target=False, decoder_runtime=TENSORRT) == "auto"
    assert decoder_graph_choice("plain", tensorrt_target=False, decoder_runtime=ONNXRUNTIME) == "plain"
    with pytest.raises(ValueError, match="goes to TensorRT"):
        decoder_graph_choice("fused", tensorrt_target=True, decoder_runtime=TENSORRT)
