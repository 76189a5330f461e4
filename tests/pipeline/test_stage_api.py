"""Stage contract v2: a stage declared in this test module through the public API (``@stage``; no
registry internals touched) is validated, planned, ordered and run by ``medlite build``; one that
damages the working model still fails the build at the check stage."""
from __future__ import annotations

import json

import pytest
from pydantic import Field

from medlite.pipeline.contract import StageResult
from medlite.cli import main
from medlite.recipes.base import Closed
from medlite.recipes.registry import STAGES, Capabilities, Order, stage, unregister_stage

CALLS: list = []


def scale_layer(state, index, opts):
    """Multiply decoder layer 0's output projections by ``factor`` (1: unchanged, 0: destroyed)."""
    import torch

    CALLS.append(opts.factor)
    layer = state.model.model.model.language_model.layers[0]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.mul_(opts.factor)
        layer.mlp.down_proj.weight.mul_(opts.factor)
    return StageResult(summary=f"layer 0 scaled by {opts.factor} (test stage)", changed=["language_model.layers.0"])


def scale_plan(index, opts, sizes):
    return [f"scale layer 0 by {opts.factor} (test plan)"]


def scale_rules(index, opts, view):
    errors = [(("stages", index, "scale_layer", "factor"), "must not be negative")] if opts.factor < 0 else []
    return errors, []


class ScaleOptions(Closed):
    factor: float = Field(1.0, description="scale of layer 0's output projections")


@pytest.fixture(scope="module", autouse=True)
def _registered():
    # The public decorator, applied while this module's tests run (at import time it would leak the
    # stage into every other test module collected in the same session).
    stage("scale_layer", summary="test stage: scale one decoder layer", runner=scale_layer, plan=scale_plan,
          rules=scale_rules, caps=Capabilities(changes_weights=True),
          order=Order(phase=25, why="the test stage works on the distilled weights"))(ScaleOptions)
    assert "scale_layer" in STAGES
    yield
    unregister_stage("scale_layer")
    assert "scale_layer" not in STAGES


RECIPE = """\
name: api-stage
version: 1.0.0
target: jetson-xavier-agx-32gb
calibration: {{samples: 8}}
evaluation: {{max_samples: 16}}
stages:
{stages}
"""
CHECK = """\
  - check:
      max_closed_acc_drop: null     # a random tiny model has no meaningful accuracy
      min_agreement: null
      max_mean_kl: 0.001
      min_vision_cosine: 0.999
"""


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from medlite.checkpoints.random_ckpt import write_random_checkpoint
    from medlite.context import RunContext

    root = tmp_path_factory.mktemp("ckpt")
    write_random_checkpoint("tiny", root / "tiny", fmt="legacy", ctx=RunContext(cache_dir=root / "cache", quiet=True))
    return root / "tiny"


def _write(tmp_path, stages: str):
    p = tmp_path / "recipe.yaml"
    p.write_text(RECIPE.format(stages=stages))
    return p


def test_validation_reads_the_declared_order_and_rules(tmp_path, capsys):
    bad = _write(tmp_path, "  - export: {precision: fp32}\n  - scale_layer: {factor: -1}\n" + CHECK)
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "stages[1].scale_layer must come after stages[0].export" not in err   # export comes later: fine
    assert "stages[0].export must come after stages[1].scale_layer (scale_layer → export: " \
           "export writes the compressed weights)" in err
    assert "stages[1].scale_layer.factor: must not be negative" in err
    unknown = _write(tmp_path, "  - scale_layers: {}\n  - export: {}\n")
    assert main(["validate", str(unknown)]) == 2
    assert "scale_layers" in capsys.readouterr().err


def test_plan_shows_the_stage(tmp_path, capsys, tiny_ckpt):
    r = _write(tmp_path, "  - scale_layer: {factor: 0.5}\n  - export: {precision: fp32}\n" + CHECK)
    assert main(["plan", str(r), "--model", str(tiny_ckpt), "--vision-tower", str(tiny_ckpt / "vision_tower"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    step = next(s for s in out["stages"] if s["stage"] == "scale_layer")
    assert "scale layer 0 by 0.5 (test plan)" in step["does"]


@pytest.mark.parametrize("factor,passes", [(1.0, True), (0.0, False)])
def test_build_runs_the_stage_and_gates_catch_damage(tmp_path, capsys, tiny_ckpt, factor, passes):
    CALLS.clear()
    r = _write(tmp_path, f"  - scale_layer: {{factor: {factor}}}\n  - export: {{precision: fp32}}\n" + CHECK)
    rc = main(["--quiet", "build", str(r), "--cache-dir", str(tmp_path.parent / "api-cache"), "--model",
               str(tiny_ckpt), "--vision-tower", str(tiny_ckpt / "vision_tower"), "--out", str(tmp_path / "out"),
               "--json"])
    res = json.loads(capsys.readouterr().out)
    assert CALLS == [factor]
    assert (rc == 0) is passes and (res["status"] == "passed") is passes
    line = next(s for s in res["stages"] if s["name"] == "scale_layer")
    assert line["ok"] and f"scaled by {factor}" in line["detail"]
    if not passes:
        assert any(g.startswith("gate mean_kl: ") for g in res["failed_gates"]), res
        assert next(s for s in res["stages"] if s["name"] == "check")["ok"] is False
