"""prune options, rules and plan (torch-free)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from medlite.compress.prune.options import PruneOptions, kept_kv_groups, kept_mlp_channels, plan, rules
from medlite.engines.targets import TARGETS


def _view(target=None, stages=("prune", "distill", "export")):
    return SimpleNamespace(target=target, by_name={n: (i, None) for i, n in enumerate(stages)}, data={})


def test_sparsity_on_volta_is_an_error_that_says_why():
    errors, _ = rules(0, PruneOptions(mlp=0.25, sparsity="2:4"), _view(TARGETS["jetson-xavier-agx-32gb"]))
    (loc, msg), = errors
    assert loc == ("stages", 0, "prune", "sparsity")
    assert "2:4 sparsity on jetson-xavier-agx-32gb" in msg and "no speed-up" in msg and "Volta" in msg
    errors, _ = rules(0, PruneOptions(mlp=0.25, sparsity="unstructured"), _view(None))
    assert errors and "dense ONNX graphs" in errors[0][1]


def test_nothing_to_prune_and_no_distill():
    errors, _ = rules(0, PruneOptions(), _view())
    assert errors[0][0] == ("stages", 0, "prune") and "prunes nothing" in errors[0][1]
    errors, warnings = rules(0, PruneOptions(mlp=0.25), _view(stages=("prune", "export")))
    assert errors == [] and "without a distill stage" in warnings[0]
    errors, warnings = rules(0, PruneOptions(mlp=0.25), _view())
    assert errors == [] and warnings == []


def test_values_are_checked():
    for bad in ({"mlp": 1.0}, {"mlp": -0.1}, {"layers": -1}, {"sparsity": "4:8"}, {"heads": 2}):
        with pytest.raises(ValidationError):
            PruneOptions(**bad)


def test_kept_counts():
    assert kept_mlp_channels(352, 0.25, 8) == 264          # the demo model
    assert kept_mlp_channels(5632, 0.25, 8) == 4224        # TinyLlama
    assert kept_mlp_channels(100, 0.99, 8) == 8            # never below one multiple
    assert kept_kv_groups(2, 0.5) == 1 and kept_kv_groups(4, 0.5) == 2 and kept_kv_groups(1, 0.9) == 1


def test_plan_estimate_equals_the_pruned_model(tiny_path, cctx, calib):
    from medlite.checkpoints import load_model
    from medlite.compress.prune.stage import run
    from compress_state import make_state

    loaded = load_model(tiny_path, ctx=cctx)
    tc = loaded.model.config.text_config
    llm = loaded.param_breakdown()["llm"]["params"]
    sizes = SimpleNamespace(params={"llm": llm}, kv={"num_layers": 2, "num_kv_heads": 2, "head_dim": 16},
                            text={"hidden_size": tc.hidden_size, "intermediate_size": tc.intermediate_size,
                                  "num_attention_heads": 4})
    opts = PruneOptions(mlp=0.25, attention_kv_groups=0.5, layers=1)
    lines = plan(0, opts, sizes)
    run(make_state(cctx, loaded, calib), 0, opts)
    after = loaded.param_breakdown()["llm"]["params"]
    assert f"~{after:,}" in lines[1], lines
    assert "128 → 96" in lines[0] and "2 → 1 groups" in lines[0]
