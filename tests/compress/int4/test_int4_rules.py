"""Validation of W4A16 options (torch-free rules) and the shipped INT4 recipes."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from medlite.compress.int4.rules import INT4_RUNTIME_REASON, packed_bytes, plan, rules
from medlite.engines.targets import TARGETS

ROOT = Path(__file__).resolve().parents[3]


def _opts(**kw):
    base = dict(vision="fp16", llm="w4a16", lm_head="fp16", algorithm="gptq", group_size=128, symmetric=True,
                act_order=False, samples=None)
    return SimpleNamespace(**{**base, **kw})


def _view(target, engines=None):
    by_name = {} if engines is None else {"engines": (3, SimpleNamespace(precision=engines))}
    return SimpleNamespace(target=TARGETS[target], by_name=by_name, data={})


def test_tensorrt_int4_is_rejected_with_the_reason():
    errors, _ = rules(0, _opts(), _view("jetson-xavier-nx-8gb", engines="int4"))
    assert errors and errors[0][0] == ("stages", 3, "engines", "precision")
    assert "TensorRT" in errors[0][1] and "no INT4" in errors[0][1] and "ONNX Runtime" in errors[0][1]


def test_xavier_int4_decoder_is_an_ort_component_warning():
    errors, warnings = rules(0, _opts(), _view("jetson-xavier-nx-8gb", engines="fp16"))
    assert not errors and any(INT4_RUNTIME_REASON in w for w in warnings)


def test_cpu_target_accepts_int4_silently():
    assert rules(0, _opts(), _view("cpu-x86_64")) == ([], [])
    assert rules(0, _opts(), _view("cpu-arm64")) == ([], [])


def test_act_order_is_gptq_only():
    errors, _ = rules(1, _opts(algorithm="awq", act_order=True, symmetric=False), _view("cpu-x86_64"))
    assert errors == [(("stages", 1, "quantize", "act_order"), "act_order is a GPTQ option; algorithm is awq")]


def test_act_order_default_is_not_an_awq_error():
    """act_order defaults to true (GPTQ's 'weight' ordering); only a written ``act_order: true`` is checked."""
    from medlite.recipes.options import QuantizeOptions

    opts = QuantizeOptions(llm="w4a16", algorithm="awq", symmetric=False)
    assert opts.act_order is True
    assert rules(0, opts, _view("cpu-x86_64")) == ([], [])
    errors, _ = rules(0, QuantizeOptions(llm="w4a16", algorithm="awq", symmetric=False, act_order=True),
                      _view("cpu-x86_64"))
    assert [e[0] for e in errors] == [("stages", 0, "quantize", "act_order")]


def test_symmetric_awq_is_warned_about():
    _, warnings = rules(0, _opts(algorithm="awq"), _view("cpu-x86_64"))
    assert len(warnings) == 1 and "symmetric: false" in warnings[0]


def test_awq_with_a_quantized_lm_head_says_it_is_round_to_nearest():
    for head in ("int4", "int8"):
        _, warnings = rules(0, _opts(algorithm="awq", symmetric=False, lm_head=head), _view("cpu-x86_64"))
        assert any(f"lm_head: {head} with awq is round-to-nearest" in w for w in warnings), warnings
    assert rules(0, _opts(algorithm="awq", symmetric=False), _view("cpu-x86_64")) == ([], [])
    assert rules(0, _opts(lm_head="int4"), _view("cpu-x86_64")) == ([], [])


def test_plan_bytes_of_the_full_size_shape():
    sizes = SimpleNamespace(text={"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32,
                                  "num_layers": 22, "num_kv_heads": 4, "head_dim": 64})
    (line,) = plan(0, _opts(), sizes)
    assert "154 Linear → MatMulNBits" in line
    # 4 bits + one fp32 scale and half a byte of zero point per 128 weights.
    assert packed_bytes(5632, 2048, 128) == 2048 * 44 * 64 + 2048 * 44 * 4 + 2048 * 22


def test_shipped_int4_recipes_validate():
    from medlite.recipes import load_recipe

    cpu = load_recipe(str(ROOT / "recipes" / "cpu-int4.yaml"))
    assert cpu.recipe.target == "cpu-x86_64" and cpu.recipe.stage("engines") is None
    assert cpu.recipe.stage("quantize").llm == "w4a16"
    nx = load_recipe(str(ROOT / "recipes" / "xavier-nx-int4.yaml"))
    assert nx.recipe.stage("engines").precision == "fp16"
    assert any("ONNX Runtime" in w for w in nx.warnings)


def test_int8_lm_head_with_w4a16_is_warned_about():
    """MatMulNBits bits=8 is onnxruntime's slow CPU path: the recipe says so, and the CPU recipe avoids it."""
    from medlite.recipes import load_recipe

    _, warnings = rules(0, _opts(lm_head="int8"), _view("cpu-x86_64"))
    assert len(warnings) == 1 and "lm_head: int4" in warnings[0] and "bits=8" in warnings[0]
    assert rules(0, _opts(lm_head="int4"), _view("cpu-x86_64")) == ([], [])
    cpu = load_recipe(str(ROOT / "recipes" / "cpu-int4.yaml"))
    assert cpu.recipe.stage("quantize").lm_head == "int4" and not any("bits=8" in w for w in cpu.warnings)
